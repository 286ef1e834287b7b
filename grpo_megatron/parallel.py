"""torch.distributed and megatron-core model parallelism, from a layout validated before anything is built."""
from __future__ import annotations

import datetime
import os
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from grpo_megatron.errors import UserError
from grpo_megatron.platform import detect, setup_platform
from grpo_megatron.ranks import launch_rank


class ParallelLayoutError(UserError, ValueError):
    """A parallel layout that cannot work; the message names the fix."""


@dataclass(frozen=True)
class ParallelLayout:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline_parallel: int | None = None
    expert_parallel: int = 1
    expert_tensor_parallel: int | None = None  # None: same as tensor_parallel (megatron's default)
    context_parallel: int = 1
    sequence_parallel: bool | None = None  # None: on when tensor_parallel > 1

    @property
    def etp(self) -> int:
        return self.expert_tensor_parallel or self.tensor_parallel

    @property
    def sp(self) -> bool:
        return self.tensor_parallel > 1 if self.sequence_parallel is None else self.sequence_parallel

    def data_parallel(self, world_size: int) -> int:
        return world_size // (self.tensor_parallel * self.pipeline_parallel * self.context_parallel)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(
        self,
        world_size: int,
        *,
        num_layers: int | None = None,
        num_experts: int | None = None,
        num_attention_heads: int | None = None,
        num_query_groups: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        """Raise ParallelLayoutError for a layout that does not fit the world size or the model."""
        tp, pp, cp, ep, etp = (self.tensor_parallel, self.pipeline_parallel, self.context_parallel,
                               self.expert_parallel, self.etp)
        for name, value in (("tensor_parallel", tp), ("pipeline_parallel", pp), ("context_parallel", cp),
                            ("expert_parallel", ep), ("expert_tensor_parallel", etp)):
            if value < 1:
                raise ParallelLayoutError(f"{name}={value}: every parallel size must be >= 1")
        model_parallel = tp * pp * cp
        if world_size % model_parallel:
            raise ParallelLayoutError(
                f"world size {world_size} is not divisible by tensor_parallel*pipeline_parallel*"
                f"context_parallel = {tp}*{pp}*{cp} = {model_parallel}; launch a multiple of "
                f"{model_parallel} processes or change the layout")
        expert_grid = etp * ep * pp
        if world_size % expert_grid:
            raise ParallelLayoutError(
                f"world size {world_size} is not divisible by expert_tensor_parallel*expert_parallel*"
                f"pipeline_parallel = {etp}*{ep}*{pp} = {expert_grid}; change expert_parallel")
        if self.virtual_pipeline_parallel is not None and pp == 1:
            raise ParallelLayoutError("virtual_pipeline_parallel needs pipeline_parallel > 1; unset it")
        if num_layers is not None:
            stages = pp * (self.virtual_pipeline_parallel or 1)
            if num_layers % stages:
                raise ParallelLayoutError(
                    f"{num_layers} layers do not split evenly over {stages} pipeline stages "
                    f"(pipeline_parallel={pp}, virtual={self.virtual_pipeline_parallel}); choose a divisor")
        if num_experts is not None:
            if num_experts % ep:
                raise ParallelLayoutError(
                    f"expert_parallel={ep} does not divide the {num_experts} experts; use a divisor of "
                    f"{num_experts}")
            if tp > 1 and not self.sp:
                raise ParallelLayoutError(
                    "MoE with tensor_parallel > 1 needs sequence_parallel: set sequence_parallel: true")
        elif ep > 1:
            raise ParallelLayoutError("expert_parallel > 1 needs an MoE model; set expert_parallel: 1")
        if num_attention_heads is not None and num_attention_heads % tp:
            raise ParallelLayoutError(
                f"tensor_parallel={tp} does not divide the {num_attention_heads} attention heads")
        if num_query_groups is not None and num_query_groups % tp:
            raise ParallelLayoutError(
                f"tensor_parallel={tp} does not divide the {num_query_groups} key/value heads")
        if vocab_size is not None and vocab_size % tp:
            raise ParallelLayoutError(
                f"tensor_parallel={tp} does not divide the vocabulary ({vocab_size}); pad the vocabulary")
        if cp > 1 and not detect().has_transformer_engine:
            raise ParallelLayoutError(
                "context_parallel > 1 needs TransformerEngine attention (GPU); set context_parallel: 1")


_CONTROL_GROUP = None


