"""How a tool call looks in the policy's tokens, and how a tool's output goes back in as tokens.

Two formats; in both a model turn that ends with the call-end marker (which must be one token: generation
stops on it) is a tool call, whose body is the text between the last call-start marker and the end.

- `hermes` (Qwen2.5/Qwen3, Hermes): `<tool_call>{"name": "calculator", "arguments": {"expression": "2+3"}}</tool_call>`;
  the output is inserted as Qwen's chat template renders a tool turn:
  `<|im_end|>\\n<|im_start|>user\\n<tool_response>\\n{output}\\n</tool_response><|im_end|>\\n<|im_start|>assistant\\n`.
- `words` (the tiny word-level vocabulary, one symbol per token): `<tool_call> calculator 1 2 + 3 4 </tool_call>`,
  i.e. the tool's name as one word, then its single argument spelled one symbol per token (joined without
  spaces: "12+34"); the output goes back spelled the same way: `<tool_response> 4 6 </tool_response>`.

Only the tool's output is tokenised here (it is inserted text); the policy's own tokens are never re-tokenised.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

FORMATS = ("hermes", "words")
_DEFAULT_TEMPLATES = {
    "hermes": ("<|im_end|>\n<|im_start|>user\n<tool_response>\n{output}\n</tool_response><|im_end|>\n"
               "<|im_start|>assistant\n"),
    "words": "<tool_response> {output} </tool_response>",
}


@dataclass
class ToolCall:
    """A parsed call: `arguments` (hermes) or one string `text` (words); `error` when it cannot be parsed."""

    name: str | None = None
    arguments: dict | None = None
    text: str | None = None
    error: str | None = None


class ToolFormat:
    """Parses tool calls out of a turn's token ids and renders tool output as token ids."""

    def __init__(self, kind: str, tokenizer, call_start: str = "<tool_call>", call_end: str = "</tool_call>",
                 response_template: str = ""):
        if kind not in FORMATS:
            raise ValueError(f"rollout.tools.format={kind!r}: use one of {', '.join(FORMATS)}")
        template = response_template or _DEFAULT_TEMPLATES[kind]
        if template.count("{output}") != 1:
            raise ValueError(f"rollout.tools.response_template={template!r}: it must hold {{output}} exactly once")
        self.kind, self.tokenizer, self.call_start = kind, tokenizer, call_start
        self.end_id = _single_token(tokenizer, call_end)
        self._prefix, self._suffix = template.split("{output}")

    def parse(self, turn_ids: list[int]) -> ToolCall | None:
        """The call a turn ending in the end marker makes; None when the turn does not end in one."""
        if not turn_ids or turn_ids[-1] != self.end_id:
            return None
        text = self.tokenizer.decode(turn_ids[:-1], skip_special_tokens=False)
        if self.call_start not in text:
            return ToolCall(error=f"no {self.call_start} before the end of the call")
        body = text.rsplit(self.call_start, 1)[1].strip()
        return _parse_json(body) if self.kind == "hermes" else _parse_words(body)

    def render(self, output: str, max_output_tokens: int) -> list[int]:
        """Token ids to insert after a call: the template around the output, the output cut to its budget."""
        if self.kind == "words":
            output = " ".join(ch for ch in output if not ch.isspace())
        encode = lambda text: self.tokenizer(text, add_special_tokens=False).input_ids if text else []  # noqa: E731
        return encode(self._prefix) + encode(output)[:max_output_tokens] + encode(self._suffix)


def _single_token(tokenizer, marker: str) -> int:
    ids = tokenizer(marker, add_special_tokens=False).input_ids
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"the tool-call end marker {marker!r} is {len(ids)} token(s) {ids} in this tokenizer; "
                         "generation stops on it, so it must be one token: add it to the vocabulary or set "
                         "rollout.tools.call_markers")
    return ids[0]


def _parse_json(body: str) -> ToolCall:
    try:
        call = json.loads(body)
    except json.JSONDecodeError as err:
        return ToolCall(error=f"the tool call is not JSON ({err.msg})")
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return ToolCall(error='the tool call must be {"name": str, "arguments": {...}}')
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return ToolCall(name=call["name"], error="arguments is a string but not JSON")
    if not isinstance(arguments, dict):
        return ToolCall(name=call["name"], error="arguments must be a JSON object")
    return ToolCall(name=call["name"], arguments=arguments)


def _parse_words(body: str) -> ToolCall:
    words = body.split()
    if not words:
        return ToolCall(error="empty tool call: name the tool")
    return ToolCall(name=words[0], text="".join(words[1:]))
