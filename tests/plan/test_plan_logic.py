"""The dry run's arithmetic around the simulation: hand counts, rank positions, the rollout share, the phase
budget, the fix search and the CLI's exit codes. The fake-CUDA simulation itself is too slow for these unit
tests, so they give the planner a stand-in rank (`standin_rank`: DDP and distributed-optimizer bytes from the
hand count, a fixed activation size); the real simulation is checked in test_shipped_configs.py and
test_plan_vs_cpu_run.py."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from grpo_megatron.parallel import ParallelLayout
from grpo_megatron.plan import constants
from grpo_megatron.plan.cli import main, run
from grpo_megatron.plan.model_shapes import load_shapes
from grpo_megatron.plan.positions import distinct_positions, hand_count
from grpo_megatron.plan.rollout_share import rollout_share
from grpo_megatron.plan.scale_costs import scale_costs
from grpo_megatron.plan.trainer_rank import TrainerRank

REPO = Path(__file__).resolve().parents[2]
GSPO = str(REPO / "slurm/configs/gspo_moe.yaml")
GiB = constants.GiB


def standin_rank(activation_gib_no_recompute: float = 50.0, activation_gib_recompute: float = 6.0):
    """A simulator stand-in: megatron DDP's buffers (bf16 params, fp32 grads) and the distributed optimizer's
    fp32 main + Adam shards (12 bytes per parameter over DP, experts over expert-DP), from the hand count."""

    def simulate(job, position):
        dense, expert = hand_count(job.shapes, job.layout, position)
        layout = job.layout
        edp = job.world // (layout.expert_parallel * layout.etp * layout.pipeline_parallel)
        params, grads = 2 * (dense + expert), 4 * (dense + expert)
        optimizer = 12 * (dense // job.dp + expert // edp)
        static = params + grads + optimizer
        act = int((activation_gib_recompute if job.cfg.model.recompute_activations
                   else activation_gib_no_recompute) * GiB)
        return TrainerRank(dense, expert, params, grads, optimizer, static, static + act, static + act, 0.0)

    return simulate


ALLOC_2x8 = ["--nodes", "2", "--gpus-per-node", "8", "--gpu-memory", "80GiB"]


def test_hand_count_equals_megatron_buffers_of_the_real_models():
    """Counts megatron's buffers held in a fake-CUDA run of the full-size models (true-scale probe of 2026-12-07)."""
    small, big = load_shapes("/x/Qwen3-30B-A3B"), load_shapes("/x/Qwen3-235B-A22B")
    layout = ParallelLayout(tensor_parallel=4, expert_parallel=8, expert_tensor_parallel=1, sequence_parallel=True)
    (last,) = distinct_positions(small, layout, 32)
    assert hand_count(small, layout, last) == (394_868_736, 3_623_878_656)
    layout = ParallelLayout(tensor_parallel=4, pipeline_parallel=2, expert_parallel=32, expert_tensor_parallel=1,
                            sequence_parallel=True)
    first, second = distinct_positions(big, layout, 128)
    assert hand_count(big, layout, first) == (1_018_433_280, 3_548_381_184)
    assert second.rank == 64 and second.holds_output and not second.holds_embedding
    assert math.isclose(small.total_params() / 1e9, 30.53, abs_tol=0.01)
    assert math.isclose(big.total_params() / 1e9, 235.09, abs_tol=0.01)


def test_positions_first_last_and_one_middle_stage_with_interleaved_layers():
    shapes = load_shapes("/x/Qwen3-30B-A3B")
    assert len(distinct_positions(shapes, ParallelLayout(tensor_parallel=2), 16)) == 1
    layout = ParallelLayout(pipeline_parallel=4, virtual_pipeline_parallel=2)
    positions = distinct_positions(shapes, layout, 32)
    assert [p.pipeline_stage for p in positions] == [0, 1, 3]
    assert [p.rank for p in positions] == [0, 8, 24]
    assert positions[1].layers == (6, 7, 8, 9, 10, 11, 30, 31, 32, 33, 34, 35)  # chunks 1 and 5 of 8
    assert not positions[1].holds_embedding and not positions[1].holds_output
    counts = [hand_count(shapes, layout, p)[0] for p in positions]
    assert counts[0] > counts[1] < counts[2]  # embedding / output layer on the ends


