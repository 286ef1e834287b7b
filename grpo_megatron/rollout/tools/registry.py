"""Tools by name, and running a round of calls so that no tool can hurt the run.

A tool is `fn(**arguments) -> str`. Built-ins are `calculator` and `python` (grpo_megatron.rollout.tools.builtin);
users add theirs with `@register_tool("name")` or name them as "package.module:function" in
`rollout.tools.names`. A call in the `words` format passes its one string as the tool's first parameter.

Every call runs in a daemon thread with a deadline: a tool that raises, hangs past `timeout_s`, returns
something other than a string, or is called with bad arguments yields an error message instead of output
(inserted for the model to see, counted in the sample's meta), never an exception in the trainer. A hung
user tool keeps its daemon thread until it returns; the python tool's child process is killed.
"""
from __future__ import annotations

import importlib
import inspect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from grpo_megatron.rollout.tools.formats import ToolCall


@dataclass
class Tool:
    name: str
    fn: Callable[..., str]
    main_arg: str  # the parameter a single-string (words format) call fills


@dataclass
class ToolResult:
    output: str  # what is inserted for the model: the tool's output, or "error: ..." when it failed
    error: str | None = None


_REGISTRY: dict[str, Tool] = {}


def make_tool(name: str, fn: Callable[..., str]) -> Tool:
    params = [p.name for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not params:
        raise ValueError(f"tool {name!r} takes no named parameter; a tool is fn(**arguments) -> str")
    return Tool(name, fn, params[0])


def register_tool(name: str) -> Callable[[Callable[..., str]], Callable[..., str]]:
    """Decorator adding `fn(**arguments) -> str` to the tools `rollout.tools.names` can list."""
    def add(fn: Callable[..., str]) -> Callable[..., str]:
        if name in _REGISTRY:
            raise ValueError(f"tool {name!r} is already registered; pick another name")
        _REGISTRY[name] = make_tool(name, fn)
        return fn
    return add


def resolve_tools(names: list[str], timeout_s: float, memory_mb: int) -> dict[str, Tool]:
    """Name -> Tool for `rollout.tools.names`: built-ins, registered tools, or "package.module:function"."""
    from grpo_megatron.rollout.tools.builtin import builtin_tools

    builtins = builtin_tools(timeout_s, memory_mb)
    tools = {}
    for spec in names:
        if spec in builtins:
            tool = builtins[spec]
        elif spec in _REGISTRY:
            tool = _REGISTRY[spec]
        elif ":" in spec:
            module_name, _, attr = spec.partition(":")
            try:
                tool = make_tool(attr, getattr(importlib.import_module(module_name), attr))
            except (ImportError, AttributeError) as exc:
                raise ValueError(f"rollout.tools.names: {spec!r} cannot be imported ({exc}); give "
                                 "'package.module:function' importable from the run's environment") from exc
        else:
            known = sorted(set(builtins) | set(_REGISTRY))
            raise ValueError(f"rollout.tools.names: unknown tool {spec!r}; known: {', '.join(known)}, or give "
                             "'package.module:function'")
        tools[tool.name] = tool
    return tools


class ToolRunner:
    """Runs a round of parsed calls concurrently, each to a deadline, and turns every failure into a result."""

    def __init__(self, tools: dict[str, Tool], timeout_s: float, max_output_chars: int = 4096):
        self.tools, self.timeout_s, self.max_output_chars = tools, timeout_s, max_output_chars

    def run(self, calls: list[ToolCall]) -> list[ToolResult]:
        boxes: list[list] = [[] for _ in calls]
        threads = []
        for call, box in zip(calls, boxes):
            if call.error is not None or call.name not in self.tools:
                box.append(ToolResult("", call.error or f"unknown tool {call.name!r}; tools: {', '.join(self.tools)}"))
                continue
            thread = threading.Thread(target=self._call, args=(call, box), daemon=True, name=f"tool-{call.name}")
            thread.start()
            threads.append((thread, box))
        deadline = time.monotonic() + self.timeout_s
        for thread, box in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if not box:
                box.append(ToolResult("", f"timed out after {self.timeout_s:.1f} s"))
        return [self._finish(box[0]) for box in boxes]

    def _call(self, call: ToolCall, box: list) -> None:
        tool = self.tools[call.name]
        arguments = call.arguments if call.arguments is not None else {tool.main_arg: call.text or ""}
        try:
            output = tool.fn(**arguments)
        except Exception as exc:  # a tool may raise anything; it costs the sample, not the run
            box.append(ToolResult("", f"{type(exc).__name__}: {exc}"))
            return
        if not isinstance(output, str):
            box.append(ToolResult("", f"tool {call.name!r} returned {type(output).__name__}, not str"))
            return
        box.append(ToolResult(output))

    def _finish(self, result: ToolResult) -> ToolResult:
        if result.error is not None:
            return ToolResult(f"error: {result.error}"[:self.max_output_chars], result.error)
        return ToolResult(result.output[:self.max_output_chars])
