"""The C++ shim that lets autograd and megatron's DDP run on fake CUDA tensors in a CPU build of torch.

A CPU build has no CUDA device guard and no CUDA hooks: the first backward node or DDP grad accumulator on a
CUDA tensor aborts the process ("PyTorch is not linked with support for cuda devices"). `fake_cuda_shim.cpp`
registers a no-op guard and hooks that say CUDA is built. It relies on torch's C++ internals, so it is built
against the installed torch's headers, once per torch version, into a cache directory, and checked by a
self-test (the backward of one fake CUDA parameter). torch reads the hooks once, at import: the library must
be in `LD_PRELOAD` of a fresh interpreter (`preload_env`), it cannot be loaded later.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).with_name("fake_cuda_shim.cpp")
_MARKER = "grpo_fake_cuda_shim_loaded"


class ShimError(RuntimeError):
    """The shim cannot be built or loaded; the message is one line naming the fix."""


def _torch_dirs() -> tuple[str, Path]:
    """torch's version and install directory, found without importing torch (this process may need the
    shim preloaded before its first torch import)."""
    import importlib.metadata
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise ShimError("torch is not installed in this interpreter: install the project's requirements")
    return importlib.metadata.version("torch"), Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    root = os.environ.get("GRPO_MEGATRON_CACHE") or Path.home() / ".cache" / "grpo_megatron"
    return Path(root) / "fake_cuda"


def library_path() -> Path:
    """The shim for the installed torch, built on first use (~5-10 s of g++)."""
    version, torch_dir = _torch_dirs()
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    target = cache_dir() / f"torch-{version}" / f"libgrpo_fake_cuda-{digest}.so"
    if target.exists():
        return target
    compiler = shutil.which(os.environ.get("CXX") or "g++")
    if not compiler:
        raise ShimError("the fake-CUDA simulation needs a C++ compiler: install g++ (apt-get install g++)")
    include, lib = torch_dir / "include", torch_dir / "lib"
    if not (include / "ATen" / "detail" / "CUDAHooksInterface.h").exists():
        raise ShimError(f"torch {version} has no C++ headers under {include}: install a torch wheel with headers")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.tmp")
    cmd = [compiler, "-shared", "-fPIC", "-O1", "-std=c++20", "-w", f"-I{include}", str(SOURCE), "-o", str(partial),
           f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        first = next((line for line in run.stderr.splitlines() if "error" in line), run.stderr.strip()[:300])
        raise ShimError(f"building the fake-CUDA shim against torch {version} failed ({first}); this torch "
                        f"version's internals may have changed: use torch 2.13")
    partial.replace(target)
    return target


def preload_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with the shim in LD_PRELOAD, for a fresh interpreter."""
    env = dict(os.environ if env is None else env)
    path = str(library_path())
    preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p]
    env["LD_PRELOAD"] = ":".join([path, *[p for p in preload if p != path]])
    return env


def is_loaded() -> bool:
    """Whether this process runs with the shim (it was preloaded)."""
    return hasattr(ctypes.CDLL(None), _MARKER)


def require_loaded() -> None:
    if not is_loaded():
        raise ShimError("the fake-CUDA shim is not preloaded in this process: start it with "
                        "grpo_megatron.simulation.shim.preload_env() (LD_PRELOAD), or use simulate_rank")


def self_test() -> None:
    """The backward of one fake CUDA parameter, as megatron's DDP sets it up (its grad accumulator)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    require_loaded()
    with FakeTensorMode(allow_non_fake_inputs=True):
        param = torch.nn.Parameter(torch.empty(4, 3, device="cuda:0"))
        accumulator = param.expand_as(param).grad_fn.next_functions[0][0]
        (torch.empty(2, 4, device="cuda:0") @ param).sum().backward()
    if param.grad is None or param.grad.device.type != "cuda" or accumulator is None:
        raise ShimError(f"fake-CUDA self-test failed (grad {param.grad}); the shim does not fit torch "
                        f"{torch.__version__}: use torch 2.13")


def run_module(module: str, args: list[str], *, timeout: float, cwd: str | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m module args` in a fresh interpreter with the shim preloaded; output captured."""
    return subprocess.run([sys.executable, "-m", module, *args], env=preload_env(env), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
