"""Prompt files: parsing, tokenisation, errors that point at the line, and loader resume equivalence."""
from __future__ import annotations

import json

import pytest

from grpo_megatron.models.tiny import build_tiny_tokenizer
from grpo_megatron.rollout.data.prompts import DatasetError, PromptDataset, PromptLoader


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def _write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_records_become_items_with_answer_and_meta(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "add 1 2 =", "answer": "3", "source": "synthetic"},
        {"prompt": "max 4 9 =", "ground_truth": "9"},
        {"prompt": "copy a ="},
    ])
    data = PromptDataset(path, tokenizer, apply_chat_template=False)
    assert len(data) == 3
    assert data[0] == {"prompt_ids": tokenizer("add 1 2 =").input_ids, "answer": "3", "index": 0,
                       "meta": {"source": "synthetic"}}
    assert data[0]["prompt_ids"][0] == tokenizer.bos_token_id
    assert data[1]["answer"] == "9" and data[2]["answer"] is None


def test_chat_template_for_prompts_and_messages(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "chat.jsonl", [
        {"prompt": "add 1 2 ="},
        {"messages": [{"role": "user", "content": "add 1 2 ="}], "answer": "3"},
    ])
    data = PromptDataset([path], tokenizer, apply_chat_template=True)
    expected = tokenizer("user : add 1 2 = assistant :", add_special_tokens=False).input_ids
    assert data[0]["prompt_ids"] == expected and data[1]["prompt_ids"] == expected
    assert tokenizer.unk_token_id not in expected


def test_several_files_are_indexed_in_order(tmp_path, tokenizer):
    first = _write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    second = _write_jsonl(tmp_path / "b.jsonl", [{"prompt": "c"}])
    data = PromptDataset([first, second], tokenizer, apply_chat_template=False)
    assert [item["index"] for item in data] == [0, 1, 2]
    assert tokenizer.decode(data[2]["prompt_ids"], skip_special_tokens=True) == "c"


@pytest.mark.parametrize("bad_line,expected", [
    ('{"prompt": "a b", ', "invalid JSON"),
    ('{"question": "a b"}', "no `prompt` or `messages`"),
    ('{"prompt": 7}', "`prompt` must be a non-empty string"),
    ('{"prompt": "a", "answer": 3}', "`answer` must be a string"),
    ('{"messages": [{"role": "user"}]}', "`messages` must be a non-empty list"),
    ('["a"]', "must be a JSON object"),
    ('{"prompt": "a b c d e f g h"}', "more than max_prompt_tokens=5"),
])
def test_malformed_line_names_file_and_line(tmp_path, tokenizer, bad_line, expected):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a"}, "", bad_line])
    with pytest.raises(DatasetError) as err:
        PromptDataset(path, tokenizer, apply_chat_template=False, max_prompt_tokens=5)
    assert f"{path}:3:" in str(err.value) and expected in str(err.value)


def test_messages_without_chat_template_and_missing_file(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "a"}]}])
    with pytest.raises(DatasetError, match=r"m\.jsonl:1: .*apply_chat_template=True"):
        PromptDataset(path, tokenizer, apply_chat_template=False)
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DatasetError, match=f"not found: {missing}"):
        PromptDataset(missing, tokenizer, apply_chat_template=False)


def test_parquet_records(tmp_path, tokenizer):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"prompt": "add 1 2 =", "answer": "3", "level": 1},
        {"prompt": None, "answer": "4", "level": 2},
    ]), path)
    with pytest.raises(DatasetError, match=r"p\.parquet:2: no `prompt`"):
        PromptDataset(path, tokenizer, apply_chat_template=False)
    pq.write_table(pa.Table.from_pylist([{"prompt": "add 1 2 =", "answer": "3", "level": 1}]), path)
    item = PromptDataset(path, tokenizer, apply_chat_template=False)[0]
    assert item["prompt_ids"] == tokenizer("add 1 2 =").input_ids
    assert item["answer"] == "3" and item["meta"] == {"level": 1}


def _dataset(tmp_path, tokenizer, n=7) -> PromptDataset:
    words = "abcdefghijklmnop"
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": words[i]} for i in range(n)])
    return PromptDataset(path, tokenizer, apply_chat_template=False)


def _indices(batch) -> list[int]:
    return [item["index"] for item in batch]


def test_loader_covers_each_epoch_and_reshuffles(tmp_path, tokenizer):
    loader = PromptLoader(_dataset(tmp_path, tokenizer), batch_size=7, seed=0)
    epoch0, epoch1 = _indices(loader.next_batch()), _indices(loader.next_batch())
    assert sorted(epoch0) == sorted(epoch1) == list(range(7))
    assert epoch0 != epoch1 and loader.epoch == 1
    assert _indices(PromptLoader(_dataset(tmp_path, tokenizer), 7, seed=0, shuffle=False).next_batch()) == list(range(7))


def test_resumed_loader_continues_with_the_next_prompt(tmp_path, tokenizer):
    data = _dataset(tmp_path, tokenizer)
    uninterrupted = PromptLoader(data, batch_size=3, seed=4)
    stream = iter(uninterrupted)
    expected = [_indices(next(stream)) for _ in range(9)]  # crosses several epochs (7 prompts, batches of 3)

    first = PromptLoader(data, batch_size=3, seed=4)
    got = [_indices(first.next_batch()) for _ in range(4)]
    state = json.loads(json.dumps(first.state_dict()))  # as it would be checkpointed
    resumed = PromptLoader(data, batch_size=3, seed=999)  # the saved seed must win
    resumed.load_state_dict(state)
    got += [_indices(batch) for batch, _ in zip(resumed, range(5))]
    assert got == expected
    assert state["epoch"] == 1 and state["position"] == 5


def test_loader_rejects_state_of_another_dataset(tmp_path, tokenizer):
    loader = PromptLoader(_dataset(tmp_path, tokenizer, n=3), batch_size=2, seed=0)
    with pytest.raises(ValueError, match="outside this dataset"):
        loader.load_state_dict({"epoch": 0, "position": 5, "seed": 0})
