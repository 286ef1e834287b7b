"""Supervised warm start: a few steps of answer log-likelihood before RL, so that rewards start mixed.

RL from a random or weak model learns nothing while every sample of a group scores the same; a short
SFT on the training set's reference answers moves the policy to where groups disagree.

The steps go through the RL actor's own optimizer. A second optimizer would leave the RL optimizer's fp32
master copies (bf16/fp16 runs: megatron-core's `Float16OptimizerWithFloat16Params` clones them at construction,
the distributed optimizer likewise) at the pre-SFT weights, and its first step would copy them back into the
model, undoing the warm start; with the distributed optimizer it would also hold a second fp32 state.
"""
from __future__ import annotations

import torch

from grpo_megatron.samples import Sample
from grpo_megatron.training.actor import data_parallel_info
from grpo_megatron.training.batch import make_micro_batch, rank_micro_batches


def sft_samples(tokenizer, items) -> list[Sample]:
    eos = tokenizer.eos_token_id
    samples = []
    for group, item in enumerate(items):
        if item["answer"] is None:
            raise ValueError("train.sft_warmup_steps > 0 needs an `answer` in every training record")
        answer_ids = tokenizer(item["answer"], add_special_tokens=False).input_ids + [eos]
        samples.append(Sample(prompt_ids=list(item["prompt_ids"]), response_ids=answer_ids, group=group))
    return samples


def sft_warmup(learner) -> list[float]:
    """`train.sft_warmup_steps` steps at the constant `train.sft_lr`; RL then starts with the actor's LR schedule
    where it was and fresh Adam moments, as with an optimizer of its own, but from masters that hold the SFT result."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    train, actor = learner.spec.train, learner.actor
    rl_scheduler = actor.scheduler
    groups = actor.optimizer.param_groups
    rl_bounds = [{key: group.pop(key) for key in ("max_lr", "min_lr") if key in group} for group in groups]
    for group in groups:  # megatron's param groups carry their own LR bounds, which a scheduler prefers
        group["max_lr"], group["min_lr"] = train.sft_lr, 0.0
    wd = train.weight_decay
    actor.scheduler = OptimizerParamScheduler(
        actor.optimizer, init_lr=train.sft_lr, max_lr=train.sft_lr, min_lr=0.0, lr_warmup_steps=0,
        lr_decay_steps=max(train.sft_warmup_steps, 1), lr_decay_style="constant", start_wd=wd, end_wd=wd,
        wd_incr_steps=max(train.sft_warmup_steps, 1), wd_incr_style="constant")
    try:
        losses = _sft_steps(learner, actor)
    finally:
        actor.scheduler = rl_scheduler
        for group, bounds in zip(groups, rl_bounds):
            del group["max_lr"], group["min_lr"]
            group.update(bounds)
        rl_scheduler.step(increment=0)  # the RL schedule's LR and weight decay back on every param group
        forget_optimizer_state(actor.optimizer)
    return losses


def forget_optimizer_state(optimizer) -> None:
    """Drop Adam's moments and step counts (they are created again, zero, at the next step); the fp32 masters,
    which are parameters of the inner optimizer, not state, keep their values."""
    for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(wrapper, "optimizer", None)
        if inner is not None:
            inner.state.clear()


def _sft_steps(learner, actor) -> list[float]:
    train, data = learner.spec.train, learner.train_data
    batch_size = learner.spec.sft_batch_size
    generator = torch.Generator().manual_seed(train.seed)
    losses = []
    dp_rank, dp_size = data_parallel_info()
    for _ in range(train.sft_warmup_steps):
        picks = torch.randint(len(data), (batch_size,), generator=generator).tolist()
        samples = sft_samples(learner.tokenizer, [data[i] for i in picks])
        normalizer = float(make_micro_batch(samples, list(range(len(samples))), learner.pad_id).num_response_tokens)
        micro = rank_micro_batches(samples, list(range(len(samples))), dp_rank, dp_size, train.micro_batch_size,
                                   learner.pad_id, learner.spec.pad_multiple)

        def nll(mb, logprobs, entropy):
            loss = -(logprobs * mb.response_mask).sum() / normalizer
            return loss, {"sft_loss": loss.detach() * normalizer / max(mb.num_response_tokens, 1)}

        losses.append(actor.train_step(micro, nll, temperature=1.0)["sft_loss"])
    return losses
