"""Rollout samples -> padded micro-batch tensors for megatron, and per-sample results back.

Layout convention (one place, used by every forward pass): a sequence is prompt + response, right-
padded; position t of every per-token tensor refers to the *target* token t + 1, so the response
tokens r_0..r_{R-1} of a prompt of length P sit at positions P-1 .. P+R-2. Micro-batches are built
from sequences of similar length (sorted by length) and padded only to their own longest sequence; with
a token budget (like verl's dynamic batch size) their number of rows follows the sequence length.
"""
from __future__ import annotations

import torch

from grpo_megatron.samples import MicroBatch, Sample


def response_span(sample: Sample) -> slice:
    start = len(sample.prompt_ids) - 1
    return slice(start, start + len(sample.response_ids))


def _aligned(samples: list[Sample], values: list[torch.Tensor | list[float] | None], width: int) -> torch.Tensor | None:
    if any(v is None for v in values):
        return None
    rows = []
    for sample, value in zip(samples, values):
        value = value.tolist() if isinstance(value, torch.Tensor) else list(value)
        span = response_span(sample)
        rows.append([0.0] * span.start + value + [0.0] * (width - span.stop))
    return torch.tensor(rows, dtype=torch.float32)


def _aligned_rows(samples: list[Sample], values: list[torch.Tensor | None], width: int,
                  dtype: torch.dtype) -> torch.Tensor | None:
    """Per-sample `[R, k]` tensors placed at their response span of a zero `[b, width, k]` tensor."""
    if any(v is None for v in values):
        return None
    out = torch.zeros(len(samples), width, values[0].shape[-1], dtype=dtype)
    for row, (sample, value) in enumerate(zip(samples, values)):
        out[row, response_span(sample)] = value.to(dtype)
    return out


