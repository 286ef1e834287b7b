"""The `rollout` section of the run config: sampling, the engine, the SGLang servers and the tool loop.

Each field's docstring is the string literal under it; a field typed `Literal[...]` is checked against those
choices when the config is loaded (grpo_megatron.config.validation).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# rollout.sglang.api_key when the config leaves it unset: a secret kept out of config files and logs.
API_KEY_ENV = "GRPO_SGLANG_API_KEY"


@dataclass(frozen=True)
class SGLangConfig:
    """SGLang servers reached over HTTP: generation, weight sync, health watching and restarts."""

    urls: list[str] = field(default_factory=list)
    """The servers themselves: weight sync, pause/abort and the probe go to each one."""
    router_url: str = ""
    """Optional sglang-router in front of `urls`: /generate goes there instead."""
    api_key: str | None = None
    """Unset: $GRPO_SGLANG_API_KEY (the Slurm scripts set one per job)."""
    timeout_s: float = 300.0
    """Per request; a /generate gets timeout_per_token_s more per token it may sample."""
    timeout_per_token_s: float = 0.05
    """A non-streaming /generate answers when done: 32K tokens -> 300 + 1638 s."""
    disk_load_timeout_s: float = 1800.0
    """/update_weights_from_disk reads the whole checkpoint (61 GB on a shared file system)."""
    max_in_flight: int = 64
    """Concurrent /generate requests per engine."""
    weight_sync: Literal["tensor", "distributed", "disk", "auto"] = "disk"
    """How weights reach the servers; auto: tensor when colocated, else distributed."""
    bucket_mb: float = 512.0
    """Weight-sync bucket (MiB): a sender holds at most two; fractions split tiny models."""
    retries: int = 4
    """Tries per request (connection errors, 5xx), across servers."""
    server_tp_size: int = 1
    """TP ranks per server: copies of each tensor bucket / ranks in the update group."""
    colocated: bool = False
    """Servers on the trainer's GPUs: server i's TP rank j shares trainer rank i*tp+j's GPU."""
    update_master_address: str = ""
    """Distributed mode: trainer rank 0's address for the servers ("" = this host's address on the route to the
    first server)."""
    update_master_port: int = 0
    """Distributed mode: the update group's port (0 = a free port)."""
    update_backend: Literal["", "nccl", "gloo"] = ""
    """Distributed mode: the update group's backend ("" = nccl on GPU, gloo on CPU)."""
    disk_dir: str = ""
    """Disk mode: a directory every server node reads ("" = a temp dir in /dev/shm, local servers only)."""
    probe_tokens: int = 16
    """Post-sync probe length (0 = off)."""
    probe_tolerance: float = 0.0
    """Max |dlogprob| of the probe (0 = log only)."""
    gpu_servers: bool = False
    """GPU servers: colocated ones release their memory for training (memory saver)."""
    probe_on_gpu_servers: bool = False
    """The probe holds an fp32 model copy on rank 0's CPU: off for GPU servers."""
    weights_cpu_backup: bool = False
    """Servers run --enable-weights-cpu-backup: released weights survive, so a changed-only sync after a release
    needs no full push (off: the push after a release is full, as SGLang resumes released weights as garbage)."""
    sync_changed_only: bool = False
    """After a full first sync, send only tensors whose parameters changed (64-bit fingerprints); tensor and
    distributed modes (disk reloads the whole directory, so it always writes it all)."""
    health_interval_s: float = 10.0
    """One /health_generate probe per server this often (slime: 10 s); 0 = off (rollout/sglang/supervisor.py)."""
    health_timeout_s: float = 30.0
    """No answer by then, or HTTP 503 (SGLang's own 20 s verdict) = hung."""
    health_slow_s: float = 5.0
    """An answer later than this is logged as slow, never acted on (slime's time-out)."""
    restart_dir: str = ""
    """The keepers' control directory (rollout/sglang/keeper.py; "" = no server is restarted)."""
    restart_timeout_s: float = 900.0
    """A restarted server must answer /health within this."""
    max_restarts_per_server: int = 3
    """Then the run stops, naming the server and its log."""
    max_restarts_per_hour: int = 6
    """All servers together, over the last hour."""

    @property
    def sync_mode(self) -> str:
        """weight_sync with `auto` resolved for this placement: CUDA IPC on the GPU a colocated server shares,
        a broadcast from trainer rank 0 to dedicated servers (never the disk: a full checkpoint per step)."""
        if self.weight_sync != "auto":
            return self.weight_sync
        return "tensor" if self.colocated else "distributed"


