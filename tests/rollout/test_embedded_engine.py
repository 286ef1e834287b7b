"""EmbeddedEngine against transformers itself: log-probs, greedy decoding, sampling law, truncation,
routed experts, finish reasons, weight updates, and the prefill shared by the samples of a prompt."""
from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file

from grpo_megatron.rollout.engines.base import SamplingParams
from grpo_megatron.rollout.engines.embedded import EmbeddedEngine
from grpo_megatron.rollout.engines.hf_layout import WeightUpdateError

EOS = 2
# Prompts of different lengths, so batches are left-padded.
PROMPTS = [[1, 5, 6], [1, 20, 21, 22, 23, 24, 25, 26, 27], [1, 9], [1, 30, 31, 32, 33, 34]]


def _hf_model(path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _teacher_forced(model, completion, router_logits: bool = False):
    ids = torch.tensor([completion.prompt_ids + completion.response_ids])
    with torch.no_grad():
        return model(input_ids=ids, output_router_logits=router_logits)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "llama"])
@pytest.mark.parametrize("max_batch_tokens", [16384, 40])
def test_logprobs_and_routes_match_teacher_forced_forward(tiny_checkpoint, family, max_batch_tokens):
    path = tiny_checkpoint(family)
    engine = EmbeddedEngine(path, max_batch_tokens=max_batch_tokens, seed=0)
    moe = family != "llama"
    # Many stop tokens make rows stop at different steps, so finished rows leave the batch mid-decode.
    params = SamplingParams(max_new_tokens=10, temperature=0.7, top_p=0.95, top_k=40, n=3, seed=3,
                            stop_token_ids=list(range(50, 64)))
    groups = engine.generate(PROMPTS, params, return_routed_experts=moe)
    model = _hf_model(path)

    assert [len(g) for g in groups] == [3] * len(PROMPTS)
    lengths = set()
    for prompt, group in zip(PROMPTS, groups):
        for c in group:
            assert c.prompt_ids == prompt
            lengths.add(len(c.response_ids))
            out = _teacher_forced(model, c, router_logits=moe)
            p = len(prompt)
            expected = torch.log_softmax(out.logits[0, p - 1:-1].float() / params.temperature, dim=-1)
            expected = expected.gather(-1, torch.tensor(c.response_ids)[:, None]).squeeze(-1)
            assert torch.allclose(torch.tensor(c.response_logprobs), expected, atol=1e-5, rtol=0)
            if moe:
                seq = p + len(c.response_ids) - 1
                routes = torch.stack([torch.topk(torch.softmax(l.float(), -1), 2, dim=-1).indices[:seq]
                                      for l in out.router_logits], dim=1).to(torch.int32)
                assert c.routed_experts.dtype == torch.int32
                assert c.routed_experts.shape == (seq, 2, 2)
                assert torch.equal(c.routed_experts, routes)
            else:
                assert c.routed_experts is None
    assert len(lengths) > 1, "rows should have stopped at different steps"


def test_finish_reason_is_length_exactly_when_truncated(tiny_checkpoint):
    engine = EmbeddedEngine(tiny_checkpoint("qwen3"), seed=0)
    stops = set(range(40, 64))
    params = SamplingParams(max_new_tokens=6, n=16, seed=0, stop_token_ids=sorted(stops - {EOS}) + [EOS])
    completions = [c for g in engine.generate(PROMPTS, params) for c in g]
    reasons = {c.finish_reason for c in completions}
    assert reasons == {"stop", "length"}
    for c in completions:
        assert all(t not in stops | {EOS} for t in c.response_ids[:-1]), "generation must halt at a stop token"
        if c.finish_reason == "stop":
            assert c.response_ids[-1] in stops | {EOS} and len(c.response_ids) <= 6
        else:
            assert len(c.response_ids) == 6 and c.response_ids[-1] not in stops | {EOS}


def test_eos_stops_without_being_listed(tiny_checkpoint):
    engine = EmbeddedEngine(tiny_checkpoint("qwen3"), seed=0)
    completions = [c for g in engine.generate([[1, 4]], SamplingParams(max_new_tokens=30, n=64, seed=1)) for c in g]
    stopped = [c for c in completions if c.finish_reason == "stop"]
    assert stopped and all(c.response_ids[-1] == EOS for c in stopped)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2"])
def test_greedy_equals_transformers_generate(tiny_checkpoint, family):
    path = tiny_checkpoint(family)
    engine = EmbeddedEngine(path)
    groups = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=0.0, n=2))
    model = _hf_model(path)
    for prompt, group in zip(PROMPTS, groups):
        reference = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   do_sample=False, max_new_tokens=12, eos_token_id=EOS, pad_token_id=0)
        expected = reference[0, len(prompt):].tolist()
        if EOS in expected:
            expected = expected[:expected.index(EOS) + 1]
        assert group[0].response_ids == expected
        assert group[1].response_ids == expected