def make_micro_batch(samples: list[Sample], indices: list[int], pad_id: int, pad_multiple: int = 1) -> MicroBatch:
    """Rows built as Python lists and converted once: one tensor per field rather than per-row writes."""
    chosen = [samples[i] for i in indices]
    width = max(s.length for s in chosen)
    width = -(-width // pad_multiple) * pad_multiple
    tokens = torch.tensor([s.prompt_ids + s.response_ids + [pad_id] * (width - s.length) for s in chosen],
                          dtype=torch.long)
    columns = torch.arange(width)
    spans = torch.tensor([[span.start, span.stop] for span in map(response_span, chosen)])
    mask = ((columns >= spans[:, :1]) & (columns < spans[:, 1:])).to(torch.float32)
    targets = torch.cat([tokens[:, 1:], torch.full((len(chosen), 1), pad_id, dtype=torch.long)], dim=1)
    positions = columns.unsqueeze(0).expand(len(chosen), -1).contiguous()
    return MicroBatch(
        indices=list(indices),
        tokens=tokens,
        positions=positions,
        targets=targets,
        response_mask=mask,
        advantages=torch.tensor([s.trainer.advantage for s in chosen], dtype=torch.float32),
        old_logprobs=_aligned(chosen, [s.trainer.old_logprobs for s in chosen], width),
        ref_logprobs=_aligned(chosen, [s.trainer.ref_logprobs for s in chosen], width),
        engine_logprobs=_aligned(chosen, [s.engine_logprobs for s in chosen], width),
        rollout_weights=_aligned(chosen, [s.trainer.rollout_weights for s in chosen], width),
        loss_selection=_aligned(chosen, [s.trainer.loss_selection for s in chosen], width),
        loss_mask=None if all(s.loss_mask is None for s in chosen) else _aligned(
            chosen, [s.loss_mask if s.loss_mask is not None else [1] * len(s.response_ids) for s in chosen], width),
        teacher_logprobs=_aligned(chosen, [s.trainer.teacher_logprobs for s in chosen], width),
        teacher_topk_logprobs=_aligned_rows(chosen, [s.trainer.teacher_topk_logprobs for s in chosen], width,
                                            torch.float32),
        teacher_topk_ids=_aligned_rows(chosen, [s.trainer.teacher_topk_ids for s in chosen], width, torch.long),
    )


def split_for_rank(indices: list[int], samples: list[Sample], dp_rank: int, dp_size: int) -> list[int]:
    """This data-parallel rank's share of `indices`: sorted by length, then dealt round-robin."""
    ordered = sorted(indices, key=lambda i: (samples[i].length, i))
    return ordered[dp_rank::dp_size]


def samples_of_rank(samples: list[Sample], passes: list[list[int]], dp_rank: int, dp_size: int) -> list[int]:
    """The samples a data-parallel rank handles in any of `passes` (each a list of indices split over DP)."""
    return sorted(set().union(*(split_for_rank(indices, samples, dp_rank, dp_size) for indices in passes)))


def make_micro_batches(
    samples: list[Sample], indices: list[int], micro_batch_size: int, pad_id: int, pad_multiple: int = 1,
    max_tokens: int | None = None, count: int | None = None,
) -> list[MicroBatch]:
    """Length-bucketed micro-batches: at most `micro_batch_size` sequences, or with `max_tokens` at most
    that many padded tokens (rows x longest row; a longer sequence gets a micro-batch of its own).
    `count` asks for exactly that many micro-batches (see `token_budget_count` and `micro_batch_count`)."""
    ordered = sorted(indices, key=lambda i: (samples[i].length, i))
    if max_tokens:
        groups = _token_budget_groups([samples[i].length for i in ordered], max_tokens, count)
    elif count is not None:
        if not 1 <= count <= len(ordered):
            raise ValueError(f"{len(ordered)} samples cannot make {count} micro-batches")
        bounds = [len(ordered) * k // count for k in range(count + 1)]
        groups = list(zip(bounds[:-1], bounds[1:]))
    else:
        groups = [(start, min(start + micro_batch_size, len(ordered))) for start in range(0, len(ordered), micro_batch_size)]
    return [make_micro_batch(samples, ordered[a:b], pad_id, pad_multiple) for a, b in groups]


def _token_budget_groups(lengths: list[int], max_tokens: int, count: int | None) -> list[tuple[int, int]]:
    """[start, end) runs of ascending `lengths` whose padded size (rows x last length) fits `max_tokens`;
    with `count`, the largest padded run is split, or the smallest adjacent pair merged, until there are
    exactly `count` runs."""
    def padded(group: tuple[int, int]) -> int:
        return (group[1] - group[0]) * lengths[group[1] - 1]

    groups, start = [], 0
    for end in range(1, len(lengths) + 1):
        if end - start > 1 and (end - start) * lengths[end - 1] > max_tokens:
            groups.append((start, end - 1))
            start = end - 1
    if lengths:
        groups.append((start, len(lengths)))
    while count is not None and len(groups) < count:
        j = max(range(len(groups)), key=lambda k: (groups[k][1] - groups[k][0] > 1, padded(groups[k])))
        (a, b), middle = groups[j], (groups[j][0] + groups[j][1]) // 2
        groups[j:j + 1] = [(a, middle), (middle, b)]
    while count is not None and len(groups) > count:
        j = min(range(len(groups) - 1), key=lambda k: padded((groups[k][0], groups[k + 1][1])))
        groups[j:j + 2] = [(groups[j][0], groups[j + 1][1])]
    return groups


def token_budget_count(samples: list[Sample], shares: list[list[int]], max_tokens: int) -> int:
    """The number of token-budget micro-batches every data-parallel rank makes, so that collectives inside
    the forward pass (expert all-to-all) line up: the most any rank's share needs, at most the smallest
    share's size (then a rank with more rows merges two micro-batches beyond the budget)."""
    needed = [len(_token_budget_groups(sorted(samples[i].length for i in share), max_tokens, None)) for share in shares]
    return min(max(needed), min(len(share) for share in shares))



def micro_batch_count(share_sizes: list[int], micro_batch_size: int) -> int:
    """The number of row-count micro-batches every data-parallel rank makes from shares of these sizes, so that
    collectives inside the forward pass (expert all-to-all, DDP's gradient reduction) line up: enough for the
    largest share at `micro_batch_size` rows, at most the smallest share's size (with micro_batch_size 1 and
    shares of n and n + 1 rows, one micro-batch of the larger share gets 2 rows)."""
    if min(share_sizes) < 1:
        raise ValueError(f"{sum(share_sizes)} samples leave a data-parallel rank of {len(share_sizes)} without one: "
                         f"every mini-batch needs at least as many samples as data-parallel ranks")
    return min(max(-(-size // micro_batch_size) for size in share_sizes), min(share_sizes))


def rank_micro_batches(samples: list[Sample], indices: list[int], dp_rank: int, dp_size: int, micro_batch_size: int,
                       pad_id: int, pad_multiple: int = 1, max_tokens: int | None = None) -> list[MicroBatch]:
    """Data-parallel rank `dp_rank`'s micro-batches of `indices`, as many as every other rank makes."""
    shares = [split_for_rank(indices, samples, rank, dp_size) for rank in range(dp_size)]
    if max_tokens:
        count = token_budget_count(samples, shares, max_tokens)
    else:
        count = micro_batch_count([len(share) for share in shares], micro_batch_size)
    return make_micro_batches(samples, shares[dp_rank], micro_batch_size, pad_id, pad_multiple,
                              max_tokens=max_tokens, count=count)
