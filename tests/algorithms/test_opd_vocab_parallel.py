"""OPD's vocab-parallel code as TP ranks 0 and 1 of size 2, in one process: each rank is a thread holding its
half of the vocabulary, and the collectives meet at a barrier. Fast enough for the default suite (the real
two-process gloo check is tests/algorithms/test_opd_tp.py, marked slow); checks every rank offset, slice
edge and reduction against the full-vocabulary reference.

The stand-in for torch.distributed follows torch/distributed/distributed_c10d.py (torch 2.13): `all_reduce`
reduces in place over the group (default op SUM; MAX takes the elementwise max), and `all_gather(tensor_list,
tensor)` fills `tensor_list[i]` with rank i's tensor; `get_rank(group)` / `get_world_size(group)` give the
rank within the group and its size.
"""
from __future__ import annotations

import threading
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.distributed as dist

from grpo_megatron.algorithms import opd
from grpo_megatron.algorithms.opd import topk_reverse_kl, vocab_logprobs_at, vocab_topk

WORLD_SIZE = 2
VOCAB = 20
LOCAL_VOCAB = VOCAB // WORLD_SIZE


class _ThreadRanks:
    """torch.distributed's rank queries and collectives for ranks that are threads of this process."""

    def __init__(self, size: int):
        self.size = size
        self._barrier = threading.Barrier(size, timeout=30)
        self._slots: list[torch.Tensor | None] = [None] * size
        self._local = threading.local()

    def get_rank(self, group=None) -> int:
        return self._local.rank

    def get_world_size(self, group=None) -> int:
        return self.size

    def _exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        self._slots[self._local.rank] = tensor.detach().clone()
        self._barrier.wait()
        values = list(self._slots)
        self._barrier.wait()
        return values

    def all_reduce(self, tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        stacked = torch.stack(self._exchange(tensor))
        tensor.copy_(stacked.amax(0) if op == dist.ReduceOp.MAX else stacked.sum(0))

    def all_gather(self, tensor_list, tensor, group=None, async_op=False):
        for out, value in zip(tensor_list, self._exchange(tensor)):
            out.copy_(value)

    def run(self, fn):
        """fn(rank) on every rank at once; the results in rank order. A failing rank breaks the barrier."""
        def as_rank(rank):
            self._local.rank = rank
            try:
                return fn(rank)
            except BaseException:
                self._barrier.abort()
                raise

        with ThreadPoolExecutor(self.size) as pool:
            futures = [pool.submit(as_rank, rank) for rank in range(self.size)]
            return [f.result() for f in futures]


@pytest.fixture
def ranks(monkeypatch) -> _ThreadRanks:
    fake = _ThreadRanks(WORLD_SIZE)
    monkeypatch.setattr(opd, "dist", types.SimpleNamespace(
        get_rank=fake.get_rank, get_world_size=fake.get_world_size, all_reduce=fake.all_reduce,
        all_gather=fake.all_gather, ReduceOp=dist.ReduceOp))
    return fake


GROUP = object()  # what megatron hands over as the TP group; only passed through


def _shard(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    return tensor[..., rank * LOCAL_VOCAB:(rank + 1) * LOCAL_VOCAB]


def _logits(dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(3, 4, VOCAB, generator=gen, dtype=dtype)
    logits[0, :, LOCAL_VOCAB:] += 10.0  # the whole top of row 0 on rank 1
    logits[1, :, :LOCAL_VOCAB] += 10.0  # and of row 1 on rank 0
    logits[2, 0, LOCAL_VOCAB + 3] = 120.0  # exp(120 - min) overflows float32: the shift must be the max
    return logits


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_at_every_id_and_gradient_equal_full_vocab(ranks, dtype, temperature):
    full = _logits(dtype)
    ids = torch.arange(VOCAB).expand(3, 4, VOCAB)  # every id: both slice edges of both ranks
    whole = full.clone().requires_grad_()
    want = vocab_logprobs_at(whole, ids, temperature)
    (want * torch.linspace(-1, 1, VOCAB, dtype=dtype)).sum().backward()
    assert torch.isfinite(want).all()

    def rank_part(rank):
        local = _shard(full, rank).clone().requires_grad_()
        got = vocab_logprobs_at(local, ids, temperature, GROUP)
        (got * torch.linspace(-1, 1, VOCAB, dtype=dtype)).sum().backward()
        return got.detach(), local.grad

    for rank, (got, grad) in enumerate(ranks.run(rank_part)):
        torch.testing.assert_close(got, want.detach())
        torch.testing.assert_close(grad, _shard(whole.grad, rank))


@pytest.mark.parametrize("k", [1, 4, LOCAL_VOCAB + 2])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_topk_equals_full_vocab_on_every_rank(ranks, k, temperature):
    teacher = _logits(torch.float64)
    want_lp, want_ids = vocab_topk(teacher, k, temperature)
    assert want_ids.shape[-1] == k
    for got_lp, got_ids in ranks.run(lambda rank: vocab_topk(_shard(teacher, rank), k, temperature, GROUP)):
        torch.testing.assert_close(got_lp, want_lp)
        assert torch.equal(got_ids, want_ids) and got_ids.dtype == torch.int64  # token ids index the vocabulary


def test_topk_kl_and_gradient_equal_full_vocab(ranks):
    student, teacher = _logits(torch.float64), 2 * torch.randn(3, 4, VOCAB, dtype=torch.float64)
    teacher_lp, ids = vocab_topk(teacher, 4)
    whole = student.clone().requires_grad_()
    want = topk_reverse_kl(vocab_logprobs_at(whole, ids), teacher_lp)
    want.sum().backward()

    def rank_part(rank):
        local = _shard(student, rank).clone().requires_grad_()
        got = topk_reverse_kl(vocab_logprobs_at(local, ids, 1.0, GROUP), teacher_lp)
        got.sum().backward()
        return got.detach(), local.grad

    for rank, (got, grad) in enumerate(ranks.run(rank_part)):
        torch.testing.assert_close(got, want.detach())
        torch.testing.assert_close(grad, _shard(whole.grad, rank))
