"""The fake-CUDA shim's build and load errors: one line naming the fix (grpo_megatron/simulation/shim.py)."""
from __future__ import annotations

import pytest

from grpo_megatron.simulation import shim


def test_missing_compiler_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("GRPO_MEGATRON_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    with pytest.raises(shim.ShimError, match=r"needs a C\+\+ compiler: install g\+\+") as error:
        shim.library_path()
    assert "\n" not in str(error.value)


def test_missing_torch_headers_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("GRPO_MEGATRON_CACHE", str(tmp_path))
    monkeypatch.setattr(shim, "_torch_dirs", lambda: ("9.9.9", tmp_path / "torch"))
    with pytest.raises(shim.ShimError, match="torch 9.9.9 has no C\\+\\+ headers") as error:
        shim.library_path()
    assert "\n" not in str(error.value)


def test_the_cache_is_keyed_by_torch_version(tmp_path, monkeypatch):
    monkeypatch.setenv("GRPO_MEGATRON_CACHE", str(tmp_path))
    built = tmp_path / "fake_cuda" / "torch-9.9.9"
    built.mkdir(parents=True)
    monkeypatch.setattr(shim, "_torch_dirs", lambda: ("9.9.9", tmp_path / "torch"))
    digest = __import__("hashlib").sha256(shim.SOURCE.read_bytes()).hexdigest()[:12]
    (built / f"libgrpo_fake_cuda-{digest}.so").write_bytes(b"")
    assert shim.library_path().parent == built  # found, not rebuilt (there are no headers to build with)
    assert shim.preload_env({"LD_PRELOAD": "/x.so"})["LD_PRELOAD"] == f"{built}/libgrpo_fake_cuda-{digest}.so:/x.so"


def test_simulating_without_the_preloaded_shim_refuses():
    assert not shim.is_loaded()  # the test process was started without it
    with pytest.raises(shim.ShimError, match="not preloaded in this process"):
        shim.require_loaded()
