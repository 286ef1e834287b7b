"""Process-wide state set by the entry point: the stop signals reach the loop's flag."""
from __future__ import annotations

import os
import signal

from grpo_megatron import process_setup


def test_sigusr1_and_sigterm_set_the_stop_flag(monkeypatch):
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    monkeypatch.setattr(process_setup, "_stop_received", False)
    try:
        process_setup.install_stop_handlers()
        assert not process_setup.stop_signal_received()
        for sig in saved:
            monkeypatch.setattr(process_setup, "_stop_received", False)
            os.kill(os.getpid(), sig)  # delivered to the main thread before kill() returns
            assert process_setup.stop_signal_received(), sig
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_prepare_process_shares_cpu_tensors_only_for_tensor_weight_sync(monkeypatch):
    from grpo_megatron.config import RunConfig, replace_keys

    calls = []
    monkeypatch.setattr(process_setup, "install_stop_handlers", lambda: calls.append("signals"))
    monkeypatch.setattr(process_setup, "share_cpu_tensors_by_name", lambda: calls.append("share"))
    for engine, sync, expected in (("embedded", "tensor", ["signals"]), ("sglang", "disk", ["signals"]),
                                   ("sglang", "tensor", ["signals", "share"])):
        calls.clear()
        process_setup.prepare_process(replace_keys(RunConfig(), {"rollout.engine": engine,
                                                                 "rollout.sglang.weight_sync": sync}))
        assert calls == expected, (engine, sync)
