"""The tool-use example's task: 3-digit + 3-digit sums, hard for a tiny model to compute and easy to copy.

    prompt  "add 5 4 7 + 6 2 9 ="          (both numbers in 500..999, so every sum has 4 digits)
    reply   "<tool_call> calculator 5 4 7 + 6 2 9 </tool_call>"      sampled by the policy
            "<tool_response> 1 1 7 6 </tool_response>"              inserted by the tool loop (loss mask 0)
            "answer 1 1 7 6 <eos>"                                    sampled by the policy

With the calculator the task is two copies at fixed offsets (the operands into the call, the result into the
answer), which rotary attention expresses directly; without it the model would have to learn carrying.
The reward is 1 when the digits after the response's last `answer` word are exactly the sum, else 0 (no
partial credit, which a direct guess would collect on the easy digits and so learn to skip the tool).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from grpo_megatron.rollout.tools.builtin import calculator


def spaced(text: str) -> str:
    return " ".join(text)


def make_dataset(n: int, seed: int, path: Path) -> Path:
    """n records {"prompt", "answer", "a", "b"}; same seed, same file."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for _ in range(n):
            a, b = rng.randint(500, 999), rng.randint(500, 999)
            record = {"prompt": f"add {spaced(str(a))} + {spaced(str(b))} =", "answer": str(a + b), "a": a, "b": b}
            out.write(json.dumps(record) + "\n")
    return path


def transcript(a: int, b: int) -> tuple[str, str, str]:
    """The three parts of a correct reply: the call, the tool's output (as the calculator gives it), the answer."""
    result = calculator(f"{a}+{b}")
    call = f"<tool_call> calculator {spaced(str(a))} + {spaced(str(b))} </tool_call>"
    return call, result, f"answer {spaced(result)}"


def final_answer(response_text: str) -> str | None:
    """The digits after the last `answer` word, joined; None without one."""
    words = response_text.split()
    if "answer" not in words:
        return None
    tail = words[len(words) - 1 - words[::-1].index("answer") + 1:]
    digits = []
    for word in tail:
        if not word.isdigit():
            break
        digits.append(word)
    return "".join(digits)


def is_correct(response_text: str, answer: str | None) -> bool:
    return final_answer(response_text) == answer


def exact_reward(response_text: str, answer: str | None, meta: dict) -> float:
    return float(is_correct(response_text, answer))
