"""The dry run of every shipped Slurm config at the allocation its script ships with: the per-GPU plan and the
wall time of each (`python benchmarks/dry_run.py [--only NAME] [--compare-recompute]`). Each run simulates
afresh (a private cache), so the times are the simulation's, not a cache hit's."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grpo_megatron.plan.cli import run  # noqa: E402
from grpo_megatron.plan.report import to_text  # noqa: E402
from tests.plan.shipped import shipped_jobs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", action="append", default=[], help="config file name(s) to plan")
    parser.add_argument("--compare-recompute", action="store_true")
    args, extra = parser.parse_known_args()
    os.environ["GRPO_PLAN_CACHE"] = tempfile.mkdtemp(prefix="dry_run_cache_")
    for job in shipped_jobs():
        if args.only and job.config.name not in args.only:
            continue
        argv = job.argv() + (["--compare-recompute"] if args.compare_recompute else []) + extra
        start = time.perf_counter()
        status, plan, _ = run(argv)
        took = time.perf_counter() - start
        print(f"### {job.config.name} ({job.script}: {job.nodes} nodes x {job.gpus_per_node} GPUs, "
              f"{job.rollout_nodes} rollout nodes): exit {status}, {took:.0f} s wall, "
              f"{len(plan.ranks)} distinct rank(s)")
        print(to_text(plan))
        print(flush=True)


if __name__ == "__main__":
    main()
