"""Every sample of a group gets its own seed, so a server that seeds its sampler still gives G different responses.

The GPU scripts start SGLang with --enable-deterministic-inference, which SGLang 0.5.23 refuses on CPU (its
torch_native attention backend is not among ascend, fa3, fa4, flashinfer, intel_xpu, triton:
srt/arg_groups/overrides.py ~1119). So these tests run the mock server started with that flag, which follows
SGLang's seeded sampler exactly (tests/sglang/seeded_sampler.py cites the lines): every copy of an n > 1 request
samples with that request's one seed (tokenizer_manager.py ~2163-2180; 42 when unset, sampling_batch_info.py
~157-171), and the Gumbel noise depends only on (seed, position, token id) (sampler.py multinomial_with_seed
~934-975, kernels/ops/sampling/murmur_hash.py).
"""
from __future__ import annotations

import struct

import httpx
import pytest
import torch

from grpo_megatron.rollout.engines.base import SamplingParams
from grpo_megatron.rollout.engines.embedded import EmbeddedEngine
from grpo_megatron.rollout.sglang.seeds import sample_seeds
from grpo_megatron.rollout.sglang import SGLangEngine, ServerPool, TensorSync
from grpo_megatron.samples import Sample
from grpo_megatron.training.group_diversity import identical_group_fraction, warn_if_identical
from tests.sglang.seeded_sampler import murmur_hash32, seeded_sample

PROMPTS = [[1, 5, 9, 2], [3, 4], [7, 7, 8]]
GROUP = 4


