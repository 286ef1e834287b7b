"""tools/compare_runs.py on synthetic run directories: outputs, table values, mismatch warnings, errors."""
from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, run_cli

spec = importlib.util.spec_from_file_location("compare_runs", REPO / "tools" / "compare_runs.py")
compare_runs = importlib.util.module_from_spec(spec)
sys.modules["compare_runs"] = compare_runs  # dataclasses look their module up there
spec.loader.exec_module(compare_runs)

GRAD = [1.0, 1.1, 0.9, 1.0, 1.2, 1.0, 9.0, 1.0, float("nan"), 1.1]  # one spike (step 7), one NaN (step 9)
LOSS = [0.01, -0.02, 0.01, -0.01, 0.02, -0.01, 0.01, -0.3, 0.01, -0.01]  # |-0.3| is a spike (step 8)


def make_run(path: Path, loss: str, seed: int, steps: int = 10, clip: float = 0.01, routing: bool = True) -> Path:
    """A run dir as the trainer writes it: config.yaml and one metrics line per step (eval every 5 and at 0)."""
    path.mkdir(parents=True)
    config = {"run_dir": str(path), "algorithm": {"loss": loss, "routing_replay": "none"}, "train": {"seed": seed}}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    lines = [{"step": 0, "eval/accuracy": 0.0}]
    for step in range(1, steps + 1):
        record = {"step": step, "rollout/tokens": 100 + step, "reward/accuracy": step / steps,
                  "train/clip_frac_tokens": clip * step, "train/approx_kl_old": 0.001 * step,
                  "train_rollout/k3_kl": 0.0, "train/grad_norm": GRAD[(step - 1) % len(GRAD)],
                  "train/pg_loss": LOSS[(step - 1) % len(LOSS)],
                  "train/entropy": 1.0, "response/length_mean": 5.0}
        if routing:
            record["routing/agree_old_current"] = 0.9
        if step % 5 == 0:
            record["eval/accuracy"] = step / steps + 0.01 * seed
        lines.append(record)
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return path


def test_plots_and_table_values_match_inputs(tmp_path):
    runs = [make_run(tmp_path / "runs" / arm / f"seed{s}", loss, s, clip=clip)
            for arm, loss, clip in (("grpo", "grpo", 0.001), ("gspo", "gspo", 0.02)) for s in (1, 2)]
    out = tmp_path / "out"
    assert compare_runs.main([*map(str, runs), "--output", str(out), "--target", "0.5"]) == 0
    for panel in ("accuracy", "clip_fraction", "train_rollout", "routing", "grad_norm", "entropy",
                  "response_length", "policy_drift"):
        assert (out / f"{panel}.png").stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    row = summary["runs"][0]
    assert row["run"] == "grpo/seed1" and row["arm"] == "grpo"
    assert row["steps"] == 10 and row["tokens"] == sum(100 + s for s in range(1, 11))
    assert row["final acc"] == pytest.approx(1.01) and row["best acc"] == pytest.approx(1.01)
    assert row["max acc drop"] == 0.0
    assert row["steps to target"] == 5 and row["tokens to target"] == sum(100 + s for s in range(1, 6))
    assert row["loss spikes"] == 1 and row["grad spikes"] == 1 and row["NaN steps"] == 1
    assert row["clip frac (tokens)"] == pytest.approx(statistics.fmean(0.001 * s for s in range(1, 11)))
    assert row["KL old-current"] == pytest.approx(0.0055)
    arms = {a["arm"]: a for a in summary["arms"]}
    assert arms["gspo"]["runs"] == 2 and arms["gspo"]["final acc"] == pytest.approx(1.015)
    assert arms["gspo"]["clip frac / lowest"] == pytest.approx(20.0) and arms["grpo"]["clip frac / lowest"] == 1
    assert arms["grpo"]["grad spikes"] == 2
    assert summary["config_differences"]["algorithm.loss"] == ["grpo", "grpo", "gspo", "gspo"]
    assert "run_dir" not in summary["config_differences"]
    table = (out / "summary.md").read_text()
    assert "| grpo/seed1 | 10 | 1055 | 1.01 | 1.01 | 0 | 5 | 515 | 1 | 1 | 1 | 0.0055 |" in table
    assert "| algorithm.loss | grpo | grpo | gspo | gspo |" in table
    assert not summary["warnings"]


