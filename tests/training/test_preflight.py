"""Every no-model check of the command line fires before any model is built: one `error:` line, exit 2.

In-process and cheap: `grpo_megatron.train.main` runs with the Trainer replaced by a sentinel that fails the
test if it is ever constructed (it is what builds and loads the models), so a check that ran only after the
model load would show as that failure, not as the expected line.
"""
from __future__ import annotations

import json

import pytest
import yaml

from grpo_megatron import train as train_cli
from grpo_megatron.platform import megatron_version


class ModelBuilt(AssertionError):
    pass


@pytest.fixture
def run_cli(task_files, tmp_path, monkeypatch, capsys):
    """run_cli(*overrides) -> (exit status, stderr lines starting "error: ") of the CLI on a valid base config."""
    from grpo_megatron import process_setup
    from grpo_megatron.training import loop

    def sentinel(self, cfg):
        raise ModelBuilt("the Trainer (model build and load) was reached")

    monkeypatch.setattr(loop.Trainer, "__init__", sentinel)
    monkeypatch.setattr(process_setup, "prepare_process", lambda cfg: None)  # no signal handlers in pytest
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), "model": {"hf_path": str(task_files["hf"])},
        "data": {"train_files": [str(task_files["train"])], "eval_files": [str(task_files["eval"])]},
        "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 3},
        "reward": {"functions": [{"name": "first_digit"}]},
        "train": {"steps": 2, "num_minibatches": 2, "micro_batch_size": 4}}))

    def run(*overrides: str) -> tuple[int, list[str]]:
        status = train_cli.main(["--config", str(config), *overrides])
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        return status, [line for line in err.splitlines() if line.startswith("error: ")]

    return run


SGLANG = ["--rollout.engine", "sglang", "--rollout.sglang.urls", "[http://127.0.0.1:1]"]

CASES = {
    "loss name": (["--algorithm.loss", "gspo_tokn"], "algorithm.loss='gspo_tokn': use cispo, clip_cov"),
    "advantage estimator": (["--algorithm.advantage", "grpoo"], "algorithm.advantage='grpoo'"),
    "KL estimator": (["--algorithm.kl_estimator", "k9"], "algorithm.kl_estimator='k9'"),
    "loss aggregation": (["--algorithm.loss_agg", "mean"], "algorithm.loss_agg='mean'"),
    "negative temperature": (["--rollout.temperature", "-1"], "rollout.temperature=-1.0: must be >= 0"),
    "no new tokens": (["--rollout.max_new_tokens", "0"], "rollout.max_new_tokens=0: must be >= 1"),
    "top_p": (["--rollout.top_p", "0"], "rollout.top_p=0.0"),
    "top_k": (["--rollout.top_k", "0"], "rollout.top_k=0"),
    "eval tokens": (["--eval.max_new_tokens", "0"], "eval.max_new_tokens=0"),
    "rollout function": (["--rollout.function", "nowhere"], "rollout.function='nowhere'"),
    "tool name": (["--rollout.function", "tool_loop", "--rollout.tools.names", "calculatr"], "unknown tool 'calculatr'"),
    "reward name": (["--reward.functions", "[{name: accurcy}]"], "reward.functions[0].name='accurcy': unknown reward"),
    "user reward": (["--reward.functions", "[{name: 'no_such_module:fn'}]"], "cannot be imported"),
    "reward options": (["--reward.functions", "[{name: length, options: {nope: 1}}]"], "bad options"),
    "engine urls": (["--rollout.engine", "sglang"], "needs rollout.sglang.urls"),
    "sync mode": ([*SGLANG, "--rollout.sglang.weight_sync", "tensr"], "rollout.sglang.weight_sync='tensr'"),
    "server tp size": ([*SGLANG, "--rollout.sglang.server_tp_size", "0"], "server_tp_size=0"),
    "tensor sync to a remote server": (["--rollout.engine", "sglang", "--rollout.sglang.urls", "[http://no-such-host.invalid:1]",
                                        "--rollout.sglang.weight_sync", "tensor"], "is not on this host"),
    "distributed sync to colocated servers over NCCL": (
        [*SGLANG, "--rollout.sglang.weight_sync", "distributed", "--rollout.sglang.colocated", "true",
         "--rollout.sglang.update_backend", "nccl"], "Duplicate GPU detected"),
    "bucket size": (["--rollout.sglang.bucket_mb", "0"], "rollout.sglang.bucket_mb=0.0: must be > 0"),
    "missing train file": (["--data.train_files", "/nonexistent/train.jsonl"], "prompt file not found"),
    "missing eval file": (["--data.eval_files", "/nonexistent/eval.jsonl"], "prompt file not found"),
    "data file type": (["--data.eval_files", "{hf}/config.json"], "unsupported file type '.json'"),
    "missing megatron checkpoint": (["--model.megatron_path", "/nonexistent/ckpt"],
                                    "/nonexistent/ckpt is not a grpo_megatron megatron checkpoint"),
    "missing teacher checkpoint": (["--algorithm.loss", "grpo", "--algorithm.opd.teacher", "megatron",
                                    "--algorithm.opd.hf_path", "{hf}",
                                    "--algorithm.opd.megatron_path", "/nonexistent/teacher"],
                                   "/nonexistent/teacher is not a grpo_megatron megatron checkpoint"),
    "replay r2 without its pass": (["--algorithm.routing_replay", "r2", "--rollout.use_engine_logprobs", "true"],
                                   "routing_replay=r2 replays"),
}


