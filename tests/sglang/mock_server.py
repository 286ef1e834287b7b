"""A stand-in SGLang server for the contract tests: SGLang's HTTP routes on a real tiny transformers model.

Mirrors sglang/srt/entrypoints/http_server.py and sglang/srt/managers/io_struct.py (request fields, status codes,
error bodies) as stored in sgl-project/sglang, plus what was seen live on SGLang 0.5.23
(../shared/notes/cpu-platform-facts.md): the `/begin_weight_update` ... `/end_weight_update` session, outside
of which tensor and distributed updates answer 400. Generation, log-probs and routed experts come from
EmbeddedEngine, so they are real numbers of the model the weights were pushed into.
It stands in for SGLang's scheduler; it does not batch, and `/_mock/*` routes (not SGLang's) inject faults and
expose a request log for the tests. Run: python -m tests.sglang.mock_server MODEL_DIR PORT
"""
from __future__ import annotations

import base64
import json
import pickle
import sys
import threading
import time
from datetime import timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
import torch.distributed as dist
import transformers
import torch.multiprocessing  # noqa: F401  (registers the tensor reductions the pickles need)
from safetensors.torch import load_file
from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world

from grpo_megatron.rollout.base import SamplingParams
from grpo_megatron.rollout.embedded import EmbeddedEngine
from grpo_megatron.rollout.hf_layout import CheckpointLayout


class MockState:
    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.engine = EmbeddedEngine(model_dir)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.layout = CheckpointLayout(self.model)  # a second copy, for prompt log-probs
        self.pending: list = []  # buckets received in the open session, loaded at /end_weight_update
        self.weight_version = "default"
        self.in_session = False
        self.groups: dict[str, dist.ProcessGroup] = {}
        self.faults: list[dict] = []  # {"route", "kind", "count"}
        self.log: list[str] = []
        self.paused = False
        self.lock = threading.Lock()

    def take_fault(self, route: str) -> str | None:
        with self.lock:
            for fault in self.faults:
                if fault["route"] == route and fault["count"] > 0:
                    fault["count"] -= 1
                    return fault["kind"]
        return None


def generate(state: MockState, req: dict) -> tuple[int, object]:
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
    with state.lock:
        outs = state.engine.generate([ids], params, bool(req.get("return_routed_experts")))[0]
        input_lp = _prompt_logprobs(state.model, ids) if req.get("logprob_start_len") == 0 else None
    results = []
    for c in outs:
        meta = {"id": "mock", "prompt_tokens": len(ids), "completion_tokens": len(c.response_ids),
                "cached_tokens": 0, "weight_version": state.weight_version,
                "finish_reason": ({"type": "stop", "matched": c.response_ids[-1]} if c.finish_reason == "stop"
                                  else {"type": "length", "length": len(c.response_ids)})}
        if req.get("return_logprob"):
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(c.response_logprobs, c.response_ids)]
            meta["input_token_logprobs"] = input_lp or [[None, ids[0], None]]
        if c.routed_experts is not None:
            meta["routed_experts"] = base64.b64encode(c.routed_experts.numpy().tobytes()).decode()
        results.append({"text": "", "output_ids": c.response_ids, "meta_info": meta})
    return 200, results[0] if params.n == 1 else results


def _prompt_logprobs(model, ids: list[int]) -> list:
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    return [[None, ids[0], None]] + [[v, t, None] for v, t in zip(lp, ids[1:])]


def update(state: MockState, route: str, req: dict) -> tuple[int, dict]:
    needs_session = route in ("/update_weights_from_tensor", "/update_weights_from_distributed")
    if needs_session and not state.in_session:
        return 400, {"success": False, "message": "update_weights requires an open weight update session; "
                                                  "call /begin_weight_update first"}
    if route == "/update_weights_from_tensor":
        named = pickle.loads(base64.b64decode(req["serialized_named_tensors"][0]))
    elif route == "/update_weights_from_distributed":
        group = state.groups[req.get("group_name", "weight_update_group")]
        named = []
        for name, dtype, shape in zip(req["names"], req["dtypes"], req["shapes"]):
            tensor = torch.empty(shape, dtype=getattr(torch, dtype))
            dist.broadcast(tensor, src=0, group=group)
            named.append((name, tensor))
    else:
        named = []
        index = json.loads(open(f"{req['model_path']}/model.safetensors.index.json").read())
        for shard in sorted(set(index["weight_map"].values())):
            named += list(load_file(f"{req['model_path']}/{shard}").items())
    if state.in_session:
        state.pending += named
    else:
        error = load(state, named)
        if error:
            return 400, {"success": False, "message": error}
    if req.get("flush_cache", True):  # io_struct's default: the scheduler flushes after applying the update
        state.log.append("(flush_cache in update)")
    message = "Succeeded to update model weights."
    if req.get("weight_version") is not None:
        state.weight_version = req["weight_version"]
        message += f" Weight version updated to {req['weight_version']}."
    body = {"success": True, "message": message}
    if route == "/update_weights_from_disk":
        body["num_paused_requests"] = 0
    return 200, body


