"""The trainer's offload/onload cycle (`training/offload.py`, `TrainStateOffload`) on one small MoE rank under fake
CUDA, with the device bytes measured at every boundary (run by scenarios.py, in its shim-preloaded interpreter).

Rank 1 of 4 at EP2 (DP 4, expert-DP 2), bf16, megatron DDP with the distributed optimizer: a train step (which
materialises Adam's state), offload, onload, a second train step, then an offload with the parameters too.
The device bytes are the live fake CUDA storages at their current sizes (`DeviceMemoryCounter.device_bytes`:
an offload resizes storages in place).
"""
from __future__ import annotations

import json
import traceback

import torch

from tests.gpu_semantics import harness


def _train_step(actor, model, samples) -> None:
    from grpo_megatron.algorithms import loss_normalizer
    from grpo_megatron.simulation.rank import _loss_fn
    from grpo_megatron.training.batch import make_micro_batches

    cfg = actor.cfg
    micro = make_micro_batches(samples, list(range(len(samples))), 2, pad_id=0)
    normalizer = loss_normalizer(torch.ones(len(samples), 32), cfg.algorithm.loss_agg, cfg.rollout.max_new_tokens)
    actor.train_step(micro, _loss_fn(cfg, normalizer), temperature=1.0)


def measure() -> dict:
    from grpo_megatron.config import RunConfig
    from grpo_megatron.models import build_model, model_dims
    from grpo_megatron.models.tiny import tiny_hf_config
    from grpo_megatron.parallel import ParallelLayout, init_model_parallel
    from grpo_megatron.simulation import moe
    from grpo_megatron.simulation.memory import DeviceMemoryCounter
    from grpo_megatron.simulation.rank import buffer_bytes, optimizer_bytes
    from grpo_megatron.training.actor import Actor
    from grpo_megatron.samples import Sample, TrainerFields
    from grpo_megatron.training.offload import TrainStateOffload

    hf, layout = tiny_hf_config("qwen3_moe"), ParallelLayout(expert_parallel=2)
    moe.use_balanced_dispatch(1.0)
    counter = DeviceMemoryCounter()
    samples = [Sample(prompt_ids=[1], response_ids=[1] * 31, group=i,
                      trainer=TrainerFields(advantage=1.0, old_logprobs=torch.zeros(31)))
               for i in range(4)]
    with harness.fake_gpu_rank(1, 4, counter, require_shim=True):
        init_model_parallel(layout, seed=0, **model_dims(hf))
        ddp = dict(use_distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True)
        model = build_model(hf, layout, torch.bfloat16, wrap_ddp=True, ddp_overrides=ddp)
        cfg = RunConfig()
        actor = Actor(model, cfg.train, total_steps=2)
        actor.cfg = cfg
        _train_step(actor, model, samples)
        params, grads = buffer_bytes(model.chunks)
        main, state = optimizer_bytes(actor.optimizer)
        bytes_at = {"after_step": counter.device_bytes()}
        offload = TrainStateOffload(model.chunks, actor.optimizer)
        offload.offload()
        bytes_at["offloaded"] = counter.device_bytes()
        offload.onload()
        bytes_at["onloaded"] = counter.device_bytes()
        _train_step(actor, model, samples)
        bytes_at["after_second_step"] = counter.device_bytes()
        with_params = TrainStateOffload(model.chunks, actor.optimizer, offload_params=True)
        with_params.offload()
        bytes_at["offloaded_with_params"] = counter.device_bytes()
        with_params.onload()
        bytes_at["onloaded_with_params"] = counter.device_bytes()
    return {"bytes_at": bytes_at, "param_bytes": params, "grad_buffer_bytes": grads, "main_param_bytes": main,
            "optimizer_state_bytes": state}


def run() -> dict[str, str]:
    try:
        return {"offload/cycle": json.dumps(measure())}
    except ImportError as e:
        return {"offload/cycle": f"ImportError: {e}"}
    except BaseException as e:  # noqa: BLE001 - reported to the test
        traceback.print_exc()
        return {"offload/cycle": f"{type(e).__name__}: {e}"}
