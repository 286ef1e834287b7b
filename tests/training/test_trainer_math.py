"""Every trainer option that changes the math changes the gradient, exactly as the seed formulas say.

One rollout batch, one optimizer step at lr 0 (the weights stay put) and no gradient clipping: the
gradient megatron accumulated (`main_grad`) must equal the gradient of an independent reference loss,
computed here from scratch: a plain forward of each sequence through the unwrapped model, log-softmax in
float64, advantages, DAPO shaping and masks from the seed formulas, and the loop-based reference loss of
`tests/algorithms/reference.py`. The engine's and the reference model's weights are perturbed so that
ratios are far from 1 (clip bounds, dual clip and loss variants act) and the KL term is not zero.

Each case also checks that the reference gradient with the option switched back differs, so the
comparison could not pass with the option ignored.
"""
from __future__ import annotations


import pytest
import torch

from grpo_megatron.config import RunConfig, load_config
from grpo_megatron.rollout.data.prompts import PromptLoader
from grpo_megatron.training.builder import learner_spec, rollout_spec
from grpo_megatron.training.learner import Learner
from grpo_megatron.training.loop import Trainer
from grpo_megatron.training.metrics import PhaseTimer
from grpo_megatron.rollout.rewards.runner import RewardRunner
from grpo_megatron.training.rollout_side import RolloutSide
from tests.algorithms import reference

MAX_NEW_TOKENS = 4
CACHE_TOKENS = 2


def varied_reward(response_text: str, answer, meta) -> float:
    """Differs between samples of a group even for a random model."""
    return float(sum(map(ord, response_text)) % 7) / 7


BASE = {"loss": "grpo", "clip_low": 0.2, "clip_high": 0.28, "loss_agg": "token_mean", "advantage": "grpo",
        "kl_coef": 0.0, "kl_estimator": "k3", "dual_clip_c": None, "overlong_filter": False}
ENGINE_OLD = {"use_engine_logprobs": True}

# (name, algorithm overrides, rollout/reward overrides, the baseline it must differ from)
CASES = [
    ("loss_gspo", {"loss": "gspo", "loss_agg": "seq_mean_token_mean", "clip_low": 0.05, "clip_high": 0.05}, {},
     {"loss": "grpo"}),
    ("loss_gspo_token", {"loss": "gspo_token", "loss_agg": "seq_mean_token_mean", "clip_low": 0.05,
                         "clip_high": 0.05}, {}, {"loss": "grpo"}),
    ("loss_agg_seq_mean", {"loss_agg": "seq_mean_token_mean"}, {}, {"loss_agg": "token_mean"}),
    ("loss_agg_sum_norm", {"loss_agg": "seq_mean_token_sum_norm"}, {}, {"loss_agg": "token_mean"}),
    ("clip_bounds", {"clip_low": 0.05, "clip_high": 0.1}, {}, {"clip_low": 0.2, "clip_high": 0.28}),
    ("dual_clip", {"dual_clip_c": 1.5, "clip_low": 0.05, "clip_high": 0.05}, {}, {"dual_clip_c": None}),
    ("kl_k3", {"kl_coef": 0.5, "kl_estimator": "k3"}, {}, {"kl_coef": 0.0}),
    ("kl_k1", {"kl_coef": 0.5, "kl_estimator": "k1"}, {}, {"kl_estimator": "k3"}),
    ("kl_k2", {"kl_coef": 0.5, "kl_estimator": "k2"}, {}, {"kl_estimator": "k3"}),
    ("advantage_dr_grpo", {"advantage": "dr_grpo"}, {}, {"advantage": "grpo"}),
    ("overlong_filter", {"overlong_filter": True}, {}, {"overlong_filter": False}),
    ("overlong_penalty", {}, {"overlong_penalty": True}, {"overlong_penalty": False}),
    ("recomputed_old_logprobs", {}, {"use_engine_logprobs": False}, {"use_engine_logprobs": True}),
]


