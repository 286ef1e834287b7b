"""benchmarks/weight_sync.py runs (mock server, tiny model, one sync per mode) and prints a rate for every mode."""
from __future__ import annotations

import re

from tests.conftest import run_cli


def test_weight_sync_benchmark_prints_every_mode():
    done = run_cli(["benchmarks/weight_sync.py", "--syncs", "1"], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # one row per layout and mode: "  1      tensor     :      1.2 MB/s (0.27 s, 0.001 of copy); ..."
    rates = dict(re.findall(r"^\s*1\s+(export|tensor|distributed|disk)\s*:\s+([\d.]+) MB/s", done.stdout, re.M))
    assert set(rates) == {"export", "tensor", "distributed", "disk"}, done.stdout
    assert all(float(rate) > 0 for rate in rates.values())
