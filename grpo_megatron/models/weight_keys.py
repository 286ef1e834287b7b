"""How the weight stream and the change tracker name a parameter shard: shared by both, importing neither."""
from __future__ import annotations

import torch

ParamKey = tuple[int, str, int]
"""(model chunk index, local megatron parameter name, EP rank of a local expert under EP > 1 else 0)."""


def chunk_tensors(chunk: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Named parameters plus the router's expert_bias, a buffer megatron does not register as a parameter."""
    params = list(chunk.named_parameters())
    known = {n for n, _ in params}
    state = chunk.state_dict()
    return params + [(n, state[n]) for n in state if "expert_bias" in n and "_extra_state" not in n and n not in known]


def is_ep_expert(name: str, ep_size: int) -> bool:
    """Whether the parameter of global name `name` (mbridge's, local expert numbers) is a local expert's weight that
    the stream gathers from its EP group (one HF tensor per EP rank)."""
    return ".mlp.experts.linear_fc" in name and ep_size > 1
