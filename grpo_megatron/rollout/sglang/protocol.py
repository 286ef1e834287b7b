"""SGLang's /generate request and response format, as plain functions (no I/O).

Mirrors `GenerateReqInput` in sglang/srt/managers/io_struct.py and the live responses listed in
../shared/notes/cpu-platform-facts.md: `meta_info.output_token_logprobs` is `[[logprob, token_id, text|null], ...]`,
`meta_info.finish_reason` is `{"type": "stop"|"length"|"abort", ...}` and `meta_info.routed_experts` is base64
int32 of shape (len(prompt) + len(response) - 1 - routed_experts_start_len, layers, topk): the rows of positions
[routed_experts_start_len, len(prompt) + len(response) - 1). A request aborted while running (/abort_request,
/pause_generation in mode "abort") answers 200 with finish_reason `{"type": "abort", "message": "Aborted",
"status_code": null, "err_type": null}` and everything it had: output_ids, their output_token_logprobs and their
routed_experts rows (seen live on 0.5.23).
"""
from __future__ import annotations

import base64
from typing import Any

import numpy as np
import torch

from grpo_megatron.rollout.engines.base import Completion, SamplingParams
from grpo_megatron.rollout.sglang.errors import MalformedResponseError
from grpo_megatron.samples import route_storage_dtype

ABORTED = "abort"


def generate_payload(prompt_ids: list[int], params: SamplingParams, return_routed_experts: bool,
                     seed: int | None = None) -> dict[str, Any]:
    """One /generate request that samples params.n responses for one prompt."""
    sampling: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "n": params.n,
    }
    if params.stop_token_ids:
        sampling["stop_token_ids"] = list(params.stop_token_ids)
    if seed is not None:
        sampling["sampling_seed"] = seed
    payload: dict[str, Any] = {"input_ids": list(prompt_ids), "sampling_params": sampling, "return_logprob": True}
    if return_routed_experts:
        payload["return_routed_experts"] = True
    return payload


def finish_type(output: dict[str, Any], url: str) -> str:
    """"stop", "length" or "abort" from one output's meta_info.finish_reason."""
    reason = _meta(output, url).get("finish_reason")
    kind = reason.get("type") if isinstance(reason, dict) else None
    if kind not in ("stop", "length", ABORTED):
        raise MalformedResponseError(f"{url}/generate: meta_info.finish_reason={reason!r}; "
                                     f"expected a dict with type stop, length or abort")
    return kind


def parse_completion(output: dict[str, Any], prompt_ids: list[int], url: str, fallback_version: int,
                     routed_shape: tuple[int, int] | None, routed_start: int = 0) -> Completion:
    """A Completion from one /generate output; routed_shape is (layers, topk) when experts were asked for, and
    routed_start the request's routed_experts_start_len (its routed_experts then lack the first rows)."""
    meta = _meta(output, url)
    entries = meta.get("output_token_logprobs")
    if not isinstance(entries, list) or not all(isinstance(e, (list, tuple)) and len(e) >= 2 for e in entries):
        raise MalformedResponseError(f"{url}/generate: meta_info.output_token_logprobs missing or not "
                                     f"[[logprob, token_id, text], ...] (was return_logprob sent?)")
    response_ids = [int(e[1]) for e in entries]
    logprobs = [float(e[0]) for e in entries]
    output_ids = output.get("output_ids")
    if output_ids is not None and list(output_ids) != response_ids:
        raise MalformedResponseError(f"{url}/generate: output_ids ({len(output_ids)} tokens) disagree with the "
                                     f"token ids of output_token_logprobs ({len(response_ids)} tokens)")
    routed = None
    if routed_shape is not None:
        routed = decode_routed_experts(meta.get("routed_experts"),
                                       len(prompt_ids) + len(response_ids) - 1 - routed_start, routed_shape, url)
    return Completion(prompt_ids=list(prompt_ids), response_ids=response_ids, response_logprobs=logprobs,
                      finish_reason=finish_type(output, url), routed_experts=routed,
                      weight_version=_version(meta.get("weight_version"), fallback_version))


def decode_routed_experts(encoded: Any, rows: int, shape: tuple[int, int], url: str) -> torch.Tensor:
    """base64 int32 -> [rows, layers, topk] in the smallest integer dtype that holds its expert ids (uint8 up to 256
    experts: a 32K-token response of a 48-layer top-8 model is 12.6 MB instead of 50 MB of int32); a wrong size is
    an error, never a silent reshape. Negative ids stay int32, for the replay's range check to report."""
    if not isinstance(encoded, str):
        raise MalformedResponseError(f"{url}/generate: meta_info.routed_experts missing; start the server with "
                                     f"--enable-return-routed-experts")
    try:
        flat = np.frombuffer(base64.b64decode(encoded, validate=True), dtype=np.int32)
    except (ValueError, TypeError) as err:
        raise MalformedResponseError(f"{url}/generate: meta_info.routed_experts is not base64 int32: {err}") from err
    layers, topk = shape
    if flat.size != rows * layers * topk:
        raise MalformedResponseError(
            f"{url}/generate: routed_experts has {flat.size} values; expected {rows} positions x {layers} layers "
            f"x top-{topk} = {rows * layers * topk} (len(prompt) + len(response) - 1 - routed_experts_start_len "
            f"positions)")
    compact = flat.size and int(flat.min()) >= 0
    dtype = route_storage_dtype(int(flat.max()) + 1) if compact else torch.int32
    return torch.from_numpy(flat.astype(_NUMPY[dtype])).view(rows, layers, topk)


_NUMPY = {torch.uint8: np.uint8, torch.int16: np.int16, torch.int32: np.int32}


def outputs_of(body: Any, n: int, url: str) -> list[dict[str, Any]]:
    """The n outputs of one /generate answer: a dict for n == 1, a list of n dicts otherwise."""
    outputs = [body] if isinstance(body, dict) else body
    if not isinstance(outputs, list) or len(outputs) != n or not all(isinstance(o, dict) for o in outputs):
        raise MalformedResponseError(f"{url}/generate: expected {n} output object(s), got {type(body).__name__}"
                                     f"{'' if not isinstance(body, list) else f' of {len(body)}'}")
    return outputs


def _meta(output: dict[str, Any], url: str) -> dict[str, Any]:
    meta = output.get("meta_info")
    if not isinstance(meta, dict):
        raise MalformedResponseError(f"{url}/generate: output has no meta_info object")
    return meta


def _version(value: Any, fallback: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return fallback
