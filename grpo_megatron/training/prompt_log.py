"""`prompts.jsonl`: which prompt draws each step trained on, so a resumed run can be audited.

One line per step: the loader's draw serials and the prompts' dataset indices, one per group. Like the
metrics file, a resumed run drops the lines past its checkpoint's step, so the file always describes
exactly the run's history: every draw should appear once (or as often as the data is repeated).
"""
from __future__ import annotations

import json
from pathlib import Path

from grpo_megatron.samples import Sample

PROMPT_LOG = "prompts.jsonl"


class PromptLog:
    def __init__(self, run_dir: str | Path, resume_step: int | None):
        self.path = Path(run_dir) / PROMPT_LOG
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step] if (
            resume_step is not None and self.path.exists()) else []
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, samples: list[Sample]) -> None:
        firsts = {s.group: s for s in samples}  # one sample per group, in group order
        groups = [firsts[g] for g in sorted(firsts)]
        record = {"step": step, "draws": [s.draw for s in groups], "prompts": [s.prompt_index for s in groups]}
        with self.path.open("a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")


def read_prompt_log(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / PROMPT_LOG
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
