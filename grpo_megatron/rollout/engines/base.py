"""The interface between the trainer and a generation engine (embedded in-process, or SGLang servers).

Everything the trainer asks of an engine is a method here (generate, push weights, verify and version them,
release memory), so training/ never needs to know which engine it has.

The trainer only ever sees token ids, per-token log-probs and (for MoE routing replay) the experts each
position was routed to, so every engine must return exactly the conventions documented on `Completion`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:  # types only: this module stays free of megatron imports
    from grpo_megatron.models.weight_stream import Alloc, Bucket


@dataclass
class SamplingParams:
    """How to sample; `n` is the GRPO group size (samples drawn for every prompt)."""

    max_new_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    stop_token_ids: list[int] = field(default_factory=list)  # eos is added by the engine
    n: int = 1
    seed: int | None = None

    def validate(self) -> None:
        """Raise ValueError naming the bad field and its allowed range."""
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens={self.max_new_tokens}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p={self.top_p}: must be in (0, 1] (1 = off)")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"SamplingParams.top_k={self.top_k}: must be >= 1, or -1 for off")
        if self.n < 1:
            raise ValueError(f"SamplingParams.n={self.n}: must be >= 1 (samples per prompt)")


@dataclass
class Completion:
    """One sampled response.

    response_logprobs[i] is the engine's log-prob of response_ids[i] under log_softmax(logits / temperature),
    taken before top-p/top-k truncation (the trainer's convention); with temperature 0 (greedy) it is
    log_softmax(logits). finish_reason is "stop" when the response ends in eos or a stop token (which is
    included in response_ids) and "length" when it was cut at max_new_tokens.
    routed_experts (MoE only, when asked) is an integer tensor [len(prompt) + len(response) - 1, num_moe_layers, topk]
    (from SGLang in the smallest dtype that holds its expert ids, uint8 up to 256 experts):
    row j holds the experts of the forward at position j, i.e. the one that produced token j + 1.
    weight_version is the version generation started under; token_versions[i] (when weights were updated
    during the generation) the version that sampled response_ids[i], and so also of routed_experts row
    len(prompt) - 1 + i.
    """

    prompt_ids: list[int]
    response_ids: list[int]
    response_logprobs: list[float]
    finish_reason: str
    routed_experts: torch.Tensor | None = None
    weight_version: int = 0
    token_versions: list[int] | None = None  # per response token, where weights changed mid-generation

    @property
    def versions(self) -> list[int]:
        """The weight version of every response token (weight_version throughout unless the engine says more)."""
        return list(self.token_versions) if self.token_versions is not None else [self.weight_version] * len(
            self.response_ids)


class BucketSender(Protocol):
    """Whatever takes a stream of weight buckets from a trainer rank (an engine's weight sync)."""

    to_every_rank: bool
    """Every trainer rank sends its own copy of each bucket (colocated tensor mode), else rank 0 only."""
    alloc: Alloc
    """Where a bucket's buffer is made (shared memory when the receiver maps it)."""

    def push_buckets(self, buckets: Iterable[Bucket], version: int) -> int:
        """Send every bucket; returns the bytes moved."""


class RolloutEngine(ABC):
    """Generates completions with the current policy weights, which the trainer pushes after each step."""

    bucket_alloc: Alloc | None = None
    """Where the trainer makes the buffers of the buckets it pushes (None: plain memory; an engine may want
    shared memory)."""
    to_every_rank: bool = False
    """Whether every trainer rank streams buckets too (each has its own sender: rollout.factory.rank_sender)."""

    @abstractmethod
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, return_routed_experts: bool = False
    ) -> list[list[Completion]]:
        """One list of params.n completions per prompt, in prompt order."""

    @abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Replace all weights; names are HF checkpoint names, tensors full (unsharded)."""

    @property
    @abstractmethod
    def weight_version(self) -> int:
        """The version passed to the last update_weights (0 for the initial weights)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Release the engine's resources; it cannot generate afterwards."""

    def push_buckets(self, buckets: Iterable[Bucket], version: int, complete: bool = True,
                     verify: bool = True) -> None:
        """Push weights streamed as buckets. `complete`: every tensor (False: only changed ones, for an engine
        that keeps the rest); `verify=False` leaves the post-push check to a later verify_push(). By default the
        bucket's tensors go to update_weights."""
        self.update_weights(((name, t) for bucket in buckets for name, t in bucket.tensors()), version)

    def serves_last_push(self) -> bool:
        """Whether the engine still holds the weights of the last push (False: the next push must be complete)."""
        return True

    def release_memory(self) -> None:
        """Give accelerator memory back for training; the next push takes it again. Nothing to give here."""

    def verify_push(self) -> None:
        """Check that the engine serves the weights of the last update (SGLang's post-sync probe); none here."""

    def sync_metrics(self) -> dict[str, float]:
        """Figures of the last update_weights for the step's metrics (bytes, MB/s, post-sync probe); none here."""
        return {}
