"""Run configuration: one YAML file plus command-line overrides, strictly checked.

Every key is a dataclass field below; an unknown key (in YAML or on the command line) is an error that
lists the known ones. Overrides come either as dotted paths (`--train.lr 1e-6`, `--rollout.group_size=8`)
or as megatron's flag names (`--tensor-model-parallel-size 2`, `--micro-batch-size 4`, see
MEGATRON_FLAGS). The resolved config is written to the run directory as `config.yaml`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from grpo_megatron.errors import ConfigError
from grpo_megatron.parallel import ParallelLayout


# rollout.sglang.api_key when the config leaves it unset: a secret kept out of config files and logs.
API_KEY_ENV = "GRPO_SGLANG_API_KEY"


@dataclass
class ModelConfig:
    hf_path: str = ""  # HF checkpoint: architecture, tokenizer and (unless megatron_path) initial weights
    megatron_path: str | None = None  # optional megatron checkpoint with the initial weights
    dtype: str = "float32"
    recompute_activations: bool = False  # full activation recomputation in the backward pass
    offload_reference: bool = True  # GPU: keep the frozen reference model in host memory between uses


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    apply_chat_template: bool = False
    max_prompt_tokens: int | None = None
    shuffle: bool = True


@dataclass
class SGLangConfig:
    urls: list[str] = field(default_factory=list)  # the servers themselves: weight sync, pause/abort, probe
    router_url: str = ""  # optional sglang-router in front of `urls`: /generate goes there instead
    api_key: str | None = None  # unset: $GRPO_SGLANG_API_KEY (the Slurm scripts set one per job)
    timeout_s: float = 300.0  # per request; a /generate gets timeout_per_token_s more per token it may sample
    timeout_per_token_s: float = 0.05  # a non-streaming /generate answers when done: 32K tokens -> 300 + 1638 s
    disk_load_timeout_s: float = 1800.0  # /update_weights_from_disk reads the whole checkpoint (61 GB, shared FS)
    max_in_flight: int = 64
    weight_sync: str = "disk"  # tensor | distributed | disk | auto (tensor when colocated, else distributed)
    bucket_mb: float = 512.0  # weight-sync bucket (MiB): a sender holds at most two; fractions split tiny models
    retries: int = 4  # tries per request (connection errors, 5xx), across servers
    server_tp_size: int = 1  # TP ranks per server: copies of each tensor bucket / ranks in the update group
    colocated: bool = False  # servers on the trainer's GPUs: server i's TP rank j shares trainer rank i*tp+j's GPU
    update_master_address: str = ""  # distributed mode: trainer rank 0's address for the servers ("" = the
    # address of this host on the route to the first server)
    update_master_port: int = 0  # 0 = a free port
    update_backend: str = ""  # "" = nccl on GPU, gloo on CPU
    disk_dir: str = ""  # disk mode: directory every server node reads ("" = a temp dir in /dev/shm, local servers only)
    probe_tokens: int = 16  # post-sync probe length (0 = off)
    probe_tolerance: float = 0.0  # max |dlogprob| of the probe (0 = log only)
    gpu_servers: bool = False  # GPU servers: colocated ones release their memory for training (memory saver)
    probe_on_gpu_servers: bool = False  # the probe holds an fp32 model copy on rank 0's CPU: off for GPU servers
    weights_cpu_backup: bool = False  # servers run --enable-weights-cpu-backup: released weights survive, so a
    # changed-only sync after a release needs no full push (off: the push after a release is full, as SGLang
    # resumes released weights as garbage)
    sync_changed_only: bool = False  # after a full first sync, send only tensors whose parameters changed (64-bit
    # fingerprints); tensor and distributed modes (disk reloads the whole directory, so it always writes it all)
    # Fault tolerance (rollout/sglang/supervisor.py): health watching of every server, restarts of the ones the job
    # runs under keepers (rollout/sglang/keeper.py) that write into restart_dir; others are reported, not restarted.
    health_interval_s: float = 10.0  # one /health_generate probe per server this often (slime: 10 s); 0 = off
    health_timeout_s: float = 30.0  # no answer by then, or HTTP 503 (SGLang's own 20 s verdict) = hung
    health_slow_s: float = 5.0  # an answer later than this is logged as slow, never acted on (slime's time-out)
    restart_dir: str = ""  # the keepers' control directory ("" = no server is restarted)
    restart_timeout_s: float = 900.0  # a restarted server must answer /health within this
    max_restarts_per_server: int = 3  # then the run stops, naming the server and its log
    max_restarts_per_hour: int = 6  # all servers together, over the last hour


    @property
    def sync_mode(self) -> str:
        """weight_sync with `auto` resolved for this placement: CUDA IPC on the GPU a colocated server shares,
        a broadcast from trainer rank 0 to dedicated servers (never the disk: a full checkpoint per step)."""
        if self.weight_sync != "auto":
            return self.weight_sync
        return "tensor" if self.colocated else "distributed"


@dataclass
class ToolsConfig:
    """The multi-turn tool loop (rollout.function: tool_loop, grpo_megatron/rollout/tools): tool output is inserted
    as tokens with loss mask 0; rollout.max_new_tokens is the budget of a whole response, tool tokens included."""

    format: str = "hermes"  # hermes: <tool_call>{"name": .., "arguments": {..}}</tool_call> (Qwen) | words (tiny vocab)
    names: list[str] = field(default_factory=lambda: ["calculator"])  # calculator, python, or package.module:function
    max_turns: int = 4  # model turns per sample, so at most max_turns - 1 tool calls
    max_tokens_per_turn: int | None = None  # None: whatever is left of rollout.max_new_tokens
    timeout_s: float = 5.0  # per tool call; past it the call returns an error and the sample goes on
    memory_mb: int = 256  # the python tool's address-space limit (RLIMIT_AS)
    max_output_tokens: int = 64  # tool output is cut to this many tokens
    call_markers: list[str] = field(default_factory=lambda: ["<tool_call>", "</tool_call>"])  # start, end (one token)
    response_template: str = ""  # text around the tool output, with {output}; "" = the format's default


@dataclass
class RolloutConfig:
    engine: str = "embedded"  # embedded | sglang
    prompts_per_step: int = 8
    group_size: int = 8
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: list[int] = field(default_factory=list)
    use_engine_logprobs: bool = False  # old log-probs from the engine instead of a policy forward pass
    dynamic_sampling: bool = False  # DAPO: keep only groups with reward std > 0, refill from more prompts
    max_sampling_rounds: int = 4  # cap on generation rounds per step when dynamic sampling refills
    mode: str = "sync"  # sync | one_step_off (batch t+1 generated with weights t) | async (continuous, bounded)
    max_staleness: int = 1  # async: versions a trained token may be behind the trainer
    stale_groups: str = "regenerate"  # async: a group staler than max_staleness is regenerated or dropped
    partial_rollouts: bool = False  # async: push weights mid-generation; responses go on under the new ones
    identical_groups_warn: float = 0.5  # warn when this fraction of a step's groups are G copies of one response
    sglang: SGLangConfig = field(default_factory=SGLangConfig)
    function: str = ""  # "" single turn | tool_loop | package.module:function (grpo_megatron/rollout/functions.py)
    function_options: dict = field(default_factory=dict)  # passed to the function as context.options
    tools: ToolsConfig = field(default_factory=ToolsConfig)


@dataclass
class RewardFunctionConfig:
    name: str = ""  # a registered reward, or "module.path:function"
    weight: float = 1.0
    options: dict = field(default_factory=dict)


@dataclass
class RewardConfig:
    functions: list[RewardFunctionConfig] = field(default_factory=list)
    fallback: float = 0.0  # score for a sample whose reward function raised or timed out
    max_failed_steps: int = 3  # stop after this many steps in a row in which every reward call failed (0: never)
    timeout_s: float = 10.0
    overlong_penalty: bool = False  # DAPO overlong reward shaping
    overlong_cache_tokens: int = 4
    correct_threshold: float = 1.0  # reward >= this counts as correct for accuracy


@dataclass
class RolloutCorrectionConfig:
    """Train-inference mismatch correction (algorithms/rollout_correction.py); needs engine log-probs and
    trainer-recomputed old log-probs (decoupled), so not rollout.use_engine_logprobs (bypass)."""

    mode: str = "none"  # none | tis (truncate at high) | mis (drop outside [low, high]) | reject (same, weights 1)
    level: str = "token"  # token | sequence (product) | geometric (geometric mean): what one weight covers
    low: float = 0.0  # mis / reject: units with weight below are dropped (0 = no lower bound)
    high: float = 2.0  # tis: truncation bound; mis / reject: units above are dropped
    veto: float | None = None  # drop a sequence with any token ratio old/rollout below this (e.g. 1e-4)
    max_seq_kl: float | None = None  # drop a sequence whose mean token k3 KL(rollout || old) is above this
    adaptive_ess_target: float | None = None  # tis: per-step bound, the largest <= high keeping ESS >= target


@dataclass
class LossParamsConfig:
    """Hyperparameters of single losses (algorithms/loss_params.py, the papers' defaults); each acts only
    with its loss."""

    sapo_tau_pos: float = 1.0  # sapo: gate temperature for A > 0
    sapo_tau_neg: float = 1.05  # sapo: for A <= 0
    clip_cov_ratio: float = 2e-4  # clip_cov: fraction of the batch's tokens detached
    clip_cov_lb: float = 1.0  # clip_cov: drawn among tokens with lb < Cov < ub
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 2e-4  # kl_cov: fraction of tokens (largest Cov) penalised
    kl_cov_coef: float = 1.0  # kl_cov: beta of beta |log r|


@dataclass
class OPDConfig:
    """On-policy distillation (algorithms/opd.py): a teacher scores the student's sampled tokens."""

    teacher: str = "none"  # none | megatron (frozen, colocated like the reference) | sglang (a server, prefill only)
    mode: str = "distill"  # distill: advantage = coef * (log p_teacher - log p_student) | rl: added to the group's
    coef: float = 1.0
    top_k: int = 0  # 0: the sampled token's log-probs | k: tail-aware reverse KL over the teacher's top-k (a loss term)
    hf_path: str = ""  # megatron teacher: its HF checkpoint (architecture; weights unless megatron_path)
    megatron_path: str | None = None  # megatron teacher: its megatron checkpoint (e.g. a run's checkpoint)
    offload: bool = True  # megatron teacher on GPU: parameters in host memory between scoring passes
    sglang_urls: list[str] = field(default_factory=list)  # sglang teacher: its server(s)
    sglang_timeout_s: float = 300.0


@dataclass
class AlgorithmConfig:
    loss: str = "gspo"  # grpo gspo gspo_token cispo sapo gmpo clip_cov kl_cov dppo_tv dppo_kl (README loss table)
    clip_low: float | None = None  # None: the loss's paper default (gspo 3e-4 / 4e-4, grpo 0.2 / 0.2; DAPO 0.2 / 0.28)
    clip_high: float | None = None
    dual_clip_c: float | None = None
    loss_params: LossParamsConfig = field(default_factory=LossParamsConfig)
    loss_agg: str = "seq_mean_token_mean"
    advantage: str = "grpo"  # grpo | dr_grpo
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    overlong_filter: bool = False  # DAPO: mask truncated samples out of the loss
    routing_replay: str = "none"  # none | r2 | r3 (MoE only)
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
    opd: OPDConfig = field(default_factory=OPDConfig)


@dataclass
class TrainConfig:
    steps: int = 20
    num_minibatches: int = 4  # optimizer steps per rollout batch (off-policy after the first)
    micro_batch_size: int = 8
    max_tokens_per_microbatch: int | None = None  # token budget per micro-batch (replaces micro_batch_size)
    lr: float = 1e-5
    min_lr: float = 0.0
    lr_warmup_steps: int = 0
    lr_decay_style: str = "constant"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    sft_warmup_steps: int = 0  # supervised steps on (prompt, answer) before RL
    sft_lr: float = 1e-3
    num_threads: int | None = None
    distributed_optimizer: bool | None = None  # shard optimizer state over DP ranks; None: on GPU when DP > 1
    offload_params: bool = False  # colocated GPU servers: model params to host memory while they generate, too (grad
    # buffers and optimizer state always go; training/offload.py)
    rollout_wait_minutes: float = 720.0  # how long ranks 1..N wait (gloo) while rank 0 generates a step's rollout
    freeze: list[str] = field(default_factory=list)  # fnmatch globs over global megatron parameter names (e.g.
    # embedding.*, output_layer.*, decoder.layers.*.self_attention.*): those parameters are not trained


@dataclass
class CheckpointConfig:
    save_interval: int = 0  # 0: only at the end
    keep_last: int = 2
    resume: bool = False  # continue from the latest checkpoint in the run directory
    optimizer_format: str = "dp_reshardable"  # distributed optimizer's state: dp_reshardable (each rank its shard;
    # a resume may change DP only) | fully_reshardable (gathered to host on every rank; any layout), see README


@dataclass
class EvalConfig:
    interval: int = 0  # 0: only before and after training
    num_prompts: int = 64
    max_new_tokens: int | None = None
    num_samples: int = 0  # k sampled responses per prompt for avg@k / pass@k beside greedy (0 = greedy only)
    temperature: float | None = None  # of the sampled responses (None = rollout.temperature)


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "grpo_megatron"
    progress_bar: bool = True


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelLayout = field(default_factory=ParallelLayout)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        """Checks that need several fields; each names the key to change."""
        if not self.model.hf_path:
            raise ConfigError("model.hf_path is required (HF checkpoint directory with config and tokenizer)")
        if not self.data.train_files:
            raise ConfigError("data.train_files is empty: give at least one JSONL or Parquet file")
        if not self.reward.functions:
            raise ConfigError("reward.functions is empty: name at least one reward function")
        if self.rollout.engine not in ("embedded", "sglang"):
            raise ConfigError(f"rollout.engine={self.rollout.engine!r}: use 'embedded' or 'sglang'")
        if self.algorithm.routing_replay not in ("none", "r2", "r3"):
            raise ConfigError(f"algorithm.routing_replay={self.algorithm.routing_replay!r}: use none, r2 or r3")
        self._validate_loss()
        self._validate_rollout_correction()
        self._validate_opd()
        self._validate_rollout_mode()
        self._validate_rollout_function()
        self._validate_weight_sync()
        batch = self.rollout.prompts_per_step * self.rollout.group_size
        if batch % self.train.num_minibatches:
            raise ConfigError(
                f"rollout batch {self.rollout.prompts_per_step}x{self.rollout.group_size}={batch} sequences "
                f"does not split into train.num_minibatches={self.train.num_minibatches}; choose a divisor")
        for name in ("steps", "num_minibatches", "micro_batch_size"):
            if getattr(self.train, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1")
        if self.train.max_tokens_per_microbatch is not None and (
                self.train.max_tokens_per_microbatch < 1 or self.parallel.pipeline_parallel > 1):
            raise ConfigError("train.max_tokens_per_microbatch must be >= 1 and needs parallel.pipeline_parallel 1 "
                              "(pipeline stages exchange activations of one fixed micro-batch shape)")
        if self.train.lr_warmup_steps >= self.train.steps and self.train.lr_warmup_steps > 0:
            raise ConfigError(f"train.lr_warmup_steps={self.train.lr_warmup_steps} must be below train.steps="
                              f"{self.train.steps}; lower it or set it to 0")
        if self.eval.num_samples < 0 or (self.eval.temperature is not None and self.eval.temperature <= 0):
            raise ConfigError("eval.num_samples must be >= 0 and eval.temperature > 0 (greedy accuracy is always reported)")
        if self.rollout.group_size < 2:
            raise ConfigError("rollout.group_size must be >= 2: group-relative advantages need a group")

    def _validate_weight_sync(self) -> None:
        s = self.rollout.sglang
        if s.sync_changed_only and (self.rollout.engine != "sglang" or s.sync_mode == "disk"):
            raise ConfigError(f"rollout.sglang.sync_changed_only needs rollout.engine sglang with weight_sync tensor or "
                              f"distributed (got engine {self.rollout.engine}, weight_sync {s.weight_sync}): "
                              f"update_weights_from_disk reloads the whole directory, so disk mode always writes "
                              f"the full checkpoint; set sync_changed_only false")
        if self.checkpoint.optimizer_format not in ("dp_reshardable", "fully_reshardable"):
            raise ConfigError(f"checkpoint.optimizer_format={self.checkpoint.optimizer_format!r}: use dp_reshardable "
                              f"or fully_reshardable")
        if any(not pattern.strip() for pattern in self.train.freeze):
            raise ConfigError("train.freeze has an empty pattern; give fnmatch globs such as embedding.*")

    def _validate_rollout_function(self) -> None:
        from grpo_megatron.rollout.functions import resolve_rollout_function
        from grpo_megatron.rollout.tools.config import check_tools_config

        try:
            resolve_rollout_function(self.rollout.function)
            if self.rollout.function == "tool_loop":
                check_tools_config(self.rollout.tools)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def _validate_opd(self) -> None:
        """One-line errors for algorithm.opd (on-policy distillation), each naming the key to change."""
        from grpo_megatron.algorithms.opd import OPD_MODES

        cfg = self
        opd, key = cfg.algorithm.opd, "algorithm.opd"
        if opd.teacher not in ("none", "megatron", "sglang"):
            raise ConfigError(f"{key}.teacher={opd.teacher!r}: use none, megatron or sglang")
        if opd.teacher == "none":
            return
        if opd.mode not in OPD_MODES:
            raise ConfigError(f"{key}.mode={opd.mode!r}: use distill (the teacher's signal alone) or rl (added to the "
                              "group advantage)")
        if not (math.isfinite(opd.coef) and opd.coef > 0):
            raise ConfigError(f"{key}.coef={opd.coef}: must be a finite number > 0 (e.g. 1.0)")
        if opd.top_k < 0:
            raise ConfigError(f"{key}.top_k={opd.top_k}: must be 0 (sampled-token signal) or the teacher's top-k size")
        if opd.top_k == 0 and cfg.algorithm.loss == "gspo":
            raise ConfigError(f"{key} gives per-token advantages, which algorithm.loss gspo (one ratio per sequence) "
                              "cannot take: use grpo or gspo_token, or set {key}.top_k > 0")
        if opd.teacher == "megatron" and not opd.hf_path:
            raise ConfigError(f"{key}.teacher=megatron needs {key}.hf_path (the teacher's HF checkpoint directory; "
                              f"weights from {key}.megatron_path if set)")
        if opd.teacher == "sglang":
            if not opd.sglang_urls:
                raise ConfigError(f"{key}.teacher=sglang needs {key}.sglang_urls (e.g. [http://127.0.0.1:30001])")
            if cfg.rollout.temperature != 1.0:
                raise ConfigError(f"{key}.teacher=sglang scores at temperature 1 (SGLang 0.5.23 ignores the temperature "
                                  f"for input log-probs), but rollout.temperature={cfg.rollout.temperature}: set it to 1.0 "
                                  f"or use {key}.teacher megatron")

    def _validate_rollout_mode(self) -> None:
        r = self.rollout
        if r.mode not in ("sync", "one_step_off", "async"):
            raise ConfigError(f"rollout.mode={r.mode!r}: use sync, one_step_off or async")
        if r.stale_groups not in ("regenerate", "drop"):
            raise ConfigError(f"rollout.stale_groups={r.stale_groups!r}: use regenerate or drop")
        if r.max_staleness < 1:
            raise ConfigError(f"rollout.max_staleness={r.max_staleness}: must be >= 1 (0 is rollout.mode sync)")
        if r.partial_rollouts and r.mode != "async":
            raise ConfigError("rollout.partial_rollouts needs rollout.mode async (weights change mid-generation)")
        if r.mode != "sync" and r.engine == "sglang" and r.sglang.colocated and r.sglang.gpu_servers:
            raise ConfigError(f"rollout.mode={r.mode} generates while the trainer trains, and colocated GPU servers then "
                              f"hold their memory beside the trainer's: use rollout.mode sync, or servers on GPUs of "
                              f"their own (rollout.sglang.colocated false)")
        if r.mode != "sync" and self.algorithm.rollout_correction.mode == "none" and not r.use_engine_logprobs:
            raise ConfigError(f"rollout.mode={r.mode} trains on samples of older weights: set algorithm."
                              "rollout_correction.mode (e.g. tis) or rollout.use_engine_logprobs true")

    def _validate_loss(self) -> None:
        from grpo_megatron.algorithms import POLICY_LOSSES, LossParams, resolve_clip

        alg = self.algorithm
        if alg.loss not in POLICY_LOSSES:
            raise ConfigError(f"algorithm.loss={alg.loss!r}: use {', '.join(POLICY_LOSSES.names())}")
        for where, check in (("algorithm", lambda: resolve_clip(alg.loss, alg.clip_low, alg.clip_high, alg.dual_clip_c)),
                             ("algorithm.loss_params", lambda: LossParams(**dataclasses.asdict(alg.loss_params)).check())):
            try:
                check()
            except ValueError as err:
                raise ConfigError(f"{where}: {err}") from None

    def _validate_rollout_correction(self) -> None:
        from grpo_megatron.algorithms import ROLLOUT_CORRECTIONS, ROLLOUT_IS_LEVELS

        rc, key = self.algorithm.rollout_correction, "algorithm.rollout_correction"
        if rc.mode != "none" and rc.mode not in ROLLOUT_CORRECTIONS:
            raise ConfigError(f"{key}.mode={rc.mode!r}: use none, {', '.join(ROLLOUT_CORRECTIONS.names())}")
        if rc.level not in ROLLOUT_IS_LEVELS:
            raise ConfigError(f"{key}.level={rc.level!r}: use {', '.join(ROLLOUT_IS_LEVELS.names())}")
        if rc.mode == "none":
            if rc.veto is not None or rc.max_seq_kl is not None or rc.adaptive_ess_target is not None:
                raise ConfigError(f"{key}.veto / max_seq_kl / adaptive_ess_target act only with a mode: set "
                                  f"{key}.mode to tis, mis or reject, or remove them")
            return
        if self.rollout.use_engine_logprobs:
            raise ConfigError(f"{key}.mode={rc.mode} needs trainer-recomputed old log-probs, but rollout."
                              "use_engine_logprobs=true makes the rollout's the old ones (bypass: the PPO ratio is "
                              "then pi/pi_rollout and its clip is the correction): set one of them off")
        if not 0 <= rc.low <= 1 <= rc.high:
            raise ConfigError(f"{key}: need 0 <= low <= 1 <= high (agreeing policies give weight 1), got "
                              f"low={rc.low}, high={rc.high}")
        if rc.veto is not None and not 0 < rc.veto < 1:
            raise ConfigError(f"{key}.veto={rc.veto}: must be in (0, 1), e.g. 1e-4, or null for off")
        if rc.max_seq_kl is not None and rc.max_seq_kl <= 0:
            raise ConfigError(f"{key}.max_seq_kl={rc.max_seq_kl}: must be > 0, or null for off")
        if rc.adaptive_ess_target is not None and (rc.mode != "tis" or not 0 < rc.adaptive_ess_target <= 1):
            raise ConfigError(f"{key}.adaptive_ess_target={rc.adaptive_ess_target}: needs mode tis and a "
                              "target in (0, 1], e.g. 0.9")


# megatron-LM flag -> dotted config path
MEGATRON_FLAGS = {
    "tensor-model-parallel-size": "parallel.tensor_parallel",
    "pipeline-model-parallel-size": "parallel.pipeline_parallel",
    "num-virtual-stages-per-pipeline-rank": "parallel.virtual_pipeline_parallel",
    "expert-model-parallel-size": "parallel.expert_parallel",
    "expert-tensor-parallel-size": "parallel.expert_tensor_parallel",
    "context-parallel-size": "parallel.context_parallel",
    "sequence-parallel": "parallel.sequence_parallel",
    "micro-batch-size": "train.micro_batch_size",
    "train-iters": "train.steps",
    "lr": "train.lr",
    "min-lr": "train.min_lr",
    "lr-warmup-iters": "train.lr_warmup_steps",
    "lr-decay-style": "train.lr_decay_style",
    "weight-decay": "train.weight_decay",
    "adam-beta1": "train.adam_beta1",
    "adam-beta2": "train.adam_beta2",
    "adam-eps": "train.adam_eps",
    "clip-grad": "train.clip_grad",
    "seed": "train.seed",
    "save-interval": "checkpoint.save_interval",
    "recompute-activations": "model.recompute_activations",
    "bf16": "model.dtype",
}
_TOP_LEVEL_SCALARS = ("run_dir",)
_FLAG_CONSTANTS = {"bf16": "bfloat16", "sequence-parallel": "true", "recompute-activations": "true"}


def _type_hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Turn YAML/CLI values into the field's type, or raise ConfigError naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _from_dict(hint, value, where)
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint in (int, float, str):
        try:
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}") from None
    return value


def _from_dict(cls, data: dict, where: str = ""):
    hints = _type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"known keys{' in ' + where if where else ''}: {', '.join(known)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(config) -> dict:
    """The config as plain data, without an API key taken from the environment: config.yaml and the
    metrics backends receive this, and a secret passed by environment must not end up in them."""
    data = dataclasses.asdict(config)
    sglang = data.get("rollout", {}).get("sglang", {})
    if sglang.get("api_key") and sglang["api_key"] == os.environ.get(API_KEY_ENV):
        sglang["api_key"] = None
    return data


def parse_overrides(argv: list[str]) -> dict:
    """`--a.b value`, `--a.b=value` and megatron flags -> a nested dict of overrides."""
    overrides: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --train.lr 1e-6")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        elif key in _FLAG_CONSTANTS:
            value = _FLAG_CONSTANTS[key]
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg} needs a value")
            i += 1
            value = argv[i]
        path = MEGATRON_FLAGS.get(key, key.replace("-", "_") if "." not in key else key)
        if "." not in path and path not in _TOP_LEVEL_SCALARS:
            raise ConfigError(f"unknown flag --{key}; use a dotted key (e.g. --train.lr) or one of the "
                              f"megatron flags: {', '.join('--' + f for f in MEGATRON_FLAGS)}")
        node = overrides
        parts = path.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _parse_scalar(value)
        i += 1
    return overrides


