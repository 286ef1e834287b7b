"""Assembles a run's learner and rollout side from a validated config (grpo_megatron/preflight.py has run the
checks that need no model). The order is the run's: process groups and seed, the policy (its random init draws
from the seeded generator) and its optimizer, the reference and teacher, then data, rewards and the engine."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from grpo_megatron.config import ConfigError, RunConfig
from grpo_megatron.models import build_model, load_hf_config, load_hf_weights, model_dims
from grpo_megatron.models.bridge import MOE_MODEL_TYPES
from grpo_megatron.models.mcore_checkpoint import dtype_from_name, load_mcore_checkpoint
from grpo_megatron.models.provider import PolicyModel
from grpo_megatron.models.tokenizer import load_tokenizer
from grpo_megatron.parallel import init_distributed, init_model_parallel
from grpo_megatron.preflight import check_replay
from grpo_megatron.ranks import is_rank0
from grpo_megatron.replay import attach_routing_replay
from grpo_megatron.rollout.data.prompts import PromptDataset, PromptLoader
from grpo_megatron.training import opd
from grpo_megatron.training.actor import Actor, data_parallel_info
from grpo_megatron.rollout.factory import make_engine
from grpo_megatron.training.evaluation import eval_names
from grpo_megatron.training.learner import Learner, LearnerSpec
from grpo_megatron.training.offload import GenerationMemory
from grpo_megatron.training.reference import ReferenceModel
from grpo_megatron.rollout.rewards.runner import RewardRunner
from grpo_megatron.training.rollout_side import RolloutReceiver, RolloutSide
from grpo_megatron.training.rollout_worker import RolloutSpec
from grpo_megatron.training.update_math import UpdateSpec


@dataclass
class Parts:
    learner: Learner
    rollouts: RolloutReceiver  # a RolloutSide on rank 0


def build(cfg: RunConfig) -> Parts:
    init_distributed(control_timeout_minutes=cfg.train.rollout_wait_minutes)
    torch.manual_seed(cfg.train.seed)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    hf_config = load_hf_config(cfg.model.hf_path)
    tokenizer = load_tokenizer(cfg.model.hf_path)
    dtype = dtype_from_name(cfg.model.dtype)
    check_replay(cfg, hf_config.model_type)
    init_model_parallel(cfg.parallel, seed=cfg.train.seed, **model_dims(hf_config))
    check_minibatch_split(cfg)
    learner_models = _learner_models(cfg, hf_config, dtype)
    train_data = PromptDataset(cfg.data.train_files, tokenizer, cfg.data.apply_chat_template, cfg.data.max_prompt_tokens)
    learner = Learner(learner_spec(cfg), tokenizer=tokenizer, train_data=train_data, **learner_models)
    # every rank reads the data and resolves the rewards, so that a bad file or name fails on all of them
    loader = PromptLoader(train_data, cfg.rollout.prompts_per_step, seed=cfg.train.seed, shuffle=cfg.data.shuffle)
    eval_sets = {name: PromptDataset([path], tokenizer, cfg.data.apply_chat_template, cfg.data.max_prompt_tokens)
                 for name, path in eval_names(cfg.data.eval_files).items()}
    rewards = RewardRunner(cfg.reward)
    if not is_rank0():
        return Parts(learner, RolloutReceiver(rollout_spec(cfg)))
    engine = make_engine(cfg.rollout, cfg.model.hf_path, cfg.train.seed, dtype)
    return Parts(learner, RolloutSide(rollout_spec(cfg), engine, tokenizer, loader, rewards, eval_sets))


def update_spec(cfg: RunConfig) -> UpdateSpec:
    """The RL update's view of the config (training/update_math.py)."""
    return UpdateSpec(algorithm=cfg.algorithm, group_size=cfg.rollout.group_size,
                      max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                      use_engine_logprobs=cfg.rollout.use_engine_logprobs,
                      num_minibatches=cfg.train.num_minibatches, seed=cfg.train.seed)


