"""Step-time overhead of MoE routing replay (R2, R3) against none, on the CPU example's tiny Qwen3-MoE.

One trainer, one rollout batch (with the engine's routes), then the trainer's side of a step (`train_on`:
old log-probs, training mini-batches) timed again and again with the modes interleaved, so that load
from other processes on a shared machine hits every mode alike; medians are reported. "off" is plain
megatron routing with no hooks at all (what "none" costs for its agreement metrics). R3's rollout-side
cost, the engine returning routes, is timed the same way on `generate`.

    python benchmarks/replay_overhead.py [--repeats 7] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = ("off", "none", "r2", "r3")


def make_trainer(cache: Path, run_dir: Path, threads: int):
    sys.path.insert(0, str(REPO / "examples" / "tiny_cpu"))
    from prepare import prepare

    from grpo_megatron.config import load_config
    from grpo_megatron.training.loop import Trainer

    inputs = prepare(cache, "copy")
    cfg = load_config(REPO / "examples" / "tiny_cpu" / "gspo_moe.yaml", {
        "run_dir": str(run_dir),
        "model": {"hf_path": str(inputs["hf"]), "megatron_path": str(inputs["mcore"])},
        "data": {"train_files": [str(inputs["train"])], "eval_files": []},
        "algorithm": {"routing_replay": "r3"},
        "train": {"steps": 1000, "sft_warmup_steps": 0, "lr_warmup_steps": 0, "num_threads": threads},
        "logging": {"progress_bar": False, "tensorboard": False},
    })
    return Trainer(cfg)


def set_mode(trainer, mode: str, hooks: dict) -> None:
    """Re-attach the policy's replay controller in `mode`; "off" takes the hooks out of the routers."""
    from grpo_megatron.replay import attach_routing_replay

    for router, hook in hooks.items():
        router.router_replay = None if mode == "off" else hook
    if mode == "off":
        trainer.learner.routing = trainer.learner.policy.extra.pop("routing_replay", None) and None
    else:
        trainer.learner.routing = attach_routing_replay(trainer.learner.policy, mode)
        hooks.update(_routers(trainer))


def _routers(trainer) -> dict:
    from megatron.core.transformer.moe.router import TopKRouter

    return {m: m.router_replay for c in trainer.learner.policy.chunks for m in c.modules() if isinstance(m, TopKRouter)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default=str(REPO / "examples" / "tiny_cpu" / "cache"))
    args = parser.parse_args()
    from grpo_megatron.training.metrics import PhaseTimer

    with tempfile.TemporaryDirectory() as run_dir:
        trainer = make_trainer(Path(args.cache), Path(run_dir), args.threads)
        batch, _ = trainer.rollouts.rollout_now(trainer.step)
        hooks = _routers(trainer)
        times = {mode: [] for mode in MODES}
        agreement = {mode: [] for mode in MODES}
        generation = {False: [], True: []}
        items = [trainer.rollouts.worker.loader.next_batch() for _ in range(1)][0]
        params = trainer.rollouts.sampling_params(0)
        for repeat in range(args.repeats + 1):  # the first round warms up
            for mode in MODES if repeat % 2 else MODES[::-1]:
                set_mode(trainer, mode, hooks)
                start = time.perf_counter()
                metrics = trainer.learner.update(copy.deepcopy(batch), trainer.step, PhaseTimer())
                if repeat:
                    times[mode].append(time.perf_counter() - start)
                    agreement[mode].append(metrics.get("routing/agree_old_current", float("nan")))
            for routes in (False, True):
                start = time.perf_counter()
                trainer.rollouts.engine.generate([it["prompt_ids"] for it in items], params, return_routed_experts=routes)
                if repeat:
                    generation[routes].append(time.perf_counter() - start)
        trainer.close()
    base = min(times["none"])
    off = min(times["off"])
    print(f"train_on (old log-probs + {trainer.cfg.train.num_minibatches} mini-batches), "
          f"{len(batch)} sequences, best of {args.repeats}:")
    print(f"{'mode':<6}{'seconds':>9}{'vs none':>9}{'vs off':>9}{'agree old/current':>19}")
    for mode in MODES:
        t = min(times[mode])
        print(f"{mode:<6}{t:>9.3f}{100 * (t / base - 1):>8.1f}%{100 * (t / off - 1):>8.1f}%"
              f"{statistics.mean(agreement[mode]):>19.4f}")
    plain, routed = (min(generation[r]) for r in (False, True))
    print(f"rollout generate: {plain:.3f} s plain, {routed:.3f} s returning routes ({100 * (routed / plain - 1):+.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
