"""The dry run's tests simulate into a cache of their own (shared by this session's tests, never a user's)."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def fresh_plan_cache(tmp_path_factory):
    previous = os.environ.get("GRPO_PLAN_CACHE")
    os.environ["GRPO_PLAN_CACHE"] = str(tmp_path_factory.mktemp("plan_cache"))
    yield
    if previous is None:
        os.environ.pop("GRPO_PLAN_CACHE", None)
    else:
        os.environ["GRPO_PLAN_CACHE"] = previous
