"""Prompt datasets (JSONL, Parquet) and a resumable, endlessly repeating prompt loader.

Every record is validated and tokenised up front, so a bad line fails at start-up with its file and line
rather than hours into a run. A record holds `prompt` (a string) or chat `messages` (a list of
{role, content}), optionally `answer` or `ground_truth` (a string); every other field is kept as `meta`
for the reward functions.
"""
from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import transformers

from grpo_megatron.errors import UserError

_PROMPT_FIELDS = ("prompt", "messages")
_ANSWER_FIELDS = ("answer", "ground_truth")
PromptItem = dict[str, Any]  # {"prompt_ids": list[int], "answer": str | None, "index": int, "meta": dict}


class DatasetError(UserError, ValueError):
    """A prompt file or one of its records cannot be used; the message names the file, the line and the fix."""


def read_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(1-based line or row number, parsed record) for every record of a .jsonl or .parquet file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"prompt file not found: {path} (check the dataset path in the config)")
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    raise DatasetError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl (one JSON object per line) "
                       f"or .parquet")


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"{path}:{line_number}: invalid JSON ({err.msg} at column {err.colno}); "
                                   f"each line must be one complete JSON object") from None


def _read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError(f"reading {path} needs pyarrow, which is optional: pip install pyarrow "
                           f"(or convert the file to .jsonl)") from None
    for row_number, record in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield row_number, record


def check_record(record: Any, where: str, apply_chat_template: bool) -> tuple[str, Any, str | None]:
    """("prompt", text, answer) or ("messages", turns, answer) of one record; DatasetError naming the fix.

    Needs no tokenizer, so that a bad record fails before any model is built (grpo_megatron.preflight).
    """
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    answer = None
    for name in _ANSWER_FIELDS:
        if record.get(name) is not None:
            answer = record[name]
            if not isinstance(answer, str):
                raise DatasetError(f"{where}: `{name}` must be a string, got {type(answer).__name__}; "
                                   f"quote it (e.g. \"{name}\": \"{answer}\")")
            break
    if "prompt" in record and record["prompt"] is not None:
        prompt = record["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise DatasetError(f"{where}: `prompt` must be a non-empty string, got {prompt!r}")
        return "prompt", prompt, answer
    if "messages" in record and record["messages"] is not None:
        messages = record["messages"]
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)):
            raise DatasetError(f"{where}: `messages` must be a non-empty list of "
                               f"{{\"role\": str, \"content\": str}} objects")
        if not apply_chat_template:
            raise DatasetError(f"{where}: chat `messages` need apply_chat_template=True "
                               f"(or give a plain `prompt` string instead)")
        return "messages", messages, answer
    raise DatasetError(f"{where}: no `prompt` or `messages` field (found: {sorted(record)}); "
                       f"add a `prompt` string or a chat `messages` list")


def check_prompt_files(paths: Sequence[str | Path], apply_chat_template: bool) -> None:
    """Every record of every file readable and usable (no tokenizer); DatasetError for the first that is not."""
    for path in paths:
        count = 0
        for line_number, record in read_records(path):
            check_record(record, f"{path}:{line_number}", apply_chat_template)
            count += 1
        if not count:
            raise DatasetError(f"no records in {path}; the prompt file is empty")


