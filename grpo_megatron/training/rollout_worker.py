"""The rollout side of the loop: prompts -> scored groups, inline (sync) or on a thread feeding the buffer.

Modes (rollout.mode):
- sync: the trainer asks for step t's batch and waits for it (generated with weights t).
- one_step_off: batch t+1 is generated with weights t while step t trains; the trainer pushes weights t+1
  only once batch t+1 is done, so every batch has exactly one version and a run is reproducible.
- async: the thread generates continuously; the trainer pushes weights as soon as a step ends (between two
  rollout batches, or, with rollout.partial_rollouts, mid-generation: the embedded engine applies them at
  the next token, the SGLang engine pauses its servers and resumes the aborted samples from their kept
  tokens; in-flight responses go on under the new weights and record the version of every token).

Both background modes bound the staleness by construction, as AReaL's max_head_offpolicyness does: a new
rollout batch starts only while the groups trained, buffered and in flight stay within
(version + max_staleness + 1) batches, so batch k starts no earlier than under version k - max_staleness
(one_step_off is that gate with max_staleness 1). The trainer still checks every group it takes and drops
or regenerates (rollout.stale_groups) one older than max_staleness.

What a checkpoint holds (state_dict): the buffer, the draws still to be re-issued and the loader cursor, in
one snapshot. A batch in flight at the snapshot is not in the buffer: its draws are saved for re-issue, so
on resume each is generated exactly once more, with the same seed.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from grpo_megatron.algorithms import dynamic_sampling_keep
from grpo_megatron.config import EvalConfig, RewardConfig, RolloutConfig
from grpo_megatron.rollout.engines.base import SamplingParams
from grpo_megatron.rollout.data.prompts import PromptItem, PromptLoader
from grpo_megatron.samples import Sample
from grpo_megatron.training.buffer import Group, RolloutBuffer, staleness_metrics
from grpo_megatron.training.group_diversity import identical_group_fraction, warn_if_identical

GenerateGroups = Callable[[list[PromptItem], SamplingParams, int], list[Sample]]


@dataclass(frozen=True)
class RolloutSpec:
    """What the rollout side (this worker, training/rollout_side.py, its evaluator and weight push) reads of the
    run config; training/builder.py builds it from the RunConfig."""

    rollout: RolloutConfig
    """Sampling, the engine, the modes."""
    reward: RewardConfig
    """Overlong shaping and the accuracy threshold."""
    eval: EvalConfig
    """Held-out evaluation."""
    seed: int
    """train.seed: every sampling seed derives from it."""
    steps: int
    """train.steps: the background worker draws no batch past the run's last step."""
    engine_routes: bool
    """algorithm.routing_replay r3: the engine returns its MoE routes."""
    hf_path: str
    """model.hf_path: the names and config the pushed weights follow."""


