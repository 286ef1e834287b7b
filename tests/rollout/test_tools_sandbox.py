"""The built-in tools and the formats: the sandbox's limits, the calculator's refusals, Hermes JSON calls."""
from __future__ import annotations

import time

import pytest

from grpo_megatron.config import ConfigError, load_config
from grpo_megatron.rollout.tools.builtin import calculator, python
from grpo_megatron.rollout.tools.formats import ToolFormat
from grpo_megatron.rollout.tools.sandbox import run_python


def test_sandbox_returns_printed_output():
    result = run_python("print(sum(range(10)))")
    assert result.ok and result.output == "45\n"


@pytest.mark.parametrize("code, error, message", [
    ("while True: pass", "timed out after 1.0 s", ""),
    ("x = bytearray(1 << 30)", "exit status 1", "MemoryError"),
    ("import socket; socket.socket()", "exit status 1", "socket.__new__ is not allowed"),
    ("import urllib.request; urllib.request.urlopen('http://127.0.0.1:9')", "exit status 1", "not allowed"),
    ("import subprocess; subprocess.run(['true'])", "exit status 1", "subprocess.Popen is not allowed"),
    ("import os; os.fork()", "exit status 1", "os.fork is not allowed"),
    ("open('big', 'w').write('x' * (2 << 20))", "exit status 1", "File too large"),
    ("raise SystemExit(3)", "exit status 3", ""),
    ("import resource; resource.setrlimit(resource.RLIMIT_CPU, (100, 100))", "exit status 1", "not allowed"),
])
def test_sandbox_limits(code, error, message):
    timeout = 1.0 if "timed out" in error else 20.0  # generous where the limit is not the clock (loaded CI)
    start = time.monotonic()
    result = run_python(code, timeout_s=timeout, memory_mb=128)
    assert time.monotonic() - start < timeout + 4
    assert not result.ok and result.error == error and message in result.output


def test_sandbox_does_not_see_the_parent_environment(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "x")
    assert run_python("import os; print(sorted(os.environ))").output.strip() in ("[]", "['LC_CTYPE']")


def test_python_tool_raises_with_the_reason():
    assert python("print(6 * 7)") == "42\n"
    with pytest.raises(ValueError, match="ZeroDivisionError"):
        python("1 / 0")


@pytest.mark.parametrize("expression, value", [("12*(3+4)", "84"), ("7/2", "3.5"), ("2**10", "1024"),
                                               ("-3 + 10 // 4", "-1"), ("123456789 * 987654321", "121932631112635269")])
def test_calculator(expression, value):
    assert calculator(expression) == value


@pytest.mark.parametrize("expression", ["__import__('os')", "x + 1", "9 ** 9999", "1 / 0", "10 ** 64 * 10 ** 64",
                                        "[1, 2]", "1 +"])
def test_calculator_refuses(expression):
    with pytest.raises((ValueError, ZeroDivisionError)):
        calculator(expression)


class CharTokenizer:
    """One token per character, plus the markers of Qwen's chat template as single tokens (ids 1000+)."""

    unk_token_id = 0
    specials = ["</tool_call>", "<|im_end|>", "<|im_start|>"]

    def __call__(self, text, add_special_tokens=False):
        ids, i = [], 0
        while i < len(text):
            special = next((s for s in self.specials if text.startswith(s, i)), None)
            ids.append(1000 + self.specials.index(special) if special else ord(text[i]))
            i += len(special) if special else 1
        return type("Encoding", (), {"input_ids": ids})

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.specials[i - 1000] if i >= 1000 else chr(i) for i in ids)


@pytest.mark.parametrize("body, name, arguments, error", [
    ('{"name": "calculator", "arguments": {"expression": "2+3"}}', "calculator", {"expression": "2+3"}, None),
    ('{"name": "python", "arguments": "{\\"code\\": \\"print(1)\\"}"}', "python", {"code": "print(1)"}, None),
    ('{"name": "calculator", "arguments": [1]}', "calculator", None, "arguments must be a JSON object"),
    ('{"arguments": {}}', None, None, "must be {"),
    ("calculator(2+3)", None, None, "not JSON"),
])
def test_hermes_calls_are_parsed_from_the_turn(body, name, arguments, error):
    tok = CharTokenizer()
    fmt = ToolFormat("hermes", tok)
    call = fmt.parse(tok(f"Let me compute.\n<tool_call>\n{body}\n</tool_call>").input_ids)
    assert (call.name, call.arguments) == (name, arguments)
    assert (call.error is None) if error is None else error in call.error
    assert fmt.parse(tok("no call here<|im_end|>").input_ids) is None


def test_hermes_output_is_rendered_as_qwens_tool_turn():
    tok = CharTokenizer()
    tokens = ToolFormat("hermes", tok).render("5", max_output_tokens=64)
    assert tok.decode(tokens) == ("<|im_end|>\n<|im_start|>user\n<tool_response>\n5\n</tool_response><|im_end|>\n"
                                  "<|im_start|>assistant\n")


def test_a_multi_token_end_marker_is_refused():
    with pytest.raises(ValueError, match="must be one token"):
        ToolFormat("hermes", CharTokenizer(), call_end="</end>")


@pytest.mark.parametrize("tools, match", [
    ({"format": "xml"}, "rollout.tools.format='xml'"), ({"names": ["nope"]}, "unknown tool 'nope'"),
    ({"max_turns": 0}, "max_turns=0"), ({"names": ["no_such_module:f"]}, "cannot be imported"),
])
def test_tools_config_errors_name_the_key(tmp_path, tools, match):
    base = {"model": {"hf_path": "x"}, "data": {"train_files": ["x"]}, "reward": {"functions": [{"name": "copy"}]},
            "rollout": {"function": "tool_loop", "tools": tools}}
    with pytest.raises(ConfigError, match=match):
        load_config(None, base)


def test_rollout_function_must_be_importable():
    base = {"model": {"hf_path": "x"}, "data": {"train_files": ["x"]}, "reward": {"functions": [{"name": "copy"}]},
            "rollout": {"function": "nowhere"}}
    with pytest.raises(ConfigError, match="rollout.function='nowhere'"):
        load_config(None, base)
