"""Test tiers: every test gets one tier marker, from its folder unless the test or its module names one, and the
end of the run prints the time spent per tier, so a slow tier shows where the suite's budget goes.

unit: no model and no subprocess (pure functions, config, parsers).
integration: one process, tiny models in this interpreter (megatron, the trainer's parts, one-process gloo).
multiprocess: launches processes (torchrun worlds, mock SGLang servers, script and command-line runs).
e2e: whole programs run as a user runs them (the examples, sbatch jobs of the tiny example on the local Slurm, the
benchmark scripts at smoke size); outside the default run (pytest.ini), CI runs them as a step of its own (.ci/run).
"""
from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import pytest

TIERS = ("unit", "integration", "multiprocess", "e2e")
TESTS = Path(__file__).resolve().parent
FOLDER_TIER = {
    "algorithms": "unit", "benchmarks": "e2e", "examples": "e2e", "gpu_semantics": "multiprocess",
    "models": "integration", "plan": "integration", "replay": "integration", "rollout": "integration",
    "sglang": "multiprocess", "sglang_live": "e2e", "simulation": "integration", "slurm": "multiprocess",
    "tools": "integration", "training": "integration",
}
"""A top-level file (tests/test_*.py) is a unit test unless it is marked otherwise."""
IMPLIES_MULTIPROCESS = ("distributed", "gpu_semantics")
"""Markers of tests that launch processes: such a test is in the multiprocess tier unless marked e2e."""


def tier_of(item: pytest.Item) -> str:
    """Its own tier marker, else an e2e folder's, else multiprocess if a process-launching marker says so, else its
    folder's tier."""
    for tier in reversed(TIERS):
        if item.get_closest_marker(tier):
            return tier
    parts = Path(str(item.fspath)).resolve().relative_to(TESTS).parts
    folder = FOLDER_TIER.get(parts[0], "unit") if len(parts) > 1 else "unit"
    if folder != "e2e" and any(item.get_closest_marker(name) for name in IMPLIES_MULTIPROCESS):
        return "multiprocess"
    return folder


class TierClock:
    """A pytest plugin: marks each test with its tier (so `-m <tier>` selects one) and sums the tiers' times."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.outcomes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.start = time.monotonic()

    @pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            tier = tier_of(item)
            if not item.get_closest_marker(tier):
                item.add_marker(tier)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        tier = next((t for t in reversed(TIERS) if t in report.keywords), "unit")
        self.seconds[tier] += report.duration
        if report.when == "call" or (report.when == "setup" and not report.passed):
            self.outcomes[tier][report.outcome] += 1

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.seconds:
            return
        terminalreporter.write_sep("=", "time per tier (setup + call + teardown of its tests; tests/tiers.py)")
        for tier in TIERS:
            if tier in self.seconds:
                outcomes = ", ".join(f"{n} {outcome}" for outcome, n in sorted(self.outcomes[tier].items()))
                terminalreporter.write_line(f"{tier:>12}: {self.seconds[tier]:7.1f} s  ({outcomes})")
        wall = time.monotonic() - self.start
        terminalreporter.write_line(f"{'all':>12}: {sum(self.seconds.values()):7.1f} s of tests, {wall:.1f} s wall")


def register(config: pytest.Config) -> None:
    for tier in TIERS:
        config.addinivalue_line("markers", f"{tier}: test tier (tests/tiers.py), from the test's folder unless marked")
    config.pluginmanager.register(TierClock(), "grpo_test_tiers")
