"""One GPU's memory through a step, phase by phase, from a simulated trainer rank and the rollout share.

A step runs generation (colocated servers hold their pool; the trainer keeps whatever it did not give back),
the weight push (the trainer's resident state, two weight buckets and one gathered tensor, the servers'
pool resumed), the log-prob passes (old policy, and the reference model on the device while it runs), and
the training micro-batches. The GPU fits when its largest phase does.
"""
from __future__ import annotations

from dataclasses import dataclass

from grpo_megatron.plan import constants
from grpo_megatron.plan.rollout_share import RolloutShare
from grpo_megatron.plan.trainer_rank import TrainerRank


@dataclass(frozen=True)
class StepSettings:
    """The config's choices that decide what is on the device when (derived from the run config)."""

    reference: bool  # algorithm.kl_coef > 0: a frozen reference model
    offload_reference: bool  # model.offload_reference: on the device only during its pass
    offload_train_state: bool  # grad buffers + optimizer state to host around generation and the weight push
    offload_params: bool  # the parameters too, around generation
    route_bytes_on_device: int  # R3: one micro-batch's replayed routes of this rank's layers
    bucket_bytes: int  # rollout.sglang.bucket_mb
    largest_tensor_bytes: int  # the biggest full HF tensor a weight push gathers


@dataclass(frozen=True)
class Phase:
    name: str
    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def phases(rank: TrainerRank, settings: StepSettings, colocated: RolloutShare | None) -> list[Phase]:
    """Every phase's device bytes on the GPU of `rank` (and of the colocated server rank, if any)."""
    overhead = constants.device_overhead_bytes()
    reference = rank.param_bytes if settings.reference else 0
    resident_reference = 0 if settings.offload_reference else reference
    frag = constants.FRAGMENTATION
    peak = rank.peak_bytes + resident_reference + settings.route_bytes_on_device
    train = {"trainer peak (simulated)": peak, "fragmentation": int(frag * peak), "context + NCCL": overhead}
    logprob_peak = rank.logprob_peak_bytes + reference
    logprob = {"log-prob pass (simulated)": logprob_peak, "fragmentation": int(frag * logprob_peak),
               "context + NCCL": overhead}
    if settings.offload_train_state:  # the cache is emptied after each offload
        held = {"trainer after offload": (0 if settings.offload_params else rank.param_bytes) + resident_reference}
        pushing = {"trainer after offload": rank.param_bytes + resident_reference}
    else:  # nothing is freed: the caching allocator keeps the training peak's blocks
        held = pushing = {"trainer cached blocks (peak reserved)": int((1 + frag) * peak)}
    sync = {**pushing, "context + NCCL": overhead, "weight buckets (2)": 2 * settings.bucket_bytes,
            "gathered tensor": settings.largest_tensor_bytes}
    result = [Phase("train", train), Phase("log-prob", logprob)]
    if colocated is not None:
        released = {"SGLang (released)": constants.SGLANG_RELEASED_BYTES + constants.CUDA_CONTEXT_BYTES}
        train.update(released)
        logprob.update(released)
        sync["SGLang weights (resumed)"] = colocated.weights_bytes + constants.SGLANG_RUNTIME_BYTES
        runtime = constants.SGLANG_RUNTIME_BYTES + constants.CUDA_CONTEXT_BYTES
        result.append(Phase("generate", {**held, "context + NCCL": overhead,
                                         "SGLang pool (weights + KV)": colocated.pool_bytes, "SGLang runtime": runtime}))
    result.append(Phase("weight push", sync))
    return result


def dedicated_server_phase(share: RolloutShare) -> Phase:
    """A GPU of a dedicated rollout node: the server alone."""
    return Phase("generate", {"SGLang pool (weights + KV)": share.pool_bytes,
                              "SGLang runtime": constants.SGLANG_RUNTIME_BYTES + constants.CUDA_CONTEXT_BYTES})
