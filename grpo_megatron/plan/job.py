"""A job as the dry run sees it: the run config, the allocation, and what follows from both.

Everything here is derived exactly as the trainer and the Slurm scripts derive it (trainer world = trainer
nodes x GPUs per node, servers colocated unless there are dedicated rollout nodes, the longest sample is
the prompt budget + rollout.max_new_tokens, padded to the TP size under sequence parallelism).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass

from grpo_megatron.config import RunConfig, replace_keys
from grpo_megatron.plan.model_shapes import ModelShapes

DEFAULT_PROMPT_TOKENS = 1024
"""Prompt budget when data.max_prompt_tokens is unset (the plan says which it used)."""

OFFLOAD_PARAMS_KEY = "train.offload_params"
"""With colocated GPU servers the trainer always gives its grad buffers, optimizer state and fp32 masters back
to the host around generation and the weight push (training/offload.py); this key gives the parameters too,
around generation."""


def trainer_offloads() -> bool:
    """Whether this checkout's trainer gives its state back around colocated generation (training/offload.py)."""
    return importlib.util.find_spec("grpo_megatron.training.offload") is not None


class PlanInputError(ValueError):
    """An allocation or plan option that cannot be planned; the message names the fix."""


@dataclass(frozen=True)
class Allocation:
    nodes: int
    gpus_per_node: int
    gpu_memory: int  # bytes per GPU
    rollout_nodes: int = 0  # dedicated SGLang nodes at the end of the allocation (ROLLOUT_NODES)
    sglang_fraction: float = 0.5  # --mem-fraction-static of colocated servers (SGLANG_MEM_FRACTION)
    dedicated_fraction: float = 0.85  # --mem-fraction-static of servers on dedicated nodes
    sglang_tp: int | None = None  # --tp-size (SGLANG_TP; default: GPUs per node)
    host_memory: int = 1 << 40  # bytes per node

    @property
    def trainer_nodes(self) -> int:
        return self.nodes - self.rollout_nodes

    @property
    def trainer_world(self) -> int:
        return self.trainer_nodes * self.gpus_per_node

    @property
    def server_tp(self) -> int:
        return self.sglang_tp or self.gpus_per_node

    def describe(self) -> str:
        text = f"{self.nodes} node(s) x {self.gpus_per_node} GPU(s) of {self.gpu_memory / (1 << 30):.0f} GiB"
        return text + (f", {self.rollout_nodes} of them dedicated to rollout" if self.rollout_nodes else "")


@dataclass(frozen=True)
class Job:
    cfg: RunConfig
    alloc: Allocation
    shapes: ModelShapes
    prompt_tokens: int
    prompt_source: str

    @property
    def world(self) -> int:
        return self.alloc.trainer_world

    @property
    def layout(self):
        return self.cfg.parallel

    @property
    def dp(self) -> int:
        return self.layout.data_parallel(self.world)

    @property
    def servers_on_gpus(self) -> bool:
        """SGLang servers started by the job (rollout.engine sglang without configured URLs)."""
        return self.cfg.rollout.engine == "sglang" and not self.cfg.rollout.sglang.urls

    @property
    def colocated(self) -> bool:
        return self.servers_on_gpus and self.alloc.rollout_nodes == 0

    @property
    def sequence(self) -> int:
        """The longest sample, padded as the trainer pads micro-batches (to TP under sequence parallelism)."""
        length = self.prompt_tokens + self.cfg.rollout.max_new_tokens
        pad = self.layout.tensor_parallel if self.layout.sp else 1
        return math.ceil(length / pad) * pad

    @property
    def samples(self) -> int:
        return self.cfg.rollout.prompts_per_step * self.cfg.rollout.group_size

    @property
    def micro_batch_rows(self) -> int:
        budget = self.cfg.train.max_tokens_per_microbatch
        return max(1, budget // self.sequence) if budget else self.cfg.train.micro_batch_size

    @property
    def micro_batches(self) -> int:
        """Micro-batches of one DP rank per optimizer step (how many the pipeline holds in flight at most)."""
        per_rank = math.ceil(self.samples / self.cfg.train.num_minibatches / self.dp)
        return max(1, math.ceil(per_rank / self.micro_batch_rows))

    @property
    def dtype_bytes(self) -> int:
        return 4 if self.cfg.model.dtype in ("float32", "fp32") else 2

    @property
    def offload_train_state(self) -> bool:
        """Grad buffers, optimizer state and masters off the device around generation and the weight push: what
        the trainer does with colocated GPU servers (the servers a GPU job's script starts on its own GPUs)."""
        return self.colocated and trainer_offloads()

    @property
    def offload_params(self) -> bool:
        return self.offload_train_state and bool(getattr(self.cfg.train, OFFLOAD_PARAMS_KEY.split(".")[1], False))


def with_changes(job: Job, *, alloc: dict | None = None, layout: dict | None = None, config: dict | None = None) -> Job:
    """A copy of `job` with allocation fields, parallel layout fields and dotted config keys changed."""
    cfg = job.cfg
    if layout:
        cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, **layout))
    cfg = replace_keys(cfg, config or {})
    return dataclasses.replace(job, cfg=cfg, alloc=dataclasses.replace(job.alloc, **(alloc or {})))
