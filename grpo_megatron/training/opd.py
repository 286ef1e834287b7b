"""On-policy distillation in the trainer: the teacher (a frozen colocated megatron model, or SGLang servers) scores
each step's samples as they were sampled, and the loss takes the signal of algorithms/opd.py.

The student's log-prob in the signal is the old policy's (the one the PPO ratio starts from: the old-log-prob pass,
the engine's with rollout.use_engine_logprobs, or the training pass's own before the update), so with async
rollouts a stale sample is scored by the teacher on exactly its tokens and corrected like any other sample.
"""
from __future__ import annotations

import dataclasses
import itertools
from functools import partial

import torch
import torch.distributed as dist

from grpo_megatron.algorithms.opd import opd_advantages, topk_reverse_kl, vocab_logprobs_at, vocab_topk
from grpo_megatron.config import ConfigError, OPDConfig, SGLangConfig
from grpo_megatron.samples import MicroBatch, Sample
from grpo_megatron.training.batch import response_span



class MegatronTeacher:
    """A frozen megatron model with its own checkpoint, in the policy's parallel layout; like the reference model
    it sits in host memory between scoring passes (`offload`, GPU only)."""

    def __init__(self, opd: OPDConfig, layout, dtype: torch.dtype, student_vocab: int):
        from grpo_megatron.models import build_model, load_hf_config, load_hf_weights, model_dims
        from grpo_megatron.models.mcore_checkpoint import load_mcore_checkpoint
        from grpo_megatron.training.reference import ReferenceModel

        hf_config = load_hf_config(opd.hf_path)
        if hf_config.vocab_size != student_vocab:
            raise ConfigError(f"algorithm.opd.hf_path has vocab_size {hf_config.vocab_size}, the student "
                              f"{student_vocab}: a teacher must share the student's tokenizer")
        try:
            layout.validate(dist.get_world_size() if dist.is_initialized() else 1, **model_dims(hf_config))
        except ValueError as err:
            raise ConfigError(f"algorithm.opd teacher does not fit the parallel layout: {err}") from None
        model = build_model(hf_config, layout, dtype, wrap_ddp=False)
        if opd.megatron_path:
            load_mcore_checkpoint(model, opd.megatron_path)
        else:
            load_hf_weights(model, opd.hf_path)
        self.frozen = ReferenceModel(model, offload=opd.offload)

    def on_device(self):
        return self.frozen.on_device()


def build_teacher(opd: OPDConfig, layout, sglang: SGLangConfig, dtype: torch.dtype, student_vocab: int):
    """The configured teacher (None when algorithm.opd.teacher is none): a megatron one in the policy's `layout`,
    or an SGLang client with rollout.sglang's API key and request bound, on rank 0 only."""
    if opd.teacher == "megatron":
        return MegatronTeacher(opd, layout, dtype, student_vocab)
    if opd.teacher == "sglang":
        from grpo_megatron.rollout.factory import SGLangTeacher

        if dist.is_initialized() and dist.get_rank() != 0:
            return "sglang"  # the scores come from rank 0
        return SGLangTeacher(opd.sglang_urls, opd.top_k, sglang.api_key, opd.sglang_timeout_s,
                             sglang.max_in_flight, vocab_size=student_vocab)
    return None


def score_with_teacher(learner, samples: list[Sample]) -> None:
    """Set every sample's teacher log-probs (and top-k ids and log-probs) on every rank."""
    top_k = learner.spec.update.algorithm.opd.top_k
    if isinstance(learner.teacher, MegatronTeacher):
        with learner.teacher.on_device() as model:
            scores = _megatron_scores(learner, model, samples, top_k)
    else:
        scores = _from_rank0(learner.teacher.score([(s.prompt_ids, s.response_ids) for s in samples])
                             if not isinstance(learner.teacher, str) else None)
        scores = dict(enumerate(scores))
    for i, s in enumerate(samples):
        n = len(s.response_ids)
        found = scores.get(i)  # none on pipeline stages before the last (they compute no loss)
        trainer = s.trainer
        trainer.teacher_logprobs = found.logprobs if found is not None else torch.zeros(n)
        if top_k:
            trainer.teacher_topk_logprobs = found.topk_logprobs if found is not None else torch.zeros(n, top_k)
            trainer.teacher_topk_ids = found.topk_ids if found is not None else torch.zeros(n, top_k, dtype=torch.long)