def _perturb(parameters, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def _config(task_files, run_dir, algorithm: dict, extra: dict) -> RunConfig:
    rollout = {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": MAX_NEW_TOKENS,
               "use_engine_logprobs": extra.get("use_engine_logprobs", True),
               "stop_token_ids": list(range(14, 30))}  # letters: a mix of finished and truncated samples
    reward = {"functions": [{"name": f"{__name__}:varied_reward"}], "overlong_penalty": extra.get("overlong_penalty", False),
              "overlong_cache_tokens": CACHE_TOKENS}
    return load_config(None, {
        "run_dir": str(run_dir), "model": {"hf_path": str(task_files["hf"])},
        "data": {"train_files": [str(task_files["train"])], "eval_files": []},
        "algorithm": {**BASE, **algorithm}, "rollout": rollout, "reward": reward,
        "train": {"steps": 1, "num_minibatches": 1, "micro_batch_size": 4, "lr": 0.0, "clip_grad": 0.0,
                  "num_threads": 1},
        "logging": {"progress_bar": False, "tensorboard": False}})


@pytest.fixture(scope="module")
def built(task_files, tmp_path_factory, dist_world1):
    """One stack for every case (lr 0: the weights never move), with a reference model for the KL cases."""
    run_dir = tmp_path_factory.mktemp("trainer_math")
    trainer = Trainer(_config(task_files, run_dir, {"kl_coef": 0.5}, {}))
    _perturb(trainer.rollouts.engine._model.parameters(), 0.3, seed=1)  # the behaviour policy differs from the trainer's
    _perturb((p for c in trainer.learner.reference.model.chunks for p in c.parameters()), 0.1, seed=2)
    yield trainer, run_dir
    trainer.close()


def _case(built, task_files, algorithm: dict, extra: dict) -> tuple[Learner, RolloutSide]:
    """The shared models under this case's config: a learner and a rollout side that differ only in it."""
    trainer, run_dir = built
    cfg = _config(task_files, run_dir, algorithm, extra)
    learner = trainer.learner
    case_learner = Learner(learner_spec(cfg), learner.policy, learner.actor, learner.memory, learner.tokenizer,
                           learner.train_data,
                           routing=learner.routing, reference=learner.reference if cfg.algorithm.kl_coef > 0 else None)
    loader = PromptLoader(learner.train_data, cfg.rollout.prompts_per_step, seed=cfg.train.seed, shuffle=cfg.data.shuffle)
    rollouts = RolloutSide(rollout_spec(cfg), trainer.rollouts.engine, learner.tokenizer, loader,
                           RewardRunner(cfg.reward), {})
    return case_learner, rollouts


def _sequence_logprobs(model, sample) -> torch.Tensor:
    """log pi(response token | prefix) for one sample, by a plain forward and a float64 log-softmax."""
    tokens = torch.tensor([sample.prompt_ids + sample.response_ids])
    logits = model(input_ids=tokens, position_ids=torch.arange(tokens.shape[1]).unsqueeze(0), attention_mask=None)
    start = len(sample.prompt_ids) - 1
    span = logits[0, start:start + len(sample.response_ids)]
    logp, _ = reference.logprobs_and_entropy(span, torch.tensor(sample.response_ids))
    return logp


def _expected_rewards(learner, samples, overlong_penalty: bool) -> list[float]:
    """The reward function on the decoded response, plus DAPO's soft overlong penalty from its formula."""
    rewards = []
    for s in samples:
        r = varied_reward(learner.tokenizer.decode(s.response_ids, skip_special_tokens=True), None, {})
        length = len(s.response_ids)
        if overlong_penalty and length > MAX_NEW_TOKENS - CACHE_TOKENS:
            r += ((MAX_NEW_TOKENS - CACHE_TOKENS) - length) / CACHE_TOKENS if length <= MAX_NEW_TOKENS else -1.0
        rewards.append(r)
    return rewards


def _reference_grads(learner, samples, alg: dict, extra: dict) -> dict[str, torch.Tensor]:
    policy = learner.policy.unwrapped()[0]
    rewards = _expected_rewards(learner, samples, extra.get("overlong_penalty", False))
    adv = reference.group_advantages(rewards, learner.spec.update.group_size,
                                     normalize_std=alg["advantage"] == "grpo", eps=1e-6)
    width = max(len(s.response_ids) for s in samples)
    rows = []
    for s in samples:
        values = _sequence_logprobs(policy, s)
        rows.append(torch.cat([values, values.new_zeros(width - len(values))]))
    logp = torch.stack(rows)
    mask = torch.zeros(len(samples), width)
    old = torch.zeros(len(samples), width, dtype=torch.float64)
    ref = torch.zeros(len(samples), width, dtype=torch.float64)
    for i, s in enumerate(samples):
        n = len(s.response_ids)
        mask[i, :n] = 0.0 if (alg["overlong_filter"] and s.truncated) else 1.0
        old[i, :n] = (torch.tensor(s.engine_logprobs, dtype=torch.float64) if extra.get("use_engine_logprobs", True)
                      else logp[i, :n].detach())
        if learner.reference is not None:
            with torch.no_grad():
                ref[i, :n] = _sequence_logprobs(learner.reference.model.unwrapped()[0], s)
    loss = reference.policy_loss(logp, old, torch.tensor(adv, dtype=torch.float64), mask, alg["loss"],
                                 alg["clip_low"], alg["clip_high"], alg["loss_agg"], ref=ref, kl_coef=alg["kl_coef"],
                                 kl_estimator=alg["kl_estimator"], dual_c=alg["dual_clip_c"], max_len=MAX_NEW_TOKENS)
    params = dict(policy.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(p)).float() for (n, p), g in zip(params.items(), grads)}


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Per tensor, not per element: float32 (trainer) against float64 (reference) differ by ~1e-6 of the norm."""
    return float((got - expected).norm() / expected.norm().clamp(min=1e-8))


def _close(a: dict, b: dict) -> bool:
    return all(_relative_error(a[n], b[n]) < 1e-4 for n in a)


@pytest.mark.parametrize("name, algorithm, extra, baseline", CASES, ids=[c[0] for c in CASES])
def test_trainer_gradient_matches_the_reference(name, algorithm, extra, baseline, built, task_files):
    learner, rollouts = _case(built, task_files, algorithm, extra)
    samples, _ = rollouts.rollout_now(0)
    assert any(s.truncated for s in samples) and not all(s.truncated for s in samples)
    metrics = learner.update(samples, 0, PhaseTimer())
    got = {n: p.main_grad.detach().clone() for n, p in learner.policy.unwrapped()[0].named_parameters()}
    alg = {**BASE, **algorithm}
    expected = _reference_grads(learner, samples, alg, extra)
    assert max(float(g.abs().max()) for g in got.values()) > 1e-6, "no gradient at all"
    for n in expected:
        assert _relative_error(got[n], expected[n]) < 1e-4, (name, n, _relative_error(got[n], expected[n]))
    # The option matters for this batch: switched back, the reference gradient is different.
    switched_alg = {**alg, **{k: v for k, v in baseline.items() if k in alg}}
    switched_extra = {**extra, **{k: v for k, v in baseline.items() if k not in alg}}
    assert not _close(expected, _reference_grads(learner, samples, switched_alg, switched_extra)), name
    if alg["dual_clip_c"] is not None:
        assert metrics["train/clip_frac_tokens"] > metrics["train/clip_frac_low"] + metrics["train/clip_frac_high"]

