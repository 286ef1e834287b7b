"""A tiny MoE policy with replay hooks, deterministic samples, and one R2/R3 step driven by hand."""
from __future__ import annotations

import torch

from grpo_megatron.models import build_loaded_policy
from grpo_megatron.parallel import ParallelLayout
from grpo_megatron.replay import attach_routing_replay
from grpo_megatron.training.actor import _run_schedule, data_parallel_info, forward_logprobs
from grpo_megatron.samples import Sample
from grpo_megatron.training.batch import make_micro_batches, split_for_rank

RECOMPUTE = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)


def build_policy(hf_dir, layout: ParallelLayout = ParallelLayout(), mode: str = "r2", wrap_ddp: bool = False,
                 **overrides):
    model = build_loaded_policy(hf_dir, layout, wrap_ddp=wrap_ddp, moe_enable_routing_replay=True, **overrides)
    return model, attach_routing_replay(model, mode)


def make_samples(count: int = 6, seed: int = 0, num_layers: int = 2, topk: int = 2, num_experts: int = 4,
                 with_routes: bool = False) -> list[Sample]:
    """Prompts of 3-5 tokens and responses of 2-6, so micro-batches need padding; random engine routes."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(count):
        prompt = torch.randint(4, 64, (3 + i % 3,), generator=g).tolist()
        response = torch.randint(4, 64, (2 + (i * 2) % 5,), generator=g).tolist()
        routes = None
        if with_routes:  # distinct experts per token, as a router would pick
            scores = torch.rand(len(prompt) + len(response) - 1, num_layers, num_experts, generator=g)
            routes = scores.topk(topk, dim=-1).indices.to(torch.int32)
        samples.append(Sample(prompt_ids=prompt, response_ids=response, group=i // 2, routed_experts=routes))
    return samples


def micro_batches_for(model, samples, indices=None, micro_batch_size: int = 2):
    dp_rank, dp_size = data_parallel_info()
    mine = split_for_rank(list(range(len(samples))) if indices is None else indices, samples, dp_rank, dp_size)
    pad = model.layout.tensor_parallel if model.config.sequence_parallel else 1
    return make_micro_batches(samples, mine, micro_batch_size, pad_id=0, pad_multiple=pad)


def nll_loss(mb, logprobs, entropy):
    mask = mb.response_mask
    loss = -(logprobs * mask).sum() / 64.0
    return loss, {"nll": loss.detach().clone(), "_tokens": torch.tensor(float(mb.num_response_tokens))}


def perturb_routers(model, scale: float = 2.0, seed: int = 1) -> None:
    """Same noise for a layer on every rank and layout (seeded by its global layer number)."""
    from megatron.core.transformer.moe.router import TopKRouter

    for chunk in model.chunks:
        for module in chunk.modules():
            if isinstance(module, TopKRouter):
                g = torch.Generator().manual_seed(seed * 1000 + module.layer_number)
                with torch.no_grad():
                    module.weight.add_(scale * torch.randn(module.weight.shape, generator=g))


def old_pass(model, samples):
    return forward_logprobs(model, micro_batches_for(model, samples), temperature=1.0)


def train_pass(model, samples, indices=None):
    """One forward+backward (no optimizer step) over `indices` of the samples; per-micro-batch outputs."""
    return _run_schedule(model, micro_batches_for(model, samples, indices), nll_loss, 1.0, forward_only=False)


def router_weights(model) -> dict[int, torch.nn.Parameter]:
    from megatron.core.transformer.moe.router import TopKRouter

    return {m.layer_number: m.weight for c in model.chunks for m in c.modules() if isinstance(m, TopKRouter)}


def token_nll(mb, logprobs, entropy):
    """Mean NLL per response token of the micro-batch (token-weighted by reduce_metrics: split-independent)."""
    tokens = mb.response_mask.sum().clamp(min=1)
    loss = -(logprobs * mb.response_mask).sum() / tokens
    return loss, {"nll": loss.detach().clone(), "_tokens": torch.tensor(float(mb.num_response_tokens))}


def replay_run(hf_dir, layout: ParallelLayout, mode: str) -> dict[str, float]:
    """One replay step (old pass, router change, training pass): global token NLL and agreement metrics."""
    from grpo_megatron.training.actor import reduce_metrics

    model, routing = build_policy(hf_dir, layout, mode=mode)
    samples = make_samples(8, with_routes=True)
    routing.begin_step(samples)
    old_pass(model, samples)
    perturb_routers(model, scale=0.5)
    outputs = _run_schedule(model, micro_batches_for(model, samples), token_nll, 1.0, forward_only=False)
    return {"nll": reduce_metrics(outputs)["nll"], **routing.end_step()}
