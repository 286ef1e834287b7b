"""Start-up checks of `rollout.tools`, so that a bad tool setting fails before any rollout (one line each)."""
from __future__ import annotations

from grpo_megatron.rollout.tools.formats import FORMATS
from grpo_megatron.rollout.tools.registry import resolve_tools


def check_tools_config(cfg) -> None:
    """ValueError naming the key and the fix; resolves every tool name (imports user tools)."""
    key = "rollout.tools"
    if cfg.format not in FORMATS:
        raise ValueError(f"{key}.format={cfg.format!r}: use one of {', '.join(FORMATS)}")
    if not cfg.names:
        raise ValueError(f"{key}.names is empty: list at least one tool (calculator, python, "
                         "package.module:function)")
    if cfg.max_turns < 1:
        raise ValueError(f"{key}.max_turns={cfg.max_turns}: must be >= 1 (1 = no tool call is ever executed)")
    if cfg.max_tokens_per_turn is not None and cfg.max_tokens_per_turn < 1:
        raise ValueError(f"{key}.max_tokens_per_turn={cfg.max_tokens_per_turn}: must be >= 1, or null for the "
                         "rest of the budget")
    if cfg.timeout_s <= 0 or cfg.memory_mb < 32 or cfg.max_output_tokens < 1:
        raise ValueError(f"{key}: need timeout_s > 0, memory_mb >= 32 and max_output_tokens >= 1, got "
                         f"{cfg.timeout_s}, {cfg.memory_mb}, {cfg.max_output_tokens}")
    if len(cfg.call_markers) != 2 or not all(cfg.call_markers):
        raise ValueError(f"{key}.call_markers={cfg.call_markers!r}: give [start, end], e.g. [<tool_call>, </tool_call>]")
    resolve_tools(cfg.names, cfg.timeout_s, cfg.memory_mb)
