"""Synthetic tasks: files, tokenisation with the tiny vocabulary, and rewards that separate good from bad."""
from __future__ import annotations

import json

import pytest

from grpo_megatron.models.tiny import build_tiny_tokenizer
from grpo_megatron.rollout.data.prompts import PromptDataset
from grpo_megatron.rollout.rewards.functions import compute_rewards, get_reward_fn
from grpo_megatron.rollout.data.tasks import TASKS, make_task_dataset


@pytest.mark.parametrize("task", TASKS)
def test_task_files_tokenise_without_unk_and_are_reproducible(tmp_path, task):
    tokenizer = build_tiny_tokenizer()
    path = make_task_dataset(task, 200, seed=3, path=tmp_path / f"{task}.jsonl")
    assert path.read_text() == make_task_dataset(task, 200, seed=3, path=tmp_path / "again.jsonl").read_text()
    data = PromptDataset(path, tokenizer, apply_chat_template=False, max_prompt_tokens=16)
    assert len(data) == 200
    for item in data:
        assert tokenizer.unk_token_id not in item["prompt_ids"]
        assert tokenizer.unk_token_id not in tokenizer(item["answer"], add_special_tokens=False).input_ids
        assert item["meta"] == {"task": task}
    assert len({tuple(item["prompt_ids"]) for item in data}) > 50  # varied prompts


def test_first_digit_answer_and_reward(tmp_path):
    records = [json.loads(line) for line in make_task_dataset("first_digit", 50, 0, tmp_path / "f.jsonl").open()]
    for r in records:
        words = r["prompt"].split()
        assert words[0] == "first" and words[-1] == "=" and r["answer"] == words[1]
    fn = get_reward_fn("first_digit")
    assert fn("7 3", "7", {}) == 1.0
    assert fn("7 <eos>", "7", {}) == 1.0
    assert fn("3 7", "7", {}) == 0.0
    assert fn("", "7", {}) == 0.0


def test_copy_answer_and_partial_credit(tmp_path):
    records = [json.loads(line) for line in make_task_dataset("copy", 50, 0, tmp_path / "c.jsonl").open()]
    for r in records:
        words = r["prompt"].split()
        assert words[0] == "copy" and words[-1] == "=" and r["answer"] == " ".join(words[1:-1])
    rewards = compute_rewards(
        ["a c b <eos>", "a c", "a x b", "a c b a c b", "<eos>"], ["a c b"] * 5, [{}] * 5, [("copy", 1.0)]
    ).total
    assert rewards == pytest.approx([1.0, 2 / 3, 2 / 3, 0.5, 0.0])


def test_unknown_task_lists_known_ones(tmp_path):
    with pytest.raises(ValueError, match="known tasks: first_digit, copy"):
        make_task_dataset("sort", 3, 0, tmp_path / "x.jsonl")
