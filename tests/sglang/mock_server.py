"""A stand-in SGLang server for the contract tests: SGLang's HTTP routes on a real tiny transformers model.

Mirrors sglang 0.5.23's sglang/srt/entrypoints/http_server.py and sglang/srt/managers/io_struct.py (request fields,
status codes, error bodies), plus what was seen live (../shared/notes/cpu-platform-facts.md): the
`/begin_weight_update` ... `/end_weight_update` session, outside of which tensor and distributed updates answer 400.
Generation, log-probs and routed experts come from EmbeddedEngine, so they are real numbers of the model the
weights were pushed into. It stands in for SGLang's scheduler and its TP workers (`--tp-size`, one weight copy per
rank, rank 0's copy serves generation); it does not batch. `/_mock/*` routes (not SGLang's) inject faults, pace
the decoding and expose request logs and the ranks' weights to the tests.
Run: python -m tests.sglang.mock_server MODEL_DIR PORT [--tp-size N] [--enable-deterministic-inference]
[--enable-memory-saver] [--enable-weights-cpu-backup] (SGLang's flags, with SGLang's semantics)
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import pickle
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
import torch.multiprocessing  # noqa: F401  (registers the tensor reductions the pickles need)
from safetensors.torch import load_file, save
from torch.distributed import PrefixStore, ProcessGroupGloo

from grpo_megatron.rollout.engines.base import Completion, SamplingParams
from grpo_megatron.rollout.engines.embedded import EmbeddedEngine
from grpo_megatron.rollout.engines.hf_layout import CheckpointLayout
from tests.sglang.mock_memory import memory_occupation
from tests.sglang.seeded_sampler import seeded_sample

PAUSE_MODES = ("abort", "retract", "in_place")  # io_struct.PauseGenerationReqInput.mode, default "abort"
# schedule_batch.FINISH_ABORT().to_json(): what a running request aborted by abort_all returns.
ABORTED = {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}
FLUSH_REFUSED = ("Weights were updated, but the cache was not flushed because requests are still running or queued. "
                 "Retract or finish them, then call /flush_cache.")


class SchedulerCrash(Exception):
    """An exception SGLang's scheduler does not catch: the real server logs it and dies (scheduler.py)."""


@dataclass(eq=False)
class Running:
    """A /generate request between its admission and its answer; `aborted` is set by abort_all."""
    rid: str
    aborted: bool = False


@dataclass
class MockState:
    model_dir: str
    tp_size: int = 1
    weight_version: str = "default"
    in_session: bool = False
    pause_mode: str | None = None  # the mode of the current /pause_generation, None when not paused
    token_delay_s: float = 0.0  # decoding pace, so tests can act on requests in flight
    health_delay_s: float = 0.0  # /health_generate's answer time (a loaded server's), for the "slow" verdict
    running: list[Running] = field(default_factory=list)
    groups: dict[str, list[ProcessGroupGloo]] = field(default_factory=dict)  # one group member per TP rank
    faults: list[dict] = field(default_factory=list)  # {"route", "kind", "count"}
    log: list[str] = field(default_factory=list)
    updates: list[dict] = field(default_factory=list)  # per weight update: route, names, version, flush, ignored
    lock: threading.Lock = field(default_factory=threading.Lock)  # the model copies
    sched: threading.Condition = field(default_factory=threading.Condition)  # pause_mode and running
    released: set[str] = field(default_factory=set)  # memory regions released (weights, kv_cache)
    deterministic: bool = False  # --enable-deterministic-inference: SGLang's seeded sampler (seeded_sampler.py)
    memory_saver: bool = False  # --enable-memory-saver: a release frees the tagged memory
    weights_cpu_backup: bool = False  # --enable-weights-cpu-backup: released weights come back intact

    def __post_init__(self):
        self.engine = EmbeddedEngine(self.model_dir, sampler=seeded_sample if self.deterministic else None)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).eval()
        self.layout = CheckpointLayout(self.model)  # a second copy, for prompt log-probs
        checkpoint = {}
        for shard in sorted(Path(self.model_dir).glob("*.safetensors")):
            checkpoint.update(load_file(str(shard)))
        shapes = self.layout.expected_shapes
        # What each TP rank holds, as checkpoint tensors in the served dtype (a real rank holds its shard).
        self.ranks = [{n: t.to(torch.float32) for n, t in checkpoint.items() if n in shapes}
                      for _ in range(self.tp_size)]
        self.started_with = [dict(rank) for rank in self.ranks]  # loads replace tensors, never write into them

    def restart_weights(self) -> None:
        """Serve the checkpoint again under the start-up weight version, as a freshly started server does (a
        test gets the servers as started, whatever earlier tests pushed); nothing to do when nothing changed."""
        self.weight_version = "default"
        if all(rank[n] is first[n] for rank, first in zip(self.ranks, self.started_with) for n in first):
            return
        self.ranks = [dict(first) for first in self.started_with]
        with self.lock:
            current = list(self.ranks[0].items())
            self.engine.update_weights(current, 0)
            self.layout.load(current)

    def take_fault(self, route: str) -> dict | None:
        with self.lock:
            for fault in self.faults:
                if fault["route"] == route and fault["count"] > 0:
                    fault["count"] -= 1
                    return dict(fault)
        return None


