"""Entry point: `python -m grpo_megatron.train --config run.yaml [overrides]` (under torchrun for >1 process)."""
from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="GRPO/GSPO RL training of a megatron-core policy",
        epilog="Overrides: --section.key value (e.g. --train.lr 1e-6) or megatron flags "
               "(--tensor-model-parallel-size 2, --micro-batch-size 4, ...). Unknown keys are errors.")
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of run_dir")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("megatron", "mbridge", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)

    from grpo_megatron.config import load_config
    from grpo_megatron.parallel import destroy
    from grpo_megatron.training.loop import Trainer

    if args.resume:
        overrides += ["--checkpoint.resume", "true"]
    cfg = load_config(args.config, overrides)
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
        destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
