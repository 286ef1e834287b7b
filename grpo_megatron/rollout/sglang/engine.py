"""The rollout engine that talks to SGLang servers over HTTP (see transport, protocol, weight_sync)."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator

import torch

from grpo_megatron.models.weight_stream import Bucket, pack
from grpo_megatron.rollout.base import Completion, RolloutEngine, SamplingParams
from grpo_megatron.rollout.sglang.probe import ProbeCheck
from grpo_megatron.rollout.sglang.protocol import ABORTED, finish_type, generate_payload, outputs_of, parse_completion
from grpo_megatron.rollout.sglang.transport import Retryable, ServerPool
from grpo_megatron.rollout.sglang.weight_sync import WeightSync

logger = logging.getLogger(__name__)


class SGLangEngine(RolloutEngine):
    """One /generate request per prompt (with `n` samples), at most max_in_flight at a time over all servers.

    routed_shape is (MoE layers, top-k) of the model, used to check and shape `routed_experts`. A generation the
    server aborted (/abort_request, pause in abort mode) is resubmitted like a failed one, so every prompt gets
    exactly its n completions or the call raises.

    `generate_pool` (an sglang-router in front of the servers) takes the /generate requests when given; weight
    sync, pause/abort and the probe always address every server in `pool` directly, because a router neither
    forwards the begin/end weight-update session nor gives each server its rank in a distributed update.
    Generations that ask for routed experts (R3) bypass the router too: sglang-router 0.3.2 drops
    `return_routed_experts` from the request (seen live), so they are balanced over `pool` by this client.
    """

    def __init__(self, pool: ServerPool, sync: WeightSync, max_in_flight: int = 64,
                 routed_shape: tuple[int, int] | None = None, probe: ProbeCheck | None = None,
                 gpu_servers: bool = False, generate_pool: ServerPool | None = None):
        if max_in_flight < 1:
            raise ValueError(f"rollout.sglang.max_in_flight={max_in_flight}: must be >= 1")
        self.pool, self.sync, self.max_in_flight = pool, sync, max_in_flight
        self.generate_pool = generate_pool or pool
        self.routed_shape, self.probe, self.gpu_servers = routed_shape, probe, gpu_servers
        self.last_sync: dict[str, float] = {}
        self._version = 0
        self._alive = True
        self._released = False

    @property
    def weight_version(self) -> int:
        return self._version

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 return_routed_experts: bool = False) -> list[list[Completion]]:
        self._check_alive()
        params.validate()
        if not prompts:
            raise ValueError("generate() got no prompts; pass a non-empty list of token-id lists")
        if return_routed_experts and self.routed_shape is None:
            raise ValueError("return_routed_experts=True needs a MoE model (Qwen3-MoE, Mixtral); this one is dense")
        return asyncio.run(self._generate(prompts, params, return_routed_experts))

    async def _generate(self, prompts: list[list[int]], params: SamplingParams,
                        routed: bool) -> list[list[Completion]]:
        window = asyncio.Semaphore(self.max_in_flight)
        shape = self.routed_shape if routed else None
        pool = self.pool if routed else self.generate_pool

        def handle(prompt: list[int]):
            def parse(url: str, body) -> list[Completion]:
                outputs = outputs_of(body, params.n, url)
                if any(finish_type(o, url) == ABORTED for o in outputs):
                    raise Retryable("the server aborted the generation")
                return [parse_completion(o, prompt, url, self._version, shape) for o in outputs]
            return parse

        async def one(i: int, prompt: list[int]) -> list[Completion]:
            seed = None if params.seed is None else params.seed + i
            async with window:
                return await pool.post(client, "/generate", generate_payload(prompt, params, routed, seed),
                                       handle(prompt))

        async with pool.client(self.max_in_flight) as client:
            return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Push full tensors held in this process (packed into buckets here); see push_buckets."""
        self.push_buckets(pack(named_tensors, self.sync.bucket_bytes, self.sync.alloc), version)

    def push_buckets(self, buckets: Iterable[Bucket], version: int, complete: bool = True) -> None:
        """Push streamed buckets to every server in the configured mode; then the probe check when configured.

        Servers that released their memory for training get their weights' memory back first and their KV cache
        after the push, so weights and KV cache are never both resident beside the trainer's sync buffers.
        `complete=False`: the buckets hold only the tensors that changed since the last push (sync_changed_only).
        """
        self._check_alive()
        if self._released:
            self._memory("/resume_memory_occupation", ["weights"])
        start = time.perf_counter()
        moved = self.sync.push_buckets(self._observed(buckets), version)
        seconds = time.perf_counter() - start
        if self._released:
            self._memory("/resume_memory_occupation", ["kv_cache"])
            self._released = False
        self._version = version
        self.last_sync = {"bytes": float(moved), "seconds": seconds, "mb_per_s": moved / 2**20 / max(seconds, 1e-9),
                          "full": float(complete)}
        logger.info("weight sync v%d: %.1f MB in %.2f s (%.0f MB/s per server)%s", version, moved / 2**20, seconds,
                    self.last_sync["mb_per_s"], "" if complete else ", changed tensors only")
        if self.probe is not None:
            self.last_sync["probe_max_abs_diff"] = self.probe.check(self.pool, version, complete)

    def serves_last_push(self) -> bool:
        """Whether every server reports the weight version of this engine's last push (/model_info): false before
        the first push and for a server that restarted since (it reports its initial version), i.e. whenever a
        changed-only sync could leave a server with other weights than the trainer's."""
        if not self.last_sync:
            return False
        return all(str(self.pool.call(url, "GET", "/model_info").get("weight_version")) == str(self._version)
                   for url in self.pool.urls)

    def _observed(self, buckets: Iterable[Bucket]) -> Iterator[Bucket]:
        for bucket in buckets:
            if self.probe is not None:
                self.probe.observe(bucket.tensors())
            yield bucket

    def sync_metrics(self) -> dict[str, float]:
        return {f"weight_sync/{key}": value for key, value in self.last_sync.items()}

    def pause_generation(self) -> None:
        for url in self.pool.urls:
            self.pool.call(url, "POST", "/pause_generation", {})

    def continue_generation(self) -> None:
        for url in self.pool.urls:
            self.pool.call(url, "POST", "/continue_generation", {})

    def abort_all(self) -> None:
        """Abort every running request (they are resubmitted by generate's retry)."""
        for url in self.pool.urls:
            self.pool.call(url, "POST", "/abort_request", {"rid": "", "abort_all": True})

    def release_memory(self) -> None:
        """Free the colocated servers' GPU memory (weights and KV cache) for training; a no-op for CPU servers
        (SGLang calls torch.cuda there). Needs servers started with --enable-memory-saver, else SGLang frees
        nothing. The next push_buckets resumes it."""
        if self._released or not self.gpu_servers:
            return
        self._memory("/release_memory_occupation", ["weights", "kv_cache"])
        self._released = True

    def _memory(self, path: str, tags: list[str]) -> None:
        for url in self.pool.urls:
            self.pool.call(url, "POST", path, {"tags": tags})

    def shutdown(self) -> None:
        if self._alive:
            self.sync.close()
        self._alive = False

    def _check_alive(self) -> None:
        if not self._alive:
            raise RuntimeError("this SGLangEngine was shut down; create a new one")
