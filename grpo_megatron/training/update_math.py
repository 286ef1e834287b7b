"""The RL update's math on a step's samples: advantages, the loss mask, the rollout-mismatch correction, the
policy-loss closure and the mini-batch split. Functions of (UpdateSpec or its algorithm section, samples) so that
each can be tested against a plain reference computation without building a model; training/learner.py runs them
in the step's order."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

from grpo_megatron.algorithms import (
    ADVANTAGE_ESTIMATORS, MAX_LOG_RATIO, POLICY_LOSSES, LossParams, adaptive_truncation_bound, aggregate_loss,
    compute_policy_loss, compute_rollout_correction, select_tokens)
from grpo_megatron.algorithms.rollout_correction import unit_values
from grpo_megatron.config import AlgorithmConfig
from grpo_megatron.ranks import multi_rank
from grpo_megatron.samples import Sample
from grpo_megatron.training import opd
from grpo_megatron.training.batch import response_span
from grpo_megatron.training.mismatch import rollout_correction_metrics, train_rollout_mismatch


@dataclass(frozen=True)
class UpdateSpec:
    """What an RL update reads of the run config (training/builder.py builds it): the objective and the few
    rollout and schedule fields it depends on, so that the update math sees nothing else."""

    algorithm: AlgorithmConfig
    """Loss, advantages, KL, rollout correction, routing replay and distillation."""
    group_size: int
    """rollout.group_size: the groups of the advantages."""
    max_new_tokens: int
    """rollout.max_new_tokens: the length the loss aggregations normalise by."""
    temperature: float
    """rollout.temperature: log-probs are taken at the sampling temperature (greedy, 0, as 1)."""
    use_engine_logprobs: bool
    """rollout.use_engine_logprobs: the engine's log-probs are the old ones (bypass)."""
    num_minibatches: int
    """train.num_minibatches: optimizer steps per rollout batch."""
    seed: int
    """train.seed: seeds the covariance losses' token draw."""

    @property
    def logprob_temperature(self) -> float:
        return self.temperature or 1.0


def assign_advantages(samples: list[Sample], estimator: str, group_size: int) -> None:
    """Each sample's advantage from the rewards of its group (`algorithm.advantage`)."""
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
    advantages = ADVANTAGE_ESTIMATORS.get(estimator)(rewards, group_size)
    for sample, adv in zip(samples, advantages.tolist()):
        sample.trainer.advantage = adv


def loss_mask(samples: list[Sample], mb) -> torch.Tensor:
    """Response tokens in the loss: sampled (not tool output), not overlong-filtered, not dropped by the
    mismatch correction."""
    keep = torch.tensor([float(samples[i].trainer.in_loss) for i in mb.indices])
    mask = mb.response_mask * keep.unsqueeze(1)
    if mb.loss_mask is not None:
        mask = mask * mb.loss_mask
    return mask if mb.rollout_weights is None else mask * (mb.rollout_weights > 0)


def old_logprobs_are_current(spec: UpdateSpec) -> bool:
    """True when the old-policy pass would recompute what the training pass computes anyway.

    With one optimizer step per rollout batch, the training pass runs the not-yet-updated policy on the
    same micro-batches, so its detached log-probs equal the old ones exactly; only routing replay needs
    the separate pass (r2 records its routes there, r3 measures rollout-vs-train agreement there), and the
    covariance losses, which select their tokens from the old log-probs before the first micro-batch.
    """
    return (spec.num_minibatches == 1 and spec.algorithm.routing_replay == "none"
            and not POLICY_LOSSES.get(spec.algorithm.loss).needs_selection)


def minibatch_indices(count: int, num_minibatches: int) -> list[list[int]]:
    """The sample indices of each optimizer step of a rollout batch of `count` samples."""
    per_minibatch = count // num_minibatches
    return [list(range(m * per_minibatch, (m + 1) * per_minibatch)) for m in range(num_minibatches)]


