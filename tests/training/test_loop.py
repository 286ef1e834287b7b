"""One full RL step per loss variant on a tiny MoE model: finite metrics, weights changed."""
import math
import signal

import pytest
import torch

from grpo_megatron.training.loop import Trainer


def varied_reward(text, answer, meta):
    """Differs between samples of a group even for a random model, so advantages are non-zero."""
    return float(sum(map(ord, text)) % 7) / 7


VARIED = {"functions": [{"name": f"{__name__}:varied_reward"}]}


def policy_weights(trainer):
    return {n: p.detach().clone() for c in trainer.learner.policy.unwrapped() for n, p in c.named_parameters()}


@pytest.mark.parametrize("loss, clip", [("grpo", (0.2, 0.28)), ("gspo", (3e-4, 4e-4)), ("gspo_token", (3e-4, 4e-4))])
def test_one_step_per_loss_variant(loss, clip, make_config, dist_world1):
    cfg = make_config(algorithm={"loss": loss, "clip_low": clip[0], "clip_high": clip[1], "kl_coef": 0.01},
                      train={"steps": 1}, reward=VARIED)
    trainer = Trainer(cfg)
    before = policy_weights(trainer)
    metrics = trainer.train_step()
    after = policy_weights(trainer)
    trainer.close()
    assert metrics["reward/std"] > 0
    assert any(not torch.equal(before[n], after[n]) for n in before), "no parameter changed"
    for key in ("reward/mean", "train/pg_loss", "train/grad_norm", "train/kl_ref", "train/entropy",
                "train/clip_frac_tokens", "train/ratio_mean", "train_rollout/logprob_abs_diff",
                "time/generation", "time/train", "time/weight_sync", "throughput/tokens_per_s"):
        assert key in metrics and math.isfinite(metrics[key]), key
    # The engine and the trainer hold the same weights before the update: log-probs agree.
    assert metrics["train_rollout/logprob_abs_diff"] < 1e-4
    assert trainer.rollouts.engine is not None and trainer.rollouts.engine.weight_version == 1


def test_engine_receives_the_updated_weights(make_config, dist_world1):
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    trainer = Trainer(make_config(train={"steps": 2}, reward=VARIED))
    # process-wide state is the entry point's (process_setup), never a constructor's
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    first = trainer.train_step()
    second = trainer.train_step()
    trainer.close()
    # Step 2's samples come from the engine after the sync of step 1's update; the trainer's log-probs
    # before step 2's update agree with the engine's only if the engine got exactly the new weights.
    assert first["train/grad_norm"] > 0
    assert second["train_rollout/logprob_abs_diff"] < 1e-4
    # Exporting must not leave autograd history on the parameters (the bridge broadcasts in place).
    assert all(p.is_leaf and p.grad_fn is None for c in trainer.learner.policy.chunks for p in c.parameters())


def test_token_budget_micro_batches_give_the_same_step(make_config, dist_world1):
    results = []
    for train in ({"micro_batch_size": 2}, {"max_tokens_per_microbatch": 48}):
        trainer = Trainer(make_config(train={"steps": 1, **train}, reward=VARIED,
                                      algorithm={"loss": "grpo", "loss_agg": "token_mean", "kl_coef": 0.01}))
        results.append(trainer.train_step())
        trainer.close()
    fixed, budget = results
    assert fixed["reward/mean"] == budget["reward/mean"]  # same rollout
    assert abs(fixed["train/pg_loss"]) > 1e-4 and fixed["train/kl_loss"] >= 0
    # The logged losses are the mini-batch's, whatever the split (each micro-batch holds a share of it).
    for key in ("train/grad_norm", "train/entropy", "train/ratio_mean", "train/pg_loss", "train/kl_loss"):
        assert budget[key] == pytest.approx(fixed[key], rel=1e-5, abs=1e-9), key


def half_constant_reward(text, answer, meta):
    """Constant (a zero-variance group) for prompts whose answer is an even digit, varied for odd ones."""
    return 0.5 if int(answer) % 2 == 0 else varied_reward(text, answer, meta)


def test_dynamic_sampling_draws_more_prompts_and_keeps_varied_groups(make_config, dist_world1):
    cfg = make_config(rollout={"dynamic_sampling": True, "max_sampling_rounds": 4},
                      reward={"functions": [{"name": f"{__name__}:half_constant_reward"}]})
    trainer = Trainer(cfg)
    batch, metrics = trainer.rollouts.rollout_now(trainer.step)
    trainer.close()
    G, prompts = cfg.rollout.group_size, cfg.rollout.prompts_per_step
    groups = [batch[g * G:(g + 1) * G] for g in range(len(batch) // G)]
    assert len(groups) == prompts
    # The first round held constant groups; the refill replaced every one of them.
    assert metrics["reward/zero_std_group_frac"] > 0
    assert metrics["rollout/prompts_drawn"] > prompts and metrics["rollout/dynamic_sampling_shortfall"] == 0
    assert all(len({s.reward for s in group}) > 1 for group in groups)
    assert all(int(s.answer) % 2 == 1 for s in batch)


def test_dynamic_sampling_fills_with_constant_groups_when_rounds_run_out(make_config, dist_world1):
    cfg = make_config(rollout={"dynamic_sampling": True, "max_sampling_rounds": 1},
                      reward={"functions": [{"name": f"{__name__}:half_constant_reward"}]})
    trainer = Trainer(cfg)
    batch, metrics = trainer.rollouts.rollout_now(trainer.step)
    trainer.close()
    G = cfg.rollout.group_size
    constant = sum(len({s.reward for s in batch[g:g + G]}) == 1 for g in range(0, len(batch), G))
    assert len(batch) == cfg.rollout.prompts_per_step * G
    assert constant > 0 and metrics["rollout/dynamic_sampling_shortfall"] == constant


def test_sft_warmup_lowers_answer_loss(make_config, dist_world1):
    trainer = Trainer(make_config(train={"sft_warmup_steps": 6, "sft_lr": 3e-3}))
    losses = trainer.learner.sft_warmup()
    trainer.close()
    assert losses[-1] < losses[0]


def test_reference_model_is_frozen_and_starts_equal_to_the_policy(make_config, dist_world1):
    trainer = Trainer(make_config(algorithm={"kl_coef": 0.1}, train={"steps": 2, "num_minibatches": 1},
                                  reward=VARIED))
    reference = trainer.learner.reference.model
    before = {n: p.detach().clone() for c in reference.chunks for n, p in c.named_parameters()}
    first = trainer.train_step()  # one optimizer step per batch: the step's log-probs are pre-update
    second = trainer.train_step()
    after = {n: p.detach().clone() for c in reference.chunks for n, p in c.named_parameters()}
    trainer.close()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not any(p.requires_grad for c in reference.chunks for p in c.parameters())
    assert first["train/kl_ref"] < 1e-10 < second["train/kl_ref"]