class RolloutWorker:
    """Draws prompts (re-issued ones first, then the loader), generates and scores them, and assembles step
    batches with dynamic sampling. `generate_groups`, `score` and `sampling_params` are the trainer's
    (RolloutSide.generate_groups is where prompts become samples); `end_step` counts failed reward calls."""

    def __init__(self, spec: RolloutSpec, loader: PromptLoader, generate_groups: GenerateGroups,
                 score: Callable[[list[Sample]], tuple[list[Sample], int, int]],
                 sampling_params: Callable[[int], SamplingParams],
                 end_step: Callable[[int, int], None], engine_version: Callable[[], int]):
        self.spec, self.loader = spec, loader
        self._generate_groups, self._score, self._sampling_params, self._end_step = (
            generate_groups, score, sampling_params, end_step)
        self._engine_version = engine_version
        self.buffer = RolloutBuffer()
        self._redo: list[tuple[int, int]] = []  # (dataset index, draw) to generate before drawing new prompts
        self._in_flight: list[tuple[int, int]] = []
        self._chunks = 0  # rollout batches completed into the buffer: the next one's seed index
        self._version = 0
        self._state = threading.Condition()  # guards the fields above and the gate
        self._engine = threading.Lock()  # one user of the engine at a time: a rollout batch, a weight push, eval
        self._thread: threading.Thread | None = None
        self._busy = False  # a rollout batch is being generated
        self._holds = 0  # weight pushes and evaluations waiting for or using the engine: no new batch starts
        self._stop = False
        self._error: BaseException | None = None
        self._rollout_idle = 0.0
        self._rollout_busy = 0.0  # seconds generating and scoring batches since the trainer's last take

    # ------------------------------------------------------------------------------------ one batch
    def rollout(self, batch_index: int) -> tuple[list[Sample], dict]:
        """One step batch: prompts -> samples with rewards (dynamic sampling refills zero-variance groups).
        Seeds follow `batch_index`, so the same batch comes out whichever mode or thread asks for it."""
        cfg = self.spec.rollout
        G = cfg.group_size
        kept: list[Sample] = []
        dropped: list[Sample] = []
        drawn = failed = calls = 0
        first_round_groups = None
        for round_index in range(cfg.max_sampling_rounds if cfg.dynamic_sampling else 1):
            draws = self._draw(cfg.prompts_per_step)
            items = [item for item, _ in draws]
            drawn += len(items)
            params = self._sampling_params(batch_index * cfg.max_sampling_rounds + round_index)
            version = self._engine_version()
            generated = self._generate_groups(items, params, drawn - len(items))
            samples = [with_draw(s, item["index"], draw, version)
                       for g, (item, draw) in enumerate(draws) for s in generated[g * G:(g + 1) * G]]
            samples, round_failed, round_calls = self._score(samples)
            failed, calls = failed + round_failed, calls + round_calls
            if first_round_groups is None:
                first_round_groups = samples
            if not cfg.dynamic_sampling:
                kept = samples
                break
            rewards = torch.tensor([s.reward for s in samples])
            keep = dynamic_sampling_keep(rewards, G)
            for g in range(len(items)):
                group = samples[g * G:(g + 1) * G]
                (kept if bool(keep[g]) else dropped).extend(group)
            if len(kept) >= cfg.prompts_per_step * G:
                break
        target = cfg.prompts_per_step * G
        shortfall = max(0, target - len(kept)) // G
        batch = (kept + dropped)[:target]  # short of varied groups: fill with zero-advantage ones
        self._end_step(failed, calls)
        metrics = rollout_metrics(self.spec, first_round_groups, batch, drawn, shortfall)
        metrics["reward/error_frac"] = failed / max(calls, 1)
        warn_if_identical(metrics["rollout/identical_uncertain_groups"], cfg.identical_groups_warn, cfg.temperature)
        return batch, metrics

    def rollout_now(self, batch_index: int) -> tuple[list[Sample], dict]:
        """rollout.mode sync: the batch goes straight to the trainer, so none of its draws stays in flight."""
        batch = self.rollout(batch_index)
        with self._state:
            self._in_flight = []
        return batch

    def _draw(self, count: int) -> list[tuple[PromptItem, int]]:
        with self._state:
            draws = []
            while len(draws) < count and self._redo:
                index, draw = self._redo.pop(0)
                draws.append((self.loader.dataset[index], draw))
            first = self.loader.drawn
            draws += [(item, first + i) for i, item in enumerate(self.loader.next_items(count - len(draws)))]
            self._in_flight += [(item["index"], draw) for item, draw in draws]
            return draws

    # ------------------------------------------------------------------------------------ background modes
    @property
    def _max_staleness(self) -> int:
        return 1 if self.spec.rollout.mode == "one_step_off" else self.spec.rollout.max_staleness

    def _gate_open(self) -> bool:
        """A new rollout batch may start: within the staleness bound, not beyond the run's last step, and
        no weight push or evaluation waiting for the engine."""
        P = self.spec.rollout.prompts_per_step
        committed = self.buffer.committed() + P  # with the batch about to start
        return (not self._holds and committed <= (self._version + self._max_staleness + 1) * P
                and committed <= self.spec.steps * P)

    def _run(self) -> None:
        try:
            while True:
                with self._state:
                    start = time.perf_counter()
                    while not (self._stop or self._gate_open()):
                        self._state.wait()
                    self._rollout_idle += time.perf_counter() - start
                    if self._stop:
                        return
                    index, self._busy = self._chunks, True
                start = time.perf_counter()
                with self._engine_or_nothing():
                    samples, metrics = self.rollout(index)
                busy = time.perf_counter() - start
                G = self.spec.rollout.group_size
                groups = [Group(samples[i:i + G], metrics) for i in range(0, len(samples), G)]
                with self._state:
                    self.buffer.put(groups)
                    self._in_flight, self._chunks, self._busy = [], self._chunks + 1, False
                    self._rollout_busy += busy
                    self._state.notify_all()
        except BaseException as error:  # handed to the trainer, which re-raises it in next_batch
            with self._state:
                self._error = error
                self._state.notify_all()

    def _engine_or_nothing(self):
        """A rollout batch holds the engine against weight pushes, unless partial rollouts let a push in
        mid-generation (the engine applies it there: see the module docstring)."""
        return contextlib.nullcontext() if self.spec.rollout.partial_rollouts else self._engine

    def next_batch(self, version: int) -> tuple[list[Sample], dict]:
        """The trainer's side: rollout.prompts_per_step groups, oldest first, none staler than max_staleness."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="rollout", daemon=True)
            self._thread.start()
        P = self.spec.rollout.prompts_per_step
        groups: list[Group] = []
        stale = 0
        start = time.perf_counter()
        while len(groups) < P:
            taken = self.buffer.take(P - len(groups), ready=lambda: self._error is None)
            if taken is None:
                raise RuntimeError("the rollout thread failed") from self._error
            for group in taken:
                if group.staleness(version) <= self._max_staleness:
                    groups.append(group)
                    continue
                stale += 1
                with self._state:
                    self.buffer.give_back(1)  # leaves room under the gate
                    if self.spec.rollout.stale_groups == "regenerate":
                        self._redo.append((group.samples[0].prompt_index, group.draw))
                    self._state.notify_all()
        trainer_idle = time.perf_counter() - start
        with self._state:
            depth, rollout_idle, self._rollout_idle = len(self.buffer), self._rollout_idle, 0.0
            rollout_busy, self._rollout_busy = self._rollout_busy, 0.0
        samples = [replace(s, group=number) for number, group in enumerate(groups) for s in group.samples]
        metrics = _weighted_mean([g.chunk_metrics for g in groups])
        metrics.update(staleness_metrics(groups, version, depth))
        metrics.update({"async/stale_groups": stale, "time/trainer_idle": trainer_idle,
                        "time/rollout_idle": rollout_idle, "time/rollout_busy": rollout_busy})
        return samples, metrics

    @contextlib.contextmanager
    def weight_update(self, version: int):
        """Around a weight push. one_step_off first waits for the batch in flight (generated with the
        previous weights), which is what makes its batches exact; async pushes as soon as the engine is free
        (at once with partial rollouts: the engine applies the weights mid-generation)."""
        with self._state:
            if self.spec.rollout.mode == "one_step_off":
                while not (self._error or self._stop or (not self._busy and not self._gate_open())):
                    self._state.wait()
            self._holds += 1
        try:
            with self._engine_or_nothing():
                yield
        finally:
            with self._state:
                self._holds -= 1
                self._version = version
                self._state.notify_all()

    @contextlib.contextmanager
    def engine_access(self):
        """Exclusive use of the engine (evaluation): no batch starts, and the one in flight is waited for."""
        with self._state:
            self._holds += 1
            while self._busy and not self._error:
                self._state.wait()
        try:
            yield
        finally:
            with self._state:
                self._holds -= 1
                self._state.notify_all()

    def close(self) -> None:
        with self._state:
            self._stop = True
            self._state.notify_all()
        if self._thread is not None:
            self._thread.join()

    # ------------------------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """Buffer, draws to re-issue (those of a batch in flight, then the regenerate queue) and the loader
        cursor, taken at one moment."""
        with self._state:
            return {"loader": self.loader.state_dict(), "redo": [list(d) for d in self._in_flight + self._redo],
                    "buffer": self.buffer.state_dict(), "chunks": self._chunks, "trained_groups": self.buffer.taken}

    def load_state_dict(self, state: dict, version: int) -> None:
        with self._state:
            self.loader.load_state_dict(state["loader"])
            self._redo = [tuple(d) for d in state.get("redo", [])]
            self.buffer.load_state_dict(state.get("buffer", []), taken=state.get("trained_groups", 0))
            self._chunks = state.get("chunks", 0)
            self._version = version


def with_draw(sample: Sample, prompt_index: int, draw: int, version: int) -> Sample:
    """`sample` with the draw it came from, and per-token weight versions (the engine's `version` at the
    start of the round for every token, unless the engine recorded them)."""
    versions = sample.weight_versions if sample.weight_versions is not None else [version] * len(sample.response_ids)
    return replace(sample, prompt_index=prompt_index, draw=draw, weight_versions=versions)


def rollout_metrics(spec: RolloutSpec, first_round: list[Sample], batch: list[Sample], drawn: int,
                    shortfall: int) -> dict:
    G = spec.rollout.group_size
    rewards = torch.tensor([s.reward for s in batch])
    first = torch.tensor([s.reward for s in first_round]).view(-1, G)
    lengths = torch.tensor([len(s.response_ids) for s in batch], dtype=torch.float32)
    correct = rewards >= spec.reward.correct_threshold
    return {
        "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
        "reward/accuracy": float(correct.float().mean()),
        "reward/zero_std_group_frac": float((first.std(dim=1) == 0).float().mean()),
        "rollout/prompts_drawn": drawn, "rollout/dynamic_sampling_shortfall": shortfall,
        "response/length_mean": float(lengths.mean()), "response/length_max": float(lengths.max()),
        "response/truncation_rate": float(torch.tensor([s.truncated for s in batch]).float().mean()),
        "rollout/tokens": int(sum(s.length for s in batch)),
        "rollout/identical_groups": identical_group_fraction(first_round, G),
        "rollout/identical_uncertain_groups": identical_group_fraction(first_round, G, uncertain_only=True),
    }


def _weighted_mean(chunk_metrics: list[dict]) -> dict:
    """Rollout metrics of a step whose groups may come from several rollout batches: the batches' metrics,
    weighted by how many of the step's groups each gave (exactly one batch's metrics in the usual case)."""
    distinct: dict[int, tuple[dict, int]] = {}
    for metrics in chunk_metrics:
        held, count = distinct.get(id(metrics), (metrics, 0))
        distinct[id(metrics)] = (held, count + 1)
    if len(distinct) == 1:
        return dict(chunk_metrics[0])
    total = len(chunk_metrics)
    return {key: sum(m[key] * n for m, n in distinct.values()) / total for key in chunk_metrics[0]}