def generate(state: MockState, req: dict) -> tuple[int, object]:
    """tokenizer_manager.generate_request: wait while paused, run, and answer even when aborted (HTTP 200)."""
    if "input_ids" not in req:
        return 400, {"error": {"message": "Either text, input_ids or input_embeds should be provided."}}
    sp = req.get("sampling_params") or {}
    params = SamplingParams(max_new_tokens=sp.get("max_new_tokens", 128), temperature=sp.get("temperature", 1.0),
                            top_p=sp.get("top_p", 1.0), top_k=sp.get("top_k", -1),
                            stop_token_ids=sp.get("stop_token_ids") or [], n=sp.get("n", 1),
                            seed=sp.get("sampling_seed"))
    ids = req["input_ids"]
    if req.get("return_routed_experts") and state.engine._moe_top_k is None:
        return 400, {"error": {"message": "routed experts requested on a dense model"}}
    start = req.get("routed_experts_start_len", 0)
    if req.get("return_routed_experts") and not 0 <= start <= len(ids):  # scheduler.handle_generate_request
        return 400, {"error": {"message": f"recv_req.routed_experts_start_len={start} is outside [0, "
                                          f"len(req.origin_input_ids)={len(ids)}]."}}
    start_len = req.get("logprob_start_len", -1)
    run = _admit(state, req.get("rid") or uuid.uuid4().hex)
    try:
        with state.lock:
            outs = (state.engine.generate([ids], params, bool(req.get("return_routed_experts")))[0]
                    if params.max_new_tokens > 0 else [_prefill_only(ids)])
            input_lp = (_prompt_logprobs(state.model, ids, start_len, req.get("top_logprobs_num") or 0)
                        if req.get("return_logprob") and start_len >= 0 else None)
        emitted = _decode(state, run, max(len(c.response_ids) for c in outs))
        # Answered before the request leaves `running`: a pause returns only after, so an aborted output reports
        # the weight_version it ran under, never the one a push makes next (tokenizer_manager's model_update_lock).
        results = [_output(state, run.rid, c, emitted, ids, input_lp, req) for c in outs]
    finally:
        with state.sched:
            state.running.remove(run)
            state.sched.notify_all()
    return 200, results[0] if params.n == 1 else results


def _admit(state: MockState, rid: str) -> Running:
    """New requests wait while the server is paused, in every mode (tokenizer_manager's is_pause_cond)."""
    with state.sched:
        state.sched.wait_for(lambda: state.pause_mode is None)
        run = Running(rid)
        state.running.append(run)
    return run


def _decode(state: MockState, run: Running, steps: int) -> int:
    """Emit `steps` tokens at the configured pace; the number emitted before an abort.

    A retract or in-place pause holds the request until /continue_generation (scheduler.pause_generation). Its
    remaining tokens were sampled at admission, so they come from the old weights; the real server samples them
    with the weights of after the pause.
    """
    for step in range(steps):
        if state.token_delay_s:
            time.sleep(state.token_delay_s)
        with state.sched:
            state.sched.wait_for(lambda: run.aborted or state.pause_mode not in ("retract", "in_place"))
            if run.aborted:
                return step
    return steps