def test_mismatched_runs_warn_and_still_compare(tmp_path):
    long = make_run(tmp_path / "long", "grpo", 1, steps=10)
    short = make_run(tmp_path / "short", "gspo", 1, steps=6, routing=False)
    out = tmp_path / "out"
    with pytest.warns(compare_runs.RunMismatchWarning) as caught:
        assert compare_runs.main([str(long), str(short), "--output", str(out)]) == 0
    messages = " | ".join(str(w.message) for w in caught)
    assert "short lacks 1 metric(s) other runs have: routing/agree_old_current" in messages
    assert "runs end at different steps: long=10, short=6" in messages
    assert (out / "routing.png").exists()
    rows = {r["run"]: r for r in json.loads((out / "summary.json").read_text())["runs"]}
    assert rows["short"]["routing agree old-current"] is None and rows["short"]["steps"] == 6
    assert "## Warnings" in (out / "summary.md").read_text()


@pytest.mark.multiprocess  # the script's real command line
def test_run_dir_without_metrics_is_an_error_naming_it(tmp_path):
    good = make_run(tmp_path / "good", "grpo", 1)
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    result = run_cli(["tools/compare_runs.py", str(good), str(empty), "--output", str(tmp_path / "out")])
    assert result.returncode == 2
    assert f"error: {empty}: no metrics.jsonl" in result.stderr
    assert not (tmp_path / "out").exists()


def test_help_lists_the_definitions(capsys):
    with pytest.raises(SystemExit) as help_exit:
        compare_runs.main(["--help"])
    assert help_exit.value.code == 0
    out = capsys.readouterr().out
    for text in ("--output", "spikes", "--target", "tokens consumed"):
        assert text in out


def test_max_accuracy_drop():
    assert compare_runs.max_drop([0.1, 0.9, 0.3, 0.95, 0.6]) == pytest.approx(0.6)


def test_spike_definition():
    assert compare_runs.count_spikes([1.0] * 5 + [5.1], factor=5.0, window=10) == 1
    assert compare_runs.count_spikes([1.0] * 5 + [-5.1], factor=5.0, window=10) == 1  # magnitudes
    # A converged run: tiny values, then one back at the run's typical size, is not a spike.
    assert compare_runs.count_spikes([2.0] * 10 + [0.01] * 6 + [2.0], factor=5.0, window=10) == 0
    assert compare_runs.count_spikes([1.0] * 5 + [4.9], factor=5.0, window=10) == 0
    assert compare_runs.count_spikes([1.0] * 4 + [50.0], factor=5.0, window=10) == 0  # too little history
    assert compare_runs.count_spikes([1.0, math.nan] * 4 + [9.0], factor=5.0, window=8) == 1  # NaNs skipped
    assert compare_runs.count_spikes([1.0] * 5 + [math.nan, math.inf], factor=5.0, window=10) == 0


def test_step_window_restricts_the_summary(tmp_path):
    run = make_run(tmp_path / "run", "grpo", 1)
    out = tmp_path / "out"
    assert compare_runs.main([str(run), "--output", str(out), "--steps", "2:4"]) == 0
    row = json.loads((out / "summary.json").read_text())["runs"][0]
    assert row["steps"] == 4 and row["tokens"] == sum(100 + s for s in range(1, 5))
    assert row["clip frac (tokens)"] == pytest.approx(0.03)  # 0.01 x mean(2, 3, 4)
    assert compare_runs.main([str(run), "--output", str(out), "--steps", "50:"]) == 2


