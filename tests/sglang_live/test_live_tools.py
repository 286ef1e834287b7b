"""The multi-turn tool loop against a REAL SGLang 0.5.23 server (bf16, CPU): every turn is a /generate with
`input_ids` that are exactly the tokens so far, the trained tokens are the sampled ones plus the inserted tool
tokens (never a re-tokenisation), their log-probs are the server's, and R3 routes cover every position.

The same trajectories and checks as tests/rollout/test_tools_engines.py (embedded engine and the mock server),
with bf16 tolerances: the server computes in bf16, the teacher-forced reference in float32.
"""
from __future__ import annotations

import pytest

from tests.rollout.test_tools_engines import check_exact_tokens, check_routes, tool_loop_samples
from tests.sglang_live.test_live_server import LOGPROB_TOL, make_engine

pytestmark = pytest.mark.sglang_live


def test_tool_loop_on_a_real_server_is_token_exact_with_routes(live_server, live_model):
    engine = make_engine([live_server.spec.url])
    samples, recording, first = tool_loop_samples(engine, live_model, routes=True)
    assert len(recording.calls) >= 2  # a first turn that ends on the call marker, then the turn after the tool
    check_exact_tokens(samples, recording, first, live_model, atol=LOGPROB_TOL)
    check_routes(samples, engine, tool_agreement=0.9)
