"""The interface between the trainer and a generation engine (embedded here; SGLang/vLLM servers later).

The trainer only ever sees token ids, per-token log-probs and (for MoE routing replay) the experts each
position was routed to, so every engine must return exactly the conventions documented on `Completion`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch


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


class RolloutEngine(ABC):
    """Generates completions with the current policy weights, which the trainer pushes after each step."""

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

    def verify_push(self) -> None:
        """Check that the engine serves the weights of the last update (SGLang's post-sync probe); none here."""

    def sync_metrics(self) -> dict[str, float]:
        """Figures of the last update_weights for the step's metrics (bytes, MB/s, post-sync probe); none here."""
        return {}