def _from_rank0(obj):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    from grpo_megatron.parallel import control_group

    box = [obj]
    dist.broadcast_object_list(box, src=0, group=control_group())
    return box[0]


def _teacher_topk_hook(k: int, mb: MicroBatch, logits: torch.Tensor, temperature: float, group) -> MicroBatch:
    logprobs, ids = vocab_topk(logits, k, temperature, group)
    return dataclasses.replace(mb, extra={**mb.extra, "topk_logprobs": logprobs, "topk_ids": ids})


def _megatron_scores(learner, model, samples: list[Sample], top_k: int) -> dict:
    """The teacher's forward pass over every sample (like the trainer's reference pass: each sample on one DP rank,
    then one all-reduce of a flat buffer), on last pipeline stages."""
    from megatron.core import parallel_state

    from grpo_megatron.platform import device
    from grpo_megatron.rollout.factory import TeacherScores
    from grpo_megatron.training.actor import data_parallel_info, forward_logprobs

    micro = learner.micro_batches(samples, list(range(len(samples))))
    if top_k:
        for mb in micro:
            mb.on_logits = partial(_teacher_topk_hook, top_k)
    outputs = forward_logprobs(model, micro, learner.spec.update.logprob_temperature)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return {}
    offsets = [0, *itertools.accumulate(len(s.response_ids) for s in samples)]
    flat = torch.zeros(offsets[-1], 1 + 2 * top_k, dtype=torch.float64, device=device())  # ids exact in float64
    for mb, out in zip(micro, outputs):
        for row, i in enumerate(mb.indices):
            span, rows = response_span(samples[i]), slice(offsets[i], offsets[i + 1])
            flat[rows, 0] = out["logprobs"][row, span].double()
            if top_k:
                flat[rows, 1:1 + top_k] = out["topk_logprobs"][row, span].double()
                flat[rows, 1 + top_k:] = out["topk_ids"][row, span].double()
    if data_parallel_info()[1] > 1:
        dist.all_reduce(flat, group=parallel_state.get_data_parallel_group())
    flat = flat.cpu()
    scores = {}
    for i in range(len(samples)):
        part = flat[offsets[i]:offsets[i + 1]]
        scores[i] = TeacherScores(part[:, 0].float(), part[:, 1:1 + top_k].float() if top_k else None,
                                  part[:, 1 + top_k:].long() if top_k else None)
    return scores


def _student_topk_hook(mb: MicroBatch, logits: torch.Tensor, temperature: float, group) -> MicroBatch:
    student = vocab_logprobs_at(logits, mb.teacher_topk_ids, temperature, group)
    return dataclasses.replace(mb, extra={**mb.extra, "student_topk_logprobs": student})


def prepare_training_micro_batches(opd: OPDConfig, micro: list[MicroBatch]) -> None:
    """Top-k mode: the training pass also reads the student's log-probs at the teacher's top-k ids off the logits."""
    if opd.teacher != "none" and opd.top_k:
        for mb in micro:
            mb.on_logits = _student_topk_hook


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return values.masked_fill(~mask, 0.0).sum() / mask.sum().clamp(min=1)


def distillation_advantages(opd: OPDConfig, mb: MicroBatch, old_logprobs: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The advantages the policy loss takes under OPD (`[B, T]`, or the group's with top-k), and opd/teacher_kl:
    the mean k1 estimate of KL(student || teacher) over the loss's tokens (tool output and padding excluded)."""
    mask = mb.response_mask.bool()
    kl = (old_logprobs.detach().float() - mb.teacher_logprobs.float())
    metrics = {"opd/teacher_kl": _masked_mean(kl, mask).detach()}
    if opd.top_k:
        advantages = mb.advantages if opd.mode == "rl" else torch.zeros_like(mb.advantages)
        return advantages, metrics
    return opd_advantages(mb.advantages, old_logprobs, mb.teacher_logprobs, mask, opd.mode, opd.coef), metrics


def topk_distillation_loss(opd: OPDConfig, mb: MicroBatch, aggregate) -> tuple[torch.Tensor, dict]:
    """coef * the tail-aware top-k reverse KL, aggregated like the policy loss (`aggregate`: its mask, loss_agg and
    normaliser), and opd/topk_kl: its mean over the loss's tokens."""
    per_token = topk_reverse_kl(mb.extra["student_topk_logprobs"], mb.teacher_topk_logprobs)  # finite on padding
    return opd.coef * aggregate(per_token), {"opd/topk_kl": _masked_mean(per_token, mb.response_mask.bool()).detach()}
