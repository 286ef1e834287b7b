"""The SGLang server's share of a GPU, from the model's shapes and the server's flags.

SGLang sizes its static pool (weights + KV cache) as `--mem-fraction-static` of the GPU's total memory: after
loading the weights, the KV cache gets what is left of that fraction (model_runner's profile_max_num_token).
Outside the pool it needs its CUDA graphs and activation buffers (constants.SGLANG_RUNTIME_BYTES). A
colocated server started with `--enable-memory-saver` releases weights and KV cache while the trainer
trains and takes them back at the next weight push.
"""
from __future__ import annotations

from dataclasses import dataclass

from grpo_megatron.plan import constants
from grpo_megatron.plan.model_shapes import ModelShapes


@dataclass(frozen=True)
class RolloutShare:
    tp: int  # --tp-size of each server
    fraction: float  # --mem-fraction-static
    weights_bytes: int  # one server rank's weights
    kv_bytes: int  # its KV cache (the pool minus the weights; negative: the weights alone do not fit)
    kv_bytes_per_token: int
    max_sequence: int  # prompt + response tokens of the longest sample

    @property
    def pool_bytes(self) -> int:
        return self.weights_bytes + max(self.kv_bytes, 0)

    @property
    def kv_tokens(self) -> int:
        return max(self.kv_bytes, 0) // self.kv_bytes_per_token

    @property
    def concurrent_sequences(self) -> int:
        """Full-length samples the KV cache holds at once on one server."""
        return self.kv_tokens // self.max_sequence

    @property
    def active_bytes(self) -> int:
        """Footprint while generating: the static pool and the runtime outside it."""
        return self.pool_bytes + constants.SGLANG_RUNTIME_BYTES

    def problem(self) -> str | None:
        """Why this server cannot run a full-length sample, or None."""
        if self.kv_bytes <= 0:
            return (f"SGLang's weights ({self.weights_bytes / constants.GiB:.1f} GiB per rank at TP {self.tp}) do not "
                    f"fit in --mem-fraction-static {self.fraction}")
        if self.concurrent_sequences < 1:
            return (f"SGLang's KV cache ({self.kv_tokens} tokens per server at --mem-fraction-static {self.fraction}) "
                    f"holds no full {self.max_sequence}-token sample")
        return None

    def to_dict(self) -> dict:
        return {"tp": self.tp, "mem_fraction_static": self.fraction, "weights_bytes": self.weights_bytes,
                "kv_cache_bytes": max(self.kv_bytes, 0), "kv_tokens": self.kv_tokens,
                "concurrent_full_sequences": self.concurrent_sequences, "runtime_bytes": constants.SGLANG_RUNTIME_BYTES,
                "problem": self.problem()}


def rollout_share(shapes: ModelShapes, tp: int, fraction: float, gpu_memory: int, max_sequence: int,
                  dtype_bytes: int = 2) -> RolloutShare:
    """One rank of a `tp`-way server with `--mem-fraction-static fraction` on a GPU of `gpu_memory` bytes."""
    weights = shapes.serving_params_per_rank(tp) * dtype_bytes
    return RolloutShare(tp=tp, fraction=fraction, weights_bytes=weights, kv_bytes=int(fraction * gpu_memory) - weights,
                        kv_bytes_per_token=shapes.kv_bytes_per_token(tp, dtype_bytes), max_sequence=max_sequence)
