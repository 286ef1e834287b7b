#!/usr/bin/env python
"""Tool use on the CPU: a tiny Qwen3-MoE learns to call a calculator for 4-digit sums (task.py).

    python examples/tool_use/run.py            # SFT warm start on tool-call transcripts, then GSPO (~5 min)
    python examples/tool_use/run.py --quick    # a few steps of each, as the test runs it (< 60 s)
    python examples/tool_use/run.py --no-tool  # the baseline: the same steps on direct answers, single turn

Steps: make the example's own tiny checkpoint (the shared 64-token vocabulary plus the tool words of
grpo_megatron.models.tiny.TOOL_WORDS) and the data; a short supervised warm start on correct transcripts (the
inserted tool output has loss mask 0 there too); then RL with `rollout.function: tool_loop` (gspo_tools.yaml).
Held-out accuracy and tool-call rate are measured with the same tool loop, greedy, before and after RL (the
trainer's own `eval/*` is single-turn, so this script evaluates itself). Results go to <run-dir>/results.json.
Extra arguments are trainer overrides (e.g. --algorithm.loss grpo --algorithm.clip_low 0.2).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from task import is_correct, make_dataset, transcript  # noqa: E402


def prepare(cache: Path, seed: int = 0) -> dict[str, Path]:
    """The example's checkpoint (random init, vocabulary with the tool words) and its data, made once."""
    from grpo_megatron.models.tiny import TOOL_WORDS, make_tiny_hf_checkpoint

    hf = cache / "tiny_qwen3_moe_tools_hf"
    if not (hf / "config.json").exists():
        make_tiny_hf_checkpoint("qwen3_moe", hf, seed=seed, extra_words=TOOL_WORDS, hidden_size=128,
                                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, intermediate_size=256)
    train, held_out = cache / "sum_train.jsonl", cache / "sum_eval.jsonl"
    if not train.exists():
        make_dataset(20000, seed + 1, train)
    if not held_out.exists():
        make_dataset(128, seed + 2, held_out)
    return {"hf": hf, "train": train, "eval": held_out}


def tool_sft(trainer, steps: int, lr: float, batch_size: int, tool_fraction: float) -> list[float]:
    """Supervised steps on correct transcripts, a `tool_fraction` of them with the tool call (the policy's parts
    trained, the tool's output, mask 0, not), the others the answer alone."""
    from grpo_megatron.rollout.tools.formats import ToolFormat
    from grpo_megatron.training.actor import Actor
    from grpo_megatron.samples import Sample
    from grpo_megatron.training.batch import make_micro_batches

    import torch

    cfg, tok, tools = trainer.cfg, trainer.learner.tokenizer, trainer.cfg.rollout.tools
    fmt = ToolFormat(tools.format, tok, *tools.call_markers, tools.response_template)
    actor = Actor(trainer.learner.policy, dataclasses.replace(cfg.train, lr=lr, lr_warmup_steps=0, lr_decay_style="constant"),
                  total_steps=steps)
    generator, losses = torch.Generator().manual_seed(cfg.train.seed), []
    for _ in range(steps):
        picks = torch.randint(len(trainer.learner.train_data), (batch_size,), generator=generator).tolist()
        samples = []
        uses_tool = (torch.rand(batch_size, generator=generator) < tool_fraction).tolist()
        for group, (index, use_tool) in enumerate(zip(picks, uses_tool)):
            item = trainer.learner.train_data[index]
            call, output, answer = transcript(item["meta"]["a"], item["meta"]["b"])
            call_ids = tok(call, add_special_tokens=False).input_ids if use_tool else []
            tool_ids = fmt.render(output, tools.max_output_tokens) if use_tool else []
            answer_ids = tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
            mask = [1] * len(call_ids) + [0] * len(tool_ids) + [1] * len(answer_ids)
            samples.append(Sample(prompt_ids=list(item["prompt_ids"]), response_ids=call_ids + tool_ids + answer_ids,
                                  group=group, loss_mask=mask))
        normalizer = float(sum(sum(s.loss_mask) for s in samples))
        micro = make_micro_batches(samples, list(range(len(samples))), cfg.train.micro_batch_size, trainer.learner.pad_id)

        def nll(mb, logprobs, entropy):
            mask = mb.response_mask * mb.loss_mask
            loss = -(logprobs * mask).sum() / normalizer
            return loss, {"sft_loss": loss.detach() * normalizer / max(float(mask.sum()), 1.0)}

        losses.append(actor.train_step(micro, nll, temperature=1.0)["sft_loss"])
    trainer.learner.actor.install_schedule_hooks()
    trainer.sync_weights()
    return losses


