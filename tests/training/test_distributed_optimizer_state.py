"""megatron's distributed optimizer with torch's Adam (no Apex/TE): a saved and reloaded optimizer takes the
same next steps as the one that was never saved (the GPU default at DP > 1; one process is enough here)."""
from __future__ import annotations

import json

import pytest
import torch

from grpo_megatron.config import TrainConfig
from grpo_megatron.models import build_model, model_dims
from grpo_megatron.models.mcore_checkpoint import METADATA_FILE, load_mcore_checkpoint, save_mcore_checkpoint
from grpo_megatron.models.tiny import tiny_hf_config
from grpo_megatron.parallel import ParallelLayout, init_model_parallel
from grpo_megatron.platform import setup_platform
from grpo_megatron.training.actor import Actor
from grpo_megatron.training.batch import make_micro_batches
from tests.training.test_actor import gspo, rollout


def _actor() -> Actor:
    setup_platform()
    config = tiny_hf_config("qwen3")
    init_model_parallel(ParallelLayout(), seed=0, **model_dims(config))
    torch.manual_seed(0)
    policy = build_model(config, ParallelLayout(), wrap_ddp=True, ddp_overrides={"use_distributed_optimizer": True})
    return Actor(policy, TrainConfig(steps=10, num_minibatches=1, lr=1e-3, clip_grad=1.0), total_steps=10)


def _steps(actor: Actor, count: int) -> None:
    batch = rollout()
    for _ in range(count):
        actor.train_step(make_micro_batches(batch, list(range(len(batch))), 4, 0), gspo(len(batch)), 1.0)


def _adam_steps(actor: Actor) -> list[float]:
    return [float(s["step"]) for opt in actor.optimizer.chained_optimizers for s in opt.optimizer.state.values()]


@pytest.mark.parametrize("optimizer_format", ["dp_reshardable", "fully_reshardable", "unrecorded"])
def test_a_reloaded_distributed_optimizer_continues_exactly(optimizer_format, dist_world1, tmp_path):
    """In each optimizer format; `unrecorded`: a checkpoint from before the format was recorded in its metadata
    (all were fully_reshardable)."""
    original = _actor()
    assert original.optimizer.chained_optimizers[0].__class__.__name__ == "DistributedOptimizer"
    _steps(original, 2)
    fmt = "fully_reshardable" if optimizer_format == "unrecorded" else optimizer_format
    save_mcore_checkpoint(original.model, tmp_path / "ckpt", optimizer=original.optimizer, optimizer_format=fmt)
    meta = json.loads((tmp_path / "ckpt" / METADATA_FILE).read_text())
    assert meta.pop("optimizer_format") == fmt
    if optimizer_format == "unrecorded":
        (tmp_path / "ckpt" / METADATA_FILE).write_text(json.dumps(meta))
    _steps(original, 2)
    expected = {n: p.detach().clone() for n, p in original.model.chunks[0].named_parameters()}

    resumed = _actor()
    load_mcore_checkpoint(resumed.model, tmp_path / "ckpt", optimizer=resumed.optimizer)
    assert set(_adam_steps(resumed)) == {2.0}
    _steps(resumed, 2)
    # megatron's load gave every parameter one shared `step` tensor, which Adam then advanced once per
    # parameter per step (bias correction wrong from the first resumed step)
    assert set(_adam_steps(resumed)) == {4.0}
    for name, p in resumed.model.chunks[0].named_parameters():
        torch.testing.assert_close(p.detach(), expected[name], rtol=0, atol=0, msg=name)


def test_a_dp_reshardable_state_refuses_another_model_parallel_layout(dist_world1, tmp_path):
    """The checkpoint's metadata says it was saved at TP2 (as a 2-GPU run would write it); loading its
    optimizer state at TP1 is refused by name (the weights alone still load at any layout)."""
    from grpo_megatron.models.mcore_checkpoint import CheckpointMismatchError

    actor = _actor()
    _steps(actor, 1)
    save_mcore_checkpoint(actor.model, tmp_path / "ckpt", optimizer=actor.optimizer)
    meta_file = tmp_path / "ckpt" / METADATA_FILE
    meta = json.loads(meta_file.read_text())
    assert meta["optimizer_format"] == "dp_reshardable"
    meta["saved_layout"]["tensor_parallel"] = 2
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointMismatchError, match="dp_reshardable format, which reshards the data-parallel size only .tensor_parallel 2 -> 1"):
        load_mcore_checkpoint(actor.model, tmp_path / "ckpt", optimizer=actor.optimizer)
    load_mcore_checkpoint(actor.model, tmp_path / "ckpt")
