"""setup_platform applies only what the device needs: the CPU shims never on a GPU, the fixes for megatron-core's
local layer spec only without TransformerEngine, and it checks megatron-core's version first."""
from __future__ import annotations

import pytest
import torch

import grpo_megatron.platform as platform
from grpo_megatron.platform import Platform, UnsupportedMegatronError


@pytest.fixture
def applied(monkeypatch):
    """The patch groups setup_platform applied, recorded instead of run; the device is whatever `detect` says."""
    calls: list[str] = []
    monkeypatch.setattr(platform, "apply_cpu_shims", lambda: calls.append("cpu_shims"))
    monkeypatch.setattr(platform, "apply_without_te_fixes", lambda: calls.append("without_te"))
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(f"cuda:{index}"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)

    def on(kind: Platform) -> list[str]:
        monkeypatch.setattr(platform, "detect", lambda: kind)
        try:
            platform.setup_platform(local_rank=11)
        finally:
            on.calls = calls
        return calls

    return on


def test_a_gpu_with_transformer_engine_gets_no_patch(applied):
    assert applied(Platform("cuda", "nccl", has_transformer_engine=True, has_apex=True)) == ["cuda:3"]


def test_a_gpu_without_transformer_engine_gets_the_local_spec_fixes_only(applied):
    assert applied(Platform("cuda", "nccl", has_transformer_engine=False, has_apex=False)) == ["cuda:3", "without_te"]


def test_the_cpu_gets_the_shims_and_the_local_spec_fixes(applied):
    assert applied(Platform("cpu", "gloo", has_transformer_engine=False, has_apex=False)) == ["cpu_shims", "without_te"]


def test_the_megatron_version_is_checked_before_anything_is_patched(applied, monkeypatch):
    def refuse():
        raise UnsupportedMegatronError("megatron-core 0.20.0 is outside the tested range")

    monkeypatch.setattr(platform, "check_megatron_version", refuse)
    with pytest.raises(UnsupportedMegatronError):
        applied(Platform("cpu", "gloo", has_transformer_engine=False, has_apex=False))
    assert applied.calls == []
