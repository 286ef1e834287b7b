"""SGLang rollout backend: HTTP client engine, weight sync (tensor / distributed / disk) and server launcher."""
from grpo_megatron.rollout.sglang.engine import SGLangEngine
from grpo_megatron.rollout.sglang.errors import (
    MalformedResponseError, SGLangError, ServerRequestError, ServerTimeoutError, ServerUnavailableError,
)
from grpo_megatron.rollout.sglang.launcher import RouterSpec, ServerSpec, SGLangServer
from grpo_megatron.rollout.sglang.probe import ProbeCheck, ProbeMismatchError
from grpo_megatron.rollout.sglang.transport import RetryPolicy, ServerPool
from grpo_megatron.rollout.sglang.disk_sync import DiskSync
from grpo_megatron.rollout.sglang.distributed_sync import DistributedSync
from grpo_megatron.rollout.sglang.tensor_sync import TensorSync
from grpo_megatron.rollout.sglang.weight_sync import WeightSync

__all__ = [
    "SGLangEngine", "SGLangError", "MalformedResponseError", "ServerRequestError", "ServerTimeoutError",
    "ServerUnavailableError", "RouterSpec", "ServerSpec", "SGLangServer", "ProbeCheck", "ProbeMismatchError", "RetryPolicy",
    "ServerPool", "DiskSync", "DistributedSync", "TensorSync", "WeightSync",
]