@dataclass(frozen=True)
class ToolsConfig:
    """The multi-turn tool loop (rollout.function: tool_loop, grpo_megatron/rollout/tools): tool output is inserted
    as tokens with loss mask 0; rollout.max_new_tokens is the budget of a whole response, tool tokens included."""

    format: Literal["hermes", "words"] = "hermes"
    """hermes: <tool_call>{"name": .., "arguments": {..}}</tool_call> (Qwen) | words (tiny vocab)."""
    names: list[str] = field(default_factory=lambda: ["calculator"])
    """calculator, python, or package.module:function."""
    max_turns: int = 4
    """Model turns per sample, so at most max_turns - 1 tool calls."""
    max_tokens_per_turn: int | None = None
    """None: whatever is left of rollout.max_new_tokens."""
    timeout_s: float = 5.0
    """Per tool call; past it the call returns an error and the sample goes on."""
    memory_mb: int = 256
    """The python tool's address-space limit (RLIMIT_AS)."""
    max_output_tokens: int = 64
    """Tool output is cut to this many tokens."""
    call_markers: list[str] = field(default_factory=lambda: ["<tool_call>", "</tool_call>"])
    """Start and end of a tool call (one token each)."""
    response_template: str = ""
    """Text around the tool output, with {output}; "" = the format's default."""


@dataclass(frozen=True)
class RolloutConfig:
    """Generation: which engine, how many samples, how they are drawn and when."""

    engine: Literal["embedded", "sglang"] = "embedded"
    """embedded: an in-process HF model on rank 0 | sglang: the servers of rollout.sglang."""
    prompts_per_step: int = 8
    """Prompts drawn per training step."""
    group_size: int = 8
    """Responses per prompt (the GRPO group, >= 2)."""
    max_new_tokens: int = 16
    """Response length budget, tool tokens included."""
    temperature: float = 1.0
    """Sampling temperature (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1 = off)."""
    top_k: int = -1
    """Top-k sampling (-1 = off)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Tokens that end a response besides eos."""
    use_engine_logprobs: bool = False
    """Old log-probs from the engine instead of a policy forward pass."""
    dynamic_sampling: bool = False
    """DAPO: keep only groups with reward std > 0, refill from more prompts."""
    max_sampling_rounds: int = 4
    """Cap on generation rounds per step when dynamic sampling refills."""
    mode: Literal["sync", "one_step_off", "async"] = "sync"
    """sync | one_step_off (batch t+1 generated with weights t) | async (continuous, bounded)."""
    max_staleness: int = 1
    """Async: versions a trained token may be behind the trainer."""
    stale_groups: Literal["regenerate", "drop"] = "regenerate"
    """Async: a group staler than max_staleness is regenerated or dropped."""
    partial_rollouts: bool = False
    """Async: push weights mid-generation; responses go on under the new ones."""
    identical_groups_warn: float = 0.5
    """Warn when this fraction of a step's groups are G copies of one response the policy is not near-certain of."""
    sglang: SGLangConfig = field(default_factory=SGLangConfig)
    """The SGLang servers (rollout.engine sglang)."""
    function: str = ""
    """"" single turn | tool_loop | package.module:function (grpo_megatron/rollout/functions.py)."""
    function_options: dict = field(default_factory=dict)
    """Passed to the rollout function as context.options."""
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    """The tool loop (rollout.function tool_loop)."""
