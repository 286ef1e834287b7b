"""algorithm.loss, its clip range and algorithm.loss_params: what the config accepts and its one-line errors."""
from __future__ import annotations

import dataclasses
import re

import pytest

from grpo_megatron.algorithms import LossParams
from grpo_megatron.config import ConfigError, LossParamsConfig, parse_overrides


def test_config_defaults_are_the_algorithms_defaults():
    """config.py keeps its own copy (it does not import torch): the two must agree."""
    assert dataclasses.asdict(LossParamsConfig()) == dataclasses.asdict(LossParams())


def test_every_loss_with_its_paper_defaults_is_accepted(make_config):
    for loss in ("cispo", "sapo", "gmpo", "clip_cov", "kl_cov", "dppo_tv", "dppo_kl", "grpo", "gspo", "gspo_token"):
        cfg = make_config(algorithm={"loss": loss})
        assert cfg.algorithm.clip_low is None and cfg.algorithm.loss_params == LossParamsConfig()


def test_loss_params_from_the_command_line(make_config):
    overrides = parse_overrides(["--algorithm.loss", "sapo", "--algorithm.loss_params.sapo_tau_neg", "1.2"])
    cfg = make_config(**overrides)
    assert cfg.algorithm.loss_params.sapo_tau_neg == 1.2 and cfg.algorithm.loss_params.sapo_tau_pos == 1.0


@pytest.mark.parametrize("algorithm, message", [
    ({"loss": "cipso"}, "algorithm.loss='cipso': use cispo, clip_cov, dppo_kl, dppo_tv, gmpo, grpo, gspo, gspo_token, "
                        "kl_cov, sapo"),
    ({"loss": "sapo", "clip_high": 0.28}, "algorithm: policy loss 'sapo' has no clip range; remove clip_low / clip_high"),
    ({"loss": "dppo_tv", "clip_low": -0.1}, "algorithm: clip_low and clip_high must be >= 0, got -0.1 and 0.15"),
    ({"loss": "gmpo", "dual_clip_c": 3.0}, "algorithm: dual_clip_c acts only with the PPO-clipped losses (clip_cov, grpo, "
                                           "gspo, gspo_token), not 'gmpo'; remove it"),
    ({"loss": "grpo", "dual_clip_c": 0.5}, "algorithm: dual_clip_c must be > 1, got 0.5"),
    ({"loss": "sapo", "loss_params": {"sapo_tau_pos": -1.0}},
     "algorithm.loss_params: sapo_tau_pos and sapo_tau_neg must be > 0 (paper: 1.0 and 1.05), got -1.0 and 1.05"),
    ({"loss": "kl_cov", "loss_params": {"kl_cov_ratio": 0.0}},
     "algorithm.loss_params: kl_cov_ratio must be in (0, 1] (a fraction of the batch's tokens, e.g. 2e-4), got 0.0"),
    ({"loss": "clip_cov", "loss_params": {"clip_cov_lb": 6.0}},
     "algorithm.loss_params: clip_cov_lb must be below clip_cov_ub (paper: 1 and 5), got 6.0 and 5.0"),
    ({"loss": "kl_cov", "loss_params": {"kl_cov_coef": -1.0}},
     "algorithm.loss_params: kl_cov_coef must be >= 0 (paper: 1), got -1.0"),
])
def test_bad_loss_settings_are_one_line_errors(make_config, algorithm, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        make_config(algorithm=algorithm)
