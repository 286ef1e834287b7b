"""What a run writes into run_dir besides checkpoints: config.yaml, the per-step metrics (metrics.jsonl, and
TensorBoard or W&B) and the prompt log. Rank 0 writes; on the other ranks the same calls do nothing, so the
loop needs no rank test."""
from __future__ import annotations

from pathlib import Path

from grpo_megatron.config import LoggingConfig, save_config_data
from grpo_megatron.ranks import is_rank0
from grpo_megatron.samples import Sample
from grpo_megatron.training.metrics import MetricsLogger
from grpo_megatron.training.prompt_log import PromptLog


class RunLog:
    def __init__(self, run_dir: Path, logging: LoggingConfig, resolved_config: dict, resume_step: int | None):
        """`resolved_config`: the run config as plain data (config.to_dict), written to config.yaml and given to
        the metric backends; `resume_step`: the step a resumed run continues from (the logs drop lines past it),
        else None."""
        self.metrics: MetricsLogger | None = None
        self.prompts: PromptLog | None = None
        if is_rank0():
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config_data(resolved_config, run_dir / "config.yaml")
            self.metrics = MetricsLogger(run_dir, logging.tensorboard, logging.wandb, logging.wandb_project,
                                         resolved_config, resume_step=resume_step)
            self.prompts = PromptLog(run_dir, resume_step)

    def log_batch(self, step: int, samples: list[Sample]) -> None:
        """The prompt draws step `step` trains on."""
        if self.prompts is not None:
            self.prompts.log(step, samples)

    def log(self, step: int, metrics: dict) -> None:
        if self.metrics is not None:
            self.metrics.log(step, metrics)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
