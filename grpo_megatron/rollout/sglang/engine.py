"""The rollout engine that talks to SGLang servers over HTTP (see transport, protocol, weight_sync).

Partial rollouts (rollout.partial_rollouts): see partial_rollouts.py.

Fault tolerance (with a ServerSupervisor; the trainer makes one, see supervisor.py for the transitions): each server
is SERVING, DOWN, RESTARTING, STALE (up without the current weights), SYNCED (full push done, check pending) or
FAILED. Generation requests go to SERVING servers only; a request in flight on a server found dead or hung is
cancelled and sent once more to another (a resumed partial rollout sends its kept tokens again, so it keeps them;
every prompt still gets its n samples); with no server SERVING, requests wait for one. A push goes to SERVING and
SYNCED servers, and to STALE ones only when it is complete (a changed-only push leaves them STALE and the next push
is full); it skips DOWN and RESTARTING ones, which join only between pushes. After the push the post-sync probe (or,
without one, /model_info's weight_version) checks the SYNCED servers, which then become SERVING: a restarted server
never generates with other weights than the trainer's. FAILED (a restart bound) makes generate and push raise.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace

import httpx
import torch

from grpo_megatron.models.weight_stream import Bucket, pack
from grpo_megatron.rollout.engines.base import Completion, RolloutEngine, SamplingParams
from grpo_megatron.rollout.sglang.seeds import sample_seeds
from grpo_megatron.rollout.sglang.partial_rollouts import RequestGate, resume_until_done
from grpo_megatron.rollout.sglang.probe import ProbeCheck
from grpo_megatron.rollout.sglang.protocol import ABORTED, finish_type, generate_payload, outputs_of, parse_completion
from grpo_megatron.rollout.sglang.supervisor import ServerSupervisor
from grpo_megatron.rollout.sglang.transport import Retryable, ServerPool
from grpo_megatron.rollout.sglang.weight_sync import WeightSync

logger = logging.getLogger(__name__)


class SGLangEngine(RolloutEngine):
    """One /generate request per sample (n=1, its own seed), at most max_in_flight prompts' samples at a time.

    routed_shape is (MoE layers, top-k) of the model, used to check and shape `routed_experts`. A generation the
    server aborted (/abort_request, pause in abort mode) is resubmitted like a failed one, so every prompt gets
    exactly its n completions or the call raises; with partial_rollouts it is resumed from the tokens it returned
    instead (see the module docstring), and every push pauses the servers around itself.

    `generate_pool` (an sglang-router in front of the servers) takes the /generate requests when given; weight
    sync, pause/abort and the probe always address every server in `pool` directly, because a router neither
    forwards the begin/end weight-update session nor gives each server its rank in a distributed update.
    Generations that ask for routed experts (R3) bypass the router too: sglang-router 0.3.2 drops
    `return_routed_experts` from the request (seen live), so they are balanced over `pool` by this client.
    """

    def __init__(self, pool: ServerPool, sync: WeightSync, max_in_flight: int = 64,
                 routed_shape: tuple[int, int] | None = None, probe: ProbeCheck | None = None,
                 gpu_servers: bool = False, generate_pool: ServerPool | None = None, partial_rollouts: bool = False,
                 weights_cpu_backup: bool = False, timeout_per_token_s: float = 0.0,
                 supervisor: ServerSupervisor | None = None):
        if max_in_flight < 1:
            raise ValueError(f"rollout.sglang.max_in_flight={max_in_flight}: must be >= 1")
        self.pool, self.sync, self.max_in_flight = pool, sync, max_in_flight
        self.partial_rollouts = partial_rollouts
        self.generate_pool = generate_pool or pool
        self.routed_shape, self.probe, self.gpu_servers = routed_shape, probe, gpu_servers
        self.weights_cpu_backup = weights_cpu_backup
        self.timeout_per_token_s = timeout_per_token_s
        self._weights_lost = False  # released without CPU backup: the servers hold garbage until a full push
        self.supervisor = supervisor
        self.last_sync: dict[str, float] = {}
        self._unverified: tuple[int, bool] | None = None  # (version, complete) of a push the probe has not checked
        self._gate = RequestGate()  # partial rollouts: closed while a push pauses generation
        self._version = 0
        self._alive = True
        self._released = False

    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def bucket_alloc(self):
        """The sync's buffers (shared memory in tensor mode on CPU, reused from bucket to bucket)."""
        return self.sync.alloc

    @property
    def to_every_rank(self) -> bool:
        """Colocated tensor mode: every trainer rank sends its copy for the server TP rank on its GPU."""
        return self.sync.to_every_rank

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 return_routed_experts: bool = False) -> list[list[Completion]]:
        self._check_alive()
        if self.supervisor is not None:
            self.supervisor.raise_if_failed()
        params.validate()
        if not prompts:
            raise ValueError("generate() got no prompts; pass a non-empty list of token-id lists")
        if return_routed_experts and self.routed_shape is None:
            raise ValueError("return_routed_experts=True needs a MoE model (Qwen3-MoE, Mixtral); this one is dense")
        return asyncio.run(self._generate(prompts, params, return_routed_experts))

    async def _generate(self, prompts: list[list[int]], params: SamplingParams,
                        routed: bool) -> list[list[Completion]]:
        """One request per sample (n=1) with the sample's own seed (rollout/sglang/seeds.py): SGLang copies an n > 1
        request with one seed, which deterministic inference turns into n identical responses."""
        window = asyncio.Semaphore(self.max_in_flight * params.n)  # max_in_flight prompts' worth of samples
        shape = self.routed_shape if routed else None
        # A router would send requests to a restarted server before its sync: while one is out, the pool balances.
        degraded = self.supervisor is not None and not self.supervisor.all_serving()
        pool = self.pool if routed or degraded else self.generate_pool
        one = replace(params, n=1)

        async def sample(prompt: list[int], seed: int) -> Completion:
            if self.partial_rollouts:
                return await self._resumable(pool, client, window, prompt, one, routed, seed)

            def parse(url: str, body) -> Completion:
                [output] = outputs_of(body, 1, url)
                if finish_type(output, url) == ABORTED:
                    raise Retryable("the server aborted the generation")
                return parse_completion(output, prompt, url, self._version, shape)

            async with window:
                return await pool.post(client, "/generate", generate_payload(prompt, one, routed, seed), parse,
                                       self._generate_timeout(pool, one.max_new_tokens), retry_timeouts=True)

        async def group(i: int, prompt: list[int]) -> list[Completion]:
            return list(await asyncio.gather(*(sample(prompt, s) for s in sample_seeds(params.seed, i, params.n))))

        async with pool.client(self.max_in_flight * params.n) as client:
            return list(await asyncio.gather(*(group(i, p) for i, p in enumerate(prompts))))

    async def _resumable(self, pool: ServerPool, client: httpx.AsyncClient, window: asyncio.Semaphore,
                         prompt: list[int], params: SamplingParams, routed: bool, seed: int) -> Completion:
        """One sample (params.n == 1); when a pause aborts it, it is resumed from its kept tokens, same seed."""

        async def segment(kept: list[int]) -> tuple[Completion, bool]:
            """One request for the rest of the sample after `kept`: (segment, aborted)."""
            sp = replace(params, max_new_tokens=params.max_new_tokens - len(kept))
            payload = generate_payload(prompt + kept, sp, routed, seed)
            start = len(prompt) + len(kept) - 1 if routed and kept else 0  # rows of the new tokens only
            if start:
                payload["routed_experts_start_len"] = start
            version = self._version  # for a server that reports no weight_version (never updated)

            def parse(url: str, body) -> tuple[Completion, bool]:
                [o] = outputs_of(body, 1, url)
                aborted = finish_type(o, url) == ABORTED
                # An abort before the first token (still queued) may come without routed_experts.
                shape = self.routed_shape if routed and (o.get("output_ids") or not aborted) else None
                return parse_completion(o, prompt + kept, url, version, shape, start), aborted

            async with window, self._gate.request():
                return await pool.post(client, "/generate", payload, parse,
                                       self._generate_timeout(pool, sp.max_new_tokens), retry_timeouts=True)

        return await resume_until_done(segment, prompt, params.max_new_tokens, pool.retry.attempts)

    def _generate_timeout(self, pool: ServerPool, max_new_tokens: int) -> float:
        """A non-streaming /generate answers only when done: its bound grows with the tokens it may sample."""
        return pool.timeout_s + max_new_tokens * self.timeout_per_token_s

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Push full tensors held in this process (packed into buckets here); see push_buckets."""
        self.push_buckets(pack(named_tensors, self.sync.bucket_bytes, self.sync.alloc), version)

    def push_buckets(self, buckets: Iterable[Bucket], version: int, complete: bool = True,
                     verify: bool = True) -> None:
        """Push streamed buckets to every server in the configured mode; then the probe check when configured
        (`verify=False`: later, by verify_push, so that a background rollout need not wait for it).

        With partial rollouts generation is aborted and paused on every server around the push: generations in
        flight come back with their tokens and are resumed under the new weights (see the module docstring).
        Servers that released their memory for training get their weights' memory back first and their KV cache
        after the push, so weights and KV cache are never both resident beside the trainer's sync buffers.
        `complete=False`: the buckets hold only the tensors that changed since the last push (sync_changed_only).
        """
        self._check_alive()
        if self._weights_lost and not complete:
            raise RuntimeError("a changed-only push onto weights the servers released without CPU backup would "
                               "leave every unsent tensor as garbage; push everything (serves_last_push() is False)")
        targets = self.supervisor.pushing(complete) if self.supervisor else contextlib.nullcontext()
        with targets, self._paused() if self.partial_rollouts else contextlib.nullcontext():
            if self._released:
                self._memory("/resume_memory_occupation", ["weights"])
            start = time.perf_counter()
            moved = self.sync.push_buckets(self._observed(buckets), version)
            seconds = time.perf_counter() - start
            if self._released:
                self._memory("/resume_memory_occupation", ["kv_cache"])
                self._released = False
                if self.supervisor is not None:
                    self.supervisor.pause_checks(False)
            self._version = version
            self._weights_lost = False
        self.last_sync = {"bytes": float(moved), "seconds": seconds, "mb_per_s": moved / 2**20 / max(seconds, 1e-9),
                          "full": float(complete)}
        logger.info("weight sync v%d: %.1f MB in %.2f s (%.0f MB/s per server)%s", version, moved / 2**20, seconds,
                    self.last_sync["mb_per_s"], "" if complete else ", changed tensors only")
        self._unverified = (version, complete)
        if verify:
            self.verify_push()

    def verify_push(self) -> None:
        """The post-sync probe of the last push (once), then the supervisor lets the servers it synced serve.
        Call it before the next push: it compares the servers with the tensors that push sent, and runs beside
        any generation."""
        if self._unverified is None:
            return
        (version, complete), self._unverified = self._unverified, None
        if self.probe is not None:
            self.last_sync["probe_max_abs_diff"] = self.probe.check(self.pool, version, complete)
        if self.supervisor is not None:  # servers restarted and fully synced serve from now on
            self.supervisor.synced(version, probed=self.probe is not None)

    def serves_last_push(self) -> bool:
        """Whether every server reports the weight version of this engine's last push (/model_info): false before
        the first push, for a server that restarted since (it reports its initial version) and after a release of
        weights without CPU backup (SGLang maps back memory that holds no weights, but keeps the version), i.e.
        whenever a changed-only sync could leave a server with other weights than the trainer's."""
        if not self.last_sync or self._weights_lost or (self.supervisor is not None and self.supervisor.has_stale()):
            return False
        return all(str((self.pool.call(url, "GET", "/model_info") or {}).get("weight_version")) == str(self._version)
                   for url in self.pool.urls)

    def _observed(self, buckets: Iterable[Bucket]) -> Iterator[Bucket]:
        for bucket in buckets:
            if self.probe is not None:
                self.probe.observe(bucket.tensors())
            yield bucket

    def sync_metrics(self) -> dict[str, float]:
        faults = self.supervisor.step_metrics() if self.supervisor is not None else {}
        return {**{f"weight_sync/{key}": value for key, value in self.last_sync.items()}, **faults}

    @contextlib.contextmanager
    def _paused(self):
        """Generation paused on every server (running requests answer aborted, new ones wait) until the end.

        The running requests are aborted, and their answers awaited, before /pause_generation: SGLang 0.5.23's
        pause in mode "abort" polls for running requests once a second (tokenizer_manager.pause_generation), so
        a pause that finds none returns at once instead of costing a second per push.
        """
        with self._gate.closed(drain=self.abort_all):
            self.pause_generation()
            try:
                yield
            finally:
                self.continue_generation()

    def pause_generation(self) -> None:
        """/pause_generation in SGLang's default mode "abort" on every server; returns once running requests
        have answered (aborted, with their tokens so far)."""
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
        nothing. The next push_buckets resumes it; without --enable-weights-cpu-backup (weights_cpu_backup) it
        must push every tensor, as the resumed weights are garbage."""
        if self._released or not self.gpu_servers:
            return
        if self.supervisor is not None:
            self.supervisor.pause_checks(True)  # a server without its memory cannot answer a generation probe
        self._memory("/release_memory_occupation", ["weights", "kv_cache"])
        self._released = True
        self._weights_lost = not self.weights_cpu_backup

    def _memory(self, path: str, tags: list[str]) -> None:
        for url in self.pool.urls:
            self.pool.call(url, "POST", path, {"tags": tags})

    def shutdown(self) -> None:
        if self._alive:
            if self.supervisor is not None:
                self.supervisor.stop()
            self.sync.close()
        self._alive = False

    def _check_alive(self) -> None:
        if not self._alive:
            raise RuntimeError("this SGLangEngine was shut down; create a new one")
