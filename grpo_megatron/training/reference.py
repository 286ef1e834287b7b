"""The frozen reference policy, colocated with the trainable one and parked in host memory between uses."""
from __future__ import annotations

from contextlib import contextmanager

import torch

from grpo_megatron.models.provider import PolicyModel
from grpo_megatron.parallel import current_device


class ReferenceModel:
    """Same layout as the policy, built from the same initial weights, never updated.

    With `offload` (the default) its parameters live in (pinned) host memory except while
    `on_device()` is active, so on a GPU it costs device memory only during the reference pass. On a
    CPU-only machine host and device are the same and nothing moves.
    """

    def __init__(self, model: PolicyModel, offload: bool = True):
        self.model = model
        self.offload = offload and current_device().type != "cpu"
        for chunk in model.chunks:
            chunk.requires_grad_(False)
        if self.offload:
            self._move(torch.device("cpu"))

    def _move(self, device: torch.device) -> None:
        for chunk in self.model.chunks:
            for param in chunk.parameters():
                data = param.data.to(device, non_blocking=True)
                param.data = data.pin_memory() if device.type == "cpu" and torch.cuda.is_available() else data

    @contextmanager
    def on_device(self):
        if self.offload:
            self._move(current_device())
        try:
            yield self.model
        finally:
            if self.offload:
                self._move(torch.device("cpu"))
