"""Tokenizer loading that respects the checkpoint's own tokenizer.json."""
from __future__ import annotations

from pathlib import Path

import transformers


def load_tokenizer(path: str | Path) -> transformers.PreTrainedTokenizerBase:
    """Load the tokenizer saved with an HF checkpoint.

    transformers 5 picks a tokenizer class from the *model* type (e.g. Qwen2Tokenizer for qwen2) and then
    re-derives its pre-tokenizer, which changes how a locally built tokenizer splits text. When the
    checkpoint ships a tokenizer.json we load exactly that; otherwise we fall back to AutoTokenizer.
    """
    path = Path(path)
    if (path / "tokenizer.json").exists():
        return transformers.PreTrainedTokenizerFast.from_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path)