# PROMPTS sorted by length need 12, 13, 16 and 19 tokens a row with max_new_tokens=10, so with n=3 and a budget
# of 80 the two shortest groups share a micro-batch and each longer group is one alone; with 40 the two longest
# groups are too big and are split in two.
@pytest.mark.parametrize("max_batch_tokens,prefill_rows", [(16384, [4]), (80, [2, 1, 1]), (40, [1] * 6)])
def test_prefill_runs_once_per_distinct_prompt(tiny_checkpoint, max_batch_tokens, prefill_rows):
    engine = EmbeddedEngine(tiny_checkpoint("qwen3_moe"), max_batch_tokens=max_batch_tokens)
    forward, generate_batch = engine._forward, engine._generate_batch
    prefills, batches = [], []

    def counting_forward(input_ids, attention_mask, position_ids, cache, record_routes):
        if cache.get_seq_length() == 0:
            prefills.append(input_ids.shape[0])
        return forward(input_ids, attention_mask, position_ids, cache, record_routes)

    def recording_generate_batch(prompts, *args):
        batches.append(prompts)
        return generate_batch(prompts, *args)

    engine._forward, engine._generate_batch = counting_forward, recording_generate_batch
    params = SamplingParams(max_new_tokens=10, n=3, seed=0)
    groups = engine.generate(PROMPTS, params, return_routed_experts=True)

    assert prefills == prefill_rows
    assert sum(len(b) for b in batches) == 3 * len(PROMPTS)
    for batch in batches:
        assert len(batch) * (max(map(len, batch)) + params.max_new_tokens) <= max_batch_tokens
    assert [[c.prompt_ids for c in g] for g in groups] == [[p] * 3 for p in PROMPTS]


def test_repeated_prompts_share_one_prefill(tiny_checkpoint):
    engine = EmbeddedEngine(tiny_checkpoint("qwen3"))
    forward, prefills = engine._forward, []

    def counting_forward(input_ids, attention_mask, position_ids, cache, record_routes):
        if cache.get_seq_length() == 0:
            prefills.append(input_ids.shape[0])
        return forward(input_ids, attention_mask, position_ids, cache, record_routes)

    engine._forward = counting_forward
    prompts = PROMPTS + [PROMPTS[2], PROMPTS[0]]
    groups = engine.generate(prompts, SamplingParams(max_new_tokens=4, temperature=0.0))
    assert prefills == [len(PROMPTS)]
    assert [g[0].response_ids for g in groups[-2:]] == [groups[2][0].response_ids, groups[0][0].response_ids]


def test_greedy_samples_of_a_prompt_equal_each_other_and_n1(tiny_checkpoint):
    engine = EmbeddedEngine(tiny_checkpoint("qwen3_moe"))
    single = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=0.0), return_routed_experts=True)
    groups = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=0.0, n=4),
                             return_routed_experts=True)
    for [reference], group in zip(single, groups):
        assert len(group) == 4
        for c in group:
            assert c.response_ids == reference.response_ids
            assert c.finish_reason == reference.finish_reason
            assert c.response_logprobs == pytest.approx(reference.response_logprobs, abs=1e-5)
            assert torch.equal(c.routed_experts, reference.routed_experts)


def _next_token_logits(path, prompt) -> torch.Tensor:
    with torch.no_grad():
        return _hf_model(path)(input_ids=torch.tensor([prompt])).logits[0, -1].float()


def test_single_step_frequencies_follow_softmax(tiny_checkpoint):
    path = tiny_checkpoint("qwen3_moe")
    prompt, temperature, samples = [1, 7, 8, 9], 0.5, 6000
    engine = EmbeddedEngine(path)
    group = engine.generate([prompt], SamplingParams(max_new_tokens=1, temperature=temperature, n=samples, seed=5))[0]
    counts = torch.bincount(torch.tensor([c.response_ids[0] for c in group]), minlength=64).float()
    expected = torch.softmax(_next_token_logits(path, prompt) / temperature, -1) * samples
    chi2, dof = _chi_square(counts, expected)
    assert chi2 < dof + 5 * (2 * dof) ** 0.5, f"chi2={chi2:.1f} with {dof} degrees of freedom"
    # Sampling at temperature 1 instead must fail the same test: it is sensitive enough to matter.
    wrong_chi2, _ = _chi_square(counts, torch.softmax(_next_token_logits(path, prompt), -1) * samples)
    assert wrong_chi2 > dof + 5 * (2 * dof) ** 0.5, f"wrong law passes: chi2={wrong_chi2:.1f}"


