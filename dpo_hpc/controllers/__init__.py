"""Small stateful objects that drive the adaptive-beta math; each has state_dict()/load_state_dict()
with plain numbers and tensors only, so checkpoints restore them exactly."""

from .beta_dpo import BetaDPOConfig, BetaDPOController
from .dynamic_beta import DynamicBetaController, DynamicBetaDPOConfig

__all__ = ["BetaDPOConfig", "BetaDPOController", "DynamicBetaController", "DynamicBetaDPOConfig"]
