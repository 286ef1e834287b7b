"""The RL loop. One step:

prompts -> rollout engine (G samples each) -> rewards -> [dynamic sampling refill] -> group advantages
-> old-policy log-probs -> [reference log-probs] -> num_minibatches optimizer steps -> weight sync.

The rollout side (training/rollout_side.py; rank 0 generates and broadcasts, inline in rollout.mode sync or
on the worker's thread otherwise) hands every rank the step's samples; the learner (training/learner.py)
turns them into an update on every rank; the weights then go back to the engine. Around that: evaluation,
checkpoint cadence and the stop signal Slurm sends before the time limit.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from grpo_megatron.config import RunConfig, to_dict
from grpo_megatron.parallel import control_group
from grpo_megatron.process_setup import stop_signal_received
from grpo_megatron.ranks import is_rank0, multi_rank
from grpo_megatron.training import checkpoint as ckpt
from grpo_megatron.training.builder import Parts, build
from grpo_megatron.training.learner import Learner
from grpo_megatron.training.metrics import PhaseTimer
from grpo_megatron.training.rollout_side import RolloutReceiver
from grpo_megatron.training.run_log import RunLog

logger = logging.getLogger(__name__)


def stop_requested() -> bool:
    """True on every rank once any rank got SIGUSR1/SIGTERM (Slurm's warning before the time limit)."""
    flag = torch.tensor([float(stop_signal_received())])  # a CPU value: reduced over the gloo control group
    if multi_rank():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=control_group())
    return bool(flag.item())


class Trainer:
    """A learner and a rollout side (built from `cfg` unless given), resumed from run_dir's latest checkpoint
    with checkpoint.resume, and the step counter."""

    def __init__(self, cfg: RunConfig, parts: Parts | None = None):
        parts = parts if parts is not None else build(cfg)
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.learner: Learner = parts.learner
        self.rollouts: RolloutReceiver = parts.rollouts
        self.step = 0
        self.preempted = False
        resume_from = ckpt.latest_checkpoint(self.run_dir) if cfg.checkpoint.resume else None
        if resume_from is not None:
            state = self.learner.load(resume_from)
            self.step = state["step"]
            self.rollouts.load_state_dict({**state.get("rollout", {}), "loader": state["loader"]}, version=self.step)
            self.sync_weights()
            if is_rank0():
                logger.info("resumed from %s at step %d", resume_from, self.step)
        self.log = RunLog(self.run_dir, cfg.logging, to_dict(cfg), self.step if resume_from is not None else None)

    def train_step(self) -> dict:
        timer, start = PhaseTimer(), time.perf_counter()
        learner, rollouts = self.learner, self.rollouts
        with timer.phase("generation"):
            learner.memory.before_generation()
            batch, rollout_metrics, routes = rollouts.next_batch(self.step, learner.take_engine_routes)
            self.log.log_batch(self.step + 1, batch)
            learner.memory.after_generation()
        train_metrics = learner.update(batch, self.step, timer, routes)
        self.step += 1
        learner.memory.before_weight_sync()
        with timer.phase("weight_sync"):
            rollouts.push_after_step(learner.policy, self.step)
        elapsed = time.perf_counter() - start
        return {**rollout_metrics, **train_metrics, **rollouts.sync_metrics(), **learner.memory.take_metrics(),
                **timer.times, "time/step": elapsed, "throughput/tokens_per_s": rollout_metrics["rollout/tokens"] / elapsed}

    def train(self) -> list[dict]:
        from tqdm import tqdm

        cfg = self.cfg
        history = []
        self.preempted = False
        if self.step == 0:
            self.sft_warmup()
            initial = self.evaluate()
            if initial:
                self.log.log(0, initial)
        bar = tqdm(total=cfg.train.steps, initial=self.step, disable=not (is_rank0() and cfg.logging.progress_bar),
                   desc="RL steps", dynamic_ncols=True)
        while self.step < cfg.train.steps:
            metrics = self.train_step()
            if cfg.eval.interval and self.step % cfg.eval.interval == 0 and self.step < cfg.train.steps:
                metrics.update(self.evaluate())
            if self.step == cfg.train.steps:
                metrics.update(self.evaluate())
            self.log.log(self.step, metrics)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", acc=f"{metrics['reward/accuracy']:.2f}")
            bar.update(1)
            history.append(metrics)
            if not all(math.isfinite(v) for v in metrics.values() if isinstance(v, float)):
                logger.warning("step %d produced non-finite metrics", self.step)
            if stop_requested():
                path = self.save_checkpoint()
                self.preempted = True
                if is_rank0():
                    logger.warning("PREEMPTED: checkpoint saved at %s; rerun with --resume to continue", path)
                break
            interval = cfg.checkpoint.save_interval
            if (interval and self.step % interval == 0) or self.step == cfg.train.steps:
                self.save_checkpoint()
        bar.close()
        return history

    def sft_warmup(self) -> None:
        """Optional supervised warm start on (prompt, answer) pairs, so that rewards start mixed."""
        if self.cfg.train.sft_warmup_steps > 0:
            self.learner.sft_warmup()
            self.sync_weights()

    def sync_weights(self) -> None:
        """The policy to the engine (every rank takes part), outside a step: at the start, resume, warm start."""
        self.rollouts.push(self.learner.policy, self.step)

    def evaluate(self) -> dict:
        """Held-out evaluation (rank 0's metrics; {} on the other ranks and without eval files)."""
        return self.rollouts.evaluate()

    def save_checkpoint(self) -> Path:
        rollout = self.rollouts.state_dict()  # buffer, draws to re-issue and the cursor, at one moment
        return self.learner.save(self.run_dir, self.step, {"loader": rollout.pop("loader"), "rollout": rollout})

    def close(self) -> None:
        self.rollouts.close()
        self.log.close()
