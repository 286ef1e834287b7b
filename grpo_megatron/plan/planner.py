"""The per-GPU memory plan of a job: simulate each distinct trainer rank, add what the simulation cannot see
and the rollout server's share, and decide whether every phase of a step fits."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from grpo_megatron.plan import constants
from grpo_megatron.plan.budget import Phase, StepSettings, dedicated_server_phase, phases
from grpo_megatron.plan.host import HostNeeds, rank0_node
from grpo_megatron.plan.job import Job
from grpo_megatron.plan.positions import RankPosition, distinct_positions, hand_count
from grpo_megatron.plan.rollout_share import RolloutShare, rollout_share
from grpo_megatron.plan.scale_costs import ScaleCosts, scale_costs
from grpo_megatron.plan.trainer_rank import TrainerRank

Simulator = Callable[[Job, RankPosition], TrainerRank]
"""Runs one rank of `job` at `position` (grpo_megatron.plan.simulate.simulate_position, or a stand-in in tests)."""


@dataclass
class RankPlan:
    position: RankPosition
    rank: TrainerRank
    hand_count: tuple[int, int]  # (dense, expert) by hand: must equal the simulation's
    phases: list[Phase]

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda p: p.total)


@dataclass
class Plan:
    job: Job
    ranks: list[RankPlan]
    rollout: RolloutShare | None  # the server rank on a trainer GPU (colocated) or a dedicated node's GPU
    dedicated: Phase | None
    host: HostNeeds
    costs: ScaleCosts
    problems: list[str] = field(default_factory=list)
    fix: object | None = None  # fixes.Fix when the plan does not fit and a change was found

    @property
    def fits(self) -> bool:
        return not self.problems


def route_id_bytes(experts: int) -> int:
    """Bytes per stored expert id (replay/tables.py storage_dtype: uint8 up to 256 experts, int16, int32)."""
    return 1 if experts <= 256 else 2 if experts <= 32767 else 4


def step_settings(job: Job, position: RankPosition) -> StepSettings:
    cfg, shapes = job.cfg, job.shapes
    moe_layers = sum(shapes.moe_layer_flags[i] for i in position.layers)
    replay = cfg.algorithm.routing_replay != "none" and shapes.is_moe
    routes = job.micro_batch_rows * job.sequence * moe_layers * shapes.topk * 8 if replay else 0  # int64 on device
    largest = max(shapes.vocab * shapes.hidden, shapes.expert_params() // 3 if shapes.is_moe else 0,
                  shapes.hidden * shapes.ffn) * job.dtype_bytes
    return StepSettings(
        reference=cfg.algorithm.kl_coef > 0, offload_reference=cfg.model.offload_reference,
        offload_train_state=job.offload_train_state, offload_params=job.offload_params,
        route_bytes_on_device=routes, bucket_bytes=int(cfg.rollout.sglang.bucket_mb * (1 << 20)),
        largest_tensor_bytes=largest)


def make_plan(job: Job, simulate: Simulator) -> Plan:
    """Simulate every distinct rank of `job` and budget each GPU (see module docstring); no fix search here."""
    shapes, alloc = job.shapes, job.alloc
    job.layout.validate(job.world, num_layers=shapes.layers, num_experts=shapes.experts or None,
                        num_attention_heads=shapes.heads, num_query_groups=shapes.kv_heads, vocab_size=shapes.vocab)
    colocated = rollout_share(shapes, alloc.server_tp, alloc.sglang_fraction, alloc.gpu_memory, job.sequence) \
        if job.colocated else None
    ranks = []
    for position in distinct_positions(shapes, job.layout, job.world):
        rank = simulate(job, position)
        ranks.append(RankPlan(position, rank, hand_count(shapes, job.layout, position),
                              phases(rank, step_settings(job, position), colocated)))
    problems = []
    for plan in ranks:
        peak = plan.peak
        if peak.total > alloc.gpu_memory:
            problems.append(f"rank {plan.position.rank} ({plan.position.label}) needs {peak.total / constants.GiB:.1f} "
                            f"GiB in its {peak.name} phase, over the GPU's {alloc.gpu_memory / constants.GiB:.0f} GiB")
    rollout, dedicated = colocated, None
    if job.servers_on_gpus and alloc.rollout_nodes:
        rollout = rollout_share(shapes, alloc.server_tp, alloc.dedicated_fraction, alloc.gpu_memory, job.sequence)
        dedicated = dedicated_server_phase(rollout)
        if dedicated.total > alloc.gpu_memory:
            problems.append(f"a dedicated rollout GPU needs {dedicated.total / constants.GiB:.1f} GiB")
    if rollout is not None and rollout.problem():
        problems.append(rollout.problem())
    host = host_needs(job, ranks)
    if host.saving > alloc.host_memory:
        problems.append(f"rank 0's node needs {host.saving / constants.GiB:.0f} GiB of host memory while saving a "
                        f"checkpoint, over its {alloc.host_memory / constants.GiB:.0f} GiB")
    return Plan(job, ranks, rollout, dedicated, host, costs_of(job, ranks), problems)


def rank_of_stage(ranks: list[RankPlan], stage: int, pp: int) -> RankPlan:
    """The simulated rank standing for pipeline `stage` (first, last, or the middle one)."""
    wanted = stage if stage in (0, pp - 1) else 1
    return next(r for r in ranks if r.position.pipeline_stage == wanted)


def host_needs(job: Job, ranks: list[RankPlan]) -> HostNeeds:
    shapes, cfg = job.shapes, job.cfg
    stage_size = job.world // job.layout.pipeline_parallel
    on_node = [rank_of_stage(ranks, r // stage_size, job.layout.pipeline_parallel).rank
               for r in range(min(job.alloc.gpus_per_node, job.world))]  # the first node: ranks 0..gpus-1
    replay = cfg.algorithm.routing_replay != "none" and shapes.is_moe
    routes = job.samples * job.sequence * shapes.num_moe_layers * shapes.topk * route_id_bytes(shapes.experts) \
        if replay else 0
    return rank0_node(on_node, samples=job.samples, sequence=job.sequence, vocab=shapes.vocab,
                      with_logprobs=cfg.rollout.engine == "sglang", route_bytes_total=routes,
                      reference_offloaded=cfg.algorithm.kl_coef > 0 and cfg.model.offload_reference,
                      train_state_offloaded=job.offload_train_state)


def costs_of(job: Job, ranks: list[RankPlan]) -> ScaleCosts:
    shapes, cfg, layout = job.shapes, job.cfg, job.layout
    servers = (job.alloc.rollout_nodes or job.alloc.trainer_nodes) if job.servers_on_gpus else 1
    return scale_costs(
        world=job.world, samples=job.samples, prompt=job.prompt_tokens, response=cfg.rollout.max_new_tokens,
        vocab=shapes.vocab, logprobs=cfg.rollout.engine == "sglang", dp=job.dp,
        tp_cp=layout.tensor_parallel * layout.context_parallel,
        moe_layers=shapes.num_moe_layers // layout.pipeline_parallel, topk=shapes.topk,
        route_id_bytes=route_id_bytes(shapes.experts), replay=cfg.algorithm.routing_replay != "none" and shapes.is_moe,
        model_bytes=shapes.total_params() * job.dtype_bytes, sync_copies=servers * job.alloc.server_tp)
