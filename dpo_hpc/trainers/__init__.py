"""Trainers. The original framework's API (``from src.trainers import ...``) lives here:
``from dpo_hpc.trainers import DynamicBetaDPOTrainer, DynamicBetaDPOConfig, BetaDPOTrainer, BetaDPOConfig``.

Imports are lazy so that ``import dpo_hpc.trainers`` stays cheap (no torch/deepspeed until used).
"""

_API = {"DynamicBetaDPOTrainer", "BetaDPOTrainer", "DPOTrainingConfig"}
_CONTROLLERS = {"DynamicBetaDPOConfig", "BetaDPOConfig"}
__all__ = sorted(_API | _CONTROLLERS)


def __getattr__(name):
    if name in _API:
        from . import api

        return getattr(api, name)
    if name in _CONTROLLERS:
        from .. import controllers

        return getattr(controllers, name)
    raise AttributeError(f"module 'dpo_hpc.trainers' has no attribute {name!r}")
