"""The `algorithm` section of the run config: the loss, advantages, KL, rollout correction and distillation.

Losses, advantage and KL estimators and rollout corrections are registries (grpo_megatron.algorithms), so
their names stay `str`, checked against the registry by validation; fixed sets of choices are `Literal`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from grpo_megatron.algorithms.loss_params import LossParams


@dataclass(frozen=True)
class RolloutCorrectionConfig:
    """Train-inference mismatch correction (algorithms/rollout_correction.py); needs engine log-probs and
    trainer-recomputed old log-probs (decoupled), so not rollout.use_engine_logprobs (bypass)."""

    mode: str = "none"
    """none | tis (truncate at high) | mis (drop outside [low, high]) | reject (same, weights 1)."""
    level: str = "token"
    """token | sequence (product) | geometric (geometric mean): what one weight covers."""
    low: float = 0.0
    """mis / reject: units with weight below are dropped (0 = no lower bound)."""
    high: float = 2.0
    """tis: truncation bound; mis / reject: units above are dropped."""
    veto: float | None = None
    """Drop a sequence with any token ratio old/rollout below this (e.g. 1e-4)."""
    max_seq_kl: float | None = None
    """Drop a sequence whose mean token k3 KL(rollout || old) is above this."""
    adaptive_ess_target: float | None = None
    """tis: per-step bound, the largest <= high keeping ESS >= target."""


@dataclass(frozen=True)
class LossParamsConfig:
    """Hyperparameters of single losses; each acts only with its loss. The defaults are the papers', held
    once in algorithms/loss_params.py."""

    sapo_tau_pos: float = LossParams.sapo_tau_pos
    """sapo: gate temperature for A > 0."""
    sapo_tau_neg: float = LossParams.sapo_tau_neg
    """sapo: gate temperature for A <= 0."""
    clip_cov_ratio: float = LossParams.clip_cov_ratio
    """clip_cov: fraction of the batch's tokens detached."""
    clip_cov_lb: float = LossParams.clip_cov_lb
    """clip_cov: drawn among tokens with lb < Cov < ub."""
    clip_cov_ub: float = LossParams.clip_cov_ub
    """clip_cov: upper bound of that band."""
    kl_cov_ratio: float = LossParams.kl_cov_ratio
    """kl_cov: fraction of tokens (largest Cov) penalised."""
    kl_cov_coef: float = LossParams.kl_cov_coef
    """kl_cov: beta of beta |log r|."""


@dataclass(frozen=True)
class OPDConfig:
    """On-policy distillation (algorithms/opd.py): a teacher scores the student's sampled tokens."""

    teacher: Literal["none", "megatron", "sglang"] = "none"
    """none | megatron (frozen, colocated like the reference) | sglang (a server, prefill only)."""
    mode: Literal["distill", "rl"] = "distill"
    """distill: advantage = coef * (log p_teacher - log p_student) | rl: added to the group's advantage."""
    coef: float = 1.0
    """Scale of the teacher's signal (> 0)."""
    top_k: int = 0
    """0: the sampled token's log-probs | k: tail-aware reverse KL over the teacher's top-k (a loss term)."""
    hf_path: str = ""
    """Megatron teacher: its HF checkpoint (architecture; weights unless megatron_path)."""
    megatron_path: str | None = None
    """Megatron teacher: its megatron checkpoint (e.g. a run's checkpoint)."""
    offload: bool = True
    """Megatron teacher on GPU: parameters in host memory between scoring passes."""
    sglang_urls: list[str] = field(default_factory=list)
    """SGLang teacher: its server(s)."""
    sglang_timeout_s: float = 300.0
    """SGLang teacher: per request."""


@dataclass(frozen=True)
class AlgorithmConfig:
    """The RL objective: policy loss, advantages, KL to the reference and corrections."""

    loss: str = "gspo"
    """grpo gspo gspo_token cispo sapo gmpo clip_cov kl_cov dppo_tv dppo_kl (README loss table)."""
    clip_low: float | None = None
    """None: the loss's paper default (gspo 3e-4 / 4e-4, grpo 0.2 / 0.2; DAPO 0.2 / 0.28)."""
    clip_high: float | None = None
    """None: the loss's paper default."""
    dual_clip_c: float | None = None
    """Dual-clip bound for negative advantages (None = off)."""
    loss_params: LossParamsConfig = field(default_factory=LossParamsConfig)
    """Hyperparameters of single losses."""
    loss_agg: str = "seq_mean_token_mean"
    """How token losses become one number (algorithms' LOSS_AGGREGATIONS)."""
    advantage: str = "grpo"
    """grpo | dr_grpo."""
    kl_coef: float = 0.0
    """Weight of the KL to the reference model (0 = no reference pass)."""
    kl_estimator: str = "k3"
    """KL estimator (k1 | k2 | k3 ...: algorithms' KL_ESTIMATORS)."""
    overlong_filter: bool = False
    """DAPO: mask truncated samples out of the loss."""
    routing_replay: Literal["none", "r2", "r3"] = "none"
    """MoE only: r2 replays the trainer's old routing, r3 the rollout engine's."""
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
    """Train-inference mismatch correction."""
    opd: OPDConfig = field(default_factory=OPDConfig)
    """On-policy distillation."""
