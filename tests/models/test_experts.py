"""Grouped-GEMM experts: the same outputs and gradients as megatron's SequentialMLP, fallback otherwise."""
import pytest
import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from grpo_megatron.models import build_model, model_dims
from grpo_megatron.models.experts import GroupedMMSequentialMLP
from grpo_megatron.models.tiny import tiny_hf_config
from grpo_megatron.parallel import ParallelLayout, init_model_parallel


@pytest.fixture
def experts(dist_world1) -> GroupedMMSequentialMLP:
    config = tiny_hf_config("qwen3_moe")
    init_model_parallel(ParallelLayout(), **model_dims(config))
    torch.manual_seed(0)
    model = build_model(config, ParallelLayout())
    module = model.chunks[0].decoder.layers[0].mlp.experts
    for param in module.parameters():  # megatron's init leaves expert fc2 near zero; make every path count
        param.data.normal_(0, 0.2)
    return module


def _inputs(module, counts: list[int]):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(sum(counts), module.config.hidden_size, generator=g, requires_grad=True)
    probs = torch.rand(sum(counts), generator=g, requires_grad=True)
    return hidden, torch.tensor(counts), probs


def _run(forward, module, counts):
    hidden, tokens_per_expert, probs = _inputs(module, counts)
    for param in module.parameters():
        param.grad = None
    out, bias = forward(module, hidden, tokens_per_expert, probs)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    grads = [hidden.grad, probs.grad] + [p.grad.clone() for p in module.parameters()]
    return out.detach(), bias, grads


@pytest.mark.parametrize("counts", [[5, 3, 7, 1], [0, 9, 0, 4]])
def test_outputs_and_gradients_match_sequential_mlp(experts, counts):
    ours, bias, our_grads = _run(GroupedMMSequentialMLP.forward, experts, counts)
    reference, _, reference_grads = _run(SequentialMLP.forward, experts, counts)
    assert bias is None and ours.shape == reference.shape == (sum(counts), experts.config.hidden_size)
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    assert len(our_grads) == len(reference_grads) == 2 + 2 * experts.num_local_experts
    for got, want in zip(our_grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    idle = [i for i, c in enumerate(counts) if c == 0]
    for i in idle:  # an expert without tokens gets an exact zero gradient, not garbage
        assert torch.equal(experts.local_experts[i].linear_fc1.weight.grad,
                           torch.zeros_like(experts.local_experts[i].linear_fc1.weight))


def test_uncovered_config_runs_megatrons_loop(experts):
    experts.config.activation_func_clamp_value = 0.05  # clamped GLU: only SequentialMLP implements it
    assert not experts._grouped_applies(torch.zeros(1))
    counts = [5, 3, 7, 1]
    ours, _, _ = _run(GroupedMMSequentialMLP.forward, experts, counts)
    reference, _, _ = _run(SequentialMLP.forward, experts, counts)
    assert torch.equal(ours, reference)
    experts.config.activation_func_clamp_value = None
    unclamped, _, _ = _run(GroupedMMSequentialMLP.forward, experts, counts)
    assert not torch.allclose(unclamped, reference)


def test_experts_above_the_size_limit_run_megatrons_loop(experts, monkeypatch):
    import grpo_megatron.models.experts as module

    size = sum(p.numel() for p in experts.local_experts[0].parameters())
    assert experts._grouped_applies(torch.zeros(1))
    monkeypatch.setattr(module, "GROUPED_MAX_EXPERT_ELEMENTS", size - 1)
    assert not experts._grouped_applies(torch.zeros(1))
    calls = []
    monkeypatch.setattr(GroupedMMSequentialMLP, "grouped_forward", lambda *a: calls.append(a))
    ours, _, _ = _run(GroupedMMSequentialMLP.forward, experts, [5, 3, 7, 1])
    reference, _, _ = _run(SequentialMLP.forward, experts, [5, 3, 7, 1])
    assert calls == [] and torch.equal(ours, reference)


def test_local_spec_moe_models_use_grouped_experts(experts):
    assert type(experts) is GroupedMMSequentialMLP
    assert experts.local_experts[0].linear_fc1.weight.shape[0] == 2 * experts.config.moe_ffn_hidden_size
