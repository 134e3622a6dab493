"""Trainers: the DeepSpeed engine, the Trainer (phases over one run of any registered algorithm),
metrics, and the original framework's API (``from src.trainers import ...`` there)::

    from dpo_hpc.trainers import DynamicBetaDPOTrainer, DynamicBetaDPOConfig, BetaDPOTrainer, BetaDPOConfig
    from dpo_hpc.trainers import KTOTrainer, KTOTrainingConfig   # KTO, as TRL's KTOTrainer
    from dpo_hpc.trainers import RewardTrainer, RewardTrainingConfig   # a reward model, as TRL's RewardTrainer

Imports are lazy so that ``import dpo_hpc.trainers`` stays cheap (no torch/deepspeed until used).
"""

_API = {"DynamicBetaDPOTrainer", "BetaDPOTrainer", "DPOTrainingConfig", "DynamicBetaDPOConfig", "BetaDPOConfig",
        "KTOTrainer", "KTOTrainingConfig", "RewardTrainer", "RewardTrainingConfig"}
_TRAINER = {"Trainer", "train"}
__all__ = sorted(_API | _TRAINER)


def __getattr__(name):
    if name in _API:
        from . import api

        return getattr(api, name)
    if name in _TRAINER:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'dpo_hpc.trainers' has no attribute {name!r}")
