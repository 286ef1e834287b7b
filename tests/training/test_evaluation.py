"""Held-out evaluation: every eval file reported on its own, greedy accuracy beside sampled avg@k / pass@k."""
import pytest

from grpo_megatron.algorithms import pass_at_k
from grpo_megatron.training.loop import Trainer


def test_each_eval_file_on_its_own_with_avg_and_pass_at_k(make_config, task_files, tmp_path, dist_world1):
    from grpo_megatron.rollout.data.tasks import make_task_dataset

    second = make_task_dataset("first_digit", 6, 2, tmp_path / "hard.jsonl")
    cfg = make_config(data={"eval_files": [str(task_files["eval"]), str(second)]},
                      eval={"num_prompts": 8, "num_samples": 4, "temperature": 1.0})
    trainer = Trainer(cfg)
    calls = []
    score = trainer.rollouts.rewards.score
    trainer.rollouts.rewards.score = lambda *args: calls.append(score(*args)) or calls[-1]
    metrics = trainer.evaluate()
    trainer.close()
    for name, n in (("eval", 8), ("hard", 6)):
        for key in ("accuracy", "reward_mean", "avg@4", "pass@1", "pass@2", "pass@4"):
            assert 0.0 <= metrics[f"eval/{name}/{key}"] <= 1.0, (name, key)
        # pass@1 over k samples is avg@k; pass@k grows with k.
        assert metrics[f"eval/{name}/pass@1"] == pytest.approx(metrics[f"eval/{name}/avg@4"])
        assert metrics[f"eval/{name}/pass@1"] <= metrics[f"eval/{name}/pass@2"] <= metrics[f"eval/{name}/pass@4"]
    # Calls: greedy then sampled, per file; the sampled call scores n x k responses.
    greedy_eval, sampled_eval, greedy_hard, sampled_hard = calls
    assert (len(greedy_eval), len(sampled_eval), len(greedy_hard), len(sampled_hard)) == (8, 32, 6, 24)
    hits = [sum(r >= 1.0 for r in sampled_hard[4 * i:4 * i + 4]) for i in range(6)]
    assert metrics["eval/hard/pass@2"] == pytest.approx(sum(pass_at_k(4, c, 2) for c in hits) / 6)
    assert metrics["eval/hard/avg@4"] == pytest.approx(sum(hits) / 24)
    assert metrics["eval/hard/accuracy"] == pytest.approx(sum(r >= 1.0 for r in greedy_hard) / 6)
    # The pooled greedy numbers weigh every prompt once.
    pooled = greedy_eval + greedy_hard
    assert metrics["eval/accuracy"] == pytest.approx(sum(r >= 1.0 for r in pooled) / 14)
    assert metrics["eval/reward_mean"] == pytest.approx(sum(pooled) / 14)


def test_greedy_only_by_default(make_config, dist_world1):
    trainer = Trainer(make_config())
    metrics = trainer.evaluate()
    trainer.close()
    assert set(metrics) == {"eval/eval/accuracy", "eval/eval/reward_mean", "eval/accuracy", "eval/reward_mean"}
    assert metrics["eval/accuracy"] == metrics["eval/eval/accuracy"]