def _murmur3_x86_32(data: bytes, seed: int = 0) -> int:
    """MurmurHash3_x86_32 as published (Appleby's reference), one block at a time."""
    mask, h = 0xFFFFFFFF, seed
    for (k,) in struct.iter_unpack("<I", data[:len(data) // 4 * 4]):
        k = (k * 0xCC9E2D51) & mask
        k = ((k << 15) | (k >> 17)) & mask
        k = (k * 0x1B873593) & mask
        h ^= k
        h = ((h << 13) | (h >> 19)) & mask
        h = (h * 5 + 0xE6546B64) & mask
    tail = data[len(data) // 4 * 4:]
    if tail:
        k = int.from_bytes(tail, "little")
        k = (k * 0xCC9E2D51) & mask
        k = ((k << 15) | (k >> 17)) & mask
        h ^= (k * 0x1B873593) & mask
    h ^= len(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & mask
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & mask
    return h ^ (h >> 16)


def test_reference_murmur3_matches_published_vectors():
    assert _murmur3_x86_32(b"") == 0 and _murmur3_x86_32(b"", 1) == 0x514E28B7
    assert _murmur3_x86_32(b"Hello, world!", 0x9747B28C) == 0x24884CBA
    assert _murmur3_x86_32(b"The quick brown fox jumps over the lazy dog", 0x9747B28C) == 0x2FA826CD


def test_mock_hash_is_murmur3_of_seed_position_and_column():
    """murmur_hash.py hashes the 16 bytes seed_low32, seed_high32, position, column with hash seed 0."""
    seeds = torch.tensor([0, 42, 2**31 - 1, 2**40 + 5])
    positions = torch.tensor([0, 3, 1000, 7])
    columns = torch.tensor([0, 1, 17, 151935])
    got = murmur_hash32(seeds, positions, columns)
    for i, (s, p) in enumerate(zip(seeds.tolist(), positions.tolist())):
        for j, c in enumerate(columns.tolist()):
            key = struct.pack("<IIII", s & 0xFFFFFFFF, s >> 32, p, c)
            assert int(got[i, j]) == _murmur3_x86_32(key)


def test_seeded_sampler_noise_depends_only_on_seed_position_and_token():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(max_new_tokens=1, temperature=1.0, seed=9)
    same = seeded_sample(logits[[0, 0, 0]], params, torch.Generator(), torch.tensor([5, 5, 5]))[0]
    assert same.unique().numel() == 1  # one seed, one position, one distribution: one token
    drawn = {int(seeded_sample(logits[:1], params, torch.Generator(), torch.tensor([p]))[0]) for p in range(40)}
    assert len(drawn) > 5  # the position moves the noise


def _post(url: str, payload: dict) -> list[dict]:
    body = httpx.post(url + "/generate", json=payload, timeout=60).json()
    return body if isinstance(body, list) else [body]


def test_one_request_with_n_copies_gives_n_identical_responses(mock_gpu_config_url):
    """What SGLang does with the old payload (one request, n = G, one seed): G copies of one response."""
    for seed in (7, None):
        sampling = {"max_new_tokens": 8, "temperature": 1.0, "n": GROUP}
        if seed is not None:
            sampling["sampling_seed"] = seed
        outs = _post(mock_gpu_config_url, {"input_ids": PROMPTS[0], "sampling_params": sampling})
        assert len(outs) == GROUP and len({tuple(o["output_ids"]) for o in outs}) == 1


def _engine(url: str) -> SGLangEngine:
    pool = ServerPool([url], timeout_s=60)
    return SGLangEngine(pool, TensorSync(pool, 64, tp_size=1), max_in_flight=2)


def _responses(groups) -> list[list[tuple[int, ...]]]:
    return [[tuple(c.response_ids) for c in group] for group in groups]


@pytest.mark.parametrize("partial_rollouts", [False, True])
def test_seeded_groups_have_distinct_samples_and_redraw_the_same(mock_gpu_config_url, partial_rollouts):
    engine = _engine(mock_gpu_config_url)
    engine.partial_rollouts = partial_rollouts
    params = SamplingParams(max_new_tokens=8, temperature=1.0, n=GROUP, seed=1234)
    first = _responses(engine.generate(PROMPTS, params))
    # G seeds, G draws: never one response G times (two may still coincide where the tiny model is near-certain,
    # as its random start-up weights are for the third prompt), and most of the batch distinct
    assert all(len(set(group)) > 1 for group in first), first
    assert sum(len(set(group)) for group in first) >= len(PROMPTS) * GROUP - 2, first
    assert _responses(engine.generate(PROMPTS, params)) == first  # a resumed run redraws the same samples
    other = _responses(engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.0, n=GROUP, seed=99)))
    assert other != first


def test_sample_seeds_are_distinct_within_and_fixed_across_calls():
    seeds = [sample_seeds(5, i, 8) for i in range(100)]
    assert all(len(set(s)) == 8 for s in seeds) and seeds == [sample_seeds(5, i, 8) for i in range(100)]
    assert len({x for s in seeds for x in s}) == 800 and sample_seeds(6, 0, 8) != seeds[0]
    assert all(0 <= x < 2**31 for s in seeds for x in s)


def test_embedded_engine_gives_every_sample_of_a_seeded_group_its_own_draw(tiny_hf_dir):
    engine = EmbeddedEngine(tiny_hf_dir("qwen3_moe"))
    params = SamplingParams(max_new_tokens=8, temperature=1.0, n=GROUP, seed=1234)
    first = _responses(engine.generate(PROMPTS, params))
    assert all(len(set(group)) == GROUP for group in first)
    assert _responses(engine.generate(PROMPTS, params)) == first


def _sample(response: list[int], logprob: float | None = None) -> Sample:
    return Sample(prompt_ids=[1], response_ids=response, group=0,
                  engine_logprobs=None if logprob is None else [logprob] * len(response))


def test_a_converged_policys_repeated_answer_is_not_taken_for_a_shared_seed():
    """G copies of a response drawn with mean token probability above ~0.9 are what a converged policy samples
    (the tiny example warned at every step after it learnt the task); copies of unlikely tokens are not."""
    certain = [_sample([1, 2], logprob=-0.01)] * 4
    unlikely = [_sample([1, 2], logprob=-1.5)] * 4
    assert identical_group_fraction(certain + unlikely, 4) == 1.0
    assert identical_group_fraction(certain + unlikely, 4, uncertain_only=True) == 0.5
    assert identical_group_fraction([_sample([1, 2])] * 4, 4, uncertain_only=True) == 1.0  # no log-probs: counted


def test_identical_group_fraction_and_its_warning(caplog):
    samples = [_sample([1, 2])] * 4 + [_sample([1, 2]), _sample([1, 3]), _sample([1, 2]), _sample([1, 2])]
    assert identical_group_fraction(samples, 4) == 0.5
    assert identical_group_fraction(samples[4:], 4) == 0.0
    warn_if_identical(0.5, 0.5, temperature=1.0)
    assert "rollout.identical_groups_warn" in caplog.text
    caplog.clear()
    warn_if_identical(1.0, 0.5, temperature=0.0)  # greedy groups are identical by design
    warn_if_identical(0.4, 0.5, temperature=1.0)
    assert not caplog.records
