"""The Trainer with `rollout.engine: sglang` against two mock SGLang servers (the real-server run is in sglang_live)."""
from __future__ import annotations

import math
import time

import pytest
import torch

from grpo_megatron.config import load_config
from grpo_megatron.rollout.engines.base import SamplingParams
from grpo_megatron.rollout.factory import make_engine
from grpo_megatron.training.loop import Trainer
from tests.sglang.conftest import request_log, running_requests, set_token_delay
from tests.sglang.test_weight_sync import new_weights


def server_run(tmp_path, tiny_hf_dir, rollout: dict, algorithm: dict | None = None, steps: int = 2):
    """A short run of the tiny Qwen3-MoE on the first-digit task (rewarded by varied_reward), its rollouts on
    SGLang servers: `rollout` adds to 4 prompts x 4 samples of 3 tokens."""
    from grpo_megatron.rollout.data.tasks import make_task_dataset

    return load_config(None, {
        "run_dir": str(tmp_path / "run"),
        "model": {"hf_path": str(tiny_hf_dir("qwen3_moe"))},
        "data": {"train_files": [str(make_task_dataset("first_digit", 64, 0, tmp_path / "train.jsonl"))]},
        "rollout": {"engine": "sglang", "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 3, **rollout},
        "reward": {"functions": [{"name": "tests.training.test_loop:varied_reward"}]},
        **({"algorithm": algorithm} if algorithm is not None else {}),
        "train": {"steps": steps, "num_minibatches": 1, "micro_batch_size": 8, "lr": 1e-3, "num_threads": 1},
        "logging": {"progress_bar": False, "tensorboard": False},
    })


@pytest.mark.parametrize("mode", ["tensor", "disk"])
def test_trainer_rolls_out_on_servers_and_pushes_each_update(mode, mock, tiny_hf_dir, tmp_path, dist_world1):
    cfg = server_run(tmp_path, tiny_hf_dir,
                     {"sglang": {"urls": mock, "weight_sync": mode, "probe_tolerance": 1e-4, "bucket_mb": 1}},
                     algorithm={"loss": "gspo"})
    trainer = Trainer(cfg)
    steps = [trainer.train_step(), trainer.train_step()]
    trainer.close()
    route = {"tensor": "/update_weights_from_tensor", "disk": "/update_weights_from_disk"}[mode]
    for url in mock:
        log = request_log(url)
        assert log.count("/begin_weight_update") == log.count("/end_weight_update") >= 2, log
        assert route in log and "/generate" in log
    for metrics in steps:
        assert metrics["weight_sync/bytes"] > 0 and math.isfinite(metrics["weight_sync/mb_per_s"])
        # The servers hold exactly the trainer's weights after every push (float32 mock server).
        assert metrics["weight_sync/probe_max_abs_diff"] < 1e-4
    # Step 2 samples come from the servers after step 1's push: the trainer's log-probs agree with theirs.
    assert steps[1]["train_rollout/logprob_abs_diff"] < 1e-4
    assert steps[0]["train/grad_norm"] > 0


def test_background_rollouts_probe_each_push_after_giving_the_engine_back(mock, tiny_hf_dir, tmp_path, dist_world1):
    """rollout.mode async: the post-sync probe still checks every push, but once the push has let go of the
    engine (no hold on it), so the rollout thread can generate while the probe's reference forward runs."""
    cfg = server_run(tmp_path, tiny_hf_dir,
                     {"mode": "async", "sglang": {"urls": mock[:1], "weight_sync": "tensor", "probe_tolerance": 1e-4}},
                     algorithm={"rollout_correction": {"mode": "tis"}}, steps=3)
    trainer = Trainer(cfg)
    probe, checks = trainer.rollouts.engine.probe, []
    check = probe.check

    def recording(pool, version, complete=True):
        checks.append((version, trainer.rollouts.worker._holds))
        return check(pool, version, complete)

    probe.check = recording
    steps = [trainer.train_step() for _ in range(3)]
    trainer.close()
    assert checks == [(1, 0), (2, 0), (3, 0)]  # every push probed once, none while holding the engine
    assert all(metrics["weight_sync/probe_max_abs_diff"] < 1e-4 for metrics in steps)


def test_router_takes_generation_and_servers_take_weights(mock, tiny_hf_dir, tmp_path):
    """With rollout.sglang.router_url, /generate goes to the router; sync and probe go to each server directly."""
    server, router = mock  # the second mock stands in for sglang-router's URL
    model = tiny_hf_dir("qwen3_moe")
    cfg = load_config(None, {"model": {"hf_path": str(model)}, "data": {"train_files": [str(tmp_path / "unused.jsonl")]},
                             "reward": {"functions": [{"name": "copy"}]},
                             "rollout": {"engine": "sglang", "sglang": {"urls": [server], "router_url": router,
                                                                        "weight_sync": "tensor"}}})
    engine = make_engine(cfg.rollout, cfg.model.hf_path, cfg.train.seed, dtype=torch.float32)
    out = engine.generate([[1, 5, 6], [1, 7]], SamplingParams(max_new_tokens=2, n=2))
    assert [len(group) for group in out] == [2, 2]
    assert request_log(router).count("/generate") == 4 and "/generate" not in request_log(server)  # per sample
    # R3 generations bypass the router (sglang-router 0.3.2 drops return_routed_experts) and keep their experts.
    replay = engine.generate([[1, 5, 6]], SamplingParams(max_new_tokens=2), return_routed_experts=True)
    assert replay[0][0].routed_experts is not None
    assert request_log(router).count("/generate") == 4 and request_log(server).count("/generate") == 1
    engine.update_weights(new_weights(model, seed=5), version=1)
    engine.shutdown()
    assert "/update_weights_from_tensor" in request_log(server)
    assert not {"/begin_weight_update", "/update_weights_from_tensor", "/flush_cache"} & set(request_log(router))
    assert engine.last_sync["probe_max_abs_diff"] < 1e-4 and request_log(server).count("/generate") == 2  # + probe


def test_colocated_gpu_servers_free_their_memory_while_the_trainer_trains(mock, tiny_hf_dir, tmp_path, dist_world1):
    """rollout -> release weights + KV cache -> training -> resume weights -> push -> resume KV cache -> rollout.
    (The mock answers the memory routes as a server started with --enable-memory-saver; CPU servers are never
    asked, see test_client.)"""
    cfg = server_run(tmp_path, tiny_hf_dir,
                     {"sglang": {"urls": mock[:1], "weight_sync": "tensor", "gpu_servers": True, "bucket_mb": 1}})
    trainer = Trainer(cfg)
    trainer.train_step()
    trainer.train_step()
    trainer.close()
    log = [e for e in request_log(mock[0]) if e in ("/generate", "/update_weights_from_tensor") or e.startswith("(re")]
    step = ["/generate", "(release_memory_occupation kv_cache,weights)", "(resume_memory_occupation weights)",
            "/update_weights_from_tensor", "(resume_memory_occupation kv_cache)"]
    collapsed = [e for i, e in enumerate(log) if i == 0 or e != log[i - 1]]  # one entry per run of requests
    assert collapsed == step * 2


def test_async_partial_rollouts_train_within_max_staleness(mock, tiny_hf_dir, tmp_path, dist_world1):
    """rollout.mode async + partial_rollouts on the servers: each push pauses them, generations in flight go on
    under the new weights, and the trainer trains the multi-version samples with R3 and the rollout correction.
    The mock decodes 16 tokens at 0.05 s each, and each push waits until requests run on a server and have had
    time for a few tokens, so that it lands mid-generation whatever the speed of the train step (left to timing,
    a fast step pushed before the first token and a slow one after the last)."""
    cfg = server_run(tmp_path, tiny_hf_dir,
                     {"max_new_tokens": 16, "mode": "async", "max_staleness": 2, "partial_rollouts": True,
                      "sglang": {"urls": mock, "weight_sync": "tensor", "bucket_mb": 1}},
                     algorithm={"loss": "gspo", "routing_replay": "r3", "rollout_correction": {"mode": "tis"}}, steps=3)
    delay = 0.05
    for url in mock:
        set_token_delay(url, delay)
    trainer = Trainer(cfg)
    push = trainer.rollouts.weight_push.run

    def push_mid_generation(model, version: int, verify: bool = True):
        deadline = time.monotonic() + 2  # the last push finds nothing running: the worker has drawn every step
        while not any(running_requests(url) for url in mock) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(3 * delay)  # a few tokens out, most of the 16 still to come
        push(model, version, verify)

    trainer.rollouts.weight_push.run = push_mid_generation
    history = trainer.train()
    trainer.close()
    assert len(history) == 3 and all(math.isfinite(m["train/pg_loss"]) for m in history)
    assert max(m["async/staleness_max"] for m in history) <= 2
    assert sum(m["async/multi_version_tokens"] for m in history) > 0  # some responses span a push
    for url in mock:
        log = [e for e in request_log(url) if e in ("/pause_generation", "/update_weights_from_tensor",
                                                    "/continue_generation")]
        pushes = log.count("/pause_generation")
        assert pushes >= 3 and log == ["/pause_generation", "/update_weights_from_tensor",
                                       "/continue_generation"] * pushes, log


@pytest.mark.parametrize("mode", ["one_step_off", "async"])
def test_background_modes_on_mock_sglang_servers(mode, mock, tiny_hf_dir, tmp_path, dist_world1):
    """The rollout thread generates on the servers while the trainer trains; every push reaches every server
    and the servers' weight versions come back on the samples (mock servers follow SGLang 0.5.23)."""
    cfg = server_run(tmp_path, tiny_hf_dir,
                     {"mode": mode, "max_staleness": 2,
                      "sglang": {"urls": mock, "weight_sync": "tensor", "bucket_mb": 1}},
                     algorithm={"rollout_correction": {"mode": "tis"}}, steps=3)
    versions = []
    trainer = Trainer(cfg)
    update = trainer.learner.update
    trainer.learner.update = lambda samples, step, timer=None, routes=None: versions.append(
        (step, {v for s in samples for v in s.weight_versions})) or update(samples, step, timer, routes)
    history = trainer.train()
    trainer.close()
    for url in mock:
        assert request_log(url).count("/end_weight_update") >= 3
    assert all(step - min(seen) <= (1 if mode == "one_step_off" else 2) for step, seen in versions), versions
    assert all(math.isfinite(m["train/pg_loss"]) for m in history)
