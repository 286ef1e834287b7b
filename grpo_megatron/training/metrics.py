"""Per-step metrics: JSON lines in the run directory, TensorBoard / W&B (offline) when installed."""
from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path

from grpo_megatron.platform import synchronize

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """Appends one JSON object per step; a resumed run truncates lines past the resumed step."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "grpo_megatron", config: dict | None = None, resume_step: int | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = _tensorboard_writer(Path(run_dir) / "tensorboard") if tensorboard else None
        self._wandb = _wandb_run(run_dir, wandb_project, config) if wandb else None

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _jsonable(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _tensorboard_writer(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.info("tensorboard not installed: metrics go to %s only", METRICS_FILE)
        return None
    return SummaryWriter(str(directory))


def _wandb_run(run_dir, project, config):
    try:
        import wandb
    except ImportError:
        logger.warning("logging.wandb is on but wandb is not installed (pip install wandb); skipping it")
        return None
    return wandb.init(project=project, dir=str(run_dir), config=config, mode="offline")


class PhaseTimer:
    """Wall time per phase of a step (generation, rewards, log-probs, training, weight sync).

    GPU kernels run asynchronously: each boundary waits for queued work, so that a phase is charged
    with its own kernels (no-op on CPU)."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize()
            self.times[f"time/{name}"] = self.times.get(f"time/{name}", 0.0) + time.perf_counter() - start
