"""Documented behaviour for bad config keys, bad dataset lines and failing reward functions."""
import logging
import threading
import time

import pytest

from grpo_megatron.config import ConfigError, load_config, parse_overrides
from grpo_megatron.config import RewardConfig, RewardFunctionConfig
from grpo_megatron.rollout.data.prompts import DatasetError
from grpo_megatron.rollout.rewards.runner import RewardRunner


def test_unknown_config_key_lists_known_keys(make_config):
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) train.learning_rate.*known keys in train: .*lr"):
        make_config(train={"learning_rate": 1e-3})
    with pytest.raises(ConfigError, match="unknown config key.*optimiser"):
        make_config(optimiser={"lr": 1})


def test_megatron_flags_and_dotted_overrides(make_config):
    overrides = parse_overrides(["--tensor-model-parallel-size", "2", "--micro-batch-size=3", "--train.lr", "2e-6",
                                 "--bf16", "--rollout.group_size", "4"])
    assert overrides == {"parallel": {"tensor_parallel": 2}, "train": {"micro_batch_size": 3, "lr": 2e-6},
                         "model": {"dtype": "bfloat16"}, "rollout": {"group_size": 4}}
    with pytest.raises(ConfigError, match="unknown flag --tensor-parallel"):
        parse_overrides(["--tensor-parallel", "2"])


def test_type_errors_and_cross_field_checks(make_config):
    with pytest.raises(ConfigError, match="train.steps: expected int"):
        make_config(train={"steps": "many"})
    with pytest.raises(ConfigError, match="does not split into train.num_minibatches=3"):
        make_config(train={"num_minibatches": 3})
    with pytest.raises(ConfigError, match="routing_replay='r5'"):
        make_config(algorithm={"routing_replay": "r5"})
    with pytest.raises(ConfigError, match="max_tokens_per_microbatch .*pipeline_parallel 1"):
        make_config(train={"max_tokens_per_microbatch": 64}, parallel={"pipeline_parallel": 2})


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_routing_replay_on_a_dense_model_is_refused(make_config, tiny_hf_dir, dist_world1):
    from grpo_megatron.training.loop import Trainer

    with pytest.raises(ConfigError, match="needs an MoE model"):
        Trainer(make_config(model={"hf_path": str(tiny_hf_dir("llama"))}, algorithm={"routing_replay": "r2"}))


def test_malformed_dataset_line_names_file_and_line(make_config, tmp_path, dist_world1):
    from grpo_megatron.training.loop import Trainer

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "first 1 2 =", "answer": "1"}\n{"answer": "3"}\n')
    with pytest.raises(DatasetError, match=rf"{bad}:2"):
        Trainer(make_config(data={"train_files": [str(bad)], "eval_files": []}))


def _raises(text, answer, meta):
    raise RuntimeError("boom")


def _sleeps(text, answer, meta):
    time.sleep(5)
    return 1.0


def test_reward_exception_and_timeout_score_the_fallback(caplog):
    cfg = RewardConfig(functions=[RewardFunctionConfig(name="exact_match", weight=1.0),
                                  RewardFunctionConfig(name=f"{__name__}:_raises", weight=1.0)],
                       fallback=-0.5, timeout_s=0.2)
    runner = RewardRunner(cfg)
    with caplog.at_level(logging.WARNING):
        scores = runner.score(["p"], ["7"], ["7"], [{}])
    assert scores == [1.0 - 0.5]
    assert "raised RuntimeError: boom on response '7'" in caplog.text

    slow = RewardRunner(RewardConfig(functions=[RewardFunctionConfig(name=f"{__name__}:_sleeps")],
                                     fallback=0.0, timeout_s=0.2))
    start = time.perf_counter()
    assert slow.score(["p"], ["x"], [None], [{}]) == [0.0]
    assert time.perf_counter() - start < 2.0
    assert slow.failures == 1


_BARRIER = threading.Barrier(4, timeout=5)


def _meets_the_others(text, answer, meta):
    _BARRIER.wait()  # breaks (raises) unless 4 calls run at the same time
    return float(text)


def test_rewards_of_a_batch_run_concurrently_and_keep_their_order():
    runner = RewardRunner(RewardConfig(functions=[RewardFunctionConfig(name=f"{__name__}:_meets_the_others")],
                                       fallback=-1.0, timeout_s=10))
    assert runner.score(["p"] * 4, ["1", "2", "3", "4"], [None] * 4, [{}] * 4) == [1.0, 2.0, 3.0, 4.0]
    assert runner.failures == 0


def test_unimportable_user_reward_is_an_error():
    with pytest.raises(ValueError, match="cannot be imported"):
        RewardRunner(RewardConfig(functions=[RewardFunctionConfig(name="no_such_module:fn")]))
