"""Micro-batch construction: row-count and token-budget micro-batches."""
import pytest

from grpo_megatron.samples import Sample
from grpo_megatron.training.batch import make_micro_batches, split_for_rank, token_budget_count

LENGTHS = [3, 9, 4, 12, 5, 5, 20, 7, 6, 3]


def samples(lengths=LENGTHS):
    return [Sample(prompt_ids=[1] * 2, response_ids=[2] * (n - 2), group=i) for i, n in enumerate(lengths)]


def test_token_budget_keeps_every_micro_batch_within_budget():
    batch = samples()
    micro = make_micro_batches(batch, list(range(len(batch))), 2, pad_id=0, max_tokens=24)
    assert sorted(i for mb in micro for i in mb.indices) == list(range(len(batch)))
    assert all(mb.tokens.numel() <= 24 or mb.tokens.shape[0] == 1 for mb in micro)
    assert [mb.tokens.shape for mb in micro][-1] == (1, 20)  # longer than the budget: alone
    # sorted by length, so short sequences share a micro-batch: fewer rows padded than fixed 2-row batches
    assert max(mb.tokens.shape[0] for mb in micro) > 2
    fixed = make_micro_batches(batch, list(range(len(batch))), 2, pad_id=0)
    assert sum(mb.tokens.numel() for mb in micro) <= sum(mb.tokens.numel() for mb in fixed)


@pytest.mark.parametrize("count", [1, 3, 7, 10])
def test_token_budget_count_is_exact(count):
    batch = samples()
    micro = make_micro_batches(batch, list(range(len(batch))), 2, pad_id=0, max_tokens=24, count=count)
    assert len(micro) == count
    assert sorted(i for mb in micro for i in mb.indices) == list(range(len(batch)))


def test_every_data_parallel_rank_gets_the_same_count():
    batch = samples([3, 3, 3, 3, 30, 30, 30, 30, 3])
    shares = [split_for_rank(list(range(len(batch))), batch, rank, 2) for rank in range(2)]
    count = token_budget_count(batch, shares, max_tokens=40)
    counts = {len(make_micro_batches(batch, share, 4, 0, max_tokens=40, count=count)) for share in shares}
    assert counts == {count} and count >= 2


def test_micro_batch_layout_follows_the_convention():
    import torch

    from grpo_megatron.training.batch import make_micro_batch

    batch = [Sample(prompt_ids=[5, 6, 7], response_ids=[8, 9], group=0, engine_logprobs=[-0.5, -0.25], advantage=1.5,
                    old_logprobs=torch.tensor([-1.0, -2.0])),
             Sample(prompt_ids=[5], response_ids=[10, 11, 12, 13], group=1, engine_logprobs=[-1.0, -2.0, -3.0, -4.0],
                    advantage=-0.5, old_logprobs=torch.tensor([-0.1, -0.2, -0.3, -0.4]))]
    mb = make_micro_batch(batch, [1, 0], pad_id=0, pad_multiple=4)
    assert mb.indices == [1, 0]
    assert mb.tokens.tolist() == [[5, 10, 11, 12, 13, 0, 0, 0], [5, 6, 7, 8, 9, 0, 0, 0]]  # width 5 -> 8
    assert mb.targets.tolist() == [[10, 11, 12, 13, 0, 0, 0, 0], [6, 7, 8, 9, 0, 0, 0, 0]]
    assert mb.positions.tolist() == [list(range(8))] * 2
    # position t predicts token t + 1: the response of a prompt of length P sits at P-1 .. P+R-2
    assert mb.response_mask.tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0]]
    assert mb.engine_logprobs.tolist() == [[-1, -2, -3, -4, 0, 0, 0, 0], [0, 0, -0.5, -0.25, 0, 0, 0, 0]]
    assert torch.allclose(mb.old_logprobs, torch.tensor([[-0.1, -0.2, -0.3, -0.4, 0, 0, 0, 0],
                                                         [0, 0, -1.0, -2.0, 0, 0, 0, 0]]))
    assert mb.ref_logprobs is None and mb.advantages.tolist() == [-0.5, 1.5] and mb.num_response_tokens == 6
    assert mb.tokens.dtype == torch.long and mb.response_mask.dtype == torch.float32
