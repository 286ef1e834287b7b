"""Entry point: `python -m grpo_megatron.train --config run.yaml [overrides]` (under torchrun for >1 process)."""
from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings


# Fallback notices printed at every start where TransformerEngine/Apex are absent (CPU), and deprecations
# inside megatron-core/torch we cannot act on. Matched exactly: any other warning still prints.
KNOWN_HARMLESS_WARNINGS = (
    (UserWarning, "Transformer Engine and Apex are not installed. Falling back to local implementations of "
                  "multi_tensor_applier and multi_tensor_scale"),
    (UserWarning, "Transformer Engine and Apex are not installed. Falling back to local implementations of "
                  "multi_tensor_applier, multi_tensor_l2norm, and multi_tensor_scale"),
    (UserWarning, "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."),
    (UserWarning, "Apex is not installed. Falling back to Torch Norm"),
    (UserWarning, "full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer."),
    (FutureWarning, "`load_state_dict` is deprecated and will be removed in future versions. "
                    "Please use `load` instead."),
    (FutureWarning, "Please use DTensor instead and we are deprecating ShardedTensor."),
)


def quiet_known_warnings() -> None:
    """Hide KNOWN_HARMLESS_WARNINGS (before megatron is imported: most are issued at import)."""
    for category, message in KNOWN_HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message) + r"\Z", category=category)


def user_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean the run's inputs need fixing; their messages name the fix."""
    from grpo_megatron.errors import UserError

    return UserError, FileNotFoundError


def error_line(exc: Exception) -> str:
    """One line for the user: a missing path says which, the others carry their own fix."""
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"error: {exc.strerror}: {exc.filename} (check that path in the config or its override)"
    return f"error: {exc}"


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
    quiet_known_warnings()

    from grpo_megatron.parallel import destroy

    if args.resume:
        overrides += ["--checkpoint.resume", "true"]
    try:
        return train(args.config, overrides)
    except user_errors() as exc:
        # One line from rank 0 instead of a traceback from every rank; exit 2 like argparse's usage errors.
        from grpo_megatron.ranks import launch_rank

        if launch_rank() == 0:
            print(error_line(exc), file=sys.stderr)
        return 2
    finally:
        destroy()


def train(config: str, overrides: list[str]) -> int:
    from grpo_megatron.config import load_config
    from grpo_megatron.platform.megatron_version import check_megatron_version
    from grpo_megatron.preflight import check_before_model
    from grpo_megatron.process_setup import prepare_process

    check_megatron_version()
    cfg = load_config(config, overrides)  # before the heavy imports: a config error shows at once
    check_before_model(cfg)  # every check that needs no model: a typo costs seconds, not a model load
    prepare_process(cfg)
    from grpo_megatron.training.loop import Trainer

    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