def evaluate(trainer, items: list[dict]) -> dict[str, float]:
    """Tool-loop responses to the held-out prompts, greedy and sampled (temperature 1, one each): accuracy,
    tool-call rate (responses that call the tool), tool-error rate."""
    from grpo_megatron.rollout.functions import RolloutContext, generate_samples

    results, context = {}, RolloutContext(trainer.learner.tokenizer, trainer.cfg.rollout)
    for name, params in (("", trainer.rollouts.sampling_params(0, greedy=True, n=1)),
                         ("sampled_", trainer.rollouts.sampling_params(1 << 29, n=1))):
        samples = generate_samples(trainer.rollouts.engine, items, params, context, first_group=0)
        texts = trainer.learner.tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
        n = len(samples)
        results.update({
            f"{name}accuracy": sum(is_correct(t, s.answer) for t, s in zip(texts, samples)) / n,
            f"{name}tool_call_rate": sum(s.meta.get("tool_calls", 0) > 0 for s in samples) / n,
            f"{name}tool_error_rate": sum(s.meta.get("tool_errors", 0) > 0 for s in samples) / n})
        results.setdefault("example", texts[0])
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(HERE / "gspo_tools.yaml"))
    parser.add_argument("--cache", default=str(REPO / "runs" / "tool_use_cache"))
    parser.add_argument("--run-dir", default=str(REPO / "runs" / "tool_use_gspo"))
    parser.add_argument("--sft-steps", type=int, default=60, help="SFT warm-start steps (batch 64)")
    parser.add_argument("--sft-lr", type=float, default=2e-3)
    parser.add_argument("--sft-tool-fraction", type=float, default=0.5,
                        help="share of SFT transcripts that call the tool; the rest answer directly")
    parser.add_argument("--quick", action="store_true", help="3 SFT and 2 RL steps on 16 held-out prompts (CI)")
    parser.add_argument("--no-tool", action="store_true", help="baseline: SFT on answers alone, single-turn RL")
    args, overrides = parser.parse_known_args()

    from grpo_megatron.train import quiet_known_warnings

    quiet_known_warnings()
    from grpo_megatron.config import load_config
    from grpo_megatron.process_setup import prepare_process
    from grpo_megatron.rollout.data.prompts import PromptDataset
    from grpo_megatron.training.loop import Trainer

    started = time.perf_counter()
    files = prepare(Path(args.cache))
    overrides = ["--run_dir", args.run_dir, "--model.hf_path", str(files["hf"]),
                 "--data.train_files", str(files["train"]), *overrides]
    if args.quick:
        overrides = ["--train-iters", "2", "--train.lr_warmup_steps", "0", "--rollout.prompts_per_step", "4",
                     *overrides]
    if args.no_tool:
        overrides = ["--rollout.function", "single_turn", "--rollout.max_new_tokens", "8", *overrides]
    cfg = load_config(args.config, overrides)
    prepare_process(cfg)
    trainer = Trainer(cfg)
    held_out = PromptDataset([files["eval"]], trainer.learner.tokenizer, False)
    items = [held_out[i] for i in range(16 if args.quick else len(held_out))]
    results = {"initial": evaluate(trainer, items)}
    sft = tool_sft(trainer, 3 if args.quick else args.sft_steps, args.sft_lr, batch_size=64,
                   tool_fraction=0.0 if args.no_tool else args.sft_tool_fraction)
    results["before_rl"] = {**evaluate(trainer, items), "sft_loss_first": sft[0], "sft_loss_last": sft[-1]}
    history = trainer.train()
    results["after_rl"] = evaluate(trainer, items)
    trainer.close()
    results["sampled_reward"] = [h["reward/mean"] for h in history]
    results["wall_s"] = time.perf_counter() - started
    Path(args.run_dir, "results.json").write_text(json.dumps(results, indent=1))
    report(results, len(items), len(history), "without" if args.no_tool else "with")
    return 0


def report(results: dict, prompts: int, steps: int, tool: str) -> None:
    print(f"\n== tool-use example: {prompts} held-out prompts, {tool} the calculator ==")
    print(f"{'':<10} {'greedy: accuracy':>16} {'tool calls':>10} {'tool errors':>11} | {'sampled: accuracy':>17} "
          f"{'tool calls':>10} {'tool errors':>11}")
    for name in ("initial", "before_rl", "after_rl"):
        r = results[name]
        greedy = f"{r['accuracy']:>16.3f} {r['tool_call_rate']:>10.3f} {r['tool_error_rate']:>11.3f}"
        sampled = (f"{r['sampled_accuracy']:>17.3f} {r['sampled_tool_call_rate']:>10.3f} "
                   f"{r['sampled_tool_error_rate']:>11.3f}")
        print(f"{name:<10} {greedy} | {sampled}")
    print(f"greedy reply after RL: {results['after_rl']['example']!r}")
    rewards = results["sampled_reward"]
    print(f"sampled reward: first step {rewards[0]:.3f} -> last step {rewards[-1]:.3f}; "
          f"{steps} RL steps, wall time {results['wall_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
