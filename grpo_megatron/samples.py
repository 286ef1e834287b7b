"""The data that crosses layers: a rollout `Sample` (with the trainer's `TrainerFields`) and a padded `MicroBatch`.

Lowest layer, so that rollout functions, routing replay and the trainer share one definition without
importing each other (the padding and splitting logic is training/batch.py's).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch


@dataclass
class TrainerFields:
    """The trainer's working values for one sample during an update: mutable, apart from the rollout's record.

    Filled on every rank by training/learner.py's `update`, in the order listed, and read into micro-batches
    by training/batch.py. Per-token tensors cover the response only ([R] = one value per response token)."""

    advantage: float = 0.0  # update_math.assign_advantages: from the rewards of the sample's group
    in_loss: bool = True  # learner.update: False for a truncated response under algorithm.overlong_filter
    old_logprobs: torch.Tensor | None = None  # [R] learner.update: the engine's or the policy's; None: the
    # training pass's own (update_math.old_logprobs_are_current)
    rollout_weights: torch.Tensor | None = None  # [R] update_math.correct_rollout: 0 = dropped from the loss
    ref_logprobs: torch.Tensor | None = None  # [R] learner.update: the frozen reference's
    teacher_logprobs: torch.Tensor | None = None  # [R] opd.score_with_teacher: the OPD teacher's
    teacher_topk_logprobs: torch.Tensor | None = None  # [R, k] opd.score_with_teacher (top-k): the teacher's k
    # most likely tokens' log-probs ...
    teacher_topk_ids: torch.Tensor | None = None  # [R, k] ... and their ids
    loss_selection: torch.Tensor | None = None  # [R] update_math.select_minibatch_tokens, per mini-batch: 1
    # where a covariance loss (clip_cov, kl_cov) singles out the token


@dataclass(frozen=True)
class Sample:
    """One prompt + response as the rollout produced and scored it; per-token lists cover the response only.

    Frozen, so that no later stage can change what was sampled and rewarded. The rollout builds it in steps,
    each making a new sample with `dataclasses.replace` that takes the old one's place in its list: the
    group number (rollout/functions.py), the draw and weight versions (training/rollout_worker.py), then
    the reward (training/rollout_side.py's score). After scoring, only the step's group renumbering
    (rollout_worker's next_batch) and the release of the routes once taken for delivery (replay/delivery.py)
    replace it; `replace` copies references, not the lists or the routes, so neither costs memory. The
    lists and `meta` stay plain Python types: nothing may mutate them in place either. The trainer's values
    live in `trainer`, the one writable part; `replace` carries the same holder over, so a replaced sample
    keeps the values the trainer already gave it."""

    prompt_ids: list[int]
    response_ids: list[int]
    group: int  # index of the prompt in the step's batch (samples of a group share it)
    reward: float = 0.0
    truncated: bool = False
    engine_logprobs: list[float] | None = None
    routed_experts: torch.Tensor | None = None  # [len(prompt)+len(response)-1, layers, topk] from the engine
    loss_mask: list[int] | None = None  # per response token: 1 sampled (trained), 0 inserted (tool output); None: all 1
    answer: str | None = None
    meta: dict = field(default_factory=dict)
    weight_versions: list[int] | None = None  # [R] the weight version each response token was sampled under
    prompt_index: int = -1  # the prompt's index in the training set
    draw: int = -1  # serial number of the prompt's draw from the loader (PromptLoader.drawn)
    trainer: TrainerFields = field(default_factory=TrainerFields, compare=False, repr=False)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class MicroBatch:
    indices: list[int]  # which samples of the batch, in row order
    tokens: torch.Tensor  # [b, s]
    positions: torch.Tensor  # [b, s]
    targets: torch.Tensor  # [b, s]: token t+1 at position t
    response_mask: torch.Tensor  # [b, s]
    advantages: torch.Tensor  # [b]
    old_logprobs: torch.Tensor | None = None  # [b, s]
    ref_logprobs: torch.Tensor | None = None  # [b, s]
    engine_logprobs: torch.Tensor | None = None  # [b, s]
    rollout_weights: torch.Tensor | None = None  # [b, s]
    loss_selection: torch.Tensor | None = None  # [b, s]
    loss_mask: torch.Tensor | None = None  # [b, s]: 0 at inserted (tool) tokens; None when every sample is all 1
    teacher_logprobs: torch.Tensor | None = None  # [b, s] (OPD)
    teacher_topk_logprobs: torch.Tensor | None = None  # [b, s, k] (OPD top-k)
    teacher_topk_ids: torch.Tensor | None = None  # [b, s, k]
    # (mb, logits, temperature, tp_group) -> mb with more values read off the logits in `extra` (OPD's top-k)
    on_logits: Callable | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())

    def to(self, device: torch.device) -> MicroBatch:
        """The same micro-batch with every tensor on `device` (built on the CPU; the model's weights are on
        the platform's device, and megatron's embedding does not move its input)."""
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **moved)


def route_storage_dtype(num_experts: int) -> torch.dtype:
    """The smallest dtype for expert ids: a byte per id up to 256 experts (routes of a long step are GBs)."""
    if num_experts <= 256:
        return torch.uint8
    return torch.int16 if num_experts <= torch.iinfo(torch.int16).max else torch.int32