def test_rollout_share_of_a_tp8_server_and_a_pool_too_small_for_the_weights():
    shapes = load_shapes("/x/Qwen3-30B-A3B")
    share = rollout_share(shapes, tp=8, fraction=0.5, gpu_memory=80 * GiB, max_sequence=5120)
    assert math.isclose(share.weights_bytes / 1e9, 2 * shapes.total_params() / 8 / 1e9, rel_tol=0.02)
    assert share.kv_bytes == 40 * GiB - share.weights_bytes
    assert share.kv_bytes_per_token == 48 * 2 * 1 * 128 * 2  # 4 KV heads over 8 ranks: one (replicated) each
    assert share.problem() is None and share.concurrent_sequences > 100
    big = rollout_share(load_shapes("/x/Qwen3-235B-A22B"), tp=8, fraction=0.5, gpu_memory=80 * GiB,
                        max_sequence=5120)
    assert "do not fit" in big.problem()


def _plan(args, **kwargs):
    return run(["--config", GSPO, *args], simulate=standin_rank(**kwargs))


def test_without_the_trainers_offload_the_shipped_30b_config_does_not_fit_and_a_smaller_pool_is_named(monkeypatch):
    """A checkout whose trainer keeps its state on the GPU while colocated servers generate: the training peak's
    cached blocks beside SGLang's 40 GiB pool overflow the GPU; the first change that fits, re-planned, is named."""
    monkeypatch.setattr("grpo_megatron.plan.job.trainer_offloads", lambda: False)
    status, plan, _ = _plan([*ALLOC_2x8, "--sglang-mem-fraction", "0.5"])
    assert status == 2 and not plan.fits
    generate = next(p for p in plan.ranks[0].phases if p.name == "generate")
    assert generate.total > 80 * GiB and "trainer cached blocks (peak reserved)" in generate.parts
    assert plan.fix is not None and plan.fix.plan.fits
    # 46 GiB of cached blocks + 2.1 context/NCCL + 3.6 SGLang runtime leave 28 GiB: 0.45 and 0.4 re-planned, refused
    assert plan.fix.change.endswith("SGLANG_MEM_FRACTION=0.35") and plan.fix.plan.job.alloc.sglang_fraction == 0.35
    assert next(p for p in plan.fix.plan.ranks[0].phases if p.name == "generate").total <= 80 * GiB


def test_the_trainers_offload_makes_the_generation_phase_fit(monkeypatch):
    monkeypatch.setattr("grpo_megatron.plan.job.trainer_offloads", lambda: False)
    kept = _plan([*ALLOC_2x8])[1]
    monkeypatch.setattr("grpo_megatron.plan.job.trainer_offloads", lambda: True)
    status, offloaded, _ = _plan([*ALLOC_2x8])
    before = next(p for p in kept.ranks[0].phases if p.name == "generate").total
    after = next(p for p in offloaded.ranks[0].phases if p.name == "generate")
    rank = kept.ranks[0].rank
    assert before - after.total > rank.grad_bytes + rank.optimizer_bytes  # and the cached activation blocks
    assert after.parts["trainer after offload"] == rank.param_bytes
    assert status == 0 and offloaded.fits
    from grpo_megatron.plan.job import with_changes
    from grpo_megatron.plan.planner import make_plan

    params_too = make_plan(with_changes(offloaded.job, config={"train.offload_params": True}), standin_rank())
    generate = next(p for p in params_too.ranks[0].phases if p.name == "generate")
    assert generate.parts["trainer after offload"] == 0
    push = next(p for p in params_too.ranks[0].phases if p.name == "weight push")
    assert push.parts["trainer after offload"] == rank.param_bytes  # the push reads them: back on the device


def test_dedicated_rollout_nodes_take_sglang_off_the_trainer_gpus():
    status, plan, _ = _plan([*ALLOC_2x8[:1], "3", *ALLOC_2x8[2:], "--rollout-nodes", "1"])
    assert plan.job.world == 16 and not plan.job.colocated
    assert all(p.name != "generate" for p in plan.ranks[0].phases)
    assert plan.dedicated is not None and plan.rollout.fraction == 0.85
    assert status == 0 and plan.fits