def init_distributed(timeout_minutes: int = 30, control_timeout_minutes: float = 720.0) -> tuple[int, int]:
    """Initialise torch.distributed from torchrun/srun environment variables (single process if absent),
    and the control group (see `control_group`) with `control_timeout_minutes`."""
    platform = setup_platform(int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        init_control_group(control_timeout_minutes)
        return dist.get_rank(), dist.get_world_size()
    rank = launch_rank()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if "MASTER_PORT" in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        init_method = "env://"
    elif world_size > 1:
        raise RuntimeError("WORLD_SIZE > 1 but MASTER_PORT is unset: launch with torchrun or srun")
    else:
        # A lone process gets a private port without exporting it, so that processes it starts
        # (conversion tools, torchrun tests) do not inherit an address that is already taken.
        init_method = f"tcp://127.0.0.1:{free_port()}"
    dist.init_process_group(
        backend=platform.backend, init_method=init_method, rank=rank, world_size=world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    init_control_group(control_timeout_minutes)
    return rank, world_size


def init_control_group(timeout_minutes: float) -> None:
    """Create the control group once (collective: every rank calls it at the same point)."""
    global _CONTROL_GROUP
    if _CONTROL_GROUP is None and dist.get_world_size() > 1:
        _CONTROL_GROUP = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=timeout_minutes))


def control_group():
    """A gloo group over all ranks for CPU-side control values: the step's samples, which ranks 1..N wait
    for while rank 0 generates (longer than NCCL's watchdog allows), and the stop flag.

    None (the default group) when it was not created and the default group is gloo, or holds one process (one
    GPU: every collective is local); an NCCL default group of several ranks cannot carry CPU tensors, so that
    is an error."""
    if _CONTROL_GROUP is None and dist.get_world_size() > 1 and dist.get_backend() != "gloo":
        raise RuntimeError("no control group: initialise torch.distributed with parallel.init_distributed")
    return _CONTROL_GROUP


def init_model_parallel(layout: ParallelLayout, seed: int = 1234, **model_dims) -> None:
    """Validate `layout` against the world and the model, then build megatron's process groups."""
    from megatron.core import parallel_state, tensor_parallel

    global _MEGATRON_LAYOUT
    world_size = dist.get_world_size()
    layout.validate(world_size, **model_dims)
    if _MEGATRON_LAYOUT == (layout, dist.group.WORLD) and parallel_state.model_parallel_is_initialized():
        # The groups in place are the ones asked for: keep them (see _MEGATRON_GROUPS); reseed, and start at the
        # first virtual stage as initialize_model_parallel does.
        if layout.virtual_pipeline_parallel:
            parallel_state.set_virtual_pipeline_model_parallel_rank(0)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return
    destroy_model_parallel()
    before = set(dist.distributed_c10d._world.pg_map)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_parallel,
        pipeline_model_parallel_size=layout.pipeline_parallel,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline_parallel,
        context_parallel_size=layout.context_parallel,
        expert_model_parallel_size=layout.expert_parallel,
        expert_tensor_parallel_size=layout.etp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    _MEGATRON_GROUPS.extend(g for g in dist.distributed_c10d._world.pg_map if g not in before)
    _MEGATRON_LAYOUT = (layout, dist.group.WORLD)


# The process groups megatron's last initialize_model_parallel created. Its destroy_model_parallel only drops
# its own references; torch keeps every group (and a gloo group's three threads) alive until
# destroy_process_group, so a process that re-initialises (the tests build many trainers) leaked ~17 groups
# and ~50 threads each time. Even destroyed, a gloo group's threads run until the group object is freed, and a
# model built on the groups keeps them: megatron's DDP reaches them and its backward hooks sit on autograd nodes,
# a cycle through C++ that Python's gc cannot collect. So a re-initialisation with the layout in place
# (`_MEGATRON_LAYOUT`: the layout and the default group it was built in, so a new world rebuilds) keeps the
# groups instead of making new ones.
_MEGATRON_GROUPS: list = []
_MEGATRON_LAYOUT: tuple | None = None


def destroy_model_parallel() -> None:
    """Tear down megatron's model-parallel state and destroy the process groups it created."""
    from megatron.core import parallel_state

    global _MEGATRON_LAYOUT
    _MEGATRON_LAYOUT = None
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    while _MEGATRON_GROUPS:
        group = _MEGATRON_GROUPS.pop()
        if group in dist.distributed_c10d._world.pg_map:  # not already gone with one it shares a backend with
            dist.destroy_process_group(group)


def destroy() -> None:
    """Everything init_distributed and init_model_parallel created, the default group last."""
    destroy_model_parallel()
    global _CONTROL_GROUP
    _CONTROL_GROUP = None
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a lone process group, an update group, a server)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def current_device() -> torch.device:
    return detect().device


def add_layout_arguments(parser) -> None:
    """--tp/--pp/--vpp/--ep/--etp/--cp command-line flags for a ParallelLayout."""
    group = parser.add_argument_group("parallel layout")
    group.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    group.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    group.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank")
    group.add_argument("--ep", type=int, default=1, help="expert parallel size (MoE)")
    group.add_argument("--etp", type=int, default=None, help="expert tensor parallel size (default: --tp)")
    group.add_argument("--cp", type=int, default=1, help="context parallel size (TransformerEngine only)")


def layout_from_args(args) -> ParallelLayout:
    return ParallelLayout(tensor_parallel=args.tp, pipeline_parallel=args.pp, virtual_pipeline_parallel=args.vpp,
                          expert_parallel=args.ep, expert_tensor_parallel=args.etp, context_parallel=args.cp)
