"""What a tool is: a named `fn(**arguments) -> str` and the parameter a single-string call fills."""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Tool:
    name: str
    fn: Callable[..., str]
    main_arg: str  # the parameter a single-string (words format) call fills


def make_tool(name: str, fn: Callable[..., str]) -> Tool:
    params = [p.name for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not params:
        raise ValueError(f"tool {name!r} takes no named parameter; a tool is fn(**arguments) -> str")
    return Tool(name, fn, params[0])
