"""`python -m grpo_megatron.plan --config run.yaml --nodes 2 --gpus-per-node 8 --gpu-memory 80GiB [overrides]`.

Prints the per-GPU memory plan of the job (or `--json`: one JSON object) and exits 0 when it fits, 2 when it
does not (the verdict line names the change that makes it fit) or when the inputs are wrong (one line).
Trainer overrides are accepted exactly as the trainer accepts them (`--train.lr 1e-6`, megatron flags).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """'80GiB', '80GB', '141 GiB', '1TiB' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r}: give a size such as 80GiB or 80GB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def sglang_setting(flag: str, env: str | None = None) -> str | None:
    """A server flag as slurm/common.sh passes it: SGLANG_ARGS (appended last, so it wins) over its own variable."""
    args = shlex.split(os.environ.get("SGLANG_ARGS", ""))
    values = [args[i + 1] for i, a in enumerate(args[:-1]) if a == flag]
    values += [a.split("=", 1)[1] for a in args if a.startswith(flag + "=")]
    return values[-1] if values else (os.environ.get(env) or None if env else None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m grpo_megatron.plan",
        description="Per-GPU memory plan of a job at its true size, before it runs",
        epilog="Other arguments are trainer overrides (--section.key value, or megatron flags).")
    parser.add_argument("--config", required=True, help="the run's YAML config")
    parser.add_argument("--nodes", type=int, required=True, help="nodes in the allocation (trainer + rollout)")
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--gpu-memory", type=parse_bytes, required=True, help="per GPU, e.g. 80GiB")
    parser.add_argument("--rollout-nodes", type=int, default=int(os.environ.get("ROLLOUT_NODES", "0") or 0),
                        help="nodes dedicated to SGLang (ROLLOUT_NODES; default 0: colocated)")
    parser.add_argument("--sglang-mem-fraction", type=float,
                        default=float(sglang_setting("--mem-fraction-static", "SGLANG_MEM_FRACTION") or 0.5),
                        help="--mem-fraction-static of colocated servers (SGLANG_ARGS, SGLANG_MEM_FRACTION; "
                             "default 0.5)")
    parser.add_argument("--dedicated-mem-fraction", type=float,
                        default=float(sglang_setting("--mem-fraction-static") or 0.85),
                        help="--mem-fraction-static of servers on dedicated nodes (SGLANG_ARGS; default 0.85, about "
                             "SGLang's own default on 80 GB GPUs)")
    parser.add_argument("--sglang-tp", type=int, default=int(sglang_setting("--tp-size", "SGLANG_TP") or 0) or None,
                        help="--tp-size of each server (SGLANG_ARGS, SGLANG_TP; default: GPUs per node)")
    parser.add_argument("--host-memory", type=parse_bytes, default=parse_bytes("1TiB"), help="per node (default 1TiB)")
    parser.add_argument("--model-config", default=None,
                        help="HF config.json (or its directory) when model.hf_path is not readable here")
    parser.add_argument("--prompt-tokens", type=int, default=None,
                        help="prompt budget when data.max_prompt_tokens is unset (default 1024)")
    parser.add_argument("--no-fix", action="store_true", help="do not search for a change when it does not fit")
    parser.add_argument("--compare-recompute", action="store_true",
                        help="also simulate each rank with recompute toggled (activations with and without it)")
    parser.add_argument("--layers-extrapolate", action="store_true",
                        help="simulate each rank with 1 and 2 layers per pipeline stage and extend the line to its "
                             "real layer count (seconds instead of minutes per rank; benchmarks/README.md gives the "
                             "agreement with the full simulation)")
    parser.add_argument("--no-cache", action="store_true",
                        help="simulate even when a result is cached (GRPO_PLAN_CACHE, ~/.cache/grpo_megatron/plan)")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    return parser


def load_job(args: argparse.Namespace, overrides: list[str]):
    """The run config (loaded as the trainer loads it), the allocation and the model's shapes."""
    from grpo_megatron.config import load_config
    from grpo_megatron.plan.job import DEFAULT_PROMPT_TOKENS, Allocation, Job, PlanInputError
    from grpo_megatron.plan.model_shapes import load_shapes

    cfg = load_config(args.config, overrides)
    for name in ("nodes", "gpus_per_node"):
        if getattr(args, name) < 1:
            raise PlanInputError(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.rollout_nodes < args.nodes:
        raise PlanInputError(f"--rollout-nodes {args.rollout_nodes} must leave a trainer node of --nodes {args.nodes}")
    if args.rollout_nodes and cfg.rollout.engine != "sglang":
        raise PlanInputError("dedicated rollout nodes need rollout.engine: sglang")
    for name in ("sglang_mem_fraction", "dedicated_mem_fraction"):
        if not 0 < getattr(args, name) < 1:
            raise PlanInputError(f"--{name.replace('_', '-')} must be between 0 and 1")
    alloc = Allocation(nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_memory=args.gpu_memory,
                       rollout_nodes=args.rollout_nodes, sglang_fraction=args.sglang_mem_fraction,
                       dedicated_fraction=args.dedicated_mem_fraction, sglang_tp=args.sglang_tp,
                       host_memory=args.host_memory)
    if cfg.data.max_prompt_tokens:
        prompt, source = cfg.data.max_prompt_tokens, "data.max_prompt_tokens"
    elif args.prompt_tokens:
        prompt, source = args.prompt_tokens, "--prompt-tokens"
    else:
        prompt, source = DEFAULT_PROMPT_TOKENS, "the default (data.max_prompt_tokens unset)"
    return Job(cfg, alloc, load_shapes(cfg.model.hf_path, args.model_config), prompt, source)


def run(argv: list[str] | None = None, simulate=None) -> tuple[int, object, bool]:
    """Plan the job; returns (exit status, plan, --json). `simulate` replaces the fake-CUDA simulation (tests)."""
    from grpo_megatron.plan.fixes import find_fix
    from grpo_megatron.plan.planner import make_plan

    args, overrides = build_parser().parse_known_args(argv)
    job = load_job(args, overrides)
    if simulate is None:
        from grpo_megatron.plan.simulate import CachedSimulator

        simulate = CachedSimulator(compare_recompute=args.compare_recompute, use_disk=not args.no_cache,
                                   extrapolate_layers=args.layers_extrapolate)
    plan = make_plan(job, simulate)
    if not plan.fits and not args.no_fix:
        plan.fix = find_fix(job, simulate)
    return (0 if plan.fits else 2), plan, args.json


def main(argv: list[str] | None = None) -> int:
    from grpo_megatron.plan.job import PlanInputError
    from grpo_megatron.plan.model_shapes import ModelConfigError
    from grpo_megatron.simulation import SimulationError
    from grpo_megatron.simulation.shim import ShimError
    from grpo_megatron.train import error_line, quiet_known_warnings, user_errors

    quiet_known_warnings()
    try:
        status, plan, as_json = run(argv)
    except (*user_errors(), PlanInputError, ModelConfigError) as exc:
        print(error_line(exc), file=sys.stderr)
        return 2
    except (ShimError, SimulationError) as exc:
        print(f"error: the simulation could not run: {exc}", file=sys.stderr)
        return 2
    from grpo_megatron.plan.report import to_json, to_text

    print(json.dumps(to_json(plan)) if as_json else to_text(plan))
    return status
