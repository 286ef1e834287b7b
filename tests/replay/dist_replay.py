"""Replay steps at several parallel layouts in one torchrun job; rank 0 prints one JSON line per run.

torchrun --nproc-per-node 2 tests/replay/dist_replay.py --hf-path DIR --layouts tp2,ep2,pp2 --modes r2,r3
"""
from __future__ import annotations

import argparse
import json

import torch.distributed as dist

from grpo_megatron.parallel import ParallelLayout, init_distributed

LAYOUTS = {
    "tp2": ParallelLayout(tensor_parallel=2),  # MoE + TP -> sequence parallel
    "ep2": ParallelLayout(expert_parallel=2),  # and data parallel 2
    "pp2": ParallelLayout(pipeline_parallel=2),
}


def main() -> None:
    from tests.replay.helpers import replay_run

    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-path", required=True)
    parser.add_argument("--layouts", default="tp2,ep2,pp2")
    parser.add_argument("--modes", default="r2,r3")
    args = parser.parse_args()
    init_distributed()
    for name in args.layouts.split(","):
        for mode in args.modes.split(","):
            result = replay_run(args.hf_path, LAYOUTS[name], mode)
            if dist.get_rank() == 0:
                print(json.dumps({"layout": name, "mode": mode, **result}), flush=True)


if __name__ == "__main__":
    main()
