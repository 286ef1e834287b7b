"""Partial rollouts: a weight update lands between two tokens of a running generation; each token (and the
route row that produced it) keeps the version it was sampled under, and the trainer replays and corrects
multi-version samples.

Replay rule across versions (R3): routed_experts row P-1+i is the route of the forward that sampled
response token i, under token_versions[i]; prompt rows are the prefill's, under the first version. The
trainer replays every row as recorded, whatever its version: the routes are part of the behaviour that
sampled the token, the decoupled correction weighs the token by pi_old / pi_behaviour with that same
expert choice, and no token older than rollout.max_staleness reaches the loss.
"""
import threading

import pytest
import torch
from safetensors.torch import load_file

from grpo_megatron.rollout.engines.base import SamplingParams
from grpo_megatron.rollout.engines.embedded import EmbeddedEngine
from grpo_megatron.training.loop import Trainer
from tests.training.test_loop import VARIED

SWITCH_AT = 3  # the update is asked for during the forward that samples token SWITCH_AT - 1


def generate_with_update(path, update: bool):
    """Two prompts x 2 samples, 8 tokens, routes; with `update`, new weights arrive mid-generation."""
    engine = EmbeddedEngine(path, seed=0)
    weights = {name: t * 1.5 for name, t in load_file(str(path / "model.safetensors")).items()}
    forward, calls, updater = engine._forward, [0], []

    def forward_then_update(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls[0] += 1
        if update and calls[0] == SWITCH_AT:  # another thread pushes; it must wait for the next token
            updater.append(threading.Thread(target=engine.update_weights, args=(weights.items(), 1)))
            updater[0].start()
            while not engine._pending:
                pass
        return out

    engine._forward = forward_then_update
    params = SamplingParams(max_new_tokens=8, temperature=1.0, n=2, seed=7, stop_token_ids=[])
    outs = engine.generate([[1, 5, 9], [2, 6]], params, return_routed_experts=True)
    for thread in updater:
        thread.join()
    return engine, [o for group in outs for o in group]


def test_update_lands_between_tokens_and_each_token_keeps_its_version(tiny_hf_dir):
    path = tiny_hf_dir("qwen3_moe")
    engine, mixed = generate_with_update(path, update=True)
    _, plain = generate_with_update(path, update=False)
    assert engine.weight_version == 1
    for m, p in zip(mixed, plain):
        cut = SWITCH_AT  # tokens 0..SWITCH_AT-1 came from forwards before the update
        assert m.token_versions[:cut] == [0] * cut
        assert set(m.token_versions[cut:]) <= {1} and m.weight_version == 0
        assert m.response_ids[:cut] == p.response_ids[:cut] and m.response_logprobs[:cut] == p.response_logprobs[:cut]
        rows = len(m.prompt_ids) - 1 + cut  # route rows up to the last old-version token: unchanged
        assert torch.equal(m.routed_experts[:rows], p.routed_experts[:rows])
        assert m.routed_experts.shape[0] == len(m.prompt_ids) + len(m.response_ids) - 1
    assert any(len(m.response_ids) > SWITCH_AT and m.response_logprobs[SWITCH_AT] != p.response_logprobs[SWITCH_AT]
               for m, p in zip(mixed, plain))  # the new weights sample the rest


def test_async_partial_rollouts_train_with_r3_and_the_correction(make_config, dist_world1):
    cfg = make_config(train={"steps": 3}, reward=VARIED,
                      rollout={"mode": "async", "max_staleness": 2, "partial_rollouts": True, "max_new_tokens": 6},
                      algorithm={"routing_replay": "r3", "rollout_correction": {"mode": "tis"}})
    trainer = Trainer(cfg)
    seen = []
    begin = trainer.learner.routing.begin_step

    def recording(samples, engine=None):  # the engine's routes as this rank received them (replay/delivery.py)
        seen.extend((s.weight_versions, engine.routes[i].clone()) for i, s in enumerate(samples))
        return begin(samples, engine)

    trainer.learner.routing.begin_step = recording
    history = trainer.train()
    trainer.close()
    assert all(m["train/pg_loss"] == m["train/pg_loss"] for m in history)
    assert max(m["async/staleness_max"] for m in history) <= 2
    assert all("async/multi_version_tokens" in m and "rollout_correction/ess_raw" in m for m in history)
    for versions, routes in seen:  # versions never decrease along a response; routes cover every position
        assert versions == sorted(versions) and routes.shape[0] >= len(versions)


def test_partial_rollouts_are_accepted_with_either_engine(make_config):
    """The SGLang engine resumes aborted samples across a push (tests/sglang/test_partial_rollouts.py)."""
    for engine in ("embedded", "sglang"):
        cfg = make_config(rollout={"mode": "async", "partial_rollouts": True, "engine": engine},
                          algorithm={"rollout_correction": {"mode": "tis"}})
        assert cfg.rollout.partial_rollouts and cfg.rollout.engine == engine
