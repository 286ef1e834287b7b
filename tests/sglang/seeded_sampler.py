"""SGLang 0.5.23's seeded sampler (--enable-deterministic-inference), for the mock server.

What the mock follows, from the wheel's sources:
- srt/managers/tokenizer_manager.py (~2163-2180): an n > 1 request becomes n copies with the same sampling_params,
  so every copy carries the request's one `sampling_seed`;
- srt/sampling/sampling_batch_info.py (~157-171): under deterministic inference each request samples with its
  sampling_seed, or 42 when unset;
- srt/model_executor/model_runner.py (~2160-2172): the sampler's position is forward_batch.positions in decode and
  seq_lens - 1 in prefill, i.e. the position of the last token fed (len(prompt) - 1 for the first response token);
- srt/layers/sampler.py multinomial_with_seed (~934-975): Gumbel noise -log(-log(u)) with
  u = murmur_hash32(seed, position, column) / (2**32 - 1) (log clamped to [float64 min, -2**-32]), added to the
  float64 log-probs, argmax. Columns are token ids in the plain case (sampling_from_probs_torch); with top-k/top-p
  (top_k_top_p_min_p_sampling_from_probs_torch, ~837-850, the pytorch backend deterministic mode forces) they are
  ranks of the descending sort, entries outside top-k/top-p zeroed before the log;
- kernels/ops/sampling/murmur_hash.py: MurmurHash3 (x86, 32-bit, hash seed 0) of the 16 bytes
  seed_low32, seed_high32, position, column;
- the returned log-prob is F.log_softmax(logits / temperature) (sampler.py ~274-285).
So the noise depends only on (seed, position, token): samples that share a seed share their response.
"""
from __future__ import annotations

import torch

from grpo_megatron.rollout.engines.base import SamplingParams

DEFAULT_SEED = 42  # sampling_batch_info.py: the seed of a request without sampling_seed
_MASK = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) held in int64, without overflowing int64."""
    low = x * (c & 0xFFFF)
    high = ((x * (c >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK


def _rotl32(x: torch.Tensor, r: int) -> torch.Tensor:
    return ((x << r) | (x >> (32 - r))) & _MASK


def _mix(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    k = _mul32(_rotl32(_mul32(k, 0xCC9E2D51), 15), 0x1B873593)
    h = _rotl32(h ^ k, 13)
    return (_mul32(h, 5) + 0xE6546B64) & _MASK


def murmur_hash32(seed: torch.Tensor, positions: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """[n, m] uint32 values (as int64) for seeds and positions [n] and columns [m]."""
    seed, positions, columns = seed.long(), positions.long(), columns.long()
    n, m = len(seed), len(columns)
    h = torch.zeros(n, 1, dtype=torch.long)
    h = _mix(h, (seed & _MASK)[:, None])
    h = _mix(h, ((seed >> 32) & _MASK)[:, None])
    h = _mix(h, (positions & _MASK)[:, None])
    h = _mix(h.expand(n, m), (columns & _MASK)[None, :].expand(n, m))
    h = h ^ 16
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def gumbel_argmax(logprobs: torch.Tensor, seed: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """multinomial_with_seed: the column index [n] maximising float64 log-prob + hashed Gumbel noise."""
    u = murmur_hash32(seed, positions, torch.arange(logprobs.shape[1])).to(torch.float64) / _MASK
    noise = -(-u.log().clamp(min=torch.finfo(torch.float64).min, max=-(2.0 ** -32))).log()
    return torch.argmax(noise + logprobs.to(torch.float64), dim=1)


def seeded_sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
                  positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An EmbeddedEngine sampler: every row samples with the request's one seed (42 when unset); `generator`
    is not used, as SGLang's seeded path draws no random numbers."""
    if params.temperature == 0:
        tokens = logits.argmax(dim=-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    seed = torch.full((len(logits),), DEFAULT_SEED if params.seed is None else params.seed, dtype=torch.long)
    scaled = logits.float() / params.temperature
    probs = torch.softmax(scaled, -1)
    if params.top_k == -1 and params.top_p >= 1.0:  # sampling_from_probs_torch: columns are token ids
        tokens = gumbel_argmax(torch.log(probs), seed, positions)
    else:  # top_k_top_p_min_p_sampling_from_probs_torch: columns are ranks of the descending sort
        ranked, order = probs.sort(dim=-1, descending=True)
        before = ranked.cumsum(-1)
        if params.top_k != -1:
            ranked[:, params.top_k:] = 0.0
        ranked[(before - ranked) > params.top_p] = 0.0
        tokens = order.gather(1, gumbel_argmax(ranked.log(), seed, positions)[:, None]).squeeze(-1)
    return tokens, torch.log_softmax(scaled, -1).gather(-1, tokens[:, None]).squeeze(-1)