@pytest.mark.parametrize("overrides, message", CASES.values(), ids=CASES.keys())
def test_no_model_check_fires_before_the_model_load(run_cli, task_files, overrides, message):
    status, lines = run_cli(*[o.replace("{hf}", str(task_files["hf"])) for o in overrides])
    assert status == 2 and len(lines) == 1 and message in lines[0], lines


def test_record_without_prompt_and_placement_fire_before_the_model_load(run_cli, tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1 2 =", "answer": "1"}\n{"answer": "3"}\n')
    status, lines = run_cli("--data.train_files", str(bad))
    assert status == 2 and lines == [f"error: {bad}:2: no `prompt` or `messages` field (found: ['answer']); add a "
                                     "`prompt` string or a chat `messages` list"]
    monkeypatch.setenv("WORLD_SIZE", "4")  # 1 server x TP 1 cannot take colocated tensor pushes from 4 ranks
    status, lines = run_cli(*SGLANG, "--rollout.sglang.weight_sync", "tensor", "--rollout.sglang.colocated", "true")
    assert status == 2 and len(lines) == 1 and "must equal the trainer's 4 ranks" in lines[0], lines


def test_model_type_from_config_json_fires_before_the_model_load(run_cli, tiny_hf_dir, tmp_path):
    status, lines = run_cli("--model.hf_path", str(tiny_hf_dir("llama")), "--algorithm.routing_replay", "r3")
    assert status == 2 and len(lines) == 1 and "routing_replay=r3 needs an MoE model; llama is dense" in lines[0]
    unsupported = tmp_path / "gpt2"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    status, lines = run_cli("--model.hf_path", str(unsupported))
    assert status == 2 and len(lines) == 1 and "unsupported architecture 'gpt2'" in lines[0], lines


def test_a_valid_config_reaches_the_model_build(run_cli):
    """The sentinel works: without a bad key the CLI gets to the Trainer."""
    with pytest.raises(ModelBuilt):
        run_cli()


@pytest.mark.parametrize("version", ["0.15.3", "0.20.0", "1.0.0"])
def test_megatron_outside_the_tested_range_is_one_line(run_cli, monkeypatch, version):
    monkeypatch.setattr(megatron_version, "installed_megatron_version", lambda: version)
    status, lines = run_cli()
    assert status == 2 and lines == [
        f"error: megatron-core {version} is outside the tested range >=0.16.1,<0.20 (tested: 0.16.1, 0.19.2): "
        "install megatron-core==0.19.2, or set GRPO_MEGATRON_ALLOW_UNTESTED_MEGATRON=1 to try it anyway"]


@pytest.mark.parametrize("version", ["0.16.1", "0.17.0", "0.19.2"])
def test_megatron_in_the_tested_range_passes(version):
    assert megatron_version.check_megatron_version(version) == version


def _user_errors():
    from grpo_megatron.errors import ConfigError
    from grpo_megatron.models.bridge import UnsupportedModelError
    from grpo_megatron.models.hf_weights import WeightMismatchError
    from grpo_megatron.models.mcore_checkpoint import CheckpointMismatchError
    from grpo_megatron.parallel import ParallelLayoutError
    from grpo_megatron.registry import UnknownNameError
    from grpo_megatron.rollout.data.prompts import DatasetError
    from grpo_megatron.rollout.rewards.runner import RewardsFailedError

    return (ConfigError, UnsupportedModelError, WeightMismatchError, CheckpointMismatchError, ParallelLayoutError,
            UnknownNameError, DatasetError, RewardsFailedError, megatron_version.UnsupportedMegatronError)


@pytest.mark.parametrize("error", _user_errors(), ids=lambda cls: cls.__name__)
def test_every_user_error_is_one_line_and_status_2(run_cli, monkeypatch, error):
    """Raised where the model is built or loaded (after preflight), each is still one line, no traceback."""
    from grpo_megatron.training import loop

    def raises(self, cfg):
        raise error("the message names the fix")

    monkeypatch.setattr(loop.Trainer, "__init__", raises)
    assert run_cli() == (2, ["error: the message names the fix"])


def test_the_entry_point_sets_process_state_before_the_trainer_is_built(run_cli, monkeypatch):
    """Signal handlers (a pre-emption warning during set-up must not be lost) and tensor sharing: prepare_process,
    called by the entry point between the checks and the Trainer."""
    from grpo_megatron import process_setup
    from grpo_megatron.training import loop

    order = []
    monkeypatch.setattr(process_setup, "prepare_process", lambda cfg: order.append(("prepare", cfg.rollout.engine)))

    def trainer(self, cfg):
        order.append(("trainer", cfg.rollout.engine))
        raise ModelBuilt

    monkeypatch.setattr(loop.Trainer, "__init__", trainer)
    with pytest.raises(ModelBuilt):
        run_cli()
    assert order == [("prepare", "embedded"), ("trainer", "embedded")]
