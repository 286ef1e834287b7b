"""The built-in tools: an arithmetic calculator and a sandboxed Python interpreter.

`calculator(expression)` evaluates + - * / // % ** and parentheses over numbers by walking the AST (no eval,
no names, exponents and result sizes capped), so it is exact, instant and safe in-process.
`python(code)` runs the code in grpo_megatron.rollout.tools.sandbox (a child process with CPU-time,
memory, file-size and no-network limits) and returns what it printed.
"""
from __future__ import annotations

import ast
import functools
import math
import operator

from grpo_megatron.rollout.tools.tool import Tool, make_tool
from grpo_megatron.rollout.tools.sandbox import run_python

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_EXPONENT = 64
_MAX_DIGITS = 100


def calculator(expression: str) -> str:
    """The value of an arithmetic expression, e.g. "12*(3+4)" -> "84"; ValueError for anything else."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression[:80]!r}") from None
    value = _evaluate(tree.body)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("the result is not finite")
        return str(int(value)) if value.is_integer() else f"{value:.6g}"
    return str(value)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise ValueError(f"exponent {right} is above {_MAX_EXPONENT}")
        value = _BINARY[type(node.op)](left, right)  # ZeroDivisionError propagates as the tool's error
        if isinstance(value, int) and len(str(abs(value))) > _MAX_DIGITS:
            raise ValueError(f"the result has more than {_MAX_DIGITS} digits")
        return value
    raise ValueError(f"only numbers and + - * / // % ** are allowed, not {type(node).__name__}")


def python(code: str, *, timeout_s: float = 5.0, memory_mb: int = 256) -> str:
    """Run `code` in the sandbox; its printed output, or ValueError with the reason it failed."""
    result = run_python(code, timeout_s=timeout_s, memory_mb=memory_mb)
    if not result.ok:
        raise ValueError(f"{result.error}: {result.output.strip()[-200:]}" if result.output.strip() else result.error)
    return result.output


def builtin_tools(timeout_s: float, memory_mb: int) -> dict[str, Tool]:
    """The built-ins with the sandbox limits of `rollout.tools` (the python child gets a little less time than
    the call's deadline, so that it is killed and reported rather than abandoned)."""
    sandboxed = functools.partial(python, timeout_s=max(0.1, timeout_s * 0.9), memory_mb=memory_mb)
    return {"calculator": make_tool("calculator", calculator), "python": make_tool("python", sandboxed)}
