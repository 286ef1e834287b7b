"""What the fake-CUDA simulation cannot see, as stated constants with where each number comes from.

The simulation counts exact tensor bytes (the analogue of `torch.cuda.max_memory_allocated()`); a real GPU
also holds a CUDA context, library workspaces and NCCL buffers, and its caching allocator reserves more
than it hands out. These are added on top, per GPU process. Change them here (not in callers) when a GPU
calibration run (benchmarks/README.md, "Dry run") measures better ones.
"""
from __future__ import annotations

GiB = 1 << 30

CUDA_CONTEXT_BYTES = int(0.6 * GiB)
"""Per process: CUDA context + kernel images of torch/megatron on H100 (0.5-0.6 GiB in `nvidia-smi` of a process
that allocated nothing; PyTorch's CUDA semantics notes). Counted once for the trainer and once for an SGLang
server rank sharing the GPU."""

CUBLAS_WORKSPACE_BYTES = 32 << 20
"""cuBLAS workspace per stream on Hopper (CUBLAS_WORKSPACE_CONFIG default :4096:8 = 32 MiB; torch's
`_getWorkspaceSize`)."""

NCCL_BYTES_PER_GROUP = 96 << 20
"""Device buffers of one NCCL communicator (NCCL_BUFFSIZE 4 MiB x 2 directions x channels, ~64-128 MiB with the
default channel count on NVLink/IB; NCCL's environment documentation)."""

NCCL_GROUPS = 16
"""Communicators a megatron rank creates that actually touch the GPU (TP, PP, DP, DP-with-CP, EP, ETP, EDP,
MP, embedding, position embedding, TP-EP, ..., the weight-update group): ~15-20 in parallel_state for MoE.
With NVLS (NVLink SHARP) each can take more: lower NCCL_NVLS_ENABLE=0 if the plan is tight."""

FRAGMENTATION = 0.10
"""The caching allocator's reserved-over-allocated overhead at the training peak (5-15% observed on MoE jobs,
worse with dropless dispatch's variable sizes; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True keeps it at the
low end). Applied to the trainer's peak allocated bytes."""

SGLANG_RUNTIME_BYTES = int(3.0 * GiB)
"""An SGLang server rank outside its static pool (weights + KV cache = --mem-fraction-static x GPU memory):
CUDA graphs of the default capture batch sizes, sampling and activation buffers (SGLang sizes the static
pool so that these fit in the rest; their size grows with --cuda-graph-max-bs). Kept while the memory saver
has released the pool."""

SGLANG_RELEASED_BYTES = int(1.0 * GiB)
"""A colocated server rank's footprint while it has released weights and KV cache (`release_memory_occupation`
with --enable-memory-saver): context and the graph pool's private memory stay."""

ROUTING_SKEW = 1.5
"""Receive-side imbalance the simulation's balanced-routing stand-in applies to dropless MoE dispatch: the
project trains with `moe_aux_loss_coeff = 0`, so nothing keeps real routing balanced (1.5x is the margin of
the dry-run's measurements; 1.0 is perfect balance)."""

GLOO_BYTES_PER_S = 1.0e9
"""Bytes per second of one gloo TCP hop between nodes (one TCP stream over IPoIB or 25-100 GbE carries ~1-3 GB/s;
the low end is taken). Gloo's broadcast is a binomial tree (gloo/broadcast.cc): ceil(log2 world) rounds, each
moving the whole message."""

HOST_RESERVE_BYTES = 32 * GiB
"""Per node, memory the OS, page cache pressure, dataloader and CUDA pinned staging need beyond what the plan
counts."""

PER_PROCESS_HOST_BYTES = int(6.0 * GiB)
"""Host memory of one trainer process before any tensor: Python, torch + CUDA libraries, megatron, NCCL's host
side (3-6 GiB RSS per rank on a GPU node)."""


def device_overhead_bytes() -> int:
    """Per trainer GPU process: context + cuBLAS workspace + NCCL communicator buffers."""
    return CUDA_CONTEXT_BYTES + CUBLAS_WORKSPACE_BYTES + NCCL_GROUPS * NCCL_BYTES_PER_GROUP


def describe() -> list[tuple[str, str]]:
    """(name, value) rows for the report's 'not seen by the simulation' section."""
    return [
        ("CUDA context per process", f"{CUDA_CONTEXT_BYTES / GiB:.2f} GiB"),
        ("cuBLAS workspace", f"{CUBLAS_WORKSPACE_BYTES >> 20} MiB"),
        ("NCCL buffers", f"{NCCL_GROUPS} groups x {NCCL_BYTES_PER_GROUP >> 20} MiB"),
        ("allocator fragmentation", f"{FRAGMENTATION:.0%} of the trainer's peak"),
        ("SGLang outside its static pool", f"{SGLANG_RUNTIME_BYTES / GiB:.1f} GiB ({SGLANG_RELEASED_BYTES / GiB:.1f} "
                                           f"GiB while released)"),
        ("MoE routing skew", f"{ROUTING_SKEW}x balanced"),
        ("gloo hop bandwidth", f"{GLOO_BYTES_PER_S / 1e9:.1f} GB/s"),
    ]
