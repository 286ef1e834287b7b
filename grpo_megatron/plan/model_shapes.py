"""A model's shapes from its Hugging Face `config.json` alone (no weights, no tokenizer), and hand counts from them.

The dry run needs the model's sizes in the parent process before any simulation: which ranks hold different
things, the rollout engine's weights and KV cache, the routes and the weight-sync payload. The trainer's own
per-rank parameter counts come from megatron's buffers in the simulation; the hand count here is what those
are checked against.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SHIPPED_CONFIGS = Path(__file__).with_name("hf_configs")
"""HF `config.json` files of the models the shipped Slurm configs name (shapes only), by checkpoint name."""

_QK_NORM_TYPES = ("qwen3", "qwen3_moe")
_QKV_BIAS_TYPES = ("qwen2",)


class ModelConfigError(ValueError):
    """No usable model config; the message names the fix."""


@dataclass(frozen=True)
class ModelShapes:
    name: str
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int  # dense MLP width
    moe_ffn: int  # one expert's width (0: dense model)
    experts: int  # 0: dense model
    topk: int
    vocab: int
    tied_embeddings: bool
    moe_layer_flags: tuple[bool, ...]
    source: str  # where the config came from, for the report

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layer_flags)

    def attention_params(self, tp: int) -> int:
        """One layer's attention (and its norms) on one TP rank of megatron's layout."""
        qkv_out = (self.heads + 2 * self.kv_heads) * self.head_dim
        count = self.hidden * qkv_out // tp + self.heads * self.head_dim * self.hidden // tp
        if self.model_type in _QKV_BIAS_TYPES:
            count += qkv_out // tp
        if self.model_type in _QK_NORM_TYPES:
            count += 2 * self.head_dim
        return count + 2 * self.hidden  # input and pre-MLP layernorms (replicated)

    def expert_params(self) -> int:
        """One expert (gate, up, down projections), unsharded."""
        return 3 * self.hidden * self.moe_ffn

    def total_params(self) -> int:
        """The whole model, unsharded (embedding and output once each unless tied)."""
        dense, expert = self.stage_params(tp=1, ep=1, etp=1, first=True, last=True, layers=self.layers)
        return dense + expert

    def stage_params(self, *, tp: int, ep: int, etp: int, first: bool, last: bool, layers: int,
                     first_layer: int = 0) -> tuple[int, int]:
        """(dense, expert) parameter counts of one rank holding `layers` layers from `first_layer`, at TP `tp`,
        EP `ep`, ETP `etp`; `first`/`last`: it holds the embedding / the final norm and output layer."""
        dense, expert = 0, 0
        for index in range(first_layer, first_layer + layers):
            dense += self.attention_params(tp)
            if self.moe_layer_flags[index]:
                dense += self.experts * self.hidden  # the router (replicated, trained as a dense parameter)
                expert += self.experts // ep * self.expert_params() // etp
            else:
                dense += 3 * self.hidden * self.ffn // tp
        if first:
            dense += self.vocab * self.hidden // tp
        if last:
            dense += self.hidden  # final layernorm
            if not self.tied_embeddings or not first:
                dense += self.vocab * self.hidden // tp  # output layer (a tied copy on the last stage when PP > 1)
        return dense, expert

    def kv_bytes_per_token(self, tp: int, dtype_bytes: int = 2) -> int:
        """KV cache bytes per token on one rank of a `tp`-way rollout server (KV heads replicated below 1 per rank)."""
        heads_per_rank = max(1, self.kv_heads // tp)
        return self.layers * 2 * heads_per_rank * self.head_dim * dtype_bytes

    def serving_params_per_rank(self, tp: int) -> int:
        """Weights one rank of a `tp`-way SGLang server holds: attention, dense MLPs, experts (split by TP) and the
        vocabulary-parallel embedding and LM head, KV projections replicated when there are fewer KV heads than ranks."""
        kv_per_rank = max(1, self.kv_heads // tp)
        per_layer = self.hidden * (self.heads // tp + 2 * kv_per_rank) * self.head_dim \
            + self.heads // tp * self.head_dim * self.hidden + 2 * self.hidden
        total = 0
        for moe in self.moe_layer_flags:
            total += per_layer + (self.experts * self.hidden + self.experts * self.expert_params() // tp if moe
                                  else 3 * self.hidden * self.ffn // tp)
        lm_head = 0 if self.tied_embeddings else self.vocab * self.hidden // tp
        return total + self.vocab * self.hidden // tp + lm_head + self.hidden


def load_shapes(hf_path: str, explicit: str | None = None) -> ModelShapes:
    """Shapes from `explicit` (a config.json or a directory with one), else `hf_path`/config.json, else the shipped
    config of the checkpoint named like `hf_path`'s last component (configs name placeholders such as
    /path/to/Qwen3-30B-A3B)."""
    candidates = [Path(explicit)] if explicit else [Path(hf_path), SHIPPED_CONFIGS / f"{Path(hf_path).name}.json"]
    for candidate in candidates:
        path = candidate / "config.json" if candidate.is_dir() else candidate
        if path.is_file():
            return shapes_from_dict(json.loads(path.read_text()), name=Path(hf_path).name or path.stem,
                                    source=str(path))
    if explicit:
        raise ModelConfigError(f"--model-config {explicit}: no config.json there")
    shipped = ", ".join(sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.json")))
    raise ModelConfigError(f"model.hf_path={hf_path} has no config.json and no shipped shapes are named "
                           f"{Path(hf_path).name!r} ({shipped}); pass --model-config path/to/config.json")


def shapes_from_dict(config: dict, name: str = "model", source: str = "") -> ModelShapes:
    """ModelShapes of a parsed HF config (the architectures the trainer builds: llama, qwen2/3, qwen3_moe, mixtral)."""
    model_type = config.get("model_type", "")
    hidden, layers, heads = config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]
    experts = config.get("num_experts") or config.get("num_local_experts") or 0
    if model_type == "mixtral":
        moe_ffn, ffn = config["intermediate_size"], 0
    else:
        moe_ffn, ffn = config.get("moe_intermediate_size") or 0, config.get("intermediate_size") or 0
    step = config.get("decoder_sparse_step") or 1
    dense_only = set(config.get("mlp_only_layers") or [])
    flags = tuple(bool(experts) and i not in dense_only and (i + 1) % step == 0 for i in range(layers))
    return ModelShapes(
        name=name, model_type=model_type, hidden=hidden, layers=layers, heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads, head_dim=config.get("head_dim") or hidden // heads,
        ffn=ffn, moe_ffn=moe_ffn if experts else 0, experts=experts, topk=config.get("num_experts_per_tok") or 0,
        vocab=config["vocab_size"], tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        moe_layer_flags=flags, source=source)
