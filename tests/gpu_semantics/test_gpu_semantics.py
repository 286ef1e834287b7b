"""The trainer's GPU code paths under CUDA's rules on this CPU machine (see harness.py and scenarios.py).

One fresh interpreter, with the fake-CUDA shim preloaded, runs every layout (the suite's other tests apply the
CPU shims in this process, which would hide device mismatches); each check is reported here as its own test.
Every check runs at every layout, MoE (EP2) and pipeline (PP2) included, forward and backward.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.gpu_semantics.scenarios import LAYOUTS, LOSSES

pytestmark = pytest.mark.gpu_semantics

CHECKS = ["build", "logprob_gather", *[f"loss_{v}" for v in LOSSES], "metric_reduction", "optimizer_step",
          "weight_sync_buckets", "stop_flag", "phase_timer"]
MOE_CHECKS = ["route_delivery", "routing_replay_r3", "routing_replay_r2"]


@pytest.fixture(scope="module")
def results() -> dict[str, str]:
    from grpo_megatron.simulation import shim

    env = shim.preload_env(dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    run = subprocess.run([sys.executable, "-m", "tests.gpu_semantics.scenarios"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    line = next((l for l in run.stdout.splitlines() if l.startswith("RESULTS ")), None)
    assert line, f"scenarios crashed (rc {run.returncode}):\n{run.stderr[-4000:]}"
    return json.loads(line[len("RESULTS "):])


@pytest.mark.parametrize("check", [f"{name}/{c}" for name, (_, family, _) in LAYOUTS.items()
                                   for c in CHECKS + (MOE_CHECKS if family == "qwen3_moe" else [])])
def test_check(results, check):
    assert results.get(check) == "ok", results.get(check, "not run")


def _hand_count(hf) -> tuple[int, int]:
    """(dense, expert) parameters of one rank of the tiny Qwen3-MoE at TP1 PP1 EP2, counted from its config."""
    h, heads, groups, d = hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim
    attention = h + (heads + 2 * groups) * d * h + 2 * d + heads * d * h  # norm, qkv, q/k norms, proj
    layer = attention + h + hf.num_experts * h  # pre-MLP norm, router
    dense = 2 * hf.vocab_size * h + h + hf.num_hidden_layers * layer  # embedding, untied output, final norm
    expert = 3 * hf.moe_intermediate_size * h  # fc1 (gate and up) and fc2
    return dense, hf.num_hidden_layers * (hf.num_experts // 2) * expert


def test_simulated_rank_matches_hand_count_and_megatron_buffers(results):
    """simulate_rank's parameter counts equal a hand count; its counted static bytes are megatron's own
    buffers (DDP param/grad buffers, distributed optimizer's fp32 shard and Adam state), to a few scalars."""
    from grpo_megatron.models.tiny import tiny_hf_config
    from tests.gpu_semantics.scenarios import simulated_rank_spec

    raw = results["simulate/rank_memory"]
    assert raw.startswith("{"), raw
    memory = json.loads(raw)
    spec = simulated_rank_spec()
    dense, expert = _hand_count(tiny_hf_config("qwen3_moe"))
    assert (memory["dense_params"], memory["expert_params"]) == (dense, expert)
    assert memory["coordinates"] == dict(tp=0, pp=0, dp=1, ep=1, etp=0, edp=0)
    # bf16 params and fp32 grads in megatron's buffers (padded for the distributed optimizer's shards)
    assert 2 * (dense + expert) <= memory["param_bytes"] < 2 * (dense + expert) * 1.05
    assert memory["grad_buffer_bytes"] == 2 * memory["param_bytes"]
    # fp32 master shard: dense over DP 4, experts over expert-DP 2; Adam: two fp32 moments (+ step scalars)
    shard = 4 * (dense / spec.world_size + expert / 2)
    assert shard <= memory["main_param_bytes"] < shard * 1.05
    assert 0 <= memory["optimizer_state_bytes"] - 2 * memory["main_param_bytes"] <= 64
    buffers = sum(memory[k] for k in ("param_bytes", "grad_buffer_bytes", "main_param_bytes", "optimizer_state_bytes"))
    assert 0 <= memory["static_bytes"] - buffers <= 64, (memory["static_bytes"], buffers)
    assert memory["peak_bytes"] > memory["logprob_peak_bytes"] > memory["static_bytes"]


def test_full_recompute_lowers_the_simulated_peak(results):
    """Checkpointed layers keep only their inputs; their recompute (on the autograd engine's device thread) still
    runs SDPA's flash kernel, not the math path that stores every [heads, s, s] score matrix."""
    plain, recomputed = (json.loads(results[k]) for k in ("simulate/rank_memory", "simulate/rank_memory_recompute"))
    assert recomputed["static_bytes"] == plain["static_bytes"]
    assert recomputed["peak_bytes"] < plain["peak_bytes"], (recomputed["peak_bytes"], plain["peak_bytes"])


def test_offload_cycle_gives_back_grads_and_optimizer_state(results):
    """TrainStateOffload (training/offload.py) on a DDP + distributed-optimizer MoE rank under fake CUDA: offload
    drops the device bytes by exactly the grad buffers, fp32 masters and Adam state; onload brings them all
    back; a second step after it leaves the same bytes (nothing leaked); parameters go too when asked."""
    raw = results["offload/cycle"]
    if raw.startswith("ImportError") and "grpo_megatron.training.offload" in raw:
        pytest.skip("training/offload.py (TrainStateOffload) is not on this branch yet")
    assert raw.startswith("{"), raw
    cycle = json.loads(raw)
    at = cycle["bytes_at"]
    trained_state = cycle["grad_buffer_bytes"] + cycle["main_param_bytes"] + cycle["optimizer_state_bytes"]
    assert at["after_step"] - at["offloaded"] == trained_state, (at, cycle)
    assert at["onloaded"] == at["after_second_step"] == at["after_step"]
    assert at["offloaded"] - at["offloaded_with_params"] == cycle["param_bytes"]
    assert at["onloaded_with_params"] == at["after_step"]