class PromptDataset:
    """Tokenised prompts of one or more files, in file order, each with its answer and metadata.

    With apply_chat_template a `prompt` string becomes a single user turn; the template is rendered with
    the generation prompt and tokenised without extra special tokens (as transformers does). Without it, a
    `prompt` is tokenised with the tokenizer's special tokens (e.g. <bos>), and `messages` are refused.
    """

    def __init__(
        self,
        paths: str | Path | Sequence[str | Path],
        tokenizer: transformers.PreTrainedTokenizerBase,
        apply_chat_template: bool,
        max_prompt_tokens: int | None = None,
    ):
        if apply_chat_template and not getattr(tokenizer, "chat_template", None):
            raise DatasetError("apply_chat_template=True but the tokenizer has no chat template; "
                               "set apply_chat_template=False or use a tokenizer that ships one")
        self._tokenizer = tokenizer
        self._apply_chat_template = apply_chat_template
        self._max_prompt_tokens = max_prompt_tokens
        self._items: list[PromptItem] = []
        for path in [paths] if isinstance(paths, (str, Path)) else paths:
            for line_number, record in read_records(path):
                self._items.append(self._make_item(record, f"{path}:{line_number}"))
        if not self._items:
            raise DatasetError(f"no records in {paths}; the prompt files are empty")

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> PromptItem:
        return self._items[index]

    def _make_item(self, record: Any, where: str) -> PromptItem:
        kind, prompt, answer = check_record(record, where, self._apply_chat_template)
        if kind == "messages":
            prompt_ids = self._render_chat(prompt)
        elif self._apply_chat_template:
            prompt_ids = self._render_chat([{"role": "user", "content": prompt}])
        else:
            prompt_ids = self._tokenizer(prompt).input_ids
        if self._max_prompt_tokens is not None and len(prompt_ids) > self._max_prompt_tokens:
            raise DatasetError(f"{where}: prompt has {len(prompt_ids)} tokens, more than max_prompt_tokens="
                               f"{self._max_prompt_tokens}; raise max_prompt_tokens or shorten/remove this record")
        meta = {k: v for k, v in record.items() if k not in _PROMPT_FIELDS + _ANSWER_FIELDS}
        return {"prompt_ids": prompt_ids, "answer": answer, "index": len(self._items), "meta": meta}

    def _render_chat(self, messages: list[dict]) -> list[int]:
        text = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self._tokenizer(text, add_special_tokens=False).input_ids


class PromptLoader:
    """Batches of prompts forever: epoch after epoch, reshuffled each epoch with seed + epoch.

    Batches are cut from the concatenated epochs, so every batch is full and no prompt is dropped. The
    state ({epoch, position, seed}) points at the next prompt, so a resumed run continues exactly there.
    """

    def __init__(self, dataset: PromptDataset, batch_size: int, seed: int, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        self._dataset = dataset
        self._batch_size = batch_size
        self._shuffle = shuffle
        self._seed = seed
        self._epoch = 0
        self._position = 0
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        order = list(range(len(self._dataset)))
        if self._shuffle:
            random.Random(self._seed + self._epoch).shuffle(order)
        return order

    def next_batch(self) -> list[PromptItem]:
        return self.next_items(self._batch_size)

    def next_items(self, count: int) -> list[PromptItem]:
        """The next `count` prompts of the endless sequence (a batch may be drawn in parts)."""
        batch = []
        while len(batch) < count:
            if self._position == len(self._order):
                self._epoch += 1
                self._position = 0
                self._order = self._epoch_order()
            batch.append(self._dataset[self._order[self._position]])
            self._position += 1
        return batch

    def __iter__(self) -> Iterator[list[PromptItem]]:
        while True:
            yield self.next_batch()

    @property
    def dataset(self) -> PromptDataset:
        return self._dataset

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def drawn(self) -> int:
        """Prompts drawn since the start of the run: the serial number of the next draw (logged per step,
        so a resumed run can be checked to train every draw exactly once)."""
        return self._epoch * len(self._dataset) + self._position

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "position": self._position, "seed": self._seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved state; its seed replaces this loader's so the order is the saved run's."""
        missing = {"epoch", "position", "seed"} - set(state)
        if missing:
            raise ValueError(f"PromptLoader state lacks {sorted(missing)}; pass what state_dict() returned")
        if not 0 <= state["position"] <= len(self._dataset):
            raise ValueError(f"PromptLoader state position {state['position']} is outside this dataset of "
                             f"{len(self._dataset)} prompts; resume with the dataset the state was saved with")
        self._seed, self._epoch, self._position = state["seed"], state["epoch"], state["position"]
        self._order = self._epoch_order()