def _parse_scalar(text: str):
    """YAML's reading of a command-line value, with 1e-6 read as a number (YAML 1.1 wants 1.0e-6)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> RunConfig:
    """Read YAML, apply overrides, coerce types, reject unknown keys, and validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        base_dir = path.parent
        data = _resolve_relative_paths(data, base_dir)
    if overrides:
        extra = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides))
        data = _merge(data, extra)
    config = _from_dict(RunConfig, data)
    if config.rollout.sglang.api_key is None:
        config.rollout.sglang.api_key = os.environ.get(API_KEY_ENV) or None
    config.validate()
    return config


def _resolve_relative_paths(data: dict, base: Path) -> dict:
    """Paths in a config file are relative to that file, so configs can be run from anywhere."""
    def fix(p):
        return str((base / p).resolve()) if isinstance(p, str) and p and not Path(p).is_absolute() else p

    data = dict(data)
    opd = data.get("algorithm", {}).get("opd") if isinstance(data.get("algorithm"), dict) else None
    if isinstance(opd, dict):
        data["algorithm"] = {**data["algorithm"], "opd": {k: fix(v) if k in ("hf_path", "megatron_path") else v
                                                           for k, v in opd.items()}}
    for section, keys in (("model", ("hf_path", "megatron_path")), ("data", ("train_files", "eval_files"))):
        if isinstance(data.get(section), dict):
            sec = dict(data[section])
            for key in keys:
                if isinstance(sec.get(key), list):
                    sec[key] = [fix(p) for p in sec[key]]
                elif key in sec:
                    sec[key] = fix(sec[key])
            data[section] = sec
    return data


def save_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