def add_mismatch_metrics(run: Path, corrected: bool) -> None:
    """The train-vs-rollout and rollout-correction metrics of a run against a separate (bf16) engine."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for record in lines[1:]:
        step = record["step"]
        record.update({"train_rollout/k3_kl": 1e-4 * step, "train_rollout/logprob_abs_diff": 0.01,
                       "train_rollout/ratio_outside_2x": 0.0, "routing/agree_rollout_train": 0.95,
                       "rollout_correction/chi2_token": 2e-4 * step, "rollout_correction/chi2_seq": 1e-3,
                       "rollout_correction/ess_raw": 0.99})
        if corrected:
            record.update({"rollout_correction/ess": 0.995, "rollout_correction/frac_truncated": 0.01 * (step % 2),
                           "rollout_correction/frac_masked": 0.0, "rollout_correction/frac_rejected": 0.0,
                           "rollout_correction/weight_mean": 1.0, "rollout_correction/weight_max": 2.0})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")


def test_mismatch_and_correction_metrics_are_tabled_and_plotted(tmp_path):
    runs = []
    for arm, corrected in (("grpo", False), ("grpo_tis", True)):
        for seed in (1, 2):
            runs.append(make_run(tmp_path / "runs" / arm / f"seed{seed}", "grpo", seed))
            add_mismatch_metrics(runs[-1], corrected)
            if corrected:  # the arms differ in config, as the study's do
                config = yaml.safe_load((runs[-1] / "config.yaml").read_text())
                config["algorithm"]["rollout_correction"] = {"mode": "tis"}
                (runs[-1] / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    with pytest.warns(compare_runs.RunMismatchWarning):  # the uncorrected arm lacks the correction's own metrics
        assert compare_runs.main([*map(str, runs), "--output", str(out)]) == 0
    for panel in ("rollout_correction_divergence", "rollout_correction_ess", "rollout_correction_weights"):
        assert (out / f"{panel}.png").stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["run"]: r for r in summary["runs"]}
    tis, plain = rows["grpo_tis/seed1"], rows["grpo/seed1"]
    assert tis["KL train-rollout (k3)"] == pytest.approx(5.5e-4)
    assert tis["chi2 token"] == pytest.approx(1.1e-3) and tis["chi2 seq"] == pytest.approx(1e-3)
    assert tis["ESS raw"] == pytest.approx(0.99) and tis["ESS corrected"] == pytest.approx(0.995)
    assert tis["frac truncated"] == pytest.approx(0.005) and tis["IS weight max"] == 2.0
    assert tis["routing agree rollout-train"] == pytest.approx(0.95)
    assert plain["ESS raw"] == pytest.approx(0.99) and plain["ESS corrected"] is None
    arms = {a["arm"]: a for a in summary["arms"]}
    assert arms["grpo_tis"]["frac truncated"] == pytest.approx(0.005) and arms["grpo"]["frac truncated"] is None
    table = (out / "summary.md").read_text()
    assert "| chi2 token | chi2 seq | ESS raw | ESS corrected | frac truncated |" in table


def test_mismatch_columns_absent_when_no_run_logged_them(tmp_path):
    runs = [make_run(tmp_path / arm, "grpo", 1) for arm in ("a", "b")]
    out = tmp_path / "out"
    assert compare_runs.main([*map(str, runs), "--output", str(out)]) == 0
    table = (out / "summary.md").read_text()
    assert "chi2 token" not in table and "ESS raw" not in table and "routing agree rollout-train" not in table
    assert not (out / "rollout_correction_ess.png").exists()


def test_server_urls_and_ignored_keys_do_not_split_arms(tmp_path):
    """Runs of one arm handed different SGLang servers (lanes), or differing in a key named by --ignore-config,
    form one arm; the differences are left out of the config table."""
    runs = []
    for seed, (url, tolerance) in enumerate((("http://a:1", 1.0), ("http://b:2", 0.0)), 1):
        runs.append(make_run(tmp_path / "runs" / "grpo" / f"seed{seed}", "grpo", seed))
        config = yaml.safe_load((runs[-1] / "config.yaml").read_text())
        config["rollout"] = {"sglang": {"urls": [url], "probe_tolerance": tolerance}}
        (runs[-1] / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert compare_runs.main([*map(str, runs), "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["arms"]) == 2 and "rollout.sglang.urls" not in summary["config_differences"]
    assert compare_runs.main([*map(str, runs), "--output", str(out),
                              "--ignore-config", "rollout.sglang.probe_tolerance"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [a["runs"] for a in summary["arms"]] == [2]
    assert summary["config_differences"] == {"train.seed": [1, 2]}
