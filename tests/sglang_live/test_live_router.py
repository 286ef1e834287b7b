"""sglang-router (0.3.2, installed beside SGLang by install_sglang.sh) in front of a REAL SGLang server: generation
through the router, weights pushed to the server directly, and the router's generations then follow the new
weights. The router drops `return_routed_experts` (seen here), so R3 generations go to the servers directly."""
from __future__ import annotations

import re

import torch

from grpo_megatron.rollout.engines.base import SamplingParams
from grpo_megatron.rollout.sglang import ProbeCheck, RouterSpec, SGLangEngine, ServerPool, SGLangServer, TensorSync
from grpo_megatron.rollout.sglang.probe import reference_logprobs
from grpo_megatron.parallel import free_port
from tests.sglang_live.server import PYTHON
from tests.sglang_live.test_live_server import PROBE, ROUTED_SHAPE, SYNC_TOL, perturbed, restore_weights  # noqa: F401


def served_logprob_error(model, completions) -> float:
    """Max |logprob the router returned - logprob of `model`| over the sampled tokens."""
    worst = 0.0
    for c in completions:
        full = c.prompt_ids + c.response_ids
        logp = torch.log_softmax(model(torch.tensor([full[:-1]])).logits[0].float(), -1)
        expected = logp[len(c.prompt_ids) - 1:].gather(-1, torch.tensor(c.response_ids)[:, None])[:, 0]
        worst = max(worst, float((torch.tensor(c.response_logprobs) - expected).abs().max()))
    return worst


def routed_generations(logs) -> int:
    """/generate requests the router answered so far (its access log: one "finished" line per request)."""
    lines = [strip_ansi(line) for line in (logs / "router.log").read_text().splitlines()]
    return sum("uri=/generate" in line and "status_code=200" in line for line in lines)


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_generation_through_router_weights_to_server(live_server, live_model, live_logs, restore_weights):  # noqa: F811
    router = SGLangServer(RouterSpec([live_server.spec.url], free_port(), policy="round_robin", python=str(PYTHON)),
                          log_path=live_logs / "router.log").start()
    try:
        router.wait_healthy(120)
        pool = ServerPool([live_server.spec.url], timeout_s=120)
        probe = ProbeCheck(live_model, PROBE, tolerance=SYNC_TOL)
        engine = SGLangEngine(pool, TensorSync(pool, bucket_mb=64, tp_size=1), routed_shape=ROUTED_SHAPE,
                              probe=probe, generate_pool=ServerPool([router.spec.url], timeout_s=120))
        params = SamplingParams(max_new_tokens=6, temperature=1.0, n=2, seed=0)
        prompts = [[1, 5, 6, 7], [1, 9, 10]]
        before = [c for g in engine.generate(prompts, params) for c in g]
        assert len(before) == 4 and routed_generations(live_logs) == 4  # one /generate per sample (its own seed)
        replay = [c for g in engine.generate(prompts, params, return_routed_experts=True) for c in g]
        assert routed_generations(live_logs) == 4  # R3 requests bypassed the router...
        assert all(c.routed_experts.shape == (len(c.prompt_ids) + len(c.response_ids) - 1, *ROUTED_SHAPE)
                   for c in replay)  # ...and came back with their experts
        with torch.inference_mode():
            old_error = served_logprob_error(probe.model, before)
            engine.update_weights(perturbed(live_model, seed=11), version=3)  # the probe now holds the new weights
            after = [c for g in engine.generate(prompts, params) for c in g]
            new_error = served_logprob_error(probe.model, after)
            stale_error = served_logprob_error(probe.model, before)
        print(f"\nrouter: logprob error old weights {old_error:.4f}, after sync {new_error:.4f} "
              f"(the pre-sync samples under the new weights: {stale_error:.3f}); probe "
              f"{engine.last_sync['probe_max_abs_diff']:.4f}")
        assert old_error < 3e-2 and new_error < SYNC_TOL and stale_error > 2 * new_error
        assert all(c.weight_version == 3 for c in after) and routed_generations(live_logs) == 8
        engine.shutdown()
    finally:
        router.stop()
    assert "update_weights" not in (live_logs / "router.log").read_text()
