"""Micro-batch construction: row-count and token-budget micro-batches."""
import pytest

from grpo_megatron.samples import Sample, TrainerFields
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

    batch = [Sample(prompt_ids=[5, 6, 7], response_ids=[8, 9], group=0, engine_logprobs=[-0.5, -0.25],
                    trainer=TrainerFields(advantage=1.5, old_logprobs=torch.tensor([-1.0, -2.0]))),
             Sample(prompt_ids=[5], response_ids=[10, 11, 12, 13], group=1, engine_logprobs=[-1.0, -2.0, -3.0, -4.0],
                    trainer=TrainerFields(advantage=-0.5, old_logprobs=torch.tensor([-0.1, -0.2, -0.3, -0.4])))]
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


@pytest.mark.parametrize("num_samples, dp_size, micro_batch_size",
                         [(9, 2, 4), (9, 2, 1), (10, 4, 2), (7, 3, 2), (12, 3, 4), (5, 5, 8)])
def test_uneven_data_parallel_shares_make_the_same_micro_batch_count(num_samples, dp_size, micro_batch_size):
    """Ranks with different micro-batch counts run different numbers of expert all-to-alls: the last one
    waits for a partner that never comes (until NCCL's timeout). Shares differ by at most one sample."""
    from grpo_megatron.training.batch import micro_batch_count

    batch = samples((LENGTHS * 2)[:num_samples])
    shares = [split_for_rank(list(range(num_samples)), batch, rank, dp_size) for rank in range(dp_size)]
    count = micro_batch_count([len(share) for share in shares], micro_batch_size)
    made = [make_micro_batches(batch, share, micro_batch_size, 0, count=count) for share in shares]
    assert {len(micro) for micro in made} == {count}
    assert sorted(i for micro in made for mb in micro for i in mb.indices) == list(range(num_samples))
    largest = max(mb.tokens.shape[0] for micro in made for mb in micro)
    assert largest <= micro_batch_size or (micro_batch_size == 1 and largest == 2)
    even = [len(s) for s in shares] == [len(shares[0])] * dp_size and len(shares[0]) % micro_batch_size == 0
    if even:  # the split the ranks made before: micro_batch_size rows each
        assert all(mb.tokens.shape[0] == micro_batch_size for micro in made for mb in micro)


def test_a_rank_without_samples_is_refused_with_the_numbers():
    from grpo_megatron.training.batch import micro_batch_count

    with pytest.raises(ValueError, match="3 samples leave a data-parallel rank of 4 without one"):
        micro_batch_count([1, 1, 1, 0], 2)


def test_the_trainers_ranks_make_equal_micro_batch_counts(make_config, dist_world1, monkeypatch):
    """The trainer's own split (log-prob and training passes), as each of 2 data-parallel ranks computes it
    for a mini-batch of 9 samples at micro_batch_size 4: shares of 5 and 4 rows."""
    from grpo_megatron.training import learner
    from grpo_megatron.training.loop import Trainer

    trainer = Trainer(make_config(train={"micro_batch_size": 4}))
    batch = samples((LENGTHS * 2)[:9])
    counts = []
    for rank in range(2):
        monkeypatch.setattr(learner, "data_parallel_info", lambda rank=rank: (rank, 2))
        counts.append(len(trainer.learner.micro_batches(batch, list(range(9)))))
    trainer.close()
    assert counts == [2, 2]


def test_a_minibatch_smaller_than_the_data_parallel_size_is_refused(make_config, dist_world1, monkeypatch):
    from grpo_megatron.config import ConfigError
    from grpo_megatron.training import builder, loop

    monkeypatch.setattr(builder, "data_parallel_info", lambda: (0, 16))
    with pytest.raises(ConfigError, match="mini-batch of 8 samples leaves some of the 16 data-parallel ranks"):
        loop.Trainer(make_config())
