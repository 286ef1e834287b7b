"""torchrun worker for test_placements.py: a sharded policy, every parameter doubled, pushed with WeightPush
to mock servers as Trainer.sync_weights does; prints each rank's bucket count.

    torchrun --nproc-per-node 2 tests/sglang/push_worker.py HF_DIR CONFIG_JSON [--tp 2 ...]
"""
from __future__ import annotations

import argparse
import json

import torch

from grpo_megatron.config import load_config
from grpo_megatron.models import build_loaded_policy
from grpo_megatron.parallel import add_layout_arguments, init_distributed, layout_from_args
from grpo_megatron.process_setup import prepare_process
from grpo_megatron.rollout.factory import make_engine
from grpo_megatron.training.weight_push import WeightPush


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("hf_dir")
    parser.add_argument("config_json")
    add_layout_arguments(parser)
    args = parser.parse_args()
    rank, _ = init_distributed()
    model = build_loaded_policy(args.hf_dir, layout_from_args(args))
    with torch.no_grad():
        for chunk in model.unwrapped():
            for param in chunk.parameters():
                param.mul_(2)
    cfg = load_config(None, json.loads(args.config_json))
    prepare_process(cfg)
    engine = make_engine(cfg.rollout, cfg.model.hf_path, cfg.train.seed, torch.float32) if rank == 0 else None
    push = WeightPush(cfg.rollout, cfg.model.hf_path, engine)
    push.run(model, version=5)
    print(f"rank {rank} to_every_rank={push.to_every_rank}", flush=True)
    if engine is not None:
        engine.shutdown()


if __name__ == "__main__":
    main()
