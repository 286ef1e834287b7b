"""Post-sync check: the server's log-probs of a fixed token sequence against a reference holding the same weights.

The reference is an in-process transformers model loaded with exactly the tensors just pushed,
so a mismatch means the server did not apply them (wrong names, dtype, a missed shard), not that trainer and
server numerics differ. It holds an fp32 copy of the model on rank 0's CPU and the pushed buckets until the check,
and costs one CPU forward per sync: meant for small models and CPU servers, so it is off for GPU servers
(rollout.sglang.gpu_servers) unless rollout.sglang.probe_on_gpu_servers asks for it.
"""
from __future__ import annotations

import logging

from pathlib import Path

import torch
import transformers

from grpo_megatron.rollout.engines.hf_layout import CheckpointLayout
from grpo_megatron.rollout.sglang.errors import MalformedResponseError, SGLangError
from grpo_megatron.rollout.sglang.transport import ServerPool
from grpo_megatron.rollout.sglang.weight_sync import NamedTensors

logger = logging.getLogger(__name__)


class ProbeMismatchError(SGLangError):
    """After a weight sync a server's log-probs differ from the reference by more than the tolerance."""


class ProbeCheck:
    def __init__(self, hf_path: str | Path, probe_ids: list[int], tolerance: float):
        if len(probe_ids) < 2:
            raise ValueError("the probe sequence needs at least 2 tokens (log-probs start at the second)")
        self.model = transformers.AutoModelForCausalLM.from_pretrained(hf_path, dtype=torch.float32).eval()
        self.layout = CheckpointLayout(self.model)
        self.probe_ids, self.tolerance = probe_ids, tolerance
        self._pushed: list[tuple[str, torch.Tensor]] = []

    def observe(self, named_tensors: NamedTensors) -> None:
        """Remember copies of the tensors being pushed for the next check (the sender refills its bucket
        buffers, so a reference would see later buckets' bytes)."""
        self._pushed.extend((name, tensor.clone()) for name, tensor in named_tensors)

    def check(self, pool: ServerPool, version: int, complete: bool = True) -> float:
        """Load what was observed into the reference and compare it with every server (see run).

        `complete=False` after a changed-only sync: the reference keeps its copy of the tensors not pushed, as the
        servers do."""
        pushed, self._pushed = self._pushed, []
        return self.run(pool, pushed, version, complete)

    def run(self, pool: ServerPool, named_tensors: NamedTensors, version: int, complete: bool = True) -> float:
        """Max |server - reference| log-prob over the probe and all servers; raises past a non-zero tolerance."""
        self.layout.load(named_tensors, complete)
        expected = reference_logprobs(self.model, self.probe_ids)
        worst = 0.0
        for url in pool.urls:
            logprobs = server_logprobs(pool, url, self.probe_ids)
            if logprobs is None:  # the server went down meanwhile (supervisor.py): it gets a full sync when back
                continue
            got = torch.tensor(logprobs)
            diff = float((got - expected).abs().max())
            logger.info("weight sync v%d probe: %s max |dlogprob| = %.3g", version, url, diff)
            if self.tolerance > 0 and diff > self.tolerance:
                raise ProbeMismatchError(f"{url}: after weight sync v{version} the probe log-probs differ from the "
                                         f"trainer's weights by {diff:.3g} > rollout.sglang.probe_tolerance="
                                         f"{self.tolerance}; the server did not load the pushed weights")
            worst = max(worst, diff)
        return worst


def reference_logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1, float32."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def server_logprobs(pool: ServerPool, url: str, ids: list[int]) -> list[float] | None:
    """The server's prompt log-probs (meta_info.input_token_logprobs with logprob_start_len 0), first token dropped;
    None when the request was dropped because the server was taken out of the pool."""
    body = pool.call(url, "POST", "/generate", {
        "input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
        "return_logprob": True, "logprob_start_len": 0})
    if body is None and pool.on_fault is not None:
        return None
    entries = body.get("meta_info", {}).get("input_token_logprobs") if isinstance(body, dict) else None
    if not isinstance(entries, list) or len(entries) != len(ids):
        raise MalformedResponseError(f"{url}/generate: meta_info.input_token_logprobs should have {len(ids)} "
                                     f"entries for the probe")
    return [float(e[0]) for e in entries[1:]]
