"""Loading the run config: one YAML file plus command-line overrides, strictly checked.

Every key is a field of grpo_megatron.config.schema; an unknown key (in YAML or on the command line) is an
error that lists the known ones. Overrides come either as dotted paths (`--train.lr 1e-6`,
`--rollout.group_size=8`) or as megatron's flag names (`--tensor-model-parallel-size 2`, `--micro-batch-size 4`,
see MEGATRON_FLAGS). The resolved config is written to the run directory as `config.yaml`.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from grpo_megatron.config.schema import RunConfig
from grpo_megatron.config.schema_rollout import API_KEY_ENV
from grpo_megatron.config.validation import validate
from grpo_megatron.errors import ConfigError


# megatron-LM flag -> dotted config path
MEGATRON_FLAGS = {
    "tensor-model-parallel-size": "parallel.tensor_parallel",
    "pipeline-model-parallel-size": "parallel.pipeline_parallel",
    "num-virtual-stages-per-pipeline-rank": "parallel.virtual_pipeline_parallel",
    "expert-model-parallel-size": "parallel.expert_parallel",
    "expert-tensor-parallel-size": "parallel.expert_tensor_parallel",
    "context-parallel-size": "parallel.context_parallel",
    "sequence-parallel": "parallel.sequence_parallel",
    "micro-batch-size": "train.micro_batch_size",
    "train-iters": "train.steps",
    "lr": "train.lr",
    "min-lr": "train.min_lr",
    "lr-warmup-iters": "train.lr_warmup_steps",
    "lr-decay-style": "train.lr_decay_style",
    "weight-decay": "train.weight_decay",
    "adam-beta1": "train.adam_beta1",
    "adam-beta2": "train.adam_beta2",
    "adam-eps": "train.adam_eps",
    "clip-grad": "train.clip_grad",
    "seed": "train.seed",
    "save-interval": "checkpoint.save_interval",
    "recompute-activations": "model.recompute_activations",
    "bf16": "model.dtype",
}
_TOP_LEVEL_SCALARS = ("run_dir",)
_FLAG_CONSTANTS = {"bf16": "bfloat16", "sequence-parallel": "true", "recompute-activations": "true"}


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Turn YAML/CLI values into the field's type, or raise ConfigError naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _from_dict(hint, value, where)
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is typing.Literal:
        return _coerce(value, type(typing.get_args(hint)[0]), where)  # the choice itself: validation
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint in (int, float, str):
        try:
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}") from None
    return value


def _from_dict(cls, data: dict, where: str = ""):
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"known keys{' in ' + where if where else ''}: {', '.join(known)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(config) -> dict:
    """The config as plain data, without an API key taken from the environment: config.yaml and the
    metrics backends receive this, and a secret passed by environment must not end up in them."""
    data = dataclasses.asdict(config)
    sglang = data.get("rollout", {}).get("sglang", {})
    if sglang.get("api_key") and sglang["api_key"] == os.environ.get(API_KEY_ENV):
        sglang["api_key"] = None
    return data


def parse_overrides(argv: list[str]) -> dict:
    """`--a.b value`, `--a.b=value` and megatron flags -> a nested dict of overrides."""
    overrides: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --train.lr 1e-6")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        elif key in _FLAG_CONSTANTS:
            value = _FLAG_CONSTANTS[key]
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg} needs a value")
            i += 1
            value = argv[i]
        path = MEGATRON_FLAGS.get(key, key.replace("-", "_") if "." not in key else key)
        if "." not in path and path not in _TOP_LEVEL_SCALARS:
            raise ConfigError(f"unknown flag --{key}; use a dotted key (e.g. --train.lr) or one of the "
                              f"megatron flags: {', '.join('--' + f for f in MEGATRON_FLAGS)}")
        node = overrides
        parts = path.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _parse_scalar(value)
        i += 1
    return overrides


def _parse_scalar(text: str):
    """YAML's reading of a command-line value, with 1e-6 read as a number (YAML 1.1 wants 1.0e-6)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> RunConfig:
    """Read YAML, apply overrides, coerce types, reject unknown keys, and validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        base_dir = path.parent
        data = _resolve_relative_paths(data, base_dir)
    if overrides:
        extra = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides))
        data = _merge(data, extra)
    config = _from_dict(RunConfig, data)
    if config.rollout.sglang.api_key is None and os.environ.get(API_KEY_ENV):
        config = replace_keys(config, {"rollout.sglang.api_key": os.environ[API_KEY_ENV]})
    validate(config)
    return config


def replace_keys(config, changes: dict[str, Any]):
    """A copy of the (frozen) config with dotted keys changed (`{"train.seed": 3}`), every section on the way
    down copied too; not validated again. A loaded config is never changed in place: code that needs another
    value builds another config."""
    for dotted, value in changes.items():
        config = _replace_path(config, dotted.split("."), value, dotted)
    return config


def _replace_path(node, parts: list[str], value: Any, dotted: str):
    if not dataclasses.is_dataclass(node) or parts[0] not in {f.name for f in dataclasses.fields(node)}:
        raise ConfigError(f"unknown config key {dotted}")
    if len(parts) > 1:
        value = _replace_path(getattr(node, parts[0]), parts[1:], value, dotted)
    return dataclasses.replace(node, **{parts[0]: value})


def _resolve_relative_paths(data: dict, base: Path) -> dict:
    """Paths in a config file are relative to that file, so configs can be run from anywhere."""
    def fix(p):
        return str((base / p).resolve()) if isinstance(p, str) and p and not Path(p).is_absolute() else p

    data = dict(data)
    opd = data.get("algorithm", {}).get("opd") if isinstance(data.get("algorithm"), dict) else None
    if isinstance(opd, dict):
        data["algorithm"] = {**data["algorithm"], "opd": {k: fix(v) if k in ("hf_path", "megatron_path") else v
                                                           for k, v in opd.items()}}
    for section, keys in (("model", ("hf_path", "megatron_path")), ("data", ("train_files", "eval_files"))):
        if isinstance(data.get(section), dict):
            sec = dict(data[section])
            for key in keys:
                if isinstance(sec.get(key), list):
                    sec[key] = [fix(p) for p in sec[key]]
                elif key in sec:
                    sec[key] = fix(sec[key])
            data[section] = sec
    return data


def save_config(config: RunConfig, path: str | Path) -> None:
    save_config_data(to_dict(config), path)


def save_config_data(data: dict, path: str | Path) -> None:
    """A config already turned into plain data (to_dict) as YAML, in the schema's key order."""
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
