"""Tiny Hugging Face checkpoints made locally: the models of the CPU example and of the tests.

Nothing here touches a hub. The tokenizer is a word-level `tokenizers` model over digits, letters and a
few symbols, so that synthetic tasks tokenise one symbol per token; the model weights are random
(seeded) in the architecture of a real family, saved exactly as `save_pretrained` would for a real one.
"""
from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
_SYMBOLS = list("+-*/=?:,.()<>#")
_WORDS = ["user", "assistant", "answer", "copy", "add", "sum", "first", "last", "reverse", "max"]
# 64 tokens in all, so the vocabulary needs no padding.
TINY_VOCAB: list[str] = SPECIAL_TOKENS + list(string.digits) + list(string.ascii_lowercase) + _SYMBOLS + _WORDS
# Extra words of the tool-use example's own checkpoint (the `words` tool-call format, rollout/tools/formats.py).
TOOL_WORDS: list[str] = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "calculator", "python"]

# One symbol per token; a chat turn is "user : <content> assistant :"
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)

SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral")
MOE_FAMILIES = ("qwen3_moe", "mixtral")


def build_tiny_tokenizer(extra_words: Sequence[str] = ()) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over TINY_VOCAB (+ extra_words), whitespace pre-tokenised, with BOS prepended."""
    vocab = {tok: i for i, tok in enumerate(TINY_VOCAB + list(extra_words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def tiny_hf_config(family: str, vocab_size: int = 64, **overrides) -> transformers.PretrainedConfig:
    """A 2-layer config of `family` small enough that a CPU forward+backward takes milliseconds."""
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(SUPPORTED_FAMILIES)}")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "llama":
        cfg = transformers.LlamaConfig(**common, head_dim=16, rope_theta=10000.0)
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**common, rope_theta=10000.0)
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=16, rope_theta=10000.0)
    elif family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(
            **common, head_dim=16, rope_theta=10000.0, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        )
    else:  # mixtral
        cfg = transformers.MixtralConfig(
            **common, head_dim=16, rope_theta=10000.0, num_local_experts=4, num_experts_per_tok=2
        )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cfg.architectures = [_ARCHITECTURES[family]]
    return cfg


_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}


def make_tiny_hf_checkpoint(family: str, out_dir: str | Path, seed: int = 0, extra_words: Sequence[str] = (),
                            **overrides) -> Path:
    """Write a random-weight float32 HF checkpoint (config, safetensors, tokenizer) of `family` to out_dir;
    extra_words extend the vocabulary (its size rounded up to a multiple of 64)."""
    out_dir = Path(out_dir)
    tokenizer = build_tiny_tokenizer(extra_words)
    config = tiny_hf_config(family, vocab_size=_round_up(len(tokenizer), 64), **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple
