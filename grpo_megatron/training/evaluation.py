"""Held-out evaluation through the rollout engine: greedy accuracy per eval file, and with eval.num_samples = k
the sampled avg@k and unbiased pass@j."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from grpo_megatron.algorithms import pass_at_k
from grpo_megatron.config import EvalConfig
from grpo_megatron.rollout.engines.base import RolloutEngine, SamplingParams
from grpo_megatron.rollout.data.prompts import PromptDataset
from grpo_megatron.rollout.rewards.runner import RewardRunner

EVAL_SEED_OFFSET = 1 << 30
"""Sampled evaluation draws with seed offsets from here (one per eval file), apart from the rollouts' offsets."""


def eval_names(files: list[str]) -> dict[str, str]:
    """Metric name -> eval file: the file's stem, with `_<i>` added where two files share a stem."""
    stems = [Path(f).stem for f in files]
    return {(stem if stems.count(stem) == 1 else f"{stem}_{i}"): f for i, (stem, f) in enumerate(zip(stems, files))}


class Evaluator:
    """`eval/<file stem>/accuracy` and `reward_mean` of greedy responses and, with eval.num_samples = k,
    `avg@k` (accuracy over the k sampled responses of every prompt) and unbiased `pass@j` for j = 1, 2, 4, ...
    up to k. `eval/accuracy` and `eval/reward_mean` pool the greedy results of all files. A response is correct
    with a reward >= `correct_threshold` (reward.correct_threshold)."""

    def __init__(self, eval_cfg: EvalConfig, correct_threshold: float, engine: RolloutEngine, tokenizer,
                 rewards: RewardRunner, eval_sets: dict[str, PromptDataset],
                 sampling_params: Callable[..., SamplingParams]):
        self.eval_cfg, self.correct_threshold = eval_cfg, correct_threshold
        self.engine, self.tokenizer, self.rewards = engine, tokenizer, rewards
        self.eval_sets, self.sampling_params = eval_sets, sampling_params

    def __call__(self) -> dict:
        cfg, threshold = self.eval_cfg, self.correct_threshold
        greedy = self.sampling_params(0, greedy=True, n=1, max_new_tokens=cfg.max_new_tokens)
        metrics, pooled = {}, []
        for index, (name, data) in enumerate(self.eval_sets.items()):
            items = [data[i] for i in range(min(cfg.num_prompts, len(data)))]
            if not items:
                continue
            rewards = [group[0] for group in self._rewards(items, greedy)]
            pooled += rewards
            metrics[f"eval/{name}/accuracy"] = sum(r >= threshold for r in rewards) / len(items)
            metrics[f"eval/{name}/reward_mean"] = sum(rewards) / len(items)
            if cfg.num_samples:
                k = cfg.num_samples
                params = self.sampling_params(EVAL_SEED_OFFSET + index, n=k, max_new_tokens=cfg.max_new_tokens)
                if cfg.temperature is not None:
                    params = dataclasses.replace(params, temperature=cfg.temperature)
                hits = [sum(r >= threshold for r in group) for group in self._rewards(items, params)]
                metrics[f"eval/{name}/avg@{k}"] = sum(hits) / (k * len(items))
                for j in sorted({2 ** p for p in range(k.bit_length()) if 2 ** p <= k} | {k}):
                    metrics[f"eval/{name}/pass@{j}"] = sum(pass_at_k(k, c, j) for c in hits) / len(items)
        if pooled:
            metrics["eval/accuracy"] = sum(r >= threshold for r in pooled) / len(pooled)
            metrics["eval/reward_mean"] = sum(pooled) / len(pooled)
        return metrics

    def _rewards(self, items: list[dict], params: SamplingParams) -> list[list[float]]:
        """Rewards of params.n responses to every eval item, one list per item."""
        outs = self.engine.generate([it["prompt_ids"] for it in items], params)
        responses = [o.response_ids for group in outs for o in group]
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        prompts = self.tokenizer.batch_decode([it["prompt_ids"] for it in items], skip_special_tokens=True)
        n = params.n
        rewards = self.rewards.score([p for p in prompts for _ in range(n)], texts,
                                     [it["answer"] for it in items for _ in range(n)],
                                     [it["meta"] for it in items for _ in range(n)])
        return [rewards[i * n:(i + 1) * n] for i in range(len(items))]