def correct_rollout(samples: list[Sample], spec: UpdateSpec) -> dict:
    """Decoupled mismatch correction: weights from the trainer's old and the engine's log-probs on every
    sample (`rollout_weights`, 0 where dropped), and the step's `rollout_correction/*` metrics, over the
    whole step so that neither depends on the mini- or micro-batch split. Metrics only with mode none,
    and nothing where old log-probs are the engine's (bypass) or come from the training pass itself."""
    rc = spec.algorithm.rollout_correction
    for s in samples:
        s.trainer.rollout_weights = None
    if spec.use_engine_logprobs or any(s.trainer.old_logprobs is None for s in samples):
        return {}
    if any(s.engine_logprobs is None for s in samples):
        if rc.mode != "none":
            raise RuntimeError("algorithm.rollout_correction needs the engine's per-token log-probs, and the "
                               "rollout engine returned none: set algorithm.rollout_correction.mode none")
        return {}
    pad = torch.nn.utils.rnn.pad_sequence
    old = pad([s.trainer.old_logprobs.float() for s in samples], batch_first=True)
    rollout = pad([torch.tensor(s.engine_logprobs, dtype=torch.float32) for s in samples], batch_first=True)
    lengths = torch.tensor([len(s.response_ids) for s in samples])
    in_loss = torch.tensor([s.trainer.in_loss for s in samples])
    sampled = pad([torch.tensor(s.loss_mask or [1] * len(s.response_ids), dtype=torch.bool) for s in samples],
                  batch_first=True)  # tool output has no behaviour log-prob to correct
    mask = (torch.arange(old.shape[1]) < lengths.unsqueeze(1)) & in_loss.unsqueeze(1) & sampled
    if rc.mode == "none":
        return from_last_stage(rollout_correction_metrics(old, rollout, mask, level=rc.level))
    correct = partial(compute_rollout_correction, old, rollout, mask, mode=rc.mode, level=rc.level, low=rc.low,
                      veto=rc.veto, max_seq_kl=rc.max_seq_kl)
    correction, bound = correct(high=rc.high), (rc.high if rc.mode == "tis" else None)
    if rc.adaptive_ess_target is not None:
        unit_weights = unit_values(correction.log_unit, correction.keep, rc.level).clamp(max=MAX_LOG_RATIO).exp()
        bound = adaptive_truncation_bound(unit_weights, rc.high, rc.adaptive_ess_target)
        correction = correct(high=bound)
    for s, row in zip(samples, correction.weights):
        s.trainer.rollout_weights = row[:len(s.response_ids)].clone()
    return from_last_stage(rollout_correction_metrics(old, rollout, mask, correction, rc.level, bound))


def from_last_stage(metrics: dict) -> dict:
    """Metrics that only last pipeline stages can compute (the others hold no old log-probs), on every rank."""
    if not multi_rank() or not metrics:
        return metrics
    from megatron.core import parallel_state

    from grpo_megatron.platform import device

    values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=device())
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        values.fill_(float("-inf"))
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return dict(zip(metrics, values.tolist()))


def policy_loss_fn(alg: AlgorithmConfig, max_len: int, normalizer: float, first_minibatch: bool, distilling: bool):
    """The actor's loss closure for one mini-batch: (micro-batch, log-probs, entropy) -> (loss, metrics)."""

    def loss_fn(mb, logprobs, entropy):
        # No old-policy pass (see old_logprobs_are_current): the policy is still the old one.
        old_logprobs = mb.old_logprobs if mb.old_logprobs is not None else logprobs.detach()
        advantages, opd_metrics = (opd.distillation_advantages(alg.opd, mb, old_logprobs) if distilling
                                   else (mb.advantages, {}))
        loss, metrics = compute_policy_loss(
            logprobs, old_logprobs, advantages, mb.response_mask, variant=alg.loss,
            clip_low=alg.clip_low, clip_high=alg.clip_high, loss_agg=alg.loss_agg,
            ref_logprobs=mb.ref_logprobs, kl_coef=alg.kl_coef, kl_estimator=alg.kl_estimator,
            dual_clip_c=alg.dual_clip_c, entropy=entropy, normalizer=normalizer, max_response_length=max_len,
            is_weights=mb.rollout_weights, params=LossParams(**dataclasses.asdict(alg.loss_params)),
            token_selection=mb.loss_selection)
        if first_minibatch and mb.engine_logprobs is not None:
            metrics.update(train_rollout_mismatch(logprobs.detach(), mb.engine_logprobs, mb.response_mask))
        if distilling and alg.opd.top_k:
            topk_loss, topk_metrics = opd.topk_distillation_loss(alg.opd, mb, partial(
                aggregate_loss, response_mask=mb.response_mask.bool(), loss_agg=alg.loss_agg,
                normalizer=normalizer, max_response_length=max_len))
            loss, metrics = loss + topk_loss, {**metrics, **topk_metrics}
        return loss, {**metrics, **opd_metrics}

    return loss_fn


def select_minibatch_tokens(samples: list[Sample], whole, spec: UpdateSpec, step: int, minibatch: int) -> None:
    """clip_cov / kl_cov: the tokens their loss singles out, over the whole mini-batch (its covariance
    spans every micro-batch and data-parallel rank), from the old log-probs, with a draw seeded by (seed,
    step, mini-batch) so that every rank selects the same; each sample keeps its share."""
    alg = spec.algorithm
    seed = (spec.seed * 1_000_003 + step) * 1009 + minibatch
    selected = select_tokens(alg.loss, whole.old_logprobs, whole.advantages, loss_mask(samples, whole),
                             LossParams(**dataclasses.asdict(alg.loss_params)), torch.Generator().manual_seed(seed))
    for row, i in enumerate(whole.indices):
        samples[i].trainer.loss_selection = selected[row, response_span(samples[i])].float()
