"""Checks of a loaded run config that need no model: choices, ranges, and fields that must agree.

Each raises ConfigError with one line naming the key to change. grpo_megatron.preflight adds the checks that read
files (the model's config.json, data files, server placement) before any model is built.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Literal

from grpo_megatron.algorithms import POLICY_LOSSES, ROLLOUT_CORRECTIONS, ROLLOUT_IS_LEVELS, LossParams, resolve_clip
from grpo_megatron.config.schema import RunConfig
from grpo_megatron.errors import ConfigError
from grpo_megatron.rollout.functions import resolve_rollout_function
from grpo_megatron.rollout.tools.config import check_tools_config


def check_choices(node: Any, where: str = "") -> None:
    """Every `Literal[...]` field of the config tree holds one of its choices (an error names them)."""
    hints = typing.get_type_hints(type(node))
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{where}.{f.name}" if where else f.name
        choices = literal_choices(hints[f.name])
        if choices and value not in choices:
            listed = [str(c) if c != "" else '""' for c in choices]
            raise ConfigError(f"{key}={value!r}: use {', '.join(listed[:-1])} or {listed[-1]}")
        if dataclasses.is_dataclass(value):
            check_choices(value, key)


def literal_choices(hint: Any) -> tuple:
    """The values a `Literal[...]` annotation allows (also inside `Optional`); () for any other type."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    return tuple(c for arg in typing.get_args(hint) if typing.get_origin(arg) is Literal for c in typing.get_args(arg))


