"""The megatron-core fence: setup.py allows exactly the range the start-up check accepts, and this venv is in it."""
from __future__ import annotations

import re

from packaging.specifiers import SpecifierSet

from grpo_megatron.platform import megatron_version
from tests.conftest import REPO


def test_setup_py_range_is_the_start_up_checks_range():
    spec = re.search(r'"megatron-core([^"]+)"', (REPO / "setup.py").read_text()).group(1)
    assert SpecifierSet(spec) == SpecifierSet(f">={megatron_version.MIN_MEGATRON},<{megatron_version.BELOW_MEGATRON}")
    for version in megatron_version.TESTED_MEGATRON_VERSIONS:
        assert version in SpecifierSet(spec)


def test_the_installed_megatron_core_passes_the_check():
    installed = megatron_version.installed_megatron_version()
    assert megatron_version.check_megatron_version() == installed
