"""The run config's schema: one dataclass per YAML section, a docstring under every field.

A field typed `Literal[...]` takes only those values (checked when the config is loaded, the error naming the
choices); names resolved through a registry (losses, rewards, rollout functions) stay `str` and are checked
against the registry. Loading and overrides are in loading.py, checks across fields in validation.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from grpo_megatron.config.schema_algorithm import AlgorithmConfig
from grpo_megatron.config.schema_rollout import RolloutConfig
from grpo_megatron.parallel import ParallelLayout


@dataclass(frozen=True)
class ModelConfig:
    """The policy: its architecture, initial weights and numerics."""

    hf_path: str = ""
    """HF checkpoint: architecture, tokenizer and (unless megatron_path) initial weights."""
    megatron_path: str | None = None
    """Optional megatron checkpoint with the initial weights."""
    dtype: Literal["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"] = "float32"
    """Parameter dtype of the policy (and reference)."""
    recompute_activations: bool = False
    """Full activation recomputation in the backward pass."""
    offload_reference: bool = True
    """GPU: keep the frozen reference model in host memory between uses."""


@dataclass(frozen=True)
class DataConfig:
    """Prompt sets (JSONL or Parquet, one `prompt` per record)."""

    train_files: list[str] = field(default_factory=list)
    """Training prompts; paths relative to the config file."""
    eval_files: list[str] = field(default_factory=list)
    """Evaluation prompts (none: no evaluation)."""
    apply_chat_template: bool = False
    """Wrap each prompt in the tokenizer's chat template."""
    max_prompt_tokens: int | None = None
    """Longer prompts are dropped (None = keep all)."""
    shuffle: bool = True
    """Shuffle the training prompts each epoch (seeded by train.seed)."""


@dataclass(frozen=True)
class RewardFunctionConfig:
    """One reward term."""

    name: str = ""
    """A registered reward, or "module.path:function"."""
    weight: float = 1.0
    """Its weight in the summed reward."""
    options: dict = field(default_factory=dict)
    """Keyword options passed to the reward function."""


@dataclass(frozen=True)
class RewardConfig:
    """How samples are scored."""

    functions: list[RewardFunctionConfig] = field(default_factory=list)
    """The reward terms, summed with their weights."""
    fallback: float = 0.0
    """Score for a sample whose reward function raised or timed out."""
    max_failed_steps: int = 3
    """Stop after this many steps in a row in which every reward call failed (0: never)."""
    timeout_s: float = 10.0
    """Per reward call."""
    overlong_penalty: bool = False
    """DAPO overlong reward shaping."""
    overlong_cache_tokens: int = 4
    """DAPO: the soft-penalty band before max_new_tokens."""
    correct_threshold: float = 1.0
    """Reward >= this counts as correct for accuracy."""


@dataclass(frozen=True)
class TrainConfig:
    """The optimizer and the step schedule."""

    steps: int = 20
    """RL steps (rollout batches)."""
    num_minibatches: int = 4
    """Optimizer steps per rollout batch (off-policy after the first)."""
    micro_batch_size: int = 8
    """Sequences per forward/backward."""
    max_tokens_per_microbatch: int | None = None
    """Token budget per micro-batch (replaces micro_batch_size)."""
    lr: float = 1e-5
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    lr_warmup_steps: int = 0
    """Linear warm-up steps."""
    lr_decay_style: Literal["constant", "linear", "cosine", "inverse-square-root"] = "constant"
    """megatron's OptimizerParamScheduler decay style."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Gradient norm clip."""
    seed: int = 1234
    """Seed of data order, sampling and initialisation."""
    sft_warmup_steps: int = 0
    """Supervised steps on (prompt, answer) before RL."""
    sft_lr: float = 1e-3
    """Learning rate of those supervised steps."""
    num_threads: int | None = None
    """torch CPU threads (None = torch's default)."""
    distributed_optimizer: bool | None = None
    """Shard optimizer state over DP ranks; None: on GPU when DP > 1."""
    offload_params: bool = False
    """Colocated GPU servers: model params to host memory while they generate, too (grad buffers and optimizer
    state always go; training/offload.py)."""
    rollout_wait_minutes: float = 720.0
    """How long ranks 1..N wait (gloo) while rank 0 generates a step's rollout."""
    freeze: list[str] = field(default_factory=list)
    """fnmatch globs over global megatron parameter names (e.g. embedding.*, output_layer.*,
    decoder.layers.*.self_attention.*): those parameters are not trained."""


@dataclass(frozen=True)
class CheckpointConfig:
    """Saving and resuming."""

    save_interval: int = 0
    """Steps between checkpoints (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints kept in the run directory."""
    resume: bool = False
    """Continue from the latest checkpoint in the run directory."""
    optimizer_format: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"
    """Distributed optimizer's state: dp_reshardable (each rank its shard; a resume may change DP only) |
    fully_reshardable (gathered to host on every rank; any layout), see README."""


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation on data.eval_files."""

    interval: int = 0
    """Steps between evaluations (0: only before and after training)."""
    num_prompts: int = 64
    """Prompts evaluated."""
    max_new_tokens: int | None = None
    """None: rollout.max_new_tokens."""
    num_samples: int = 0
    """k sampled responses per prompt for avg@k / pass@k beside greedy (0 = greedy only)."""
    temperature: float | None = None
    """Of the sampled responses (None = rollout.temperature)."""


@dataclass(frozen=True)
class LoggingConfig:
    """Where per-step metrics go besides metrics.jsonl."""

    tensorboard: bool = True
    """Write TensorBoard event files."""
    wandb: bool = False
    """Log to Weights & Biases."""
    wandb_project: str = "grpo_megatron"
    """The W&B project."""
    progress_bar: bool = True
    """A progress bar on rank 0."""


@dataclass(frozen=True)
class RunConfig:
    """A whole run: one YAML file with these sections, plus command-line overrides."""

    run_dir: str = "runs/default"
    """Checkpoints, metrics and the resolved config.yaml go here."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy."""
    parallel: ParallelLayout = field(default_factory=ParallelLayout)
    """megatron's parallel layout (TP, PP, EP, CP, ...)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt sets."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Generation."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Scoring."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """The RL objective."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimizer and step schedule."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and resuming."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metric backends."""

