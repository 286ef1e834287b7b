"""Which ranks to simulate: one per position that holds something different.

Megatron's ranks differ in what they hold only through their pipeline stage (which layers, the embedding on
the first stage, the final norm and output layer on the last); every TP, CP, EP and DP coordinate of a stage
holds equal shares (even splits are enforced by ParallelLayout.validate), and the distributed optimizer's
shards differ by at most its padding. So a plan simulates the first stage, the last stage, and one middle
stage when there are more than two (all middle stages hold the same number of layers and no embedding).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from grpo_megatron.parallel import ParallelLayout
from grpo_megatron.plan.model_shapes import ModelShapes


@dataclass(frozen=True)
class RankPosition:
    rank: int  # global rank simulated (the first rank of its pipeline stage)
    pipeline_stage: int
    tensor_rank: int
    data_rank: int
    expert_rank: int
    holds_embedding: bool
    holds_output: bool
    layers: tuple[int, ...]  # global layer numbers this rank holds (all its virtual chunks)

    @property
    def label(self) -> str:
        roles = [r for r, held in (("embedding", self.holds_embedding), ("output", self.holds_output)) if held]
        return f"stage {self.pipeline_stage}" + (f" ({', '.join(roles)})" if roles else "")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["layers"] = f"{self.layers[0]}-{self.layers[-1]}" if self.layers else ""
        return data


def stage_layers(shapes: ModelShapes, layout: ParallelLayout, stage: int) -> tuple[int, ...]:
    """Global layers on pipeline rank `stage`: its chunk of each virtual stage (megatron's interleaved order)."""
    pp, vpp = layout.pipeline_parallel, layout.virtual_pipeline_parallel or 1
    per_chunk = shapes.layers // (pp * vpp)
    return tuple(layer for v in range(vpp) for layer in range((v * pp + stage) * per_chunk,
                                                              (v * pp + stage + 1) * per_chunk))


def distinct_positions(shapes: ModelShapes, layout: ParallelLayout, world_size: int) -> list[RankPosition]:
    """The ranks whose memory can differ: first stage, last stage, one middle stage (see module docstring)."""
    pp = layout.pipeline_parallel
    stages = sorted({0, pp - 1} | ({1} if pp > 2 else set()))
    per_stage = world_size // pp  # megatron's default order tp-cp-ep-dp-pp: the stage is the slowest index
    return [RankPosition(rank=stage * per_stage, pipeline_stage=stage, tensor_rank=0, data_rank=0, expert_rank=0,
                         holds_embedding=stage == 0, holds_output=stage == pp - 1,
                         layers=stage_layers(shapes, layout, stage))
            for stage in stages]


def hand_count(shapes: ModelShapes, layout: ParallelLayout, position: RankPosition) -> tuple[int, int]:
    """(dense, expert) parameters of `position` by hand, layer by layer (what megatron's buffers must equal).

    "Expert" is megatron's sense: parameters reduced over the expert-data-parallel group (`allreduce=False`), which
    it marks only under expert parallelism (tensor_parallel/layers.py: `not (is_expert and expert_parallel)`, with
    expert_parallel = EP > 1); at EP 1 the experts are reduced with, and counted as, the dense parameters."""
    dense, expert = 0, 0
    for layer in position.layers:
        d, e = shapes.stage_params(tp=layout.tensor_parallel, ep=layout.expert_parallel, etp=layout.etp,
                                   first=False, last=False, layers=1, first_layer=layer)
        dense, expert = dense + d, expert + e
    d, _ = shapes.stage_params(tp=layout.tensor_parallel, ep=1, etp=1, first=position.holds_embedding,
                               last=position.holds_output, layers=0)
    return (dense + d, expert) if layout.expert_parallel > 1 else (dense + d + expert, 0)