def test_no_recompute_does_not_fit_and_recompute_is_named_when_nothing_cheaper_helps():
    status, plan, _ = _plan(["--nodes", "3", "--gpus-per-node", "8", "--gpu-memory", "80GiB", "--rollout-nodes", "1",
                             "--model.recompute_activations", "false"], activation_gib_no_recompute=60.0)
    assert status == 2
    assert "recompute" in plan.fix.change and plan.fix.plan.job.cfg.model.recompute_activations


def test_scale_costs_grow_with_the_tree_and_the_batch():
    common = dict(prompt=512, response=2048, vocab=151936, logprobs=True, dp=8, tp_cp=2, moe_layers=48, topk=8,
                  route_id_bytes=1, replay=True, model_bytes=61 * 10**9, sync_copies=16)
    small = scale_costs(world=16, samples=256, **common)
    large = scale_costs(world=128, samples=512, **common)
    assert small.broadcast_rounds == 4 and large.broadcast_rounds == 7
    assert large.broadcast_bytes == 2 * small.broadcast_bytes
    assert 5 * 2560 * 256 < small.broadcast_bytes < 20 * 2560 * 256  # a few bytes per id, 9 per log-prob
    assert small.route_bytes_per_rank == 32 * 2560 * 48 * 8


def test_cli_json(capsys, monkeypatch):
    import grpo_megatron.plan.cli as cli

    planned = _plan(["--nodes", "3", "--gpus-per-node", "8", "--gpu-memory", "80GiB", "--rollout-nodes", "1", "--json"])
    monkeypatch.setattr(cli, "run", lambda argv: planned)
    assert main([]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] and data["verdict"] == "FITS"
    rank = data["ranks"][0]
    assert rank["hand_count"]["expert"] == rank["expert_params"] and rank["position"]["holds_embedding"]
    assert set(rank["phases"]) == {"train", "log-prob", "weight push"}


@pytest.mark.parametrize("bad, words", [
    (["--gpu-memory", "80GiB", "--rollout-nodes", "2"], "--rollout-nodes 2 must leave a trainer node"),
    (["--gpu-memory", "80GiB", "--train.nope", "1"], "unknown config key(s) train.nope"),
    (["--gpu-memory", "80GiB", "--model-config", "/nonexistent"], "--model-config /nonexistent: no config.json"),
])
def test_bad_input_is_one_line_and_status_2(capsys, bad, words):
    assert main(["--config", GSPO, "--nodes", "2", "--gpus-per-node", "8", *bad]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err


def test_unreadable_size_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", GSPO, "--nodes", "2", "--gpus-per-node", "8", "--gpu-memory", "80XB"])
    assert exit_info.value.code == 2 and "give a size such as 80GiB" in capsys.readouterr().err


def test_host_memory_of_rank0s_node_while_saving_swaps_the_offloaded_copy_for_the_checkpoint_staging():
    from grpo_megatron.plan.host import rank0_node

    rank = TrainerRank(1, 0, 2 * GiB, 4 * GiB, 12 * GiB, 18 * GiB, 20 * GiB, 20 * GiB, 0.0)
    kept = rank0_node([rank] * 8, samples=512, sequence=6144, vocab=151936, with_logprobs=True, route_bytes_total=0,
                      reference_offloaded=False, train_state_offloaded=False)
    offloaded = rank0_node([rank] * 8, samples=512, sequence=6144, vocab=151936, with_logprobs=True,
                           route_bytes_total=0, reference_offloaded=False, train_state_offloaded=True)
    assert offloaded.steady - kept.steady == 8 * 12 * GiB  # optimizer state + masters, not the freed grad buffers
    assert offloaded.saving == kept.saving == kept.steady + 8 * (2 + 12) * GiB
    # every rank holds the whole batch (ids and engine log-probs as Python objects: tens of bytes per token)
    samples = kept.parts["step samples (whole batch, every rank)"]
    assert 8 * 512 * 6144 * 40 < samples < 8 * 512 * 6144 * 100
