"""The shipped Slurm configs and the allocation each ships with, read from the sbatch scripts that run them.

A script's `#SBATCH --nodes` / `--gpus-per-node` lines and its `ROLLOUT_NODES` default are the allocation a
plain `sbatch slurm/<script>.sh` gets; a config no script names (tiny_cpu.yaml, a CPU config) is planned on the
allocation its header comment gives, one GPU per node standing for its one CPU process."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GPU_MEMORY = "80GiB"  # the H100 80 GB the shipped scripts are written for
SGLANG_MEM_FRACTION = "0.5"  # slurm/common.sh's default for colocated servers (SGLANG_MEM_FRACTION)


@dataclass(frozen=True)
class ShippedJob:
    config: Path
    script: str
    nodes: int
    gpus_per_node: int
    rollout_nodes: int

    def argv(self) -> list[str]:
        return ["--config", str(self.config), "--nodes", str(self.nodes), "--gpus-per-node", str(self.gpus_per_node),
                "--gpu-memory", GPU_MEMORY, "--rollout-nodes", str(self.rollout_nodes),
                "--sglang-mem-fraction", SGLANG_MEM_FRACTION]


def _sbatch(text: str, option: str) -> int:
    return int(re.search(rf"^#SBATCH --{option}=(\d+)", text, re.M).group(1))


def shipped_jobs() -> list[ShippedJob]:
    jobs = {}
    for script in sorted((REPO / "slurm").glob("*.sh")):
        text = script.read_text()
        named = re.search(r'grpo_slurm_main "\$GRPO_REPO/(slurm/configs/[^"]+)"', text)
        if not named:
            continue
        rollout = re.search(r"ROLLOUT_NODES=\$\{ROLLOUT_NODES:-(\d+)\}", text)
        jobs[named.group(1)] = ShippedJob(REPO / named.group(1), script.name, _sbatch(text, "nodes"),
                                          _sbatch(text, "gpus-per-node"), int(rollout.group(1)) if rollout else 0)
    for config in sorted((REPO / "slurm/configs").glob("*.yaml")):
        key = f"slurm/configs/{config.name}"
        if key not in jobs:
            header = re.search(r"sbatch --nodes=(\d+) --gpus-per-node=(\d+)", config.read_text())
            jobs[key] = ShippedJob(config, "(header comment)", int(header.group(1)), max(1, int(header.group(2))), 0)
    return [jobs[k] for k in sorted(jobs)]
