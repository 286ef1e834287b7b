"""The Actor's update: fused torch Adam, and gradients independent of how micro-batches are formed."""
import pytest
import torch

from grpo_megatron.algorithms import compute_policy_loss
from grpo_megatron.config import TrainConfig
from grpo_megatron.models import build_model, model_dims
from grpo_megatron.models.tiny import tiny_hf_config
from grpo_megatron.parallel import ParallelLayout, init_model_parallel
from grpo_megatron.platform import setup_platform
from grpo_megatron.training.actor import Actor
from grpo_megatron.samples import Sample, TrainerFields
from grpo_megatron.training.batch import make_micro_batches


def make_actor(lr: float) -> Actor:
    setup_platform()
    config = tiny_hf_config("qwen3_moe")
    layout = ParallelLayout()
    init_model_parallel(layout, seed=0, **model_dims(config))
    torch.manual_seed(0)
    policy = build_model(config, layout, wrap_ddp=True)
    return Actor(policy, TrainConfig(steps=10, num_minibatches=1, lr=lr, clip_grad=0.0), total_steps=10)


def rollout(n: int = 12) -> list[Sample]:
    g = torch.Generator().manual_seed(1)
    return [Sample(prompt_ids=torch.randint(1, 64, (3 + i % 4,), generator=g).tolist(),
                   response_ids=torch.randint(1, 64, (2 + (5 * i) % 7,), generator=g).tolist(), group=i // 4,
                   trainer=TrainerFields(advantage=float(torch.randn((), generator=g)))) for i in range(n)]


def gspo(num_sequences: int):
    def loss_fn(mb, logprobs, entropy):
        return compute_policy_loss(logprobs, logprobs.detach(), mb.advantages, mb.response_mask, variant="gspo",
                                   clip_low=3e-4, clip_high=4e-4, loss_agg="seq_mean_token_mean",
                                   entropy=entropy, normalizer=num_sequences)
    return loss_fn


def main_grads(actor: Actor) -> dict[str, torch.Tensor]:
    return {n: p.main_grad.clone() for n, p in actor.model.chunks[0].named_parameters()}


def test_megatron_adam_runs_the_fused_kernel(dist_world1):
    actor = make_actor(lr=1e-3)
    groups = [g for opt in actor.optimizer.chained_optimizers for g in opt.optimizer.param_groups]
    assert groups and all(g["fused"] and not g["foreach"] for g in groups)
    batch = rollout()
    params = dict(actor.model.chunks[0].named_parameters())
    start = {n: p.detach().clone() for n, p in params.items()}
    grads = []
    for _ in range(2):  # the second step depends on Adam's moments, not only on the gradient's sign
        metrics = actor.train_step(make_micro_batches(batch, list(range(len(batch))), 4, 0), gspo(len(batch)), 1.0)
        assert metrics["update_skipped"] == 0.0
        grads.append(main_grads(actor))
    expected = adam_reference(start, grads, lr=1e-3)
    for name, p in params.items():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-7, msg=name)
    assert max(float((p.detach() - start[n]).abs().max()) for n, p in params.items()) > 1e-4


def adam_reference(start: dict, grads: list[dict], lr: float, beta1=0.9, beta2=0.999, eps=1e-8) -> dict:
    """Adam (no weight decay) written out from its definition, step by step, with bias correction."""
    result = {}
    for name, p in start.items():
        m, v, p = torch.zeros_like(p), torch.zeros_like(p), p.clone()
        for t, step_grads in enumerate(grads, start=1):
            g = step_grads[name]
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            p = p - lr * (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + eps)
        result[name] = p
    return result


def test_token_budget_micro_batches_give_the_same_gradients(dist_world1):
    actor = make_actor(lr=0.0)
    batch = rollout()
    indices = list(range(len(batch)))
    fixed = make_micro_batches(batch, indices, 4, 0)
    budget = make_micro_batches(batch, indices, 4, 0, max_tokens=40)
    assert [mb.tokens.shape[0] for mb in budget] != [mb.tokens.shape[0] for mb in fixed]
    results = []
    for micro in (fixed, budget):
        metrics = actor.train_step(micro, gspo(len(batch)), 1.0)
        results.append((metrics, main_grads(actor)))
    (m_fixed, g_fixed), (m_budget, g_budget) = results
    assert m_budget["grad_norm"] == pytest.approx(m_fixed["grad_norm"], rel=1e-5) and m_fixed["grad_norm"] > 0
    for name in g_fixed:
        torch.testing.assert_close(g_budget[name], g_fixed[name], rtol=1e-5, atol=1e-7, msg=name)
