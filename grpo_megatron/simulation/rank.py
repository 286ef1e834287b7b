"""One rank of a training job, simulated: the project's real model at the real world size, megatron's DDP and
optimizer, and one forward+backward+update through megatron's schedule with the project's policy loss, while
every live device byte is counted (see the package docstring)."""
from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass, field

import torch

from grpo_megatron.parallel import ParallelLayout

RECOMPUTE = {"none": {}, "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
             "selective": dict(recompute_granularity="selective")}


@dataclass
class RankSpec:
    """What to simulate. `model_config`: an HF `config.json` as a dict; `moe_dispatch`: "balanced" (with
    `routing_skew` >= 1: the most-loaded rank receives skew x its even share) or "capacity" (megatron's
    capacity-padded dispatch at `capacity_factor`)."""

    model_config: dict
    layout: ParallelLayout
    rank: int
    world_size: int
    seq_len: int
    micro_batch_size: int = 1
    num_micro_batches: int = 1
    recompute: str = "none"  # none | full | selective
    dtype: str = "bfloat16"
    distributed_optimizer: bool = True
    moe_dispatch: str = "balanced"
    routing_skew: float = 1.0
    capacity_factor: float = 1.0

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "layout": self.layout.to_dict()})

    @classmethod
    def from_json(cls, text: str) -> RankSpec:
        data = json.loads(text)
        return cls(**{**data, "layout": ParallelLayout(**data["layout"])})


@dataclass
class RankMemory:
    """What one rank holds on its GPU. Counts are this rank's parameters (expert: megatron's `allreduce=False`
    parameters); `*_bytes` come from megatron's own buffers and optimizer state; `static_bytes` is the counted
    live device memory before the step, `peak_bytes` the most during forward, backward and optimizer step
    (exact tensor bytes, as `torch.cuda.max_memory_allocated`: no CUDA context, NCCL buffers or fragmentation)."""

    rank: int
    coordinates: dict
    dense_params: int
    expert_params: int
    param_bytes: int
    grad_buffer_bytes: int
    main_param_bytes: int
    optimizer_state_bytes: int
    static_bytes: int
    peak_bytes: int
    by_category: dict = field(default_factory=dict)
    seconds: float = 0.0
    logprob_peak_bytes: int = 0  # the most live bytes in a forward-only log-prob pass (old policy, reference)

    @property
    def activation_peak_bytes(self) -> int:
        return self.peak_bytes - self.static_bytes


def _hf_config(model_config: dict):
    import transformers

    from grpo_megatron.models.bridge import validate_hf_config

    config = transformers.AutoConfig.for_model(**model_config)
    validate_hf_config(config)
    return config


def _coordinates() -> dict:
    from megatron.core import parallel_state as ps

    return dict(tp=ps.get_tensor_model_parallel_rank(), pp=ps.get_pipeline_model_parallel_rank(),
                dp=ps.get_data_parallel_rank(), ep=ps.get_expert_model_parallel_rank(),
                etp=ps.get_expert_tensor_parallel_rank(), edp=ps.get_expert_data_parallel_rank())


def _nbytes(tensor) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def buffer_bytes(chunks) -> tuple[int, int]:
    """(param, grad) bytes of megatron DDP's contiguous buffers, dense and expert."""
    params = grads = 0
    for chunk in chunks:
        for buffer in [*chunk.buffers, *chunk.expert_parallel_buffers]:
            params += _nbytes(buffer.param_data)
            grads += _nbytes(buffer.grad_data)
    return params, grads


