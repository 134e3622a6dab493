"""Configuration: typed sections, the algorithm registry and strict loading (no torch imported here)."""

from .errors import ConfigError
from .loader import (detect_trainer, load_config, parse_override, read_mapping, set_dotted, to_dict, to_identity,
                     validate_as, validate_mapping)
from .registry import ALGORITHMS, Algorithm, algorithm, by_command
from .schema import (
    ROW_FIELDS,
    STRICT,
    BetaDPORunConfig,
    BetaDPOSectionConfig,
    BetaUpdateConfig,
    DatasetConfig,
    DeepSpeedConfig,
    DPORunConfig,
    DPOTrainingConfig,
    DynamicBetaDPORunConfig,
    KTORunConfig,
    KTOTrainingConfig,
    MixSource,
    RewardRunConfig,
    RewardTrainingConfig,
    RiskTestConfig,
    SFTRunConfig,
    SFTTrainingConfig,
    TrainingConfig,
)

__all__ = [
    "ALGORITHMS", "ROW_FIELDS", "STRICT", "Algorithm", "BetaDPORunConfig", "BetaDPOSectionConfig", "BetaUpdateConfig",
    "ConfigError", "DatasetConfig", "DeepSpeedConfig", "DPORunConfig", "DPOTrainingConfig",
    "DynamicBetaDPORunConfig", "KTORunConfig", "KTOTrainingConfig", "MixSource", "RewardRunConfig",
    "RewardTrainingConfig", "RiskTestConfig", "SFTRunConfig", "SFTTrainingConfig", "TrainingConfig",
    "algorithm", "by_command", "detect_trainer", "load_config", "parse_override", "read_mapping", "set_dotted",
    "to_dict", "to_identity", "validate_as", "validate_mapping",
]
