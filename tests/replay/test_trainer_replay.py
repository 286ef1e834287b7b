"""`routing_replay: r2 | r3` through the trainer: a full step trains, logs agreement, and fails loudly."""
import math

import pytest

from grpo_megatron.config import ConfigError
from grpo_megatron.training.loop import Trainer
from tests.training.test_loop import VARIED


@pytest.mark.parametrize("mode", ["r2", "r3"])
def test_one_step_with_replay_logs_routing_agreement(mode, make_config, dist_world1):
    cfg = make_config(algorithm={"routing_replay": mode, "loss": "grpo", "clip_low": 0.2, "clip_high": 0.28,
                                 "kl_coef": 0.01},
                      train={"steps": 1}, reward=VARIED)
    trainer = Trainer(cfg)
    metrics = trainer.train_step()
    trainer.close()
    assert math.isfinite(metrics["train/pg_loss"]) and metrics["train/grad_norm"] > 0
    # Old-vs-current: the first mini-batch has the old weights, the second the updated ones.
    assert 0.5 < metrics["routing/agree_old_current"] <= 1.0
    for layer in (0, 1):
        assert f"routing/agree_old_current/layer_{layer}" in metrics
    if mode == "r3":
        # The engine and the trainer hold the same weights at rollout time: identical routing.
        assert metrics["routing/agree_rollout_train"] == 1.0
        assert metrics["routing/agree_rollout_train/layer_1"] == 1.0
    assert metrics["train_rollout/logprob_abs_diff"] < 1e-4


def test_r2_refuses_engine_logprobs(make_config, dist_world1):
    cfg = make_config(algorithm={"routing_replay": "r2"}, rollout={"use_engine_logprobs": True})
    with pytest.raises(ConfigError, match="use_engine_logprobs"):
        Trainer(cfg)


def test_r3_step_on_one_nccl_process(make_config, dist_world1, monkeypatch):
    """One GPU: torch.distributed with one NCCL rank, so no gloo control group is made (parallel.init_control_group
    needs a second rank); the step must not ask for one. The backend name is what control_group() checks."""
    import torch.distributed as dist

    trainer = Trainer(make_config(algorithm={"routing_replay": "r3"}, train={"steps": 1}, reward=VARIED))
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    metrics = trainer.train_step()
    trainer.close()
    assert metrics["routing/agree_rollout_train"] == 1.0
