"""The config schema: a docstring under every field, and every `Literal` field refusing other values at load
with one line naming its choices."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import typing

import pytest

from grpo_megatron.config import ConfigError, RunConfig, load_config, replace_keys
from grpo_megatron.config.validation import literal_choices

BASE = {"model": {"hf_path": "/m"}, "data": {"train_files": ["/d.jsonl"]},
        "reward": {"functions": [{"name": "exact_match"}]}}


def _sections(cls=RunConfig, where=""):
    """(dotted key, dataclass, field) for every field of the config tree."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{where}.{f.name}" if where else f.name
        yield key, cls, f
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _sections(hints[f.name], key)


def _documented(cls) -> set[str]:
    """Fields of `cls` followed by a string literal in its class body (the torchtitan convention)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {a.target.id for a, nxt in zip(body, body[1:]) if isinstance(a, ast.AnnAssign)
            and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)}


def test_every_field_has_a_docstring():
    from grpo_megatron.parallel import ParallelLayout

    missing = [key for key, cls, f in _sections() if cls is not ParallelLayout and f.name not in _documented(cls)]
    assert not missing, f"fields without a docstring under them: {missing}"


LITERALS = [(key, literal_choices(typing.get_type_hints(cls)[f.name])) for key, cls, f in _sections()
            if literal_choices(typing.get_type_hints(cls)[f.name])]


def test_the_fixed_choices_are_literals():
    keys = {key for key, _ in LITERALS}
    assert {"model.dtype", "rollout.engine", "rollout.mode", "rollout.stale_groups", "rollout.sglang.weight_sync",
            "rollout.sglang.update_backend", "rollout.tools.format", "algorithm.routing_replay",
            "algorithm.opd.teacher", "algorithm.opd.mode", "train.lr_decay_style",
            "checkpoint.optimizer_format"} <= keys


@pytest.mark.parametrize("key,choices", LITERALS, ids=[k for k, _ in LITERALS])
def test_a_literal_field_refuses_other_values_naming_the_choices(key, choices):
    with pytest.raises(ConfigError) as err:
        load_config(overrides={**BASE, **_nested(key, "bogus_value")})
    message = str(err.value)
    assert message.startswith(f"{key}='bogus_value': use ") and "\n" not in message
    assert all((str(c) if c else '""') in message for c in choices)


def test_a_literal_field_takes_each_of_its_choices():
    cfg = load_config(overrides={**BASE, "model": {"hf_path": "/m", "dtype": "bf16"},
                                 "train": {"lr_decay_style": "cosine", "steps": 20}})
    assert (cfg.model.dtype, cfg.train.lr_decay_style) == ("bf16", "cosine")


def test_a_constructed_config_is_checked_too():
    from grpo_megatron.config import validate

    cfg = replace_keys(load_config(overrides=BASE), {"rollout.engine": "vllm"})
    with pytest.raises(ConfigError, match=r"rollout.engine='vllm': use embedded or sglang"):
        validate(cfg)


def test_the_opd_gspo_message_names_the_key():
    with pytest.raises(ConfigError) as err:
        load_config(overrides={**BASE, "algorithm": {"loss": "gspo", "opd": {"teacher": "megatron", "hf_path": "/t"}}})
    assert "set algorithm.opd.top_k > 0" in str(err.value)


def _nested(key: str, value) -> dict:
    """{"a": {"b": value}} for "a.b", merged over BASE's section when it has one."""
    head, *rest = key.split(".")
    if not rest:
        return {head: value}
    inner = _nested(".".join(rest), value)
    return {head: {**BASE.get(head, {}), **inner}}


def test_a_loaded_config_refuses_assignment_at_every_level():
    """Every section of a loaded config is frozen: code that needs another value builds another config."""
    cfg = load_config(overrides=BASE)
    nodes = [cfg, *cfg.reward.functions] + [_get(cfg, key) for key, _, _ in _sections()
                                             if dataclasses.is_dataclass(_get(cfg, key))]
    assert len(nodes) == 17  # the run, its one reward function and its 15 sections and subsections
    for node in nodes:
        first = dataclasses.fields(node)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(node, first, getattr(node, first))


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_replace_keys_gives_a_changed_copy_and_leaves_the_loaded_config_alone():
    cfg = load_config(overrides=BASE)
    changed = replace_keys(cfg, {"train.seed": 7, "rollout.sglang.bucket_mb": 1.5, "run_dir": "/r"})
    assert (changed.train.seed, changed.rollout.sglang.bucket_mb, changed.run_dir) == (7, 1.5, "/r")
    assert (cfg.train.seed, cfg.rollout.sglang.bucket_mb, cfg.run_dir) == (1234, 512.0, "runs/default")
    assert changed.algorithm is cfg.algorithm  # untouched sections are shared, which frozen sections allow
    with pytest.raises(ConfigError, match="unknown config key train.sed"):
        replace_keys(cfg, {"train.sed": 7})
