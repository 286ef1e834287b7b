"""Every check of a run that needs no model, run by the entry point before anything is built.

A typo in a name, a bad sampling setting, an unreachable placement or a missing data file would otherwise show
only after the policy and reference are loaded (minutes of GPU time on a 30B MoE). Each check raises a
ConfigError (or the data/model error) naming the key and the fix; `train.py` prints it as one line, exit 2.
What load_config already checks (key names, types, rollout.function and rollout.tools, batch arithmetic,
modes) is not repeated here.
"""
from __future__ import annotations

import os

from grpo_megatron.config import ConfigError, RunConfig
from grpo_megatron.registry import UnknownNameError

SYNC_MODES = ("tensor", "distributed", "disk")


def check_before_model(cfg: RunConfig, world_size: int | None = None) -> None:
    """Raise the first problem of `cfg` that is visible without a model; `world_size` defaults to $WORLD_SIZE."""
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    check_algorithm_names(cfg)
    check_sampling(cfg)
    check_rewards(cfg)
    check_engine(cfg, world)
    check_data_files(cfg)
    check_model_type(cfg)
    check_initial_weights(cfg)


def check_algorithm_names(cfg: RunConfig) -> None:
    from grpo_megatron.algorithms import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES

    a = cfg.algorithm
    for key, name, registry in (("loss", a.loss, POLICY_LOSSES), ("advantage", a.advantage, ADVANTAGE_ESTIMATORS),
                                ("kl_estimator", a.kl_estimator, KL_ESTIMATORS),
                                ("loss_agg", a.loss_agg, LOSS_AGGREGATIONS)):
        try:
            registry.get(name)
        except UnknownNameError as err:
            raise ConfigError(f"algorithm.{key}={name!r}: {err}") from None


def check_sampling(cfg: RunConfig) -> None:
    r = cfg.rollout
    if r.max_new_tokens < 1:
        raise ConfigError(f"rollout.max_new_tokens={r.max_new_tokens}: must be >= 1 (response tokens per sample)")
    if r.temperature < 0:
        raise ConfigError(f"rollout.temperature={r.temperature}: must be >= 0 (0 = greedy, 1 = the model's own "
                          "distribution)")
    if not 0 < r.top_p <= 1:
        raise ConfigError(f"rollout.top_p={r.top_p}: must be in (0, 1] (1 = off)")
    if r.top_k != -1 and r.top_k < 1:
        raise ConfigError(f"rollout.top_k={r.top_k}: must be >= 1, or -1 for off")
    if cfg.eval.max_new_tokens is not None and cfg.eval.max_new_tokens < 1:
        raise ConfigError(f"eval.max_new_tokens={cfg.eval.max_new_tokens}: must be >= 1, or null for "
                          "rollout.max_new_tokens")


def check_rewards(cfg: RunConfig) -> None:
    """Every reward name resolves (registered, `remote`, or an importable "package.module:function") with its options."""
    from grpo_megatron.rollout.rewards.functions import resolve_reward

    for i, spec in enumerate(cfg.reward.functions):
        try:
            resolve_reward(spec.name, spec.options)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"reward.functions[{i}].name={spec.name!r}: {err}") from None


def check_engine(cfg: RunConfig, world_size: int) -> None:
    """Weight-sync settings, and for SGLang the servers and a placement the sync mode can serve."""
    s = cfg.rollout.sglang
    if not s.bucket_mb > 0:
        raise ConfigError(f"rollout.sglang.bucket_mb={s.bucket_mb}: must be > 0 (512 is the default)")
    if cfg.rollout.engine != "sglang":
        return
    if not s.urls:
        raise ConfigError("rollout.engine=sglang needs rollout.sglang.urls (e.g. [http://127.0.0.1:30000]): the servers "
                          "themselves, also behind a router (rollout.sglang.router_url), since weights are pushed "
                          "to each one")
    if s.weight_sync not in SYNC_MODES:
        raise ConfigError(f"rollout.sglang.weight_sync={s.weight_sync!r}: use tensor, distributed or disk")
    if s.server_tp_size < 1:
        raise ConfigError(f"rollout.sglang.server_tp_size={s.server_tp_size}: the servers' --tp-size, >= 1")
    if s.weight_sync == "tensor" and s.colocated and world_size > 1 and world_size != len(s.urls) * s.server_tp_size:
        raise ConfigError(f"colocated tensor weight sync maps server TP ranks onto trainer ranks: {len(s.urls)} "
                          f"server(s) x rollout.sglang.server_tp_size={s.server_tp_size} must equal the trainer's "
                          f"{world_size} ranks; fix server_tp_size or the server count")
    if s.weight_sync == "tensor" and not s.colocated:
        from grpo_megatron.rollout.sglang.weight_sync import is_local_host

        remote = [url for url in s.urls if not is_local_host(url)]
        if remote:
            raise ConfigError(f"rollout.sglang.weight_sync=tensor shares memory with the servers, but {remote[0]} is "
                              "not on this host: set rollout.sglang.colocated=true with one server per server_tp_size "
                              "trainer ranks, or use weight_sync: distributed or disk")
    if s.weight_sync == "distributed" and s.colocated and (s.update_backend or _default_backend()) == "nccl":
        raise ConfigError("rollout.sglang.weight_sync=distributed with colocated servers puts trainer rank 0 "
                          "and a server rank on one GPU in one NCCL group (NCCL: Duplicate GPU detected); "
                          "use weight_sync: tensor for colocated servers")


def _default_backend() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def check_data_files(cfg: RunConfig) -> None:
    """Every train and eval file exists, has a supported type and only usable records (no tokenizer needed)."""
    from grpo_megatron.rollout.data.prompts import check_prompt_files

    check_prompt_files([*cfg.data.train_files, *cfg.data.eval_files], cfg.data.apply_chat_template)


def check_model_type(cfg: RunConfig) -> None:
    """The architecture in config.json is supported, and routing replay is asked of an MoE model only."""
    from grpo_megatron.models.provider import load_hf_config

    check_replay(cfg, load_hf_config(cfg.model.hf_path).model_type)


def check_initial_weights(cfg: RunConfig) -> None:
    """The megatron checkpoints named for the policy and a megatron teacher exist and are checkpoints (their
    metadata and HF config only; the weights load with the model), and the teacher's HF config is supported."""
    from grpo_megatron.models.mcore_checkpoint import read_checkpoint_config
    from grpo_megatron.models.provider import load_hf_config

    if cfg.model.megatron_path:
        read_checkpoint_config(cfg.model.megatron_path)
    opd = cfg.algorithm.opd
    if opd.teacher == "megatron":
        if opd.hf_path:
            load_hf_config(opd.hf_path)
        if opd.megatron_path:
            read_checkpoint_config(opd.megatron_path)


def check_replay(cfg: RunConfig, model_type: str) -> None:
    from grpo_megatron.models.bridge import MOE_MODEL_TYPES

    replay = cfg.algorithm.routing_replay
    if replay != "none" and model_type not in MOE_MODEL_TYPES:
        raise ConfigError(f"algorithm.routing_replay={replay} needs an MoE model; {model_type} is dense: set "
                          "routing_replay: none")
    if replay == "r2" and cfg.rollout.use_engine_logprobs:
        raise ConfigError("algorithm.routing_replay=r2 replays the routes of the old-log-prob pass, which "
                          "rollout.use_engine_logprobs=true skips: use r3, or set use_engine_logprobs: false")
