"""The Python part of scripts/gpu_smoke.sh (grpo_megatron.smoke), run on the CPU: each check passes on today's
code and fails on the defect it is there to catch; the shell script parses."""
from __future__ import annotations

import subprocess

import pytest

from grpo_megatron import smoke
from tests.conftest import REPO


def test_gpu_smoke_script_parses():
    subprocess.run(["bash", "-n", str(REPO / "scripts" / "gpu_smoke.sh")], check=True)


def test_sft_check_passes_and_catches_an_undone_warm_start(task_files, dist_world1, tmp_path, monkeypatch):
    result = smoke.check_sft_warm_start(task_files, tmp_path)
    assert set(result) == {"float16", "distributed"} and all(r["sft_max_change"] > 0 for r in result.values())

    def refresh_masters_too_late(learner):  # the defect: masters copied before SFT are written back at RL's step
        stale = [[p.detach().clone() for p in group["params"]] for group in learner.actor.optimizer.param_groups]
        losses = sft_warmup(learner)
        for group, saved in zip(learner.actor.optimizer.param_groups, stale):
            for p, value in zip(group["params"], saved):
                p.data.copy_(value)
        return losses

    from grpo_megatron.training import sft
    sft_warmup = sft.sft_warmup
    monkeypatch.setattr(sft, "sft_warmup", refresh_masters_too_late)
    with pytest.raises(smoke.SmokeFailure, match="zero-lr RL step then changed"):
        smoke.check_sft_warm_start(task_files, tmp_path / "bad")


def test_diversity_check_passes_and_catches_identical_groups(task_files, dist_world1, tmp_path, monkeypatch):
    result = smoke.check_group_diversity(task_files, tmp_path)
    assert result["groups"] == 8 and min(result["distinct_per_group"]) > 1 and result["same_seed_same_samples"]

    from grpo_megatron.rollout.engines.embedded import EmbeddedEngine
    generate = EmbeddedEngine.generate

    def one_sample_copied(self, prompts, params, **kwargs):  # what a seeded SGLang group without per-sample seeds returns
        return [[group[0]] * len(group) for group in generate(self, prompts, params, **kwargs)]

    monkeypatch.setattr(EmbeddedEngine, "generate", one_sample_copied)
    with pytest.raises(smoke.SmokeFailure, match="8 of 8 seeded groups"):
        smoke.check_group_diversity(task_files, tmp_path / "bad")


def test_r3_check_runs_one_replayed_step(task_files, dist_world1, tmp_path):
    result = smoke.check_r3_step(task_files, tmp_path)
    assert result["agree_rollout_train"] >= 0.9 and result["grad_norm"] > 0


def test_the_checks_refuse_to_run_without_a_gpu_unless_asked(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(smoke.torch.cuda, "is_available", lambda: False)
    assert smoke.main([str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
