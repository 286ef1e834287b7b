"""Supervised warm start: a few steps of answer log-likelihood before RL, so that rewards start mixed.

RL from a random or weak model learns nothing while every sample of a group scores the same; a short
SFT on the training set's reference answers moves the policy to where groups disagree.
"""
from __future__ import annotations

import dataclasses

import torch

from grpo_megatron.training.actor import Actor, data_parallel_info
from grpo_megatron.samples import Sample
from grpo_megatron.training.batch import make_micro_batch, make_micro_batches, split_for_rank


def sft_samples(trainer, items) -> list[Sample]:
    eos = trainer.tokenizer.eos_token_id
    samples = []
    for group, item in enumerate(items):
        if item["answer"] is None:
            raise ValueError("train.sft_warmup_steps > 0 needs an `answer` in every training record")
        answer_ids = trainer.tokenizer(item["answer"], add_special_tokens=False).input_ids + [eos]
        samples.append(Sample(prompt_ids=list(item["prompt_ids"]), response_ids=answer_ids, group=group))
    return samples


def sft_warmup(trainer) -> list[float]:
    cfg = trainer.cfg
    sft_cfg = dataclasses.replace(cfg.train, lr=cfg.train.sft_lr, lr_warmup_steps=0, lr_decay_style="constant")
    actor = Actor(trainer.policy, sft_cfg, total_steps=cfg.train.sft_warmup_steps)
    batch_size = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    generator = torch.Generator().manual_seed(cfg.train.seed)
    losses = []
    dp_rank, dp_size = data_parallel_info()
    for _ in range(cfg.train.sft_warmup_steps):
        picks = torch.randint(len(trainer.train_data), (batch_size,), generator=generator).tolist()
        samples = sft_samples(trainer, [trainer.train_data[i] for i in picks])
        normalizer = float(make_micro_batch(samples, list(range(len(samples))), trainer.pad_id).num_response_tokens)
        mine = split_for_rank(list(range(len(samples))), samples, dp_rank, dp_size)
        micro = make_micro_batches(samples, mine, cfg.train.micro_batch_size, trainer.pad_id, trainer._pad_multiple())

        def nll(mb, logprobs, entropy):
            loss = -(logprobs * mb.response_mask).sum() / normalizer
            return loss, {"sft_loss": loss.detach() * normalizer / max(mb.num_response_tokens, 1)}

        losses.append(actor.train_step(micro, nll, temperature=1.0)["sft_loss"])
    trainer.actor.install_schedule_hooks()
    return losses
