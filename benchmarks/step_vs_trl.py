"""One RL step (generation + log-probs + update) in this project vs TRL's GRPOTrainer (GSPO), alternating.

Both systems load the CPU example's tiny Qwen3-MoE (examples/tiny_cpu/prepare.py): TRL the HF checkpoint,
this project the megatron checkpoint converted from that same HF checkpoint (its embedded engine loads the
HF one). Both get the same prompts file (the first prompts of the copy task, in file order, no shuffling),
the same reward function (`copy`), group size, max new tokens, temperature, loss (GSPO: sequence-level
importance ratio, clip 3e-4 / 4e-4, no KL, per-sequence mean aggregation) and optimizer (Adam(W) lr 5e-4,
betas 0.9/0.999, eps 1e-8, weight decay 0, grad clip 1.0, constant LR, no warm-up).

Per RL step each system generates prompts x group completions, scores them, and makes ONE optimizer step
over all of them in micro-batches of --micro-batch sequences (TRL: per_device_train_batch_size=micro,
gradient_accumulation_steps=batch/micro, which makes steps_per_generation the same, so TRL generates once
per optimizer step; this project: train.num_minibatches=1, micro_batch_size=micro).

Alternation: TRL's own `trainer.train()` runs, and a callback times each of its optimizer steps
(on_step_begin -> on_step_end) and right after it runs one step of this project's Trainer (`train_step()`,
timed on its own), so the two alternate A B A B ... in one process under the same load. The first
--warmup steps of each are dropped. Tokens/s = (prompt + completion tokens of the step) / step time;
TRL's count is the increase of `state.num_input_tokens_seen`, ours `rollout/tokens`.

Settings that differ, and why:
  * generation: TRL calls transformers `model.generate` (its non-vLLM path); this project its embedded engine
    (transformers model + KV cache, finished rows dropped). Both are the system's own CPU generation path.
  * update model: TRL trains the HF transformers model under accelerate; this project the megatron-core GPTModel
    (same weights) through megatron's schedule and optimizer. That is the comparison.
  * old log-probs: TRL skips the old-policy pass when it makes one optimizer step per generation (it uses the
    detached current log-probs); this project computes them unless the trainer can prove them redundant
    (see the trainer's own rule; reported in the output as time/old_logprobs).
  * weight sync: this project copies the updated weights into its engine every step (time/weight_sync, counted
    in its step time); TRL generates with the trained model itself, so it has no sync.
  * TRL also computes its own logging metrics (entropy, clip ratios); this project its metrics. Both counted.
  * micro-batches (only when asked): --max-tokens-per-microbatch gives this project token-budget micro-batches
    (train.max_tokens_per_microbatch) and --trl-micro-batch sets TRL's per_device_train_batch_size (with
    gradient_accumulation_steps = batch / it); "each system's best" = one micro-batch of the whole batch for both.

    python benchmarks/step_vs_trl.py [--steps 7] [--warmup 1] [--threads 1] [--prompts 16] [--group 8]
        [--max-tokens-per-microbatch N] [--trl-micro-batch N]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _prepare(cache: Path):
    sys.path.insert(0, str(REPO / "examples" / "tiny_cpu"))
    from prepare import prepare

    return prepare(cache, "copy")


def _prompts_file(train: Path, out: Path, n: int) -> list[dict]:
    rows = [json.loads(line) for line in train.read_text().splitlines()[:n]]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def make_ours(args, inputs, prompts: Path, run_dir: Path):
    from grpo_megatron.config import load_config
    from grpo_megatron.training.loop import Trainer

    cfg = load_config(None, {
        "run_dir": str(run_dir),
        "model": {"hf_path": str(inputs["hf"]), "megatron_path": str(inputs["mcore"])},
        "data": {"train_files": [str(prompts)], "eval_files": [], "shuffle": False},
        "rollout": {"prompts_per_step": args.prompts, "group_size": args.group, "max_new_tokens": args.max_new_tokens,
                    "temperature": 1.0},
        "reward": {"functions": [{"name": "copy"}]},
        "algorithm": {"loss": "gspo", "clip_low": 3e-4, "clip_high": 4e-4, "loss_agg": "seq_mean_token_mean"},
        "train": {"steps": 10_000, "num_minibatches": 1, "micro_batch_size": args.micro_batch, "lr": args.lr,
                  "lr_warmup_steps": 0, "weight_decay": 0.0, "clip_grad": 1.0, "num_threads": args.threads,
                  "max_tokens_per_microbatch": args.max_tokens_per_microbatch},
        "logging": {"progress_bar": False, "tensorboard": False},
        "checkpoint": {"save_interval": 0},
        "eval": {"interval": 0},
    })
    return Trainer(cfg)


def make_trl(args, inputs, rows: list[dict], out_dir: Path, callback):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from grpo_megatron.rollout.data.tasks import copy_reward

    def reward(prompts, completions, answer, **_):
        return [copy_reward(c, a, {}) for c, a in zip(completions, answer)]

    tokenizer = AutoTokenizer.from_pretrained(inputs["hf"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    import torch

    model = AutoModelForCausalLM.from_pretrained(inputs["hf"], dtype=torch.float32)
    batch = args.prompts * args.group
    micro = args.trl_micro_batch or args.micro_batch
    config = GRPOConfig(
        output_dir=str(out_dir), max_steps=args.steps + args.warmup, per_device_train_batch_size=micro,
        gradient_accumulation_steps=batch // micro, num_generations=args.group,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch",
        importance_sampling_level="sequence", loss_type="grpo", epsilon=3e-4, epsilon_high=4e-4, beta=0.0,
        num_iterations=1, scale_rewards="group", shuffle_dataset=False, use_cpu=True, bf16=False, fp16=False,
        logging_steps=10_000, save_strategy="no", report_to=[], disable_tqdm=True, seed=1234,
        dataloader_num_workers=0, log_completions=False,
    )
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    return GRPOTrainer(model=model, reward_funcs=[reward], args=config, train_dataset=dataset,
                       processing_class=tokenizer, callbacks=[callback])


def summarise(name: str, times: list[float], tokens: list[float]) -> dict:
    rates = [n / t for n, t in zip(tokens, times)]
    return {"name": name, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "tokens_per_s": statistics.median(rates), "tokens_per_step": statistics.median(tokens), "n": len(times)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=7, help="timed steps of each system")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps of each system")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--max-tokens-per-microbatch", type=int, default=None,
                        help="ours: token-budget micro-batches instead of --micro-batch rows")
    parser.add_argument("--trl-micro-batch", type=int, default=None,
                        help="TRL's per_device_train_batch_size (default --micro-batch)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both systems)")
    parser.add_argument("--cache", default=str(REPO / "examples" / "tiny_cpu" / "cache"))
    args = parser.parse_args(argv)
    if (args.prompts * args.group) % (args.trl_micro_batch or args.micro_batch):
        parser.error("prompts x group must be a multiple of --micro-batch and --trl-micro-batch")

    import torch
    from transformers import TrainerCallback

    torch.set_num_threads(args.threads)
    inputs = _prepare(Path(args.cache))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = _prompts_file(inputs["train"], tmp / "prompts.jsonl", args.prompts * (args.steps + args.warmup + 1))
        ours = make_ours(args, inputs, tmp / "prompts.jsonl", tmp / "ours")
        torch.set_num_threads(args.threads)
        record = {"trl": [], "trl_tokens": [], "ours": [], "ours_tokens": [], "ours_phases": []}

        class Alternate(TrainerCallback):
            def on_step_begin(self, targs, state, control, **kw):
                self.tokens0 = state.num_input_tokens_seen
                self.t0 = time.perf_counter()

            def on_step_end(self, targs, state, control, **kw):
                record["trl"].append(time.perf_counter() - self.t0)
                record["trl_tokens"].append(state.num_input_tokens_seen - self.tokens0)
                t0 = time.perf_counter()
                metrics = ours.train_step()
                record["ours"].append(time.perf_counter() - t0)
                record["ours_tokens"].append(metrics["rollout/tokens"])
                record["ours_phases"].append({k: v for k, v in metrics.items() if k.startswith("time/")})
                print(f"step {state.global_step}: trl {record['trl'][-1]:.3f}s  ours {record['ours'][-1]:.3f}s",
                      flush=True)

        trl = make_trl(args, inputs, rows, tmp / "trl", Alternate())
        trl.train()
        ours.close()

    w = args.warmup
    results = {"trl": summarise("TRL GRPOTrainer (GSPO)", record["trl"][w:], record["trl_tokens"][w:]),
               "ours": summarise("grpo_megatron", record["ours"][w:], record["ours_tokens"][w:])}
    phases = record["ours_phases"][w:]
    results["ours_phases_median"] = {k: statistics.median(p[k] for p in phases) for k in phases[0]}
    results["ratio"] = results["trl"]["median_s"] / results["ours"]["median_s"]
    pair_ratios = sorted(t / o for t, o in zip(record["trl"][w:], record["ours"][w:]))
    results["pair_ratio_median"] = statistics.median(pair_ratios)
    results["settings"] = {"threads": args.threads, "prompts": args.prompts, "group": args.group,
                           "max_new_tokens": args.max_new_tokens, "micro_batch": args.micro_batch, "lr": args.lr,
                           "max_tokens_per_microbatch": args.max_tokens_per_microbatch,
                           "trl_micro_batch": args.trl_micro_batch or args.micro_batch}
    print(f"\nsettings: {results['settings']}")
    for key in ("trl", "ours"):
        r = results[key]
        print(f"{r['name']:>24}: median step {r['median_s']:.3f}s (min {r['min_s']:.3f}, max {r['max_s']:.3f}, "
              f"n={r['n']}), {r['tokens_per_s']:.0f} tokens/s ({r['tokens_per_step']:.0f} tokens/step)")
    print("grpo_megatron phases (median s): " +
          ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in results["ours_phases_median"].items()))
    print(f"ratio TRL/ours step time: {results['ratio']:.2f}x (target >= 2x: "
          f"{'met' if results['ratio'] >= 2 else 'NOT met'}); median of per-pair ratios "
          f"{results['pair_ratio_median']:.2f}x ({pair_ratios[0]:.2f}-{pair_ratios[-1]:.2f})")
    return results


if __name__ == "__main__":
    main()