def learner_spec(cfg: RunConfig) -> LearnerSpec:
    """The learner's view of the config (training/learner.py)."""
    return LearnerSpec(update=update_spec(cfg), train=cfg.train, checkpoint=cfg.checkpoint, hf_path=cfg.model.hf_path,
                       pad_multiple=cfg.parallel.tensor_parallel if cfg.parallel.sp else 1,
                       sft_batch_size=cfg.rollout.prompts_per_step * cfg.rollout.group_size)


def rollout_spec(cfg: RunConfig) -> RolloutSpec:
    """The rollout side's view of the config (training/rollout_side.py, rollout_worker.py)."""
    return RolloutSpec(rollout=cfg.rollout, reward=cfg.reward, eval=cfg.eval, seed=cfg.train.seed,
                       steps=cfg.train.steps, engine_routes=cfg.algorithm.routing_replay == "r3",
                       hf_path=cfg.model.hf_path)


def check_minibatch_split(cfg: RunConfig) -> None:
    r, dp_size = cfg.rollout, data_parallel_info()[1]
    per_minibatch = r.prompts_per_step * r.group_size // cfg.train.num_minibatches
    if per_minibatch < dp_size:
        raise ConfigError(f"a mini-batch of {per_minibatch} samples leaves some of the {dp_size} data-parallel "
                          f"ranks without one: raise rollout.prompts_per_step or lower train.num_minibatches")


def build_policy_model(cfg: RunConfig, hf_config, dtype: torch.dtype, wrap_ddp: bool) -> PolicyModel:
    """The policy (`wrap_ddp`: trainable, in megatron's DDP) or a frozen copy of its layout (the reference)."""
    overrides = {}
    if cfg.model.recompute_activations:
        overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if wrap_ddp and hf_config.model_type in MOE_MODEL_TYPES:
        overrides["moe_enable_routing_replay"] = True  # the policy's replay hooks (grpo_megatron.replay)
    ddp = None
    if wrap_ddp:
        from megatron.core import parallel_state

        from grpo_megatron.platform import use_distributed_optimizer

        dp_size = parallel_state.get_data_parallel_world_size()
        ddp = {"use_distributed_optimizer": use_distributed_optimizer(cfg.train.distributed_optimizer, dp_size)}
    return build_model(hf_config, cfg.parallel, dtype, wrap_ddp=wrap_ddp, ddp_overrides=ddp,
                       freeze=cfg.train.freeze if wrap_ddp else None, **overrides)


def load_initial_weights(cfg: RunConfig, model: PolicyModel) -> None:
    if cfg.model.megatron_path:
        load_mcore_checkpoint(model, cfg.model.megatron_path)
    else:
        load_hf_weights(model, cfg.model.hf_path)


def _learner_models(cfg: RunConfig, hf_config, dtype: torch.dtype) -> dict:
    policy = build_policy_model(cfg, hf_config, dtype, wrap_ddp=True)
    load_initial_weights(cfg, policy)
    actor = Actor(policy, cfg.train, total_steps=cfg.train.steps * cfg.train.num_minibatches)
    sglang = cfg.rollout.sglang  # colocated GPU servers share the trainer's GPUs while they generate
    memory = GenerationMemory(policy.chunks, actor.optimizer, offload_params=cfg.train.offload_params,
                              active=cfg.rollout.engine == "sglang" and sglang.colocated and sglang.gpu_servers)
    routing = attach_routing_replay(policy, cfg.algorithm.routing_replay) if policy.is_moe else None
    reference = None
    if cfg.algorithm.kl_coef > 0:
        frozen = build_policy_model(cfg, hf_config, dtype, wrap_ddp=False)
        load_initial_weights(cfg, frozen)
        reference = ReferenceModel(frozen, offload=cfg.model.offload_reference)
    # on-policy distillation
    teacher = opd.build_teacher(cfg.algorithm.opd, cfg.parallel, cfg.rollout.sglang, dtype, hf_config.vocab_size)
    return {"policy": policy, "actor": actor, "memory": memory, "routing": routing, "reference": reference,
            "teacher": teacher}
