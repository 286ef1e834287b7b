"""Process-wide state the entry point sets once: stop-signal handlers and how CPU tensors are shared.

Kept out of constructors so that building a Trainer or a weight sync in a test or a notebook leaves the
process as it was; `train.py` calls :func:`prepare_process` before anything is built.
"""
from __future__ import annotations

import logging
import os
import signal
import sys

logger = logging.getLogger(__name__)

_stop_received = False


def install_stop_handlers() -> None:
    """SIGUSR1/SIGTERM (Slurm's warning before the time limit) ask the loop to checkpoint after this step."""

    def handler(signum, frame):
        global _stop_received
        logger.warning("received signal %d: will checkpoint after this step and exit", signum)
        _stop_received = True

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, handler)


def stop_signal_received() -> bool:
    return _stop_received


def share_cpu_tensors_by_name() -> None:
    """CPU tensors pickled for an SGLang server (weight_sync: tensor) must be mappable by name.

    With torch's default fd strategy a pickled CPU tensor needs a live connection to the sender; the
    file_system strategy lets the server map it by name (see cpu-platform-facts.md). Its shared-memory daemon
    is started here with its stdout/stderr on /dev/null: it outlives the trainer while a server still maps
    shared tensors, and with the trainer's stdio a caller reading the trainer's output through a pipe (CI,
    `subprocess.run(capture_output=True)`, `| tee`) would wait for the server to stop.
    """
    import torch
    import torch.multiprocessing as mp

    mp.set_sharing_strategy("file_system")
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            os.dup2(devnull, fd)
        torch.empty(1).share_memory_()  # the first share starts the daemon (a no-op once it runs)
    finally:
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)
        os.close(devnull)


def prepare_process(cfg) -> None:
    """Everything process-wide that the run `cfg` (a RunConfig) needs, before any model or engine is built."""
    install_stop_handlers()
    if cfg.rollout.engine == "sglang" and cfg.rollout.sglang.weight_sync == "tensor":
        share_cpu_tensors_by_name()
