"""The remote reward client against a local reward server (stdlib http.server on a thread): batching, retries
with back-off, time-outs, refused and malformed answers, and the RewardRunner's fallback and failure count."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from grpo_megatron.config import RewardConfig, RewardFunctionConfig
from grpo_megatron.parallel import free_port
from grpo_megatron.rollout.rewards.remote import RemoteReward
from grpo_megatron.rollout.rewards.runner import RewardRunner


class RewardServer:
    """Scores a response by its length (+ 0.5 when it equals the answer). `plan` lists what the next requests
    get instead: an HTTP status, "sleep" (answer after 1 s), "garbage" (not JSON), "short" (one reward too few)
    or "nan"."""

    def __init__(self):
        self.requests: list[list[dict]] = []
        self.times: list[float] = []
        self.plan: list = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                items = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["items"]
                server.requests.append(items)
                server.times.append(time.monotonic())
                step = server.plan.pop(0) if server.plan else None
                if step == "sleep":
                    time.sleep(1.0)
                rewards = [len(it["response"]) + 0.5 * (it["response"] == it["answer"]) for it in items]
                body = {"rewards": rewards}
                if step == "short":
                    body = {"rewards": rewards[:-1]}
                elif step == "nan":
                    body = {"rewards": [float("nan")] * len(items)}
                data = b"<html>oops" if step == "garbage" else json.dumps(body).encode()
                status = step if isinstance(step, int) else 200
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/score"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    s = RewardServer()
    yield s
    s.httpd.shutdown()


TEXTS = [f"r{'x' * i}" for i in range(10)]
ANSWERS = ["rxx"] * 10
METAS = [{"prompt": f"p{i}", "task": "t"} for i in range(10)]


def test_batches_carry_prompt_response_answer_meta_and_keep_order(server):
    client = RemoteReward(server.url, batch_size=4, max_in_flight=2)
    assert client.score(TEXTS, ANSWERS, METAS) == [len(t) + 0.5 * (t == "rxx") for t in TEXTS]
    assert sorted(len(r) for r in server.requests) == [2, 4, 4]
    first = next(r for r in server.requests if r[0]["response"] == "r")[0]
    assert first == {"prompt": "p0", "response": "r", "answer": "rxx", "meta": {"task": "t"}}


def test_server_errors_are_retried_with_back_off(server):
    server.plan = [503, 500]
    client = RemoteReward(server.url, batch_size=10, retries=3, backoff_s=0.2)
    assert client.score(TEXTS, ANSWERS, METAS)[2] == 3.5
    assert len(server.requests) == 3
    gaps = [b - a for a, b in zip(server.times, server.times[1:])]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4  # back-off doubles


def test_a_slow_server_times_out_and_scores_the_fallback(server):
    server.plan = ["sleep", "sleep"]
    client = RemoteReward(server.url, batch_size=10, timeout_s=0.3, retries=1, backoff_s=0.0, fallback=-1.0)
    start = time.monotonic()
    assert client.score(TEXTS, ANSWERS, METAS) == [-1.0] * 10
    assert time.monotonic() - start < 1.9 and len(server.requests) == 2  # not waiting out the 1 s answers


@pytest.mark.parametrize("step", [400, "garbage", "short", "nan"])
def test_refused_or_malformed_answers_fail_the_batch_without_retry(server, step):
    server.plan = [step]
    client = RemoteReward(server.url, batch_size=5, retries=3, backoff_s=0.0, max_in_flight=1)
    assert client.score_batch(TEXTS, ANSWERS, METAS) == [None] * 5 + [len(t) for t in TEXTS[5:]]
    assert len(server.requests) == 2


def test_no_server_fails_after_the_retries():
    client = RemoteReward(f"http://127.0.0.1:{free_port()}/score", retries=2, backoff_s=0.05)
    assert client.score(TEXTS[:2], ANSWERS[:2], METAS[:2]) == [0.0, 0.0]


def test_runner_batches_remote_rewards_and_counts_failed_samples(server):
    server.plan = [503]
    options = {"url": server.url, "batch_size": 4, "retries": 0, "max_in_flight": 1}
    cfg = RewardConfig(functions=[RewardFunctionConfig(name="remote", weight=2.0, options=options),
                                  RewardFunctionConfig(name="exact_match")], fallback=-5.0)
    runner = RewardRunner(cfg)
    scores = runner.score([m["prompt"] for m in METAS], TEXTS, ANSWERS, [{"task": "t"}] * 10)
    failed = [i for i, s in enumerate(scores) if s == -10.0 + float(TEXTS[i] == "rxx")]
    assert failed == [0, 1, 2, 3]
    assert len(failed) == 4 and runner.last_failed == 4 and runner.last_calls == 20  # one batch of 4 failed
    for i, s in enumerate(scores):
        if i not in failed:
            assert s == 2.0 * (len(TEXTS[i]) + 0.5 * (TEXTS[i] == "rxx")) + float(TEXTS[i] == "rxx")
    assert len(server.requests) == 3


def test_bad_options_name_the_fix():
    with pytest.raises(ValueError, match="must start with http"):
        RemoteReward("localhost:8000")
    with pytest.raises(ValueError, match="batch_size >= 1"):
        RemoteReward("http://x", batch_size=0)
