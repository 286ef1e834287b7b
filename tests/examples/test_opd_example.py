"""The OPD example (examples/opd/run.py), shortened: teacher, then the three student arms, and the table. Slow (four
trainer runs)."""
import json

import pytest

from tests.conftest import run_cli


@pytest.mark.slow
def test_quick_opd_example_writes_the_side_by_side_table(tmp_path):
    out = tmp_path / "opd"
    result = run_cli(["examples/opd/run.py", "--quick", "--cache", str(tmp_path.parent / "example_cache"),
                      "--out", str(out)], timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    table = (out / "table.md").read_text()
    for arm in ("opd", "rl", "rl_opd"):
        assert f"| {arm} |" in table
    assert "teacher held-out accuracy" in table
    records = [json.loads(line) for line in (out / "rl_opd" / "metrics.jsonl").read_text().splitlines()]
    assert all("opd/teacher_kl" in r and r["time/teacher"] > 0 for r in records if "time/step" in r)
    assert not any("opd/teacher_kl" in r for r in map(json.loads, (out / "rl" / "metrics.jsonl").read_text().splitlines()))
