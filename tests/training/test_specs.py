"""Downstream code gets the config sections or the small frozen specs it reads (training/builder.py builds them),
never the whole RunConfig: only the assembly points (config/, training/builder.py, training/loop.py, preflight,
process setup, plan/, simulation/) see a RunConfig."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

import grpo_megatron

PACKAGE = Path(grpo_megatron.__file__).parent
DOWNSTREAM = ["training/update_math.py", "training/evaluation.py", "training/run_log.py", "training/opd.py",
              "training/weight_push.py", "training/rollout_side.py", "training/rollout_worker.py",
              "training/learner.py", "training/sft.py", "rollout/factory.py"]


def _names_used(path: Path) -> set[str]:
    """Every name a module imports (TYPE_CHECKING blocks too) or uses in its code and annotations."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.ImportFrom, ast.Import)):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
    return names


@pytest.mark.parametrize("module", DOWNSTREAM)
def test_downstream_modules_never_import_the_whole_run_config(module):
    assert "RunConfig" not in _names_used(PACKAGE / module)


def test_the_builder_gives_each_part_its_view_of_the_config(make_config):
    from grpo_megatron.training.builder import learner_spec, rollout_spec

    cfg = make_config(rollout={"temperature": 0.0, "use_engine_logprobs": True},
                      algorithm={"loss": "gspo", "routing_replay": "r3"}, train={"seed": 9, "steps": 3})
    learner, rollout = learner_spec(cfg), rollout_spec(cfg)
    update = learner.update
    assert update.algorithm is cfg.algorithm and learner.train is cfg.train and learner.checkpoint is cfg.checkpoint
    assert (update.group_size, update.max_new_tokens, update.use_engine_logprobs, update.num_minibatches,
            update.seed) == (4, 3, True, 2, 9)
    assert update.temperature == 0.0 and update.logprob_temperature == 1.0  # greedy rollouts are scored at 1
    assert (learner.hf_path, learner.pad_multiple, learner.sft_batch_size) == (cfg.model.hf_path, 1, 16)
    assert rollout.rollout is cfg.rollout and rollout.reward is cfg.reward and rollout.eval is cfg.eval
    assert (rollout.seed, rollout.steps, rollout.engine_routes, rollout.hf_path) == (9, 3, True, cfg.model.hf_path)
    for spec in (learner, update, rollout):
        with pytest.raises(dataclasses.FrozenInstanceError):
            spec.seed = 1  # a spec, like the config it is cut from, is fixed once built