def materialise_adam_state(optimizer) -> None:
    """Create torch Adam's per-parameter state as its first step would (`torch/optim/adam.py` `_init_group`:
    fp32 `exp_avg`/`exp_avg_sq` like the parameter; `step` on the device for the fused kernel)."""
    for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = wrapper.optimizer
        for group in inner.param_groups:
            fused = group.get("fused") or group.get("capturable")
            for param in group["params"]:
                if not inner.state.get(param):
                    inner.state[param] = {
                        "step": torch.zeros((), dtype=torch.float32, device=param.device if fused else "cpu"),
                        "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}


def optimizer_bytes(optimizer) -> tuple[int, int]:
    """(fp32 main-parameter, Adam state) bytes held by megatron's optimizer on this rank."""
    main = state = 0
    for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
        for groups_name in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups"):
            main += sum(_nbytes(p) for group in getattr(wrapper, groups_name, []) for p in group)
        for values in wrapper.optimizer.state.values():
            state += sum(_nbytes(v) for v in values.values() if isinstance(v, torch.Tensor) and v.device.type == "cuda")
    return main, state


def _samples(spec: RankSpec):
    """Full-length samples (a one-token prompt, the rest response) for this rank's micro-batches."""
    from grpo_megatron.samples import Sample, TrainerFields

    count = spec.micro_batch_size * spec.num_micro_batches
    return [Sample(prompt_ids=[1], response_ids=[1] * (spec.seq_len - 1), group=i,
                   trainer=TrainerFields(advantage=1.0, old_logprobs=torch.zeros(spec.seq_len - 1)))
            for i in range(count)]


def _loss_fn(cfg, normalizer: float):
    """The trainer's policy loss (training/update_math.py `policy_loss_fn`) with the run's algorithm settings."""
    from grpo_megatron.algorithms.policy_loss import compute_policy_loss

    alg = cfg.algorithm

    def loss_fn(mb, logprobs, entropy):
        return compute_policy_loss(
            logprobs, mb.old_logprobs, mb.advantages, mb.response_mask, variant=alg.loss, clip_low=alg.clip_low,
            clip_high=alg.clip_high, loss_agg=alg.loss_agg, ref_logprobs=mb.ref_logprobs, kl_coef=alg.kl_coef,
            kl_estimator=alg.kl_estimator, dual_clip_c=alg.dual_clip_c, entropy=entropy, normalizer=normalizer,
            max_response_length=cfg.rollout.max_new_tokens)

    return loss_fn


def simulate_rank_here(spec: RankSpec) -> RankMemory:
    """`simulate_rank` in this process, which must have the shim preloaded and no CPU shims applied."""
    from grpo_megatron.algorithms import loss_normalizer
    from grpo_megatron.config import RunConfig
    from grpo_megatron.models import build_model, model_dims
    from grpo_megatron.parallel import init_model_parallel
    from grpo_megatron.simulation import moe
    from grpo_megatron.simulation.memory import DeviceMemoryCounter
    from grpo_megatron.simulation.runtime import fake_gpu_rank
    from grpo_megatron.training.actor import Actor, forward_logprobs
    from grpo_megatron.training.batch import make_micro_batches

    start = time.perf_counter()
    hf = _hf_config(spec.model_config)
    dims = model_dims(hf)
    overrides = dict(RECOMPUTE[spec.recompute], variable_seq_lengths=False)
    if dims["num_experts"]:
        if spec.moe_dispatch not in ("balanced", "capacity"):
            raise ValueError(f"moe_dispatch {spec.moe_dispatch!r}: use 'balanced' or 'capacity'")
        moe.use_balanced_dispatch(spec.routing_skew)
        if spec.moe_dispatch == "capacity":
            overrides.update(moe.capacity_overrides(spec.capacity_factor))
    counter = DeviceMemoryCounter()
    samples = _samples(spec)  # real host tensors: the batch builder reads their values (a fake one answers per item)
    with fake_gpu_rank(spec.rank, spec.world_size, counter, require_shim=True):
        init_model_parallel(spec.layout, seed=0, **dims)
        ddp = dict(use_distributed_optimizer=spec.distributed_optimizer, overlap_grad_reduce=True,
                   overlap_param_gather=spec.distributed_optimizer, grad_reduce_in_fp32=True)
        with counter.category("model"):
            model = build_model(hf, spec.layout, getattr(torch, spec.dtype), wrap_ddp=True, ddp_overrides=ddp,
                                **overrides)
        cfg = RunConfig()
        with counter.category("optimizer"):
            actor = Actor(model, cfg.train, total_steps=1)
            materialise_adam_state(actor.optimizer)
        static = counter.snapshot()
        micro = make_micro_batches(samples, list(range(len(samples))), spec.micro_batch_size, pad_id=0)
        normalizer = loss_normalizer(torch.ones(len(samples), spec.seq_len), cfg.algorithm.loss_agg,
                                     cfg.rollout.max_new_tokens)
        counter.reset_peak()
        with counter.category("activations"):
            actor.train_step(micro, _loss_fn(cfg, normalizer), temperature=1.0)
        peak = counter.peak
        counter.reset_peak()
        with counter.category("activations"):
            forward_logprobs(model, micro, temperature=1.0)
        logprob_peak = counter.peak
        params = [p for c in model.chunks for p in c.parameters()]
        param_bytes, grad_bytes = buffer_bytes(model.chunks)
        main_bytes, state_bytes = optimizer_bytes(actor.optimizer)
        result = RankMemory(
            rank=spec.rank, coordinates=_coordinates(),
            dense_params=sum(p.numel() for p in params if getattr(p, "allreduce", True)),
            expert_params=sum(p.numel() for p in params if not getattr(p, "allreduce", True)),
            param_bytes=param_bytes, grad_buffer_bytes=grad_bytes, main_param_bytes=main_bytes,
            optimizer_state_bytes=state_bytes, static_bytes=static.total, peak_bytes=peak,
            by_category=static.by_category, logprob_peak_bytes=logprob_peak)
        del actor, model
        gc.collect()
    result.seconds = round(time.perf_counter() - start, 2)
    return result
