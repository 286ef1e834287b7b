"""OPD with a real colocated megatron teacher (one process): config errors, a teacher that is the student's own
checkpoint (KL exactly 0, so the distillation advantages and the gradient vanish), and a teacher of another size
and architecture in the top-k mode."""
from __future__ import annotations

import math

import pytest

from grpo_megatron.config import ConfigError


@pytest.fixture(scope="module")
def dense_teacher(tmp_path_factory):
    from grpo_megatron.models.tiny import make_tiny_hf_checkpoint

    return make_tiny_hf_checkpoint("qwen3", tmp_path_factory.mktemp("teacher") / "qwen3", seed=7, hidden_size=96,
                                   intermediate_size=160)


@pytest.mark.parametrize("opd, overrides, message", [
    ({"teacher": "teacher"}, {}, "algorithm.opd.teacher='teacher': use none, megatron or sglang"),
    ({"teacher": "megatron", "hf_path": "x", "mode": "forward"}, {}, "algorithm.opd.mode='forward'"),
    ({"teacher": "megatron", "hf_path": "x", "coef": 0.0}, {}, "algorithm.opd.coef=0.0: must be a finite number > 0"),
    ({"teacher": "megatron", "hf_path": "x", "top_k": -2}, {}, "algorithm.opd.top_k=-2"),
    ({"teacher": "megatron"}, {}, "algorithm.opd.teacher=megatron needs algorithm.opd.hf_path"),
    ({"teacher": "megatron", "hf_path": "x"}, {"algorithm": {"loss": "gspo"}}, "cannot take: use grpo or gspo_token"),
    ({"teacher": "sglang"}, {}, "algorithm.opd.teacher=sglang needs algorithm.opd.sglang_urls"),
    ({"teacher": "sglang", "sglang_urls": ["http://h:1"]}, {"rollout": {"temperature": 0.7}},
     "rollout.temperature=0.7: set it to 1.0 or use algorithm.opd.teacher megatron"),
])
def test_config_errors_are_one_line_and_name_the_key(opd, overrides, message, make_config):
    algorithm = {"loss": "grpo", **overrides.get("algorithm", {}), "opd": opd}
    with pytest.raises(ConfigError) as err:
        make_config(algorithm=algorithm, **{k: v for k, v in overrides.items() if k != "algorithm"})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_top_k_with_gspo_is_accepted(make_config):
    cfg = make_config(algorithm={"loss": "gspo", "opd": {"teacher": "megatron", "hf_path": "x", "top_k": 4}})
    assert cfg.algorithm.opd.top_k == 4


def _train(make_config, steps: int, **overrides):
    from grpo_megatron.training.loop import Trainer

    trainer = Trainer(make_config(**overrides))
    try:
        return trainer, [trainer.train_step() for _ in range(steps)]
    finally:
        trainer.close()


def test_teacher_equal_to_the_student_gives_zero_kl_and_no_gradient(make_config, task_files, dist_world1):
    _, (metrics,) = _train(make_config, 1, algorithm={
        "loss": "grpo", "opd": {"teacher": "megatron", "hf_path": str(task_files["hf"]), "mode": "distill"}},
        train={"num_minibatches": 1})
    assert metrics["opd/teacher_kl"] == 0.0
    assert metrics["train/pg_loss"] == 0.0 and metrics["train/grad_norm"] == 0.0
    assert metrics["time/teacher"] > 0


def test_megatron_teacher_of_another_size_in_top_k_mode(make_config, dense_teacher, dist_world1):
    trainer, history = _train(make_config, 2, algorithm={
        "loss": "gspo", "opd": {"teacher": "megatron", "hf_path": str(dense_teacher), "mode": "rl", "top_k": 4}},
        rollout={"temperature": 0.8})
    assert trainer.learner.teacher.frozen.model.hf_config.hidden_size == 96  # the student: 64
    for metrics in history:
        assert metrics["opd/teacher_kl"] != 0.0 and math.isfinite(metrics["opd/teacher_kl"])
        assert metrics["opd/topk_kl"] > 0 and metrics["train/grad_norm"] > 0


def test_teacher_paths_in_a_config_file_are_relative_to_it(tmp_path, task_files):
    import yaml

    from grpo_megatron.config import load_config

    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"hf_path": str(task_files["hf"])}, "data": {"train_files": [str(task_files["train"])]},
        "reward": {"functions": [{"name": "first_digit"}]},
        "algorithm": {"loss": "grpo", "opd": {"teacher": "megatron", "hf_path": "teacher_hf",
                                              "megatron_path": "../ckpt/step_000010"}}}))
    opd = load_config(path).algorithm.opd
    assert opd.hf_path == str(tmp_path / "conf" / "teacher_hf")
    assert opd.megatron_path == str(tmp_path / "ckpt" / "step_000010")