def _chi_square(counts: torch.Tensor, expected: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic, pooling cells expected below 5 into one (as the test's approximation needs)."""
    frequent = expected >= 5
    observed, wanted = counts[frequent], expected[frequent]
    if not frequent.all():
        observed = torch.cat([observed, counts[~frequent].sum()[None]])
        wanted = torch.cat([wanted, expected[~frequent].sum()[None]])
    return float(((observed - wanted) ** 2 / wanted).sum()), len(wanted) - 1


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (-1, 0.3), (5, 0.5)])
def test_truncated_sampling_stays_in_allowed_set(tiny_checkpoint, top_k, top_p):
    path = tiny_checkpoint("llama")
    temperature = 0.4
    engine = EmbeddedEngine(path)
    params = SamplingParams(max_new_tokens=6, temperature=temperature, top_k=top_k, top_p=top_p, n=200, seed=2,
                            stop_token_ids=[])
    model = _hf_model(path)
    emitted_sizes = set()
    for c in engine.generate([PROMPTS[0]], params)[0]:
        logits = _teacher_forced(model, c).logits[0, len(c.prompt_ids) - 1:-1].float() / temperature
        for step, token in enumerate(c.response_ids):
            allowed = _allowed_tokens(logits[step], top_k, top_p)
            assert token in allowed, f"step {step}: token {token} outside {sorted(allowed)}"
            emitted_sizes.add(len(allowed))
    assert max(emitted_sizes) > 1  # the test would be vacuous if only greedy-like sets occurred


def _allowed_tokens(scaled_logits: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    order = scaled_logits.argsort(descending=True).tolist()
    if top_k != -1:
        order = order[:top_k]
    probs = torch.softmax(scaled_logits[order], -1).tolist()
    allowed, mass = set(), 0.0
    for token, prob in zip(order, probs):
        allowed.add(token)
        mass += prob
        if mass >= top_p - 1e-6:
            break
    return allowed


def test_update_weights_replaces_outputs_and_version(tiny_checkpoint):
    path = tiny_checkpoint("qwen3_moe")
    trained = load_file(str(path / "model.safetensors"))
    engine = EmbeddedEngine(transformers.AutoConfig.from_pretrained(path), seed=123)  # other random weights
    assert set(engine.expected_weight_shapes) == set(trained)
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    before = engine.generate(PROMPTS, greedy)
    reference = EmbeddedEngine(path).generate(PROMPTS, greedy)

    engine.update_weights(trained.items(), version=7)

    after = engine.generate(PROMPTS, greedy)
    assert engine.weight_version == 7 and after[0][0].weight_version == 7
    assert [g[0].response_ids for g in after] == [g[0].response_ids for g in reference]
    assert [g[0].response_ids for g in after] != [g[0].response_ids for g in before]
    assert [lp for g in after for lp in g[0].response_logprobs] == pytest.approx(
        [lp for g in reference for lp in g[0].response_logprobs], abs=1e-6)


def _bad_update(trained, rename=None, reshape=None, drop=None):
    for name, tensor in trained.items():
        if name == drop:
            continue
        if name == rename:
            name = name.replace("experts.1.", "experts.9.")
        if name == reshape:
            tensor = tensor[:-1]
        yield name, tensor


@pytest.mark.parametrize("kind", ["rename", "reshape", "drop"])
def test_update_weights_rejects_mismatch_naming_the_parameter(tiny_checkpoint, kind):
    path = tiny_checkpoint("qwen3_moe")
    trained = load_file(str(path / "model.safetensors"))
    engine = EmbeddedEngine(transformers.AutoConfig.from_pretrained(path), seed=123)
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    before = engine.generate(PROMPTS, greedy)
    target = "model.layers.1.mlp.experts.1.up_proj.weight"
    with pytest.raises(WeightUpdateError) as err:
        engine.update_weights(_bad_update(trained, **{kind: target}), version=1)
    message = str(err.value)
    assert target in message
    if kind == "rename":
        assert "unknown: model.layers.1.mlp.experts.9.up_proj.weight" in message and "missing: " + target in message
    if kind == "reshape":
        assert "mis-shaped" in message and "(31, 64)" in message
    # All or nothing: a rejected update leaves the weights (and version) as they were.
    assert engine.weight_version == 0
    assert [g[0].response_ids for g in engine.generate(PROMPTS, greedy)] == [g[0].response_ids for g in before]


def test_same_seed_same_samples_and_shutdown(tiny_checkpoint):
    engine = EmbeddedEngine(tiny_checkpoint("qwen3"))
    params = SamplingParams(max_new_tokens=5, n=4, seed=11)
    first, second = engine.generate(PROMPTS, params), engine.generate(PROMPTS, params)
    assert [[c.response_ids for c in g] for g in first] == [[c.response_ids for c in g] for g in second]
    engine.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        engine.generate(PROMPTS, params)


def test_bad_requests_name_the_fix(tiny_checkpoint):
    engine = EmbeddedEngine(tiny_checkpoint("qwen3"))
    with pytest.raises(ValueError, match="top_p"):
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=4, top_p=0.0))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([[1, 999]], SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="needs a MoE model"):
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=4), return_routed_experts=True)
    with pytest.raises(FileNotFoundError, match="config.json"):
        EmbeddedEngine("/nonexistent/checkpoint")
