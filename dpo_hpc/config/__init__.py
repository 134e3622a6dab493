"""Configuration: typed sections and strict loading (no torch imported here)."""

from .loader import ConfigError, detect_trainer, load_config, read_mapping, set_dotted, to_dict, validate_as, validate_mapping
from .schema import (
    RUN_CONFIGS,
    BetaDPORunConfig,
    BetaDPOSectionConfig,
    BetaUpdateConfig,
    DatasetConfig,
    DeepSpeedConfig,
    DPORunConfig,
    DPOTrainingConfig,
    DynamicBetaDPORunConfig,
    RiskTestConfig,
    SFTRunConfig,
    SFTTrainingConfig,
    TrainingConfig,
)

__all__ = [
    "RUN_CONFIGS", "BetaDPORunConfig", "BetaDPOSectionConfig", "BetaUpdateConfig", "ConfigError",
    "DatasetConfig", "DeepSpeedConfig", "DPORunConfig", "DPOTrainingConfig", "DynamicBetaDPORunConfig",
    "RiskTestConfig", "SFTRunConfig", "SFTTrainingConfig", "TrainingConfig", "detect_trainer",
    "load_config", "read_mapping", "set_dotted", "to_dict", "validate_as", "validate_mapping",
]
