"""`--layers-extrapolate`: a rank's memory from simulations with 1 and 2 layers per pipeline chunk, extended to its
real layer count, against the full simulation of the tiny shipped config (4 layers: the line is extended two layers
past what it saw). Both plans' simulations are shared with test_shipped_configs.py and test_preflight_plan.py
through the session's plan cache (tests/plan/conftest.py): the full tiny rank is the one preflight plans."""
from __future__ import annotations

import copy

import pytest

from grpo_megatron.parallel import ParallelLayout
from grpo_megatron.plan import extrapolate
from grpo_megatron.plan.cli import run
from grpo_megatron.plan.simulate import CachedSimulator
from grpo_megatron.simulation import RankMemory, RankSpec
from tests.plan.shipped import shipped_jobs

COUNTS = ("dense_params", "expert_params", "param_bytes", "grad_bytes")
BYTES_TOLERANCE = 1e-3  # static, optimizer state, the training step's peak: relative to the full simulation
LOGPROB_MARGIN = 0.15  # the forward-only log-prob peak is not linear in the layers (tiny: 54.7, 66.4, 81.6 MB at
# 1, 2, 4 layers; the line gives 90.0 MB at 4, 10% over): a stated margin, see benchmarks/README.md


def _tiny_argv():
    return next(j for j in shipped_jobs() if j.config.name == "tiny_cpu.yaml").argv() + ["--no-fix"]


def test_extrapolated_plan_of_the_tiny_config_equals_the_full_simulation():
    _, whole, _ = run(_tiny_argv(), simulate=CachedSimulator())
    _, line, _ = run(_tiny_argv() + ["--layers-extrapolate"])
    (full_rank,), (short_rank,) = [r.rank for r in whole.ranks], [r.rank for r in line.ranks]
    assert short_rank.extra["extrapolated"] and not full_rank.extra["extrapolated"]
    for name in COUNTS:  # parameter counts and megatron's bf16/fp32 buffers: exact
        assert getattr(short_rank, name) == getattr(full_rank, name), name
    for name in ("optimizer_bytes", "static_bytes", "peak_bytes"):
        assert getattr(short_rank, name) == pytest.approx(getattr(full_rank, name), rel=BYTES_TOLERANCE), name
    assert short_rank.logprob_peak_bytes == pytest.approx(full_rank.logprob_peak_bytes, rel=LOGPROB_MARGIN)
    assert short_rank.activation_bytes == pytest.approx(full_rank.activation_bytes, rel=BYTES_TOLERANCE)
    assert line.ranks[0].peak.total == pytest.approx(whole.ranks[0].peak.total, rel=BYTES_TOLERANCE)


def _spec(config: dict, pp: int = 2, vpp: int | None = None) -> RankSpec:
    layout = ParallelLayout(pipeline_parallel=pp, virtual_pipeline_parallel=vpp)
    return RankSpec(model_config=config, layout=layout, rank=0, world_size=pp, seq_len=16)


def test_reduced_spec_keeps_all_but_the_layer_count_and_refuses_mixed_layers():
    config = {"num_hidden_layers": 48, "num_experts": 8, "decoder_sparse_step": 1, "mlp_only_layers": []}
    spec = _spec(config, pp=2, vpp=3)
    assert extrapolate.layers_per_chunk(spec) == 8
    short = extrapolate.reduced_spec(spec, 2)
    assert short.model_config["num_hidden_layers"] == 12 and short.layout == spec.layout and short.rank == 0
    assert spec.model_config["num_hidden_layers"] == 48  # the original is left alone
    for mixed in ({"mlp_only_layers": [0]}, {"decoder_sparse_step": 2}):
        with pytest.raises(extrapolate.LayersNotUniform, match="plan without it"):
            extrapolate.reduced_spec(_spec({**copy.deepcopy(config), **mixed}), 1)
    dense = {"num_hidden_layers": 4, "mlp_only_layers": [0, 1, 2, 3]}  # all dense: alike
    assert extrapolate.reduced_spec(_spec(dense), 1).model_config["num_hidden_layers"] == 2


def test_the_line_through_one_and_two_layers():
    def memory(layers: int) -> RankMemory:
        return RankMemory(rank=0, coordinates={"tp": 0}, dense_params=10 + 3 * layers, expert_params=5 * layers,
                          param_bytes=2 * (10 + 8 * layers), grad_buffer_bytes=4 * (10 + 8 * layers),
                          main_param_bytes=7, optimizer_state_bytes=11 * layers, static_bytes=100 + 40 * layers,
                          peak_bytes=150 + 50 * layers, by_category={"model": 60 + 30 * layers, "optimizer": 11},
                          seconds=1.5, logprob_peak_bytes=120 + 45 * layers)
    got = extrapolate.extrapolate(memory(1), memory(2), per_chunk=48)
    want = memory(48)
    assert got == RankMemory(**{**want.__dict__, "seconds": 3.0})
