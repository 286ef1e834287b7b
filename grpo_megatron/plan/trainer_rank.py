"""What one simulated trainer rank holds, in the plan's terms (filled from the fake-CUDA simulation)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class TrainerRank:
    """One rank's device bytes as megatron allocated them in the simulation (exact tensor bytes, no allocator
    overhead); `peak_bytes` is the high-water mark of a training step (forward + backward of the configured
    micro-batches through megatron's schedule), `logprob_peak_bytes` of a forward-only log-prob pass."""

    dense_params: int
    expert_params: int
    param_bytes: int  # model parameters (bf16 in DDP's param buffers)
    grad_bytes: int  # DDP grad buffers (fp32 with grad_reduce_in_fp32)
    optimizer_bytes: int  # fp32 main-param shard + Adam moments (sharded by the distributed optimizer)
    static_bytes: int  # everything live before the step: the three above and small extras
    peak_bytes: int  # training step, the config's recompute setting
    logprob_peak_bytes: int  # forward-only log-prob pass (old policy / reference)
    seconds: float  # wall time of the simulation
    other_recompute_peak_bytes: int | None = None  # the same step with recompute toggled (for the report)
    extra: dict = field(default_factory=dict)  # anything else the simulation reported, passed through to --json

    @property
    def activation_bytes(self) -> int:
        return self.peak_bytes - self.static_bytes

    def to_dict(self) -> dict:
        return asdict(self)
