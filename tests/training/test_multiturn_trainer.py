"""RL steps with `rollout.function: tool_loop` on the tiny MoE model: every loss variant, dynamic sampling and
routing replay R3 (tool tokens' routes from a prefill) run, tool tokens are out of the loss (the trainer's
log-probs of the sampled tokens equal the engine's; at tool positions the engine's are logged as 0.0), and a
user's rollout function named in the config is the one called."""
from __future__ import annotations

import math

import pytest

from grpo_megatron.rollout.engines.base import SamplingParams
from grpo_megatron.rollout.engines.embedded import EmbeddedEngine
from grpo_megatron.rollout.functions import single_turn
from grpo_megatron.rollout.tools.loop import tool_loop
from grpo_megatron.training.loop import Trainer
from tests.training.test_loop import VARIED

CALLS: list[int] = []
SEEN: list = []
ROUTE_SPANS: list[tuple[int, int]] = []


def recording_tool_loop(engine, items, params, context):
    """The built-in tool loop, keeping its samples for the test to look at."""
    groups = tool_loop(engine, items, params, context)
    SEEN.extend(s for group in groups for s in group)
    # the step takes the routes out of the samples (each rank gets its share): check them as they came
    ROUTE_SPANS.extend((s.routed_experts.shape[0], s.length - 1) for group in groups for s in group
                       if s.routed_experts is not None)
    return groups


def counting_rollout(engine, items, params, context):
    """A user's rollout function: the single-turn one, counting its calls."""
    CALLS.append(len(items))
    return single_turn(engine, items, params, context)


@pytest.fixture(scope="module")
def end_marker(task_files):
    """The token the random model samples most often from training prompts: some samples of every step end a
    turn on it (a call without a start marker, whose error output is inserted as the tool's)."""
    import collections
    import json

    from grpo_megatron.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(task_files["hf"])
    lines = task_files["train"].read_text().splitlines()[:16]
    prompts = [tokenizer(json.loads(line)["prompt"]).input_ids for line in lines]
    outs = EmbeddedEngine(task_files["hf"]).generate(prompts, SamplingParams(max_new_tokens=8, n=4, seed=0))
    counts = collections.Counter(t for group in outs for o in group for t in o.response_ids
                                 if t != tokenizer.eos_token_id)
    return tokenizer.convert_ids_to_tokens(counts.most_common(1)[0][0])


@pytest.mark.parametrize("loss, clip", [("grpo", (0.2, 0.28)), ("gspo", (3e-4, 4e-4)), ("gspo_token", (3e-4, 4e-4))])
def test_tool_loop_steps_with_every_loss_dynamic_sampling_and_r3(loss, clip, end_marker, make_config, dist_world1):
    SEEN.clear()
    ROUTE_SPANS.clear()
    cfg = make_config(
        algorithm={"loss": loss, "clip_low": clip[0], "clip_high": clip[1], "kl_coef": 0.01, "routing_replay": "r3"},
        rollout={"function": f"{__name__}:recording_tool_loop", "max_new_tokens": 24, "dynamic_sampling": True,
                 "max_sampling_rounds": 2,
                 "tools": {"format": "words", "names": ["calculator"], "max_turns": 3, "max_output_tokens": 3,
                           "call_markers": ["#", end_marker], "response_template": ": {output} ."}},
        train={"steps": 1}, reward=VARIED)
    trainer = Trainer(cfg)
    metrics = trainer.train_step()
    trainer.close()
    assert sum(0 in s.loss_mask for s in SEEN) >= 2 and all(s.meta["turns"] >= 1 for s in SEEN)
    assert len(ROUTE_SPANS) == len(SEEN) and all(routes == positions for routes, positions in ROUTE_SPANS)
    for key in ("reward/mean", "train/pg_loss", "train/grad_norm", "train/kl_ref", "routing/agree_rollout_train"):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert metrics["train_rollout/logprob_abs_diff"] < 1e-4  # tool positions (engine log-prob 0.0) left out
    assert metrics["routing/agree_rollout_train"] > 0.9


def test_a_users_rollout_function_is_called(make_config, dist_world1):
    CALLS.clear()
    trainer = Trainer(make_config(rollout={"function": f"{__name__}:counting_rollout"}, train={"steps": 1},
                                  reward=VARIED))
    metrics = trainer.train_step()
    trainer.close()
    assert CALLS == [trainer.cfg.rollout.prompts_per_step] and math.isfinite(metrics["train/pg_loss"])


@pytest.mark.parametrize("mode", ["one_step_off", "async"])
def test_tool_loop_in_the_background_rollout_modes(mode, end_marker, make_config, dist_world1):
    """The tool loop on the rollout thread, weights pushed while it runs (async: mid-generation too): every
    token has a weight version within max_staleness, and the steps train."""
    SEEN.clear()
    rollout = {"function": f"{__name__}:recording_tool_loop", "max_new_tokens": 24, "mode": mode,
               "tools": {"format": "words", "names": ["calculator"], "max_turns": 3, "max_output_tokens": 3,
                         "call_markers": ["#", end_marker], "response_template": ": {output} ."}}
    if mode == "async":
        rollout.update(max_staleness=1, partial_rollouts=True)
    trainer = Trainer(make_config(rollout=rollout, algorithm={"rollout_correction": {"mode": "tis"}},
                                  train={"steps": 3}, reward=VARIED))
    history = trainer.train()
    trainer.close()
    assert len(history) == 3 and all(math.isfinite(m["train/pg_loss"]) for m in history)
    assert any(0 in s.loss_mask for s in SEEN)
    assert all(len(s.weight_versions) == len(s.response_ids) for s in SEEN)
    assert max(m["async/staleness_max"] for m in history) <= 1
