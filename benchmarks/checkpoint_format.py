"""Host memory of a distributed-optimizer checkpoint per megatron-core format, saved at DP2 and loaded at DP2 and DP1.

    python benchmarks/checkpoint_format.py              # torchrun, 2 gloo processes, ~30M-parameter Qwen3-MoE, bf16
    python benchmarks/checkpoint_format.py --nproc 1    # one process: save and load at DP1 only

Each rank builds the same policy (bf16 params, fp32 masters, megatron's distributed optimizer), takes one Adam
step, then saves run checkpoints in each format of `DistributedOptimizer.sharded_state_dict` that 0.16.1 can save
here, and loads each back. Memory: the rank resets its peak RSS (/proc/self/clear_refs 5) before a save or load
and reports VmHWM - VmRSS(before) after it. The load at DP1 (one process, `--load-dp1`) is what a resume on fewer
ranks does; a format that cannot do it says so. `fully_sharded_model_space`, 0.16.1's default, fails to save
("ShardedTensor.flattened_range is not supported") and is not listed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from grpo_megatron.models import mcore_checkpoint  # noqa: E402

FORMATS = {  # name -> the metadata megatron's sharded_state_dict takes
    **mcore_checkpoint.OPTIMIZER_FORMATS,
    "fully_reshardable_mem_efficient": {"distrib_optim_sharding_type": "fully_reshardable",
                                        "distrib_optim_fully_reshardable_mem_efficient": True},
}
SHAPE = dict(hidden_size=512, intermediate_size=1024, moe_intermediate_size=512, num_hidden_layers=4, num_experts=8,
             num_attention_heads=8, num_key_value_heads=4)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _measured(fn) -> tuple[float, float]:
    """(extra peak RSS in MiB, seconds) of fn()."""
    import torch.distributed as dist

    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")
    before, start = _status_kb("VmRSS"), time.perf_counter()
    fn()
    return (_status_kb("VmHWM") - before) / 1024, time.perf_counter() - start


def _actor():
    from grpo_megatron.config import TrainConfig
    from grpo_megatron.models import build_model, model_dims
    from grpo_megatron.models.tiny import tiny_hf_config
    from grpo_megatron.parallel import ParallelLayout, init_model_parallel
    from grpo_megatron.training.actor import Actor

    config = tiny_hf_config("qwen3_moe", vocab_size=4096, **SHAPE)
    init_model_parallel(ParallelLayout(), seed=0, **model_dims(config))
    torch.manual_seed(0)
    policy = build_model(config, ParallelLayout(), torch.bfloat16, wrap_ddp=True,
                         ddp_overrides={"use_distributed_optimizer": True})
    return Actor(policy, TrainConfig(steps=2, num_minibatches=1, lr=1e-3), total_steps=2)


def _adam_step(actor) -> None:
    from grpo_megatron.samples import Sample
    from grpo_megatron.training.batch import make_micro_batches

    g = torch.Generator().manual_seed(0)
    batch = [Sample(prompt_ids=torch.randint(3, 4096, (8,), generator=g).tolist(),
                    response_ids=torch.randint(3, 4096, (8,), generator=g).tolist(), group=0) for _ in range(4)]

    def nll(mb, logprobs, entropy):
        return -(logprobs * mb.response_mask).sum() / 32, {}

    actor.train_step(make_micro_batches(batch, list(range(4)), 2, 0), nll, 1.0)


def _state_sum(actor) -> float:
    """Sum of every exp_avg_sq over all DP shards: the same at any DP size when a load restored the state."""
    import torch.distributed as dist

    local = sum(float(s["exp_avg_sq"].double().sum()) for w in actor.optimizer.chained_optimizers
                for s in w.optimizer.state.values())
    total = torch.tensor([local], dtype=torch.float64)
    dist.all_reduce(total)
    return float(total)


def worker(args) -> None:
    import torch.distributed as dist

    from grpo_megatron.parallel import init_distributed

    init_distributed()
    torch.set_num_threads(1)
    actor = _actor()
    rank, results = dist.get_rank(), {}
    if not args.load_dp1:
        _adam_step(actor)
        results["state_sum"] = _state_sum(actor)
        results["parameters"] = sum(p.numel() for p in actor.model.chunks[0].parameters())
    mcore_checkpoint.OPTIMIZER_FORMATS.update(FORMATS)  # the variant too, under its own name
    for name in FORMATS:
        path = Path(args.dir) / name
        try:
            if args.load_dp1:
                memory, seconds = _measured(lambda: mcore_checkpoint.load_mcore_checkpoint(actor.model, path,
                                                                                           optimizer=actor.optimizer))
                results[name] = {"load_dp1_mib": memory, "load_dp1_s": seconds, "state_sum_dp1": _state_sum(actor)}
                continue
            save = _measured(lambda: mcore_checkpoint.save_mcore_checkpoint(actor.model, path, optimizer=actor.optimizer,
                                                                            optimizer_format=name))
            load = _measured(lambda: mcore_checkpoint.load_mcore_checkpoint(actor.model, path, optimizer=actor.optimizer))
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
            results[name] = {"save_mib": save[0], "save_s": save[1], "load_mib": load[0], "load_s": load[1],
                             "disk_mib": size, "state_sum_after_load": _state_sum(actor)}
        except Exception as err:  # a format this layout cannot load: reported, not fatal
            results[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, results)
    if rank == 0:
        Path(args.out).write_text(json.dumps(everyone))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--load-dp1", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--nproc", type=int, choices=(1, 2), default=2, help="ranks that save (DP size)")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    from grpo_megatron.parallel import free_port

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    launches = [(2, []), (1, ["--load-dp1"])] if args.nproc == 2 else [(1, [])]
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for nproc, extra in launches:
            out = Path(tmp) / f"dp{nproc}{''.join(extra)}.json"
            launcher = ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}"]
            subprocess.run([sys.executable, *(launcher if nproc > 1 else []), __file__, "--worker", "--dir", tmp,
                            "--out", str(out), *extra], env=env, check=True, cwd=REPO)
            runs[nproc] = json.loads(out.read_text())
    dp2 = runs[args.nproc]
    dp1 = runs[1][0] if args.nproc == 2 else {name: {"error": "not run (--nproc 1)"} for name in FORMATS}
    print(f"{dp2[0]['parameters'] / 1e6:.1f}M parameters, bf16 with fp32 masters; Adam state sum {dp2[0]['state_sum']:.6e}")
    print(f"| format | save at DP{args.nproc}: extra peak RSS per rank (MiB) | save s | load at DP{args.nproc}: extra MiB "
          f"per rank | load at DP1: extra MiB | on disk MiB | state after DP{args.nproc} / DP1 load |")
    print("|---|---|---|---|---|---|---|")
    for name in FORMATS:
        ranks = [r[name] for r in dp2]
        if "error" in ranks[0]:
            print(f"| {name} | {ranks[0]['error']} | | | | | |")
            continue
        load1 = dp1[name]
        same2 = all(abs(r["state_sum_after_load"] - dp2[0]["state_sum"]) <= 1e-9 * dp2[0]["state_sum"] for r in ranks)
        dp1_cell = load1.get("error") or f"{load1['load_dp1_mib']:.0f}"
        same1 = "error" not in load1 and abs(load1["state_sum_dp1"] - dp2[0]["state_sum"]) <= 1e-9 * dp2[0]["state_sum"]
        saves = " / ".join(f"{r['save_mib']:.0f}" for r in ranks)
        loads = " / ".join(f"{r['load_mib']:.0f}" for r in ranks)
        print(f"| {name} | {saves} | {ranks[0]['save_s']:.1f} | {loads} | {dp1_cell} | {ranks[0]['disk_mib']:.0f} | "
              f"{'same' if same2 else 'DIFFERENT'} / {'same' if same1 else 'not restored'} |")


if __name__ == "__main__":
    main()
