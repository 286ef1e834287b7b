#!/usr/bin/env python
"""Check a Slurm run before any node is touched, and write the resolved config the trainer will read.

Run by slurm/common.sh on the batch host. It loads the YAML config with the command-line overrides exactly
as the trainer does (unknown keys are errors), checks that the model/checkpoint/data paths exist and that
the parallel layout fits the world size the allocation gives (nodes x processes per node) and the model's
sizes, and on GPU jobs runs the dry run (grpo_megatron.plan: each distinct trainer rank simulated at the job's
true size, plus the rollout servers' share) to check that every GPU's memory fits. On success it writes the
resolved config (absolute paths, overrides applied) to RUN_DIR/slurm/job-JOBID.yaml and prints shell assignments for common.sh to `eval`. On failure it prints
one `ERROR: ...` line naming the fix and exits 2, so the job stops within seconds with the reason in
its output file instead of after minutes of model loading on every node.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def fail(message: str) -> "NoReturn":  # noqa: F821
    print(f"ERROR: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("--world-size", type=int, required=True, help="trainer nodes x processes per node")
    parser.add_argument("--layout-hint", default="", help="how the world size came about, for messages")
    parser.add_argument("--run-dir", default="", help="overrides run_dir (relative: to the current directory)")
    parser.add_argument("--job-id", default="local")
    parser.add_argument("--trainer-nodes", type=int, default=0, help="for the memory plan (0: skip it)")
    parser.add_argument("--gpus-per-node", type=int, default=0, help="for the memory plan (0: CPU job, skip it)")
    parser.add_argument("--rollout-nodes", type=int, default=0)
    parser.add_argument("--gpu-memory", default="", help="per GPU, e.g. 80GiB (empty: skip the memory plan)")
    parser.add_argument("--plan", choices=("auto", "1", "0"), default="auto",
                        help="memory plan: auto (when it can run), 1 (required), 0 (off)")
    args, overrides = parser.parse_known_args(argv)

    config_path = Path(args.config)
    if not config_path.is_file():
        fail(f"config file {config_path} does not exist (set CONFIG=path/to/run.yaml or pass --config)")

    from grpo_megatron.config import ConfigError, load_config, replace_keys, save_config
    from grpo_megatron.parallel import ParallelLayoutError

    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as exc:
        fail(f"config {config_path}: {exc}")
    cfg = replace_keys(cfg, {"run_dir": str(Path(args.run_dir or cfg.run_dir).resolve())})

    hf = Path(cfg.model.hf_path)
    if not (hf / "config.json").is_file():
        fail(f"model.hf_path={hf}: no config.json there; point it (or HF_PATH=...) at a Hugging Face "
             f"checkpoint directory readable from every node")
    if cfg.model.megatron_path and not Path(cfg.model.megatron_path).exists():
        fail(f"model.megatron_path={cfg.model.megatron_path} does not exist; convert the HF checkpoint with "
             f"tools/convert_hf_to_megatron.py or set MCORE_PATH=... (or model.megatron_path: null to load "
             f"the HF weights)")
    for key in ("train_files", "eval_files"):
        for f in getattr(cfg.data, key):
            if not Path(f).exists():
                fail(f"data.{key}: {f} does not exist")

    from grpo_megatron.models.provider import load_hf_config, model_dims

    try:
        dims = model_dims(load_hf_config(hf))
    except Exception as exc:  # an unsupported or broken HF config: say so before any node loads it
        fail(f"model.hf_path={hf}: cannot read the model config: {exc}")
    try:
        cfg.parallel.validate(args.world_size, **dims)
    except ParallelLayoutError as exc:
        fail(f"parallel layout does not fit the allocation ({args.layout_hint or f'world size {args.world_size}'}): "
             f"{exc}")

    check_memory_plan(args, config_path, overrides)

    out_dir = Path(cfg.run_dir) / "slurm"
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg, marker = with_weights_dir_marker(cfg, args.job_id)
    resolved = out_dir / f"job-{args.job_id}.yaml"
    save_config(cfg, resolved)
    values = {
        "RUN_DIR": cfg.run_dir,
        "RESOLVED_CONFIG": str(resolved),
        "TRAIN_STEPS": cfg.train.steps,
        "ROLLOUT_ENGINE": cfg.rollout.engine,
        "ROUTING_REPLAY": cfg.algorithm.routing_replay,
        "MODEL_HF_PATH": str(hf),
        "CONFIG_SGLANG_URLS": ",".join(cfg.rollout.sglang.urls),
        # The key the trainer will send (config, else GRPO_SGLANG_API_KEY): servers the job starts require it.
        "CONFIG_SGLANG_API_KEY": cfg.rollout.sglang.api_key or "",
        "WEIGHTS_MARKER": marker or "",
        "LAYOUT": f"tp={cfg.parallel.tensor_parallel} pp={cfg.parallel.pipeline_parallel} "
                  f"ep={cfg.parallel.expert_parallel} cp={cfg.parallel.context_parallel} "
                  f"dp={cfg.parallel.data_parallel(args.world_size)}",
    }
    for key, value in values.items():
        print(f"{key}={shlex.quote(str(value))}")
    return 0


def check_memory_plan(args, config_path: Path, overrides: list[str]) -> None:
    """Stop a GPU job whose plan does not fit, naming the change that makes it fit (python -m grpo_megatron.plan
    prints the whole table). A plan that cannot run here (no C++ compiler for the simulation, ...) is a warning
    unless --plan 1."""
    if args.plan == "0" or not args.gpus_per_node or not args.trainer_nodes:
        return
    if not args.gpu_memory:
        if args.plan == "1":
            fail("GRPO_PLAN=1 but the GPU memory size is unknown: set GPU_MEMORY=80GiB (nvidia-smi was not found)")
        print("WARNING: memory plan skipped: GPU memory size unknown (set GPU_MEMORY=80GiB)", file=sys.stderr)
        return
    from grpo_megatron.plan.cli import run

    argv = ["--config", str(config_path), "--nodes", str(args.trainer_nodes + args.rollout_nodes),
            "--gpus-per-node", str(args.gpus_per_node), "--rollout-nodes", str(args.rollout_nodes),
            "--gpu-memory", args.gpu_memory, *overrides]
    command = "python -m grpo_megatron.plan " + " ".join(shlex.quote(a) for a in argv)
    try:
        status, plan, _ = run(argv)
    except Exception as exc:  # the plan is an extra check: one that cannot run here must not hide the job's own
        if args.plan == "1":
            fail(f"the memory plan could not run ({type(exc).__name__}: {exc}); GRPO_PLAN=0 skips it")
        print(f"WARNING: memory plan skipped ({type(exc).__name__}: {exc})", file=sys.stderr)
        return
    if status:
        fix = f"fix: {plan.fix.change}" if plan.fix else "no single change found"
        fail(f"the job does not fit in GPU memory ({plan.problems[0]}); {fix} (table: {command})")
    peak = max(r.peak.total for r in plan.ranks) / (1 << 30)
    print(f"memory plan: fits, largest GPU phase {peak:.1f} GiB of {args.gpu_memory}", file=sys.stderr)


def with_weights_dir_marker(cfg, job_id: str):
    """Disk weight sync: the config with the directory servers load each version from (rollout.sglang.disk_dir,
    defaulting to RUN_DIR/weights: a node-local temporary directory is invisible to servers on other nodes), and
    a marker file written there for common.sh to look for from every server node; else the config and None."""
    from grpo_megatron.config import replace_keys

    s = cfg.rollout.sglang
    if cfg.rollout.engine != "sglang" or s.sync_mode != "disk":
        return cfg, None
    disk_dir = str(Path(s.disk_dir or Path(cfg.run_dir) / "weights").resolve())
    try:
        Path(disk_dir).mkdir(parents=True, exist_ok=True)
        marker = Path(disk_dir) / f".visible-{job_id}"
        marker.write_text("written by slurm/preflight.py; servers must see this file\n")
    except OSError as exc:
        fail(f"rollout.sglang.disk_dir={disk_dir}: cannot write there ({exc}); point it at a shared directory")
    return replace_keys(cfg, {"rollout.sglang.disk_dir": disk_dir}), str(marker)


if __name__ == "__main__":
    sys.exit(main())
