"""A rank's memory at its real layer count from two short simulations (`--layers-extrapolate`).

Every transformer layer of a pipeline stage is built alike (same shapes, same parallel layout, same recompute
setting), so what a rank holds grows by the same bytes with each layer of its stage: static state (parameters,
grad buffers, optimizer shards) and the activations kept per layer. Simulating the rank with 1 and 2 layers per
virtual-pipeline chunk, at the real world size, hidden size and sequence length, gives that slope and the
rest (embedding, output layer, logits, one layer's working set); a straight line through both reaches the real
count. Seconds instead of minutes for a 30B-235B rank; the agreement with full simulations is recorded in
benchmarks/README.md and checked on the tiny config in the default test suite.
"""
from __future__ import annotations

import copy
import dataclasses

INT_FIELDS = ("dense_params", "expert_params", "param_bytes", "grad_buffer_bytes", "main_param_bytes",
              "optimizer_state_bytes", "static_bytes", "peak_bytes", "logprob_peak_bytes")


class LayersNotUniform(ValueError):
    """The model's layers differ (dense and MoE layers mixed): a straight line through two counts would not hold."""


def chunks(spec) -> int:
    """Pipeline chunks of the model: PP x virtual PP (each holds the same number of layers)."""
    return spec.layout.pipeline_parallel * (spec.layout.virtual_pipeline_parallel or 1)


def layers_per_chunk(spec) -> int:
    return spec.model_config["num_hidden_layers"] // chunks(spec)


def reduced_spec(spec, per_chunk: int):
    """`spec` with `per_chunk` layers per pipeline chunk, everything else (world, layout, rank, shapes) as is."""
    config = copy.deepcopy(spec.model_config)
    layers = config["num_hidden_layers"]
    step = config.get("decoder_sparse_step") or 1
    dense_only = set(config.get("mlp_only_layers") or [])
    moe = {bool(config.get("num_experts") or config.get("num_local_experts")) and i not in dense_only
           and (i + 1) % step == 0 for i in range(layers)}
    if len(moe) > 1:
        raise LayersNotUniform("--layers-extrapolate needs a model whose layers are all alike (mlp_only_layers / "
                               "decoder_sparse_step mix dense and MoE layers): plan without it")
    config["num_hidden_layers"] = per_chunk * chunks(spec)
    config.pop("mlp_only_layers", None)
    config["decoder_sparse_step"] = 1
    return dataclasses.replace(spec, model_config=config)


def _line(one, two, per_chunk: int):
    """The value at `per_chunk` layers per chunk on the line through (1, one) and (2, two)."""
    if isinstance(one, dict):
        return {k: _line(one[k], two.get(k, one[k]), per_chunk) if k in one else two[k] for k in {*one, *two}}
    if isinstance(one, bool) or not isinstance(one, (int, float)):
        return two
    value = one + (per_chunk - 1) * (two - one)
    return int(round(value)) if isinstance(one, int) and isinstance(two, int) else value


def extrapolate(one, two, per_chunk: int):
    """RankMemory at `per_chunk` layers per chunk from those at 1 and 2 (see module docstring); its seconds are
    both simulations'."""
    fields = {name: _line(getattr(one, name), getattr(two, name), per_chunk) for name in INT_FIELDS}
    return dataclasses.replace(two, **fields, by_category=_line(one.by_category, two.by_category, per_chunk),
                               seconds=one.seconds + two.seconds)
