"""Vocab-parallel log-probs / entropy under TP=2 (two gloo processes) equal the single-process values."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grpo_megatron.algorithms import token_logprobs_and_entropy
from grpo_megatron.parallel import free_port
from tests.algorithms import reference

WORLD_SIZE = 2


def _worker(rank: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        gen = torch.Generator().manual_seed(0)
        vocab = 22
        full = 3 * torch.randn(4, 5, vocab, generator=gen, dtype=torch.float64)
        full[0, :, vocab // 2:] += 40.0  # the rows' max on one rank only: exercises the rescaling
        full[1, :, : vocab // 2] += 40.0
        targets = torch.randint(0, vocab, (4, 5), generator=gen)
        w_lp, w_h = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64)
        local_vocab = vocab // WORLD_SIZE
        for temperature, chunk_size in ((1.0, None), (0.8, 3)):
            local = full[..., rank * local_vocab:(rank + 1) * local_vocab].clone().requires_grad_()
            logprobs, entropy = token_logprobs_and_entropy(
                local, targets, temperature=temperature, process_group=dist.group.WORLD, chunk_size=chunk_size
            )
            whole = full.clone().requires_grad_()
            naive_lp, naive_h = reference.logprobs_and_entropy(whole, targets, temperature)
            torch.testing.assert_close(logprobs, naive_lp)
            torch.testing.assert_close(entropy, naive_h)
            ((w_lp * logprobs).sum() + (w_h * entropy).sum()).backward()
            ((w_lp * naive_lp).sum() + (w_h * naive_h).sum()).backward()
            torch.testing.assert_close(local.grad, whole.grad[..., rank * local_vocab:(rank + 1) * local_vocab])
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_tp2_equals_single_process():
    mp.spawn(_worker, args=(free_port(),), nprocs=WORLD_SIZE, join=True)