def _output(state: MockState, rid: str, c, emitted: int, ids: list[int], input_lp, req: dict) -> dict:
    """One output object; one aborted after `emitted` tokens keeps them, their log-probs and routed-experts rows
    and has finish_reason type abort (as a real 0.5.23 server answers a pause in mode "abort")."""
    aborted = len(c.response_ids) > emitted
    response = c.response_ids[:emitted] if aborted else c.response_ids
    if aborted:
        reason = ABORTED
    elif c.finish_reason == "stop":
        reason = {"type": "stop", "matched": c.response_ids[-1]}
    else:
        reason = {"type": "length", "length": len(c.response_ids)}
    meta = {"id": rid, "prompt_tokens": len(ids), "completion_tokens": len(response), "cached_tokens": 0,
            "weight_version": state.weight_version, "finish_reason": reason}
    if req.get("return_logprob"):
        meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(c.response_logprobs, response)]
        meta["input_token_logprobs"] = input_lp[0] if input_lp else [[None, ids[0], None]]
        if input_lp and req.get("top_logprobs_num"):
            meta["input_top_logprobs"] = input_lp[1]
    if c.routed_experts is not None:  # positions [routed_experts_start_len, seqlen - 1) (batch_result_processor)
        rows = c.routed_experts[req.get("routed_experts_start_len", 0):max(len(ids) + len(response) - 1, 0)]
        meta["routed_experts"] = base64.b64encode(rows.numpy().tobytes()).decode()
    return {"text": "", "output_ids": response, "meta_info": meta}


def _prefill_only(ids: list[int]) -> Completion:
    """What a max_new_tokens 0 request (Req.is_prefill_only) outputs: no token, finish_reason length 0."""
    return Completion(prompt_ids=list(ids), response_ids=[], response_logprobs=[], finish_reason="length")


