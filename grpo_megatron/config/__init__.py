"""The run config: schema (schema*.py, a docstring under every field), loading (YAML and overrides) and the
checks that need no model (validation.py). Everything a caller needs is re-exported here."""
from grpo_megatron.config.loading import (MEGATRON_FLAGS, load_config, parse_overrides, replace_keys, save_config,
                                         save_config_data, to_dict)
from grpo_megatron.config.schema import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    RewardConfig,
    RewardFunctionConfig,
    RunConfig,
    TrainConfig,
)
from grpo_megatron.config.schema_algorithm import (
    AlgorithmConfig,
    LossParamsConfig,
    OPDConfig,
    RolloutCorrectionConfig,
)
from grpo_megatron.config.schema_rollout import API_KEY_ENV, RolloutConfig, SGLangConfig, ToolsConfig
from grpo_megatron.config.validation import check_choices, validate
from grpo_megatron.errors import ConfigError

__all__ = [
    "API_KEY_ENV", "MEGATRON_FLAGS", "AlgorithmConfig", "CheckpointConfig", "ConfigError", "DataConfig",
    "EvalConfig", "LoggingConfig", "LossParamsConfig", "ModelConfig", "OPDConfig", "RewardConfig",
    "RewardFunctionConfig", "RolloutConfig", "RolloutCorrectionConfig", "RunConfig", "SGLangConfig",
    "ToolsConfig", "TrainConfig", "check_choices", "load_config", "parse_overrides", "replace_keys", "save_config",
    "save_config_data", "to_dict", "validate",
]
