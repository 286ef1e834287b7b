"""Synthetic tasks for the CPU example: learnable by GRPO from a random-init 2-layer tiny model in a few dozen steps.

Every prompt uses only tokens of the tiny 64-token vocabulary (one symbol per token), so the model sees
the task exactly; each task's reward is registered under the task's name.

first_digit  "first 7 3 9 =" -> "7" (always 3 digits). Reward 1 when the first response token is the answer.
    A random policy already scores about 1/64 and the reward separates the samples of a group from step
    one, so GRPO has a signal immediately: first it learns "emit a digit" (1/10), then "copy the token 3
    positions back", a fixed relative offset that one rotary attention head expresses.
copy  "copy a c b =" -> "a c b" (always 3 of the letters a-f). Reward is the fraction of positions
    right, over max(answer length, response length), so partial copies earn partial credit (a dense signal
    a random policy reaches at ~1/64 per position) and rambling past the answer without <eos> costs reward:
    the policy learns both to copy (attend a fixed 4 positions back) and to stop. Generate with
    max_new_tokens above the answer length (e.g. 6) so that not stopping is visible to the reward.
"""
from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from pathlib import Path

from grpo_megatron.rollout.rewards.functions import register_reward

# Fixed lengths keep the token to copy at a fixed distance from the current position, which rotary
# attention expresses directly; variable lengths would ask a 2-layer model for position counting.
_FIRST_DIGIT_COUNT = 3
_COPY_LETTERS = string.ascii_lowercase[:6]
_COPY_LENGTH = 3
_SPECIAL = {"<pad>", "<bos>", "<eos>", "<unk>"}


def _first_digit_example(rng: random.Random) -> tuple[str, str]:
    digits = [rng.choice(string.digits) for _ in range(_FIRST_DIGIT_COUNT)]
    return f"first {' '.join(digits)} =", digits[0]


def _copy_example(rng: random.Random) -> tuple[str, str]:
    letters = " ".join(rng.choice(_COPY_LETTERS) for _ in range(_COPY_LENGTH))
    return f"copy {letters} =", letters


_EXAMPLES: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "first_digit": _first_digit_example,
    "copy": _copy_example,
}
TASKS = tuple(_EXAMPLES)


def make_task_dataset(task: str, n: int, seed: int, path: str | Path) -> Path:
    """Write n records {"prompt", "answer", "task"} of `task` to the JSONL file `path`; same seed, same file."""
    if task not in _EXAMPLES:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for _ in range(n):
            prompt, answer = _EXAMPLES[task](rng)
            out.write(json.dumps({"prompt": prompt, "answer": answer, "task": task}) + "\n")
    return path


def _words(text: str) -> list[str]:
    """The response's tokens (the tiny vocabulary is whitespace-split), special tokens left out."""
    return [w for w in text.split() if w not in _SPECIAL]


@register_reward("first_digit")
def first_digit_reward(response_text: str, answer: str | None, meta: dict) -> float:
    words = _words(response_text)
    return float(bool(words) and words[0] == answer)


@register_reward("copy")
def copy_reward(response_text: str, answer: str | None, meta: dict) -> float:
    predicted, wanted = _words(response_text), (answer or "").split()
    if not wanted:
        raise ValueError("copy reward needs the letters to copy as `answer`")
    correct = sum(p == w for p, w in zip(predicted, wanted))
    return correct / max(len(wanted), len(predicted))