def load(state: MockState, named: list) -> str | None:
    """Load a full set of checkpoint tensors into both model copies; the error text, or None."""
    with state.lock:
        try:
            state.engine.update_weights(named, 0)
            state.layout.load(named)
        except Exception as err:  # noqa: BLE001  (SGLang reports a failed load as success=false)
            return f"Failed to update weights: {err}"
    return None


def init_group(state: MockState, req: dict) -> tuple[int, dict]:
    timeout = timedelta(seconds=60)
    store = dist.TCPStore(req["master_address"], req["master_port"], req["world_size"], is_master=False,
                          timeout=timeout)
    name = req.get("group_name", "weight_update_group")
    group, _ = _new_process_group_helper(req["world_size"], req["rank_offset"], [], Backend(req.get("backend", "nccl")),
                                         PrefixStore(name, store), group_name=name, timeout=timeout)
    _world.pg_group_ranks[group] = {i: i for i in range(req["world_size"])}
    state.groups[name] = group
    return 200, {"success": True, "message": "Succeeded to initialize custom process group."}


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
        path = self.path.split("?")[0]
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        state = self.state
        state.log.append(path)
        fault = state.take_fault(path)
        if fault == "500":
            return self._send(500, {"error": {"message": "injected internal error"}})
        if fault == "drop":
            self.close_connection = True
            self.connection.shutdown(2)
            return
        if fault == "hang":
            time.sleep(30)
        try:
            req = json.loads(raw) if raw else {}
        except json.JSONDecodeError as err:
            return self._send(400, {"object": "error", "message": f"JSON decode error: {err}", "type": "Bad Request",
                                    "param": None, "code": 400})
        status, body = self._dispatch(method, path, req)
        if fault == "malformed":
            return self._send(200, b'{"text": "truncated', raw_bytes=True)
        if fault == "routed_experts_size":
            for out in body if isinstance(body, list) else [body]:
                out["meta_info"]["routed_experts"] = base64.b64encode(b"\0" * 12).decode()
        self._send(status, body)

    def _dispatch(self, method: str, path: str, req: dict) -> tuple[int, object]:
        state = self.state
        if path in ("/health", "/health_generate") and method == "GET":
            return 200, None
        if path == "/get_model_info" and method == "GET":
            return 200, {"model_path": state.model_dir, "tokenizer_path": state.model_dir, "is_generation": True,
                         "preferred_sampling_params": None, "weight_version": state.weight_version}
        if path == "/get_weight_version" and method == "GET":
            return 200, {"weight_version": state.weight_version}
        if path == "/generate" and method in ("POST", "PUT"):
            while state.paused:
                time.sleep(0.05)
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
            named, state.pending = state.pending, []
            error = load(state, named) if named else None
            if error:
                return 400, {"success": False, "message": error}
            return 200, {"success": True, "message": "Weight update session closed."}
        if path in ("/update_weights_from_tensor", "/update_weights_from_distributed",
                    "/update_weights_from_disk") and method == "POST":
            return update(state, path, req)
        if path == "/init_weights_update_group" and method == "POST":
            return init_group(state, req)
        if path == "/destroy_weights_update_group" and method == "POST":
            group = state.groups.pop(req.get("group_name", "weight_update_group"), None)
            if group is not None:
                dist.destroy_process_group(group)
            return 200, {"success": True, "message": "Succeeded to destroy custom process group."}
        if path == "/pause_generation" and method == "POST":
            state.paused = True
            return 200, {"message": "Generation paused successfully.", "status": "ok"}
        if path == "/continue_generation" and method == "POST":
            state.paused = False
            return 200, {"message": "Generation continued successfully.", "status": "ok"}
        if path == "/abort_request" and method == "POST":
            return 200, None
        if path == "/_mock/fault" and method == "POST":
            state.faults.append({"route": req["route"], "kind": req["kind"], "count": req.get("count", 1)})
            return 200, {"ok": True}
        if path == "/_mock/log" and method == "GET":
            return 200, {"log": state.log, "weight_version": state.weight_version}
        if path == "/_mock/reset" and method == "POST":
            state.faults.clear()
            state.log.clear()
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
    torch.set_num_threads(1)
    model_dir, port = sys.argv[1], int(sys.argv[2])
    Handler.state = MockState(model_dir)
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
