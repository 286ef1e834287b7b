"""Per-sample sampling seeds: every sample of a group gets its own, fixed by (draw seed, prompt, sample).

Why: a server that seeds its sampler (SGLang with --enable-deterministic-inference draws Gumbel noise from a hash
of (seed, position, token id) alone) gives every sample that shares a seed the same response, so a group sent as
one request with n copies and one seed is G copies of one answer. One seed per sample, derived from the draw's
seed, also makes a resumed run redraw exactly the same samples.
"""
from __future__ import annotations

import hashlib
import secrets

SEED_LIMIT = 2**31  # seeds stay in [0, 2**31): a non-negative int32/int64 on every server


def group_seed_base(draw_seed: int | None, prompt_index: int, group_size: int) -> int:
    """The first of `group_size` consecutive seeds of one prompt's group (hashed, so groups never share a range
    in a pattern); a fresh random one when the draw has no seed."""
    if group_size >= SEED_LIMIT // 2:
        raise ValueError(f"group size {group_size} is too large for per-sample seeds (< {SEED_LIMIT // 2})")
    span = SEED_LIMIT - group_size
    if draw_seed is None:
        return secrets.randbelow(span)
    digest = hashlib.blake2b(f"{draw_seed}/{prompt_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % span


def sample_seeds(draw_seed: int | None, prompt_index: int, group_size: int) -> list[int]:
    """One distinct seed per sample of the group of prompt `prompt_index` in a draw."""
    base = group_seed_base(draw_seed, prompt_index, group_size)
    return [base + j for j in range(group_size)]