def validate(config: RunConfig) -> None:
    """Every check that needs no model, each naming the key to change; load_config runs it."""
    check_choices(config)
    if not config.model.hf_path:
        raise ConfigError("model.hf_path is required (HF checkpoint directory with config and tokenizer)")
    if not config.data.train_files:
        raise ConfigError("data.train_files is empty: give at least one JSONL or Parquet file")
    if not config.reward.functions:
        raise ConfigError("reward.functions is empty: name at least one reward function")
    _validate_loss(config)
    _validate_rollout_correction(config)
    _validate_opd(config)
    _validate_rollout_mode(config)
    _validate_rollout_function(config)
    _validate_weight_sync(config)
    batch = config.rollout.prompts_per_step * config.rollout.group_size
    if batch % config.train.num_minibatches:
        raise ConfigError(
            f"rollout batch {config.rollout.prompts_per_step}x{config.rollout.group_size}={batch} sequences "
            f"does not split into train.num_minibatches={config.train.num_minibatches}; choose a divisor")
    for name in ("steps", "num_minibatches", "micro_batch_size"):
        if getattr(config.train, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1")
    if config.train.max_tokens_per_microbatch is not None and (
            config.train.max_tokens_per_microbatch < 1 or config.parallel.pipeline_parallel > 1):
        raise ConfigError("train.max_tokens_per_microbatch must be >= 1 and needs parallel.pipeline_parallel 1 "
                          "(pipeline stages exchange activations of one fixed micro-batch shape)")
    if config.train.lr_warmup_steps >= config.train.steps and config.train.lr_warmup_steps > 0:
        raise ConfigError(f"train.lr_warmup_steps={config.train.lr_warmup_steps} must be below train.steps="
                          f"{config.train.steps}; lower it or set it to 0")
    if config.eval.num_samples < 0 or (config.eval.temperature is not None and config.eval.temperature <= 0):
        raise ConfigError("eval.num_samples must be >= 0 and eval.temperature > 0 (greedy accuracy is always reported)")
    if config.rollout.group_size < 2:
        raise ConfigError("rollout.group_size must be >= 2: group-relative advantages need a group")


def _validate_weight_sync(config: RunConfig) -> None:
    s = config.rollout.sglang
    if s.sync_changed_only and (config.rollout.engine != "sglang" or s.sync_mode == "disk"):
        raise ConfigError(f"rollout.sglang.sync_changed_only needs rollout.engine sglang with weight_sync tensor or "
                          f"distributed (got engine {config.rollout.engine}, weight_sync {s.weight_sync}): "
                          f"update_weights_from_disk reloads the whole directory, so disk mode always writes "
                          f"the full checkpoint; set sync_changed_only false")
    if any(not pattern.strip() for pattern in config.train.freeze):
        raise ConfigError("train.freeze has an empty pattern; give fnmatch globs such as embedding.*")


def _validate_rollout_function(config: RunConfig) -> None:
    try:
        resolve_rollout_function(config.rollout.function)
        if config.rollout.function == "tool_loop":
            check_tools_config(config.rollout.tools)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _validate_opd(config: RunConfig) -> None:
    """One-line errors for algorithm.opd (on-policy distillation), each naming the key to change."""
    cfg = config
    opd, key = cfg.algorithm.opd, "algorithm.opd"
    if opd.teacher == "none":
        return
    if not (math.isfinite(opd.coef) and opd.coef > 0):
        raise ConfigError(f"{key}.coef={opd.coef}: must be a finite number > 0 (e.g. 1.0)")
    if opd.top_k < 0:
        raise ConfigError(f"{key}.top_k={opd.top_k}: must be 0 (sampled-token signal) or the teacher's top-k size")
    if opd.top_k == 0 and cfg.algorithm.loss == "gspo":
        raise ConfigError(f"{key} gives per-token advantages, which algorithm.loss gspo (one ratio per sequence) "
                          f"cannot take: use grpo or gspo_token, or set {key}.top_k > 0")
    if opd.teacher == "megatron" and not opd.hf_path:
        raise ConfigError(f"{key}.teacher=megatron needs {key}.hf_path (the teacher's HF checkpoint directory; "
                          f"weights from {key}.megatron_path if set)")
    if opd.teacher == "sglang":
        if not opd.sglang_urls:
            raise ConfigError(f"{key}.teacher=sglang needs {key}.sglang_urls (e.g. [http://127.0.0.1:30001])")
        if cfg.rollout.temperature != 1.0:
            raise ConfigError(f"{key}.teacher=sglang scores at temperature 1 (SGLang 0.5.23 ignores the temperature "
                              f"for input log-probs), but rollout.temperature={cfg.rollout.temperature}: set it to 1.0 "
                              f"or use {key}.teacher megatron")


def _validate_rollout_mode(config: RunConfig) -> None:
    r = config.rollout
    if r.max_staleness < 1:
        raise ConfigError(f"rollout.max_staleness={r.max_staleness}: must be >= 1 (0 is rollout.mode sync)")
    if r.partial_rollouts and r.mode != "async":
        raise ConfigError("rollout.partial_rollouts needs rollout.mode async (weights change mid-generation)")
    if r.mode != "sync" and r.engine == "sglang" and r.sglang.colocated and r.sglang.gpu_servers:
        raise ConfigError(f"rollout.mode={r.mode} generates while the trainer trains, and colocated GPU servers then "
                          f"hold their memory beside the trainer's: use rollout.mode sync, or servers on GPUs of "
                          f"their own (rollout.sglang.colocated false)")
    if r.mode != "sync" and config.algorithm.rollout_correction.mode == "none" and not r.use_engine_logprobs:
        raise ConfigError(f"rollout.mode={r.mode} trains on samples of older weights: set algorithm."
                          "rollout_correction.mode (e.g. tis) or rollout.use_engine_logprobs true")


def _validate_loss(config: RunConfig) -> None:
    alg = config.algorithm
    if alg.loss not in POLICY_LOSSES:
        raise ConfigError(f"algorithm.loss={alg.loss!r}: use {', '.join(POLICY_LOSSES.names())}")
    for where, check in (("algorithm", lambda: resolve_clip(alg.loss, alg.clip_low, alg.clip_high, alg.dual_clip_c)),
                         ("algorithm.loss_params", lambda: LossParams(**dataclasses.asdict(alg.loss_params)).check())):
        try:
            check()
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None


def _validate_rollout_correction(config: RunConfig) -> None:
    rc, key = config.algorithm.rollout_correction, "algorithm.rollout_correction"
    if rc.mode != "none" and rc.mode not in ROLLOUT_CORRECTIONS:
        raise ConfigError(f"{key}.mode={rc.mode!r}: use none, {', '.join(ROLLOUT_CORRECTIONS.names())}")
    if rc.level not in ROLLOUT_IS_LEVELS:
        raise ConfigError(f"{key}.level={rc.level!r}: use {', '.join(ROLLOUT_IS_LEVELS.names())}")
    if rc.mode == "none":
        if rc.veto is not None or rc.max_seq_kl is not None or rc.adaptive_ess_target is not None:
            raise ConfigError(f"{key}.veto / max_seq_kl / adaptive_ess_target act only with a mode: set "
                              f"{key}.mode to tis, mis or reject, or remove them")
        return
    if config.rollout.use_engine_logprobs:
        raise ConfigError(f"{key}.mode={rc.mode} needs trainer-recomputed old log-probs, but rollout."
                          "use_engine_logprobs=true makes the rollout's the old ones (bypass: the PPO ratio is "
                          "then pi/pi_rollout and its clip is the correction): set one of them off")
    if not 0 <= rc.low <= 1 <= rc.high:
        raise ConfigError(f"{key}: need 0 <= low <= 1 <= high (agreeing policies give weight 1), got "
                          f"low={rc.low}, high={rc.high}")
    if rc.veto is not None and not 0 < rc.veto < 1:
        raise ConfigError(f"{key}.veto={rc.veto}: must be in (0, 1), e.g. 1e-4, or null for off")
    if rc.max_seq_kl is not None and rc.max_seq_kl <= 0:
        raise ConfigError(f"{key}.max_seq_kl={rc.max_seq_kl}: must be > 0, or null for off")
    if rc.adaptive_ess_target is not None and (rc.mode != "tis" or not 0 < rc.adaptive_ess_target <= 1):
        raise ConfigError(f"{key}.adaptive_ess_target={rc.adaptive_ess_target}: needs mode tis and a "
                          "target in (0, 1], e.g. 0.9")
