"""CPU adaptation of SGLang 0.5.23 for the live tests (test support only; never imported by grpo_megatron).

Put this directory on PYTHONPATH of the SGLang server (tests/sglang_live/server.py does) and Python imports it
at start-up in the server and in every process it spawns (scheduler, detokenizer). It patches two places of
the pinned SGLang / sglang-kernel when they are imported, and nothing else:

1. sgl_kernel/load_utils.py `_load_architecture_specific_ops` loads the CUDA build of the kernel library
   (`sm100/common_ops.*.so`), which needs libcuda.so.1 and kills the import on a machine without a GPU. It is
   replaced by an empty op set, and `_preload_cuda_library` by a no-op, so SGLang takes its plain-PyTorch
   fallbacks (what it does on a CPU without AMX anyway).
2. sglang/srt/mem_cache/pool_host/common.py `ALLOC_MEMORY_FUNCS` allocates the routed-experts host buffer
   (`--enable-return-routed-experts`, sglang/srt/state_capturer/base.py BaseHostCache) with cudaHostRegister.
   For device "cpu" it becomes a plain CPU tensor.

Enabled only when GRPO_SGLANG_CPU_ADAPT=1, and only for the SGLang version named below (checked on import).
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types

TARGET_SGLANG = "0.5.23"


def _patch_load_utils(module: types.ModuleType) -> None:
    def empty_ops():
        return types.ModuleType("common_ops")  # no compiled kernels: SGLang uses its torch fallbacks

    module._load_architecture_specific_ops = empty_ops
    module._preload_cuda_library = lambda *args, **kwargs: None


def _patch_pool_host(module: types.ModuleType) -> None:
    import torch

    def plain_cpu_alloc(dims, dtype, device, pin_memory=False, allocator=None, **kwargs):
        return torch.zeros(dims, dtype=dtype, device="cpu")

    module.ALLOC_MEMORY_FUNCS["cpu"] = plain_cpu_alloc


def _check_version() -> None:
    from importlib.metadata import version as installed

    version = installed("sglang")
    if version != TARGET_SGLANG:
        raise ImportError(f"tests/sglang_live/cpu_site targets sglang {TARGET_SGLANG}, found {version}; "
                          f"re-check the patched places before using it")


_PATCHES = {
    "sgl_kernel.load_utils": _patch_load_utils,
    "sglang.srt.mem_cache.pool_host.common": _patch_pool_host,
}


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader, patch):
        self.inner, self.patch = inner, patch

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        self.patch(module)


class _PatchingFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        patch = _PATCHES.get(name)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader, patch)
        return spec


if os.environ.get("GRPO_SGLANG_CPU_ADAPT") == "1":
    _check_version()
    sys.meta_path.insert(0, _PatchingFinder())