def _prompt_logprobs(model, ids: list[int], start: int, top_k: int) -> tuple[list, list]:
    """(input_token_logprobs, input_top_logprobs) from position `start` on, the first entry None
    (logprob_result_processor._process_input_token_logprobs / _process_input_top_logprobs), at temperature 1
    whatever the sampling temperature (layers/logprob_processor.py)."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    log_p = torch.log_softmax(logits, -1)[start:]
    targets = ids[start + 1:]
    lp = log_p.gather(-1, torch.tensor(targets, dtype=torch.long)[:, None])[:, 0].tolist()
    vocab = model.config.vocab_size  # ids >= vocab - 1 are echoed as 0 (_process_input_token_logprobs)
    tokens = [[None, ids[start], None]] + [[v, t if t < vocab - 1 else 0, None] for v, t in zip(lp, targets)]
    top = [None]
    if top_k:
        values, top_ids = log_p.topk(top_k, -1)
        top += [[[v, t, None] for v, t in zip(vs, ts)] for vs, ts in zip(values.tolist(), top_ids.tolist())]
    return tokens, top


def pause(state: MockState, req: dict) -> tuple[int, dict]:
    """tokenizer_manager.pause_generation: "abort" aborts every running request and returns once all have
    answered; "retract"/"in_place" stop the scheduler, leaving them running until /continue_generation."""
    mode = req.get("mode", "abort")
    if mode not in PAUSE_MODES:
        return 400, {"error": {"message": f"mode={mode!r}: expected one of {PAUSE_MODES}"}}
    with state.sched:
        state.pause_mode = mode
        if mode == "abort":
            for run in state.running:
                run.aborted = True
            state.sched.notify_all()
            state.sched.wait_for(lambda: not state.running)
    return 200, {"message": "Generation paused successfully.", "status": "ok"}


def abort(state: MockState, req: dict) -> tuple[int, None]:
    """tokenizer_manager.abort_request: abort_all, or the requests whose rid starts with a non-empty `rid`."""
    rid = req.get("rid", "")
    with state.sched:
        for run in state.running:
            if req.get("abort_all") or (rid and run.rid.startswith(rid)):
                run.aborted = True
        state.sched.notify_all()
    return 200, None


def update(state: MockState, route: str, req: dict) -> tuple[int, dict]:
    """One /update_weights_from_*: every TP rank loads it at once; the reply says whether it did.

    scheduler_components/weight_updater.py: tensor and distributed need an open session; the update waits for
    running requests unless the server is paused (tokenizer's model_update_lock); a flush refused because an
    in-place pause keeps requests running fails the request after the weights changed.
    """
    needs_session = route in ("/update_weights_from_tensor", "/update_weights_from_distributed")
    if "weights" in state.released:
        return 400, {"success": False, "message": "weights are released; /resume_memory_occupation first"}
    if needs_session and not state.in_session:
        return 400, {"success": False, "message": "update_weights requires an open weight update session; "
                                                  "call /begin_weight_update first"}
    with state.sched:
        state.sched.wait_for(lambda: state.pause_mode is not None or not state.running)
    received = _receive(state, route, req)
    try:
        ignored = _load(state, route, received)
    except ValueError as err:
        return 400, {"success": False, "message": str(err)}
    flush = req.get("flush_cache", True)  # io_struct's default: the scheduler flushes after applying the update
    state.updates.append({"route": route, "names": [n for n, _ in received[0]], "ignored": ignored,
                          "weight_version": req.get("weight_version"), "flush_cache": flush})
    if flush:
        with state.sched:
            if state.pause_mode == "in_place" and state.running:
                return 400, {"success": False, "message": FLUSH_REFUSED}
        state.log.append("(flush_cache in update)")
    message = "Succeeded to update model weights."
    if req.get("weight_version") is not None:
        state.weight_version = req["weight_version"]
        message += f" Weight version updated to {req['weight_version']}."
    body = {"success": True, "message": message}
    if route == "/update_weights_from_disk":
        body["num_paused_requests"] = 0
    return 200, body


def _receive(state: MockState, route: str, req: dict) -> list[list[tuple[str, torch.Tensor]]]:
    """The named tensors each TP rank gets from one update request."""
    if route == "/update_weights_from_tensor":
        # tp_worker.deserialize_own_rank: rank r unpickles entry r; a short list is an uncaught IndexError.
        entries = req["serialized_named_tensors"]
        try:
            return [pickle.loads(base64.b64decode(entries[rank])) for rank in range(state.tp_size)]
        except Exception as err:  # noqa: BLE001  (the scheduler does not catch it either)
            raise SchedulerCrash(f"update_weights_from_tensor: {type(err).__name__}: {err}") from err
    if route == "/update_weights_from_distributed":
        members = state.groups[req.get("group_name", "weight_update_group")]
        with ThreadPoolExecutor(len(members)) as pool:  # each TP rank receives every broadcast
            return list(pool.map(lambda member: _receive_broadcasts(member, req), members))
    named = []
    index = json.loads(open(f"{req['model_path']}/model.safetensors.index.json").read())
    for shard in sorted(set(index["weight_map"].values())):
        named += list(load_file(f"{req['model_path']}/{shard}").items())
    return [named] * state.tp_size


def _receive_broadcasts(member: ProcessGroupGloo, req: dict) -> list[tuple[str, torch.Tensor]]:
    """model_runner weight_updater.receive_weights_from_distributed: one broadcast from rank 0 per tensor, or with
    load_format "flattened_bucket" one of the whole bucket, tensors back to back (weight_sync/tensor_bucket.py)."""
    specs = [(name, getattr(torch, dtype), torch.Size(shape))
             for name, dtype, shape in zip(req["names"], req["dtypes"], req["shapes"])]
    options = dist.BroadcastOptions()
    options.rootRank = 0
    if req.get("load_format") == "flattened_bucket":
        sizes = [dtype.itemsize * shape.numel() for _, dtype, shape in specs]
        flat = torch.empty(sum(sizes), dtype=torch.uint8)
        member.broadcast([flat], options).wait()
        named, offset = [], 0
        for (name, dtype, shape), size in zip(specs, sizes):
            if offset % dtype.itemsize:
                raise ValueError(f"Misaligned offset {offset} for tensor {name} of dtype {dtype}")
            named.append((name, flat[offset:offset + size].view(dtype).view(shape)))
            offset += size
        return named
    named = []
    for name, dtype, shape in specs:
        tensor = torch.empty(shape, dtype=dtype)
        member.broadcast([tensor], options).wait()
        named.append((name, tensor))
    return named


def _load(state: MockState, route: str, received: list) -> list[str]:
    """Write each rank's tensors into its copy (Qwen3-MoE load_weights): the names it ignored, or raise.

    Unknown names are skipped with a warning. A mis-shaped tensor fails the weight loader: disk rolls back and
    answers 400, distributed answers 400 with the tensors before it loaded, tensor mode does not catch it.
    """
    ignored = sorted({n for named in received for n, _ in named if n not in state.ranks[0]})
    bad = [f"{n}: got {tuple(t.shape)}, expected {tuple(state.ranks[0][n].shape)}" for named in received[:1]
           for n, t in named if n in state.ranks[0] and t.shape != state.ranks[0][n].shape]
    if bad and route == "/update_weights_from_tensor":
        raise SchedulerCrash(f"update_weights_from_tensor: AssertionError: {bad[0]}")
    if bad and route == "/update_weights_from_disk":
        raise ValueError(f"Failed to update weights: {bad[0]}.\nRolling back to original weights.")
    for rank, named in zip(state.ranks, received):
        for name, tensor in named:
            if name in rank and tensor.shape == rank[name].shape:
                rank[name] = tensor.detach().to(rank[name].dtype).clone()
            elif name in rank:
                break
    with state.lock:
        current = list(state.ranks[0].items())
        state.engine.update_weights(current, 0)
        state.layout.load(current)
    if bad:
        raise ValueError(f"Failed to update parameter online: {bad[0]}. The full weights of the ModelRunner are "
                         f"partially updated. Please discard the whole weights.")
    return ignored


def init_group(state: MockState, req: dict) -> tuple[int, dict]:
    """model_runner weight_updater.init_weights_update_group: TP rank r joins as rank_offset + r.

    The members use the rendezvous of sglang's init_custom_process_group (a PrefixStore named after the group
    around torch's _new_process_group_helper, whose gloo backend keys live under "<group>/cpu/"); they are built
    directly because torch registers one group per name and process, and this process plays all the TP ranks.
    """
    name, world = req.get("group_name", "weight_update_group"), req["world_size"]
    ranks = [req["rank_offset"] + r for r in range(state.tp_size)]
    if name in state.groups:  # torch's _new_process_group_helper refuses a group name in use
        return 400, {"success": False, "message": "Failed to initialize custom process group: The specified group "
                                                  "name has already been used."}
    if req.get("backend", "nccl") != "gloo" or ranks[-1] >= world:
        return 400, {"success": False, "message": f"Failed to initialize custom process group: ranks {ranks} of "
                                                  f"world_size {world}, backend {req.get('backend', 'nccl')}."}
    timeout = timedelta(seconds=60)

    def join(rank: int) -> ProcessGroupGloo:
        store = dist.TCPStore(req["master_address"], req["master_port"], world, is_master=False, timeout=timeout)
        return ProcessGroupGloo(PrefixStore("cpu/", PrefixStore(f"{name}/", PrefixStore(name, store))), rank,
                                world, timeout)

    with ThreadPoolExecutor(len(ranks)) as pool:
        state.groups[name] = list(pool.map(join, ranks))
    return 200, {"success": True, "message": "Succeeded to initialize custom process group."}


def mock_weights(state: MockState, query: str) -> tuple[int, dict]:
    """Not SGLang's: the tensors TP rank `rank` holds, as base64 safetensors bytes."""
    rank = int(dict(p.split("=") for p in query.split("&") if "=" in p).get("rank", 0))
    return 200, {"safetensors": base64.b64encode(save(state.ranks[rank])).decode()}


class Handler(BaseHTTPRequestHandler):
    state: MockState
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def _route(self, method: str) -> None:
        path, _, query = self.path.partition("?")
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        state = self.state
        state.log.append(path)
        taken = state.take_fault(path)
        fault = taken["kind"] if taken else None
        if fault == "500":
            return self._send(500, {"error": {"message": "injected internal error"}})
        if fault == "503":  # /health_generate's answer when the scheduler sent nothing for 20 s (http_server.py)
            return self._send(503, None)
        if fault == "drop":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if fault == "hang":
            time.sleep(taken.get("seconds", 30))
        try:
            req = json.loads(raw) if raw else {}
        except json.JSONDecodeError as err:
            return self._send(400, {"object": "error", "message": f"JSON decode error: {err}", "type": "Bad Request",
                                    "param": None, "code": 400})
        try:
            status, body = self._dispatch(method, path, query, req)
        except SchedulerCrash as err:  # the scheduler logs "Scheduler hit an exception" and the server exits
            print(f"Scheduler hit an exception: {err}", file=sys.stderr, flush=True)
            os._exit(1)
        if fault == "malformed":
            return self._send(200, b'{"text": "truncated', raw_bytes=True)
        if fault == "routed_experts_size":
            for out in body if isinstance(body, list) else [body]:
                out["meta_info"]["routed_experts"] = base64.b64encode(b"\0" * 12).decode()
        self._send(status, body)

    def _dispatch(self, method: str, path: str, query: str, req: dict) -> tuple[int, object]:
        state = self.state
        if path in ("/health", "/health_generate") and method == "GET":
            time.sleep(state.health_delay_s)
            return 200, None
        if path in ("/model_info", "/get_model_info") and method == "GET":  # the second is deprecated in 0.5.23
            return 200, {"model_path": state.model_dir, "tokenizer_path": state.model_dir, "is_generation": True,
                         "preferred_sampling_params": None, "weight_version": state.weight_version}
        if path == "/get_weight_version" and method == "GET":
            return 200, {"weight_version": state.weight_version}
        if path == "/update_weight_version" and method == "POST":  # io_struct.UpdateWeightVersionReqInput
            state.weight_version = req["new_version"]
            return 200, {"success": True, "message": f"Weight version updated to {req['new_version']}",
                         "new_version": req["new_version"]}
        if path == "/generate" and method in ("POST", "PUT"):
            return generate(state, req)
        if path == "/flush_cache" and method in ("GET", "POST"):
            return 200, "Cache flushed.\nPlease check backend logs for more details. (When there are running or " \
                        "waiting requests, the operation will not be performed.)\n"
        if path == "/begin_weight_update" and method == "POST":
            if state.in_session:
                return 400, {"success": False, "message": "A weight update session is already open"}
            state.in_session = True
            return 200, {"success": True, "message": "Weight update session opened."}
        if path == "/end_weight_update" and method == "POST":
            if not state.in_session:
                return 400, {"success": False, "message": "No open session; call begin_weight_update first"}
            state.in_session = False
            return 200, {"success": True, "message": "Weight update session closed."}
        if path in ("/update_weights_from_tensor", "/update_weights_from_distributed",
                    "/update_weights_from_disk") and method == "POST":
            return update(state, path, req)
        if path == "/init_weights_update_group" and method == "POST":
            return init_group(state, req)
        if path == "/destroy_weights_update_group" and method == "POST":
            if state.groups.pop(req.get("group_name", "weight_update_group"), None) is None:  # weight_updater.py
                return 400, {"success": False, "message": "The group to be destroyed does not exist."}
            return 200, {"success": True, "message": "Succeeded to destroy custom process group."}
        if path == "/pause_generation" and method == "POST":
            return pause(state, req)
        if path == "/continue_generation" and method == "POST":
            with state.sched:
                state.pause_mode = None
                state.sched.notify_all()
            return 200, {"message": "Generation continued successfully.", "status": "ok"}
        if path == "/abort_request" and method == "POST":
            return abort(state, req)
        if path in ("/release_memory_occupation", "/resume_memory_occupation") and method == "POST":
            return memory_occupation(state, path, req)
        return self._mock_route(method, path, query, req)

    def _mock_route(self, method: str, path: str, query: str, req: dict) -> tuple[int, object]:
        state = self.state
        if path == "/_mock/fault" and method == "POST":
            state.faults.append({"route": req["route"], "kind": req["kind"], "count": req.get("count", 1),
                                 "seconds": req.get("seconds", 30)})
            return 200, {"ok": True}
        if path == "/_mock/config" and method == "POST":
            state.token_delay_s = req.get("token_delay_s", state.token_delay_s)
            state.health_delay_s = req.get("health_delay_s", state.health_delay_s)
            return 200, {"ok": True}
        if path == "/_mock/log" and method == "GET":
            with state.sched:
                running = len(state.running)
            return 200, {"log": state.log, "updates": state.updates, "weight_version": state.weight_version,
                         "running": running}
        if path == "/_mock/weights" and method == "GET":
            return mock_weights(state, query)
        if path == "/_mock/reset" and method == "POST":
            state.faults.clear()
            state.log.clear()
            state.updates.clear()
            state.token_delay_s = state.health_delay_s = 0.0
            state.in_session = False  # a test that failed mid-sync leaves no session to the next one
            state.released.clear()
            state.groups.clear()  # a test that failed mid-sync leaves no update group to the next one
            state.restart_weights()
            return 200, {"ok": True}
        return 404, {"detail": "Not Found"}

    def _send(self, status: int, body: object, raw_bytes: bool = False) -> None:
        if raw_bytes:
            data, ctype = body, "application/json"
        elif body is None:
            data, ctype = b"", "text/plain"
        elif isinstance(body, str):
            data, ctype = body.encode(), "text/plain; charset=utf-8"
        else:
            data, ctype = json.dumps(body).encode(), "application/json"
        self.send_response(HTTPStatus(status))
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("port", type=int)
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--enable-deterministic-inference", action="store_true")
    parser.add_argument("--enable-memory-saver", action="store_true")
    parser.add_argument("--enable-weights-cpu-backup", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    Handler.state = MockState(args.model_dir, args.tp_size, deterministic=args.enable_deterministic_inference,
                              memory_saver=args.enable_memory_saver,
                              weights_cpu_backup=args.enable_weights_cpu_backup)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
