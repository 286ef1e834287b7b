"""Build megatron-core GPTModels (dense and MoE) from a Hugging Face config, for the current layout."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from grpo_megatron.models.bridge import MOE_MODEL_TYPES, make_bridge, validate_hf_config
from grpo_megatron.parallel import ParallelLayout, current_device
from grpo_megatron.ranks import multi_rank


def load_hf_config(path: str | Path) -> transformers.PretrainedConfig:
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no config.json in {path}: pass a Hugging Face checkpoint directory")
    config = transformers.AutoConfig.from_pretrained(path)
    validate_hf_config(config)
    return config


def model_dims(hf_config) -> dict:
    """The sizes a parallel layout must divide (see ParallelLayout.validate)."""
    num_experts = getattr(hf_config, "num_local_experts", None) or getattr(hf_config, "num_experts", None)
    return dict(
        num_layers=hf_config.num_hidden_layers,
        num_experts=num_experts if hf_config.model_type in MOE_MODEL_TYPES else None,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        vocab_size=hf_config.vocab_size,
    )


@dataclass
class PolicyModel:
    """A megatron model as a list of virtual-pipeline chunks, with the bridge that maps it to HF."""

    chunks: list[torch.nn.Module]
    bridge: object
    hf_config: transformers.PretrainedConfig
    layout: ParallelLayout
    dtype: torch.dtype
    extra: dict = field(default_factory=dict)

    @property
    def config(self):
        return self.bridge.config

    @property
    def is_moe(self) -> bool:
        return self.hf_config.model_type in MOE_MODEL_TYPES

    def unwrapped(self) -> list[torch.nn.Module]:
        from mbridge.core.util import unwrap_model

        return [unwrap_model(c) for c in self.chunks]


def build_model(
    hf_config: transformers.PretrainedConfig,
    layout: ParallelLayout,
    dtype: torch.dtype = torch.float32,
    *,
    use_te: bool | None = None,
    wrap_ddp: bool = False,
    ddp_overrides: dict | None = None,
    freeze: list[str] | None = None,
    **config_overrides,
) -> PolicyModel:
    """Build this rank's model chunks (random init; load weights with hf_weights.load_hf_weights).

    Megatron's parallel state must already be initialised with `layout` (parallel.init_model_parallel).
    bf16/fp16 models are wrapped in megatron's Float16Module (needed on CPU too); `wrap_ddp` wraps each
    chunk in megatron's DistributedDataParallel, which its optimizer requires. `freeze` (train.freeze) marks
    parameters requires_grad=False before that wrapping, so DDP gives them no gradient buffer and no optimizer
    (plain or distributed) holds them.
    """
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.transformer.module import Float16Module

    bridge = make_bridge(hf_config, layout, dtype=dtype, use_te=use_te, **config_overrides)
    provider = bridge._model_provider([])
    vpp = layout.virtual_pipeline_parallel
    chunks = []
    for stage in range(vpp or 1):
        vp_stage = stage if vpp else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        chunk = provider(pre_process=pre, post_process=post, vp_stage=vp_stage)
        chunk.to(current_device())
        for param in chunk.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
        chunks.append(chunk)
    if dtype in (torch.bfloat16, torch.float16):
        chunks = [Float16Module(bridge.config, c) for c in chunks]
    if freeze:
        freeze_parameters(chunks, bridge, freeze)
    if wrap_ddp:
        chunks = wrap_with_ddp(chunks, bridge.config, ddp_overrides)
    return PolicyModel(chunks, bridge, hf_config, layout, dtype)


def wrap_with_ddp(chunks: list[torch.nn.Module], config, overrides: dict | None = None) -> list[torch.nn.Module]:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    kwargs = dict(grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False)
    kwargs.update(overrides or {})
    ddp_config = DistributedDataParallelConfig(**kwargs)
    return [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]


def freeze_parameters(chunks: list[torch.nn.Module], bridge, patterns: list[str]) -> int:
    """Set requires_grad=False on parameters whose global megatron name matches one of the fnmatch `patterns`;
    returns how many this rank froze.

    Global names are mbridge's, the same on every backend and layout: layers and experts numbered as in the whole
    model, Transformer Engine's fused names (the input layernorm is `self_attention.linear_qkv.layer_norm_weight`,
    expert e's first linear `mlp.experts.linear_fc1.weight<e>`).

    Every rank takes part (a pattern may match on another pipeline stage only). ConfigError, naming the model's
    parameters, for a pattern that matches nothing anywhere, a set that leaves nothing to train, or a parameter
    frozen in some layers or experts only: megatron's checkpoint stacks each parameter's optimizer state over
    layers and experts and refuses a stack with holes (dist_checkpointing "Invalid access pattern").
    """
    from fnmatch import fnmatchcase

    from mbridge.core.util import unwrap_model

    states: dict[str, set[bool]] = {}
    matched, frozen = set(), 0
    for chunk in chunks:
        module = unwrap_model(chunk)
        global_names = bridge._weight_name_mapping_mcore_local_to_global(module)
        for local, param in module.named_parameters():
            name = global_names.get(local, local)
            hits = {p for p in patterns if fnmatchcase(name, p)}
            matched |= hits
            if hits:
                param.requires_grad_(False)
                frozen += 1
            states.setdefault(_stacked_name(name), set()).add(param.requires_grad)
    _check_freeze(patterns, *_across_ranks(states, matched))
    return frozen


def _stacked_name(name: str) -> str:
    """The name with layer and expert numbers as `*`: one entry per stacked checkpoint tensor."""
    import re

    return re.sub(r"weight\d+$", "weight*", re.sub(r"\.layers\.\d+\.", ".layers.*.", name))


def _across_ranks(states: dict[str, set[bool]], matched: set[str]) -> tuple[dict[str, set[bool]], set[str]]:
    """The union of `states` and of the matched patterns over all ranks (gloo control group)."""
    import torch.distributed as dist

    if not multi_rank():
        return states, matched
    from grpo_megatron.parallel import control_group

    entries: list = [None] * dist.get_world_size()
    dist.all_gather_object(entries, (states, matched), group=control_group())
    union: dict[str, set[bool]] = {}
    for rank_states, _ in entries:
        for name, values in rank_states.items():
            union.setdefault(name, set()).update(values)
    return union, set().union(*(e[1] for e in entries))


def _check_freeze(patterns: list[str], states: dict[str, set[bool]], matched: set[str]) -> None:
    from grpo_megatron.errors import ConfigError

    unmatched = [p for p in patterns if p not in matched]
    if unmatched:
        raise ConfigError(f"train.freeze: {', '.join(map(repr, unmatched))} match no parameter; the model's "
                          f"parameters (fnmatch over these global megatron names): {', '.join(sorted(states))}")
    if not any(True in values for values in states.values()):
        raise ConfigError(f"train.freeze {patterns} freezes every parameter: leave something to train")
    mixed = sorted(name for name, values in states.items() if len(values) > 1)
    if mixed:
        raise ConfigError(f"train.freeze freezes {', '.join(mixed)} in some layers or experts only; megatron's "
                          f"optimizer checkpoint stacks a parameter over all of them: freeze it in all or none")
