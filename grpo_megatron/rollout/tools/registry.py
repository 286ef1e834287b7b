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

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from grpo_megatron.registry import Registry, UnknownNameError, import_object, is_import_path
from grpo_megatron.rollout.tools.builtin import builtin_tools
from grpo_megatron.rollout.tools.formats import ToolCall
from grpo_megatron.rollout.tools.tool import Tool, make_tool

__all__ = ["Tool", "ToolResult", "ToolRunner", "make_tool", "register_tool", "resolve_tools"]


@dataclass
class ToolResult:
    output: str  # what is inserted for the model: the tool's output, or "error: ..." when it failed
    error: str | None = None


TOOLS: Registry = Registry("tool")
"""Users' tools added with @register_tool; the built-ins are made per run (their limits come from the config)."""


def register_tool(name: str) -> Callable[[Callable[..., str]], Callable[..., str]]:
    """Decorator adding `fn(**arguments) -> str` to the tools `rollout.tools.names` can list."""
    def add(fn: Callable[..., str]) -> Callable[..., str]:
        if name in TOOLS:
            raise ValueError(f"tool {name!r} is already registered; pick another name")
        TOOLS.add(name, make_tool(name, fn))
        return fn
    return add


def resolve_tools(names: list[str], timeout_s: float, memory_mb: int) -> dict[str, Tool]:
    """Name -> Tool for `rollout.tools.names`: built-ins, registered tools, or "package.module:function"."""
    builtins = builtin_tools(timeout_s, memory_mb)
    tools = {}
    for spec in names:
        if spec in builtins:
            tool = builtins[spec]
        elif spec in TOOLS:
            tool = TOOLS.get(spec)
        elif is_import_path(spec):
            try:
                tool = make_tool(spec.partition(":")[2], import_object(spec, "tool"))
            except UnknownNameError as err:
                raise UnknownNameError(f"rollout.tools.names: {err}") from None
        else:
            known = sorted(set(builtins) | set(TOOLS.names()))
            raise UnknownNameError(f"rollout.tools.names: unknown tool {spec!r}; known: {', '.join(known)}, or give "
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
