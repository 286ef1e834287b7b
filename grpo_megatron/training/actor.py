"""Forward and forward-backward passes of a megatron policy through megatron's pipeline schedules.

Every pass goes through `get_forward_backward_func`, so micro-batching, pipeline parallelism (1F1B,
interleaved) and the DDP gradient reduction are megatron's own. Log-probs come from the vocab-parallel
chunked function of the algorithms package, on the last pipeline stage.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
import torch.distributed as dist

from grpo_megatron.algorithms import token_logprobs_and_entropy
from grpo_megatron.models.provider import PolicyModel
from grpo_megatron.parallel import control_group
from grpo_megatron.platform import device
from grpo_megatron.ranks import multi_rank
from grpo_megatron.samples import MicroBatch

LossFn = Callable[[MicroBatch, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]
"""(micro_batch, logprobs [b, s], entropy [b, s]) -> (loss normalised by the *global* count, metrics)."""


def _tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group() if parallel_state.get_tensor_model_parallel_world_size() > 1 else None


def data_parallel_info() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def _run_schedule(model: PolicyModel, micro_batches: list[MicroBatch], loss_fn: LossFn, temperature: float,
                  forward_only: bool) -> list[dict]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not micro_batches:
        return []
    micro_batches = [mb.to(device()) for mb in micro_batches]  # the one place batches reach the device
    group = _tp_group()

    def forward_step(data_iterator, chunk):
        mb = next(data_iterator)
        output = chunk(input_ids=mb.tokens, position_ids=mb.positions, attention_mask=None)
        return output, functools.partial(_loss_on_logits, mb)

    def _loss_on_logits(mb: MicroBatch, logits: torch.Tensor):
        logprobs, entropy = token_logprobs_and_entropy(
            logits.float(), mb.targets, temperature=temperature, process_group=group)
        if mb.on_logits is not None:  # more values read off the logits (OPD's top-k, training/opd.py)
            mb = mb.on_logits(mb, logits, temperature, group)
        return loss_fn(mb, logprobs, entropy)

    num_chunks = len(model.chunks)
    iterators = [iter(micro_batches) for _ in range(num_chunks)]
    seq_length = max(mb.tokens.shape[1] for mb in micro_batches)
    routing = model.extra.get("routing_replay")  # MoE routing replay (grpo_megatron.replay), if attached
    with routing.pass_over(micro_batches, forward_only) if routing else contextlib.nullcontext():
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if num_chunks > 1 else iterators[0],
            model=model.chunks,
            num_microbatches=len(micro_batches),
            seq_length=seq_length,
            micro_batch_size=micro_batches[0].tokens.shape[0],
            forward_only=forward_only,
        )


def forward_logprobs(model: PolicyModel, micro_batches: list[MicroBatch], temperature: float) -> list[dict]:
    """Log-probs and entropy of every target token, per micro-batch, without gradients.

    Returns (on the last pipeline stage; [] elsewhere) one dict per micro-batch with `logprobs` and
    `entropy` [b, s] in the micro-batch's row order, and whatever a micro-batch's `on_logits` put in its `extra`.
    """
    def keep(mb, logprobs, entropy):
        return torch.zeros((), device=logprobs.device), {"logprobs": logprobs.detach(), "entropy": entropy.detach(),
                                                         **mb.extra}

    with torch.no_grad():
        return _run_schedule(model, micro_batches, keep, temperature, forward_only=True)


def uses_distributed_optimizer(model: PolicyModel) -> bool:
    """Whether the model's DDP buffers were laid out for megatron's distributed optimizer (set when it was
    built; every optimizer made for it must match)."""
    return bool(getattr(getattr(model.chunks[0], "ddp_config", None), "use_distributed_optimizer", False))


class Actor:
    """The trainable policy: megatron DDP chunks, megatron optimizer and LR schedule."""

    def __init__(self, model: PolicyModel, train_cfg, total_steps: int):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.model = model
        opt_config = OptimizerConfig(
            optimizer="adam", lr=train_cfg.lr, min_lr=train_cfg.min_lr, weight_decay=train_cfg.weight_decay,
            adam_beta1=train_cfg.adam_beta1, adam_beta2=train_cfg.adam_beta2, adam_eps=train_cfg.adam_eps,
            clip_grad=train_cfg.clip_grad, bf16=model.dtype == torch.bfloat16, fp16=model.dtype == torch.float16,
            params_dtype=model.dtype, use_distributed_optimizer=uses_distributed_optimizer(model),
        )
        self.optimizer = get_megatron_optimizer(opt_config, model.chunks)
        use_fused_torch_adam(self.optimizer)
        # train_cfg counts RL steps; the schedule advances once per optimizer step.
        per_step = max(total_steps // max(train_cfg.steps, 1), 1)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if train_cfg.lr_warmup_steps else train_cfg.lr, max_lr=train_cfg.lr,
            min_lr=train_cfg.min_lr, lr_warmup_steps=train_cfg.lr_warmup_steps * per_step,
            lr_decay_steps=max(total_steps, 1), lr_decay_style=train_cfg.lr_decay_style,
            start_wd=train_cfg.weight_decay, end_wd=train_cfg.weight_decay, wd_incr_steps=max(total_steps, 1),
            wd_incr_style="constant",
        )
        self.install_schedule_hooks()

    def install_schedule_hooks(self) -> None:
        """Point megatron's schedule at this actor's optimizer (the config object is shared by actors)."""
        from megatron.core.distributed import finalize_model_grads

        config, chunks = self.model.config, self.model.chunks
        config.grad_scale_func = self.optimizer.scale_loss
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
        config.timers = None

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train_step(self, micro_batches: list[MicroBatch], loss_fn: LossFn, temperature: float) -> dict:
        """One optimizer step over `micro_batches` (this rank's share of one mini-batch).

        `loss_fn` returns the loss normalised by the global (all micro-batches, all DP ranks) count.
        Megatron divides each micro-batch loss by the number of micro-batches and DDP averages
        gradients over DP ranks; we multiply both back so that gradients are exactly those of the
        global loss, however the mini-batch is split.
        """
        _, dp_size = data_parallel_info()
        scale = len(micro_batches) * dp_size

        def scaled(mb, logprobs, entropy):
            loss, metrics = loss_fn(mb, logprobs, entropy)
            metrics["_tokens"] = torch.tensor(float(mb.num_response_tokens))
            return loss * scale, metrics

        for chunk in self.model.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = _run_schedule(self.model, micro_batches, scaled, temperature, forward_only=False)
        update_ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        metrics = reduce_metrics(outputs)
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["update_skipped"] = float(not update_ok)
        return metrics


def use_fused_torch_adam(optimizer) -> int:
    """Run torch Adam/AdamW inside a megatron optimizer with torch's fused kernel; returns how many.

    Without apex/TransformerEngine megatron falls back to `torch.optim.AdamW` with torch's default
    implementation, which on CPU is a Python loop of ~7 elementwise ops per tensor; the fused kernel makes
    one pass per tensor (3x faster on the CPU example's update). Same algorithm, same state layout.
    """
    switched = 0
    for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(wrapper, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            if all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in group["params"]):
                group["fused"], group["foreach"] = True, False
                switched += 1
    return switched


_MIN_KEYS = ("ratio_min",)
_MAX_KEYS = ("ratio_max",)
# Each micro-batch reports its share of the mini-batch loss (normalised by the global count): summed, not averaged.
_SUM_KEYS = ("pg_loss", "kl_loss")


def reduce_metrics(outputs: list[dict]) -> dict:
    """Token-weighted means of per-micro-batch metrics over micro-batches, DP ranks and pipeline stages; the loss
    terms, which are shares of the mini-batch loss, are summed.

    Only the last pipeline stage computes losses; other stages contribute nothing, and the result is
    the same on every rank.
    """
    from megatron.core import parallel_state

    keys = sorted({k for out in outputs for k in out if not k.startswith("_")})
    keys = _agree_on_keys(keys)
    sums = torch.zeros(len(keys) + 1, dtype=torch.float64)
    mins = torch.full((len(keys),), float("inf"), dtype=torch.float64)
    maxs = torch.full((len(keys),), float("-inf"), dtype=torch.float64)
    for out in outputs:
        weight = float(out["_tokens"])
        sums[-1] += weight
        for j, key in enumerate(keys):
            value = float(out[key]) if key in out else 0.0
            sums[j] += value if key in _SUM_KEYS else value * weight
            mins[j] = min(mins[j], value)
            maxs[j] = max(maxs[j], value)
    if multi_rank():
        # the default group is NCCL on GPU: its collectives take device tensors only
        sums, mins, maxs = (t.to(device()) for t in (sums, mins, maxs))
        dist.all_reduce(sums)
        dist.all_reduce(mins, op=dist.ReduceOp.MIN)
        dist.all_reduce(maxs, op=dist.ReduceOp.MAX)
        sums, mins, maxs = sums.cpu(), mins.cpu(), maxs.cpu()
        # Every rank of a TP group (and of a DP replica's stages) saw the same micro-batches.
        sums /= parallel_state.get_tensor_model_parallel_world_size() * parallel_state.get_context_parallel_world_size()
    total = float(sums[-1]) or 1.0
    result = {}
    for j, key in enumerate(keys):
        if key in _MIN_KEYS:
            result[key] = float(mins[j])
        elif key in _MAX_KEYS:
            result[key] = float(maxs[j])
        elif key in _SUM_KEYS:
            result[key] = float(sums[j])
        else:
            result[key] = float(sums[j]) / total
    return result


def combine_minibatch_metrics(results: list[dict]) -> dict:
    """One step's metrics from its mini-batches: means, except extremes (min/max) and the
    train-vs-rollout comparison, which only the first mini-batch (policy == rollout weights) measures."""
    combined = {}
    for key in results[0]:
        values = [r[key] for r in results if key in r]
        if key.startswith("train_rollout"):
            combined[key] = results[0][key]
        elif key in _MIN_KEYS:
            combined[key] = min(values)
        elif key in _MAX_KEYS:
            combined[key] = max(values)
        else:
            combined[key] = sum(values) / len(values)
    return combined


def _agree_on_keys(keys: list[str]) -> list[str]:
    """Ranks that are not the last stage have no metrics; take the key list from those that do."""
    if not multi_rank():
        return keys
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, keys, group=control_group())
    return sorted(set().union(*everyone))
