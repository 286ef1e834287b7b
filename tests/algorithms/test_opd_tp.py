"""OPD's vocab-parallel pieces under TP=2 (two gloo processes) equal the single-process values: the teacher's top-k
(values and ids) and the student's log-probs at given ids, with their gradient. Slow (a process launch)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grpo_megatron.algorithms.opd import topk_reverse_kl, vocab_logprobs_at, vocab_topk
from grpo_megatron.parallel import free_port

WORLD_SIZE = 2


def _worker(rank: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        gen = torch.Generator().manual_seed(0)
        vocab, k = 20, 4
        full = 3 * torch.randn(3, 5, vocab, generator=gen, dtype=torch.float64)
        full[0, :, vocab // 2:] += 10.0  # the whole top-k on rank 1 for this row
        teacher = 2 * torch.randn(3, 5, vocab, generator=gen, dtype=torch.float64)
        local_vocab = vocab // WORLD_SIZE
        part = slice(rank * local_vocab, (rank + 1) * local_vocab)
        for temperature in (1.0, 0.6):
            got_lp, got_ids = vocab_topk(teacher[..., part], k, temperature, dist.group.WORLD)
            want_lp, want_ids = vocab_topk(teacher, k, temperature)
            torch.testing.assert_close(got_lp, want_lp)
            assert torch.equal(got_ids, want_ids)
            local = full[..., part].clone().requires_grad_()
            whole = full.clone().requires_grad_()
            got = topk_reverse_kl(vocab_logprobs_at(local, want_ids, temperature, dist.group.WORLD), want_lp)
            want = topk_reverse_kl(vocab_logprobs_at(whole, want_ids, temperature), want_lp)
            torch.testing.assert_close(got, want)
            got.sum().backward()
            want.sum().backward()
            torch.testing.assert_close(local.grad, whole.grad[..., part])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_tp2_equals_single_process():
    mp.spawn(_worker, args=(free_port(),), nprocs=WORLD_SIZE, join=True)
