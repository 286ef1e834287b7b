"""R2/R3 on a tiny megatron Qwen3-MoE in one process: exact replay, gradients, recompute, engine routes."""
import pytest
import torch

from grpo_megatron.replay import attach_routing_replay
from grpo_megatron.rollout.engines.base import SamplingParams
from grpo_megatron.rollout.engines.embedded import EmbeddedEngine
from grpo_megatron.samples import Sample
from tests.replay.helpers import (
    RECOMPUTE, build_policy, make_samples, micro_batches_for, old_pass, perturb_routers, router_weights, train_pass)


def capture_routing(model):
    """Forward hooks collecting each router's routing map [tokens, experts] per call, by layer number."""
    from megatron.core.transformer.moe.router import TopKRouter

    seen, handles = {}, []
    for chunk in model.chunks:
        for module in chunk.modules():
            if isinstance(module, TopKRouter):
                def hook(mod, args, output):
                    seen.setdefault(mod.layer_number, []).append(output[1].detach().clone())
                handles.append(module.register_forward_hook(hook))
    return seen, handles


def _by_token(routing_map: torch.Tensor, mb) -> torch.Tensor:
    """A router's [s * b, experts] map (megatron's sequence-major token order) as [b, s, experts]."""
    b, s = mb.tokens.shape
    return routing_map.view(s, b, -1).transpose(0, 1)


def mismatches(model, samples, seen, expected_experts) -> int:
    """Real tokens whose experts in the captured pass `seen` differ from `expected_experts(sample, layer)`,
    a bool [positions, experts] map built without the replay code (no RouteTable.align)."""
    count = 0
    for layer, calls in seen.items():
        for mb, routing_map in zip(micro_batches_for(model, samples), calls):
            used = _by_token(routing_map, mb)
            for row, i in enumerate(mb.indices):
                expected = expected_experts(samples[i], layer)
                count += int((used[row, :expected.shape[0]] != expected).any(-1).sum())
    return count


def experts_of_pass(model, samples, seen):
    """expected_experts: what the router chose in another captured pass over the same micro-batches."""
    maps = {(layer, i): _by_token(m, mb)[row, :samples[i].length]
            for layer, calls in seen.items() for mb, m in zip(micro_batches_for(model, samples), calls)
            for row, i in enumerate(mb.indices)}
    index = {id(s): i for i, s in enumerate(samples)}
    return lambda sample, layer: maps[(layer, index[id(sample)])]


def experts_of_engine(num_experts: int):
    """expected_experts: the engine's routes [positions, layers, top-k] of the sample, as a bool map."""
    def expected(sample, layer):
        routes = sample.routed_experts[:, layer - 1].long()
        return torch.zeros(routes.shape[0], num_experts, dtype=torch.bool).scatter_(1, routes, True)
    return expected


@pytest.mark.parametrize("mode", ["r2", "none"])
def test_replay_uses_exactly_the_recorded_experts_after_a_router_change(mode, tiny_hf_dir, dist_world1):
    model, routing = build_policy(tiny_hf_dir("qwen3_moe"), mode=mode)
    samples = make_samples()
    routing.begin_step(samples)
    before, handles = capture_routing(model)
    old_pass(model, samples)
    for h in handles:
        h.remove()
    perturb_routers(model, scale=0.5)
    seen, handles = capture_routing(model)
    train_pass(model, samples)
    for h in handles:
        h.remove()
    metrics = routing.end_step()
    changed = mismatches(model, samples, seen, experts_of_pass(model, samples, before))
    assert metrics["routing/agree_old_current"] < 1.0  # the live router now disagrees with the old one...
    if mode == "r2":
        assert changed == 0  # ...but the forward pass used the recorded experts
    else:
        assert changed > 0


def test_router_gets_gradients_under_replay(tiny_hf_dir, dist_world1):
    model, routing = build_policy(tiny_hf_dir("qwen3_moe"), mode="r3")
    samples = make_samples(with_routes=True)
    routing.begin_step(samples)
    old_pass(model, samples)
    train_pass(model, samples)
    routing.end_step()
    for layer, weight in router_weights(model).items():
        assert weight.grad is not None and torch.isfinite(weight.grad).all()
        assert weight.grad.abs().sum() > 0, f"router of layer {layer} got no gradient"


def run_r2_step(model, routing, samples):
    routing.begin_step(samples)
    old_pass(model, samples)
    perturb_routers(model, scale=0.5)
    outputs = train_pass(model, samples)
    metrics = routing.end_step()
    grads = {n: p.grad.clone() for c in model.chunks for n, p in c.named_parameters()}
    return [float(o["nll"]) for o in outputs], grads, metrics


def test_backward_recompute_replays_the_same_routes(tiny_hf_dir, dist_world1):
    """Full recompute re-runs every router in the backward pass (REPLAY_BACKWARD): same loss and grads."""
    samples = make_samples()
    plain = run_r2_step(*build_policy(tiny_hf_dir("qwen3_moe"), mode="r2"), samples)
    recomputed = run_r2_step(*build_policy(tiny_hf_dir("qwen3_moe"), mode="r2", **RECOMPUTE), samples)
    assert plain[2]["routing/agree_old_current"] < 1.0  # live routing would differ in the recompute
    assert recomputed[0] == pytest.approx(plain[0], rel=1e-6)
    for name, grad in plain[1].items():
        assert torch.allclose(recomputed[1][name], grad, atol=1e-6, rtol=1e-5), name
    assert recomputed[2] == pytest.approx(plain[2])


def engine_samples(hf_dir, prompts_seed: int = 0) -> list[Sample]:
    engine = EmbeddedEngine(hf_dir)
    g = torch.Generator().manual_seed(prompts_seed)
    prompts = [[1, *torch.randint(4, 64, (3 + i,), generator=g).tolist()] for i in range(3)]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=5, n=2, seed=3), return_routed_experts=True)
    return [Sample(prompt_ids=o.prompt_ids, response_ids=o.response_ids, group=g_, routed_experts=o.routed_experts)
            for g_, group in enumerate(outs) for o in group]


def test_r3_engine_routes_agree_then_drop_after_a_weight_change(tiny_hf_dir, dist_world1):
    hf_dir = tiny_hf_dir("qwen3_moe")
    samples = engine_samples(hf_dir)
    model, routing = build_policy(hf_dir, mode="none")

    def rollout_agreement():
        routing.begin_step(samples)
        old_pass(model, samples)
        train_pass(model, samples)
        return routing.end_step()

    same = rollout_agreement()
    assert same["routing/agree_rollout_train"] == 1.0
    assert same["routing/agree_rollout_train/layer_0"] == same["routing/agree_rollout_train/layer_1"] == 1.0
    perturb_routers(model, scale=0.5)
    changed = rollout_agreement()
    assert changed["routing/agree_rollout_train"] < 0.95

    # R3 after the change: the training forward uses the engine's experts, not the live ones.
    routing = attach_routing_replay(model, "r3")
    routing.begin_step(samples)
    old_pass(model, samples)
    seen, handles = capture_routing(model)
    train_pass(model, samples)
    for h in handles:
        h.remove()
    metrics = routing.end_step()
    assert mismatches(model, samples, seen, experts_of_engine(model.config.num_moe_experts)) == 0
    assert metrics["routing/agree_rollout_train"] < 0.95
