"""The original framework's Python API, on dpo-hpc's DeepSpeed loop.

The original imported ``from src.trainers import ...`` and took TRL ``DPOConfig`` args; here::

    from dpo_hpc.trainers import DynamicBetaDPOTrainer, DynamicBetaDPOConfig, DPOTrainingConfig

    args = DPOTrainingConfig(learning_rate=5e-7, batch_size=16, save_dir="dpo_model")
    trainer = DynamicBetaDPOTrainer(model=policy, ref_model=ref, args=args,
                                    dynamic_cfg=DynamicBetaDPOConfig(beta_0=0.1, delta=0.1),
                                    train_dataset=train_rows, eval_dataset=eval_rows, tokenizer=tokenizer)
    trainer.train()

Datasets are ``datasets.Dataset`` objects or lists of dicts in HH format (``chosen``/``rejected``
transcripts) or with ``prompt``/``chosen``/``rejected``. ``args`` may also be a dict of the
``dpo_training`` keys. Everything else (checkpoints, resume, TensorBoard, run manifest) is as
with the command line, under ``args.save_dir``.
"""

from __future__ import annotations

from typing import Any, Optional

from ..config import DatasetConfig, DeepSpeedConfig, DPOTrainingConfig, validate_mapping
from ..config.loader import to_dict
from ..controllers import BetaDPOConfig, DynamicBetaDPOConfig


class _PreferenceTrainer:
    trainer_name = ""

    def __init__(self, model, ref_model, args, train_dataset, eval_dataset, tokenizer, precision, max_length,
                 max_prompt_length, zero_stage, sections: dict[str, Any]):
        if tokenizer is None:
            raise ValueError("tokenizer is required (the original API's tokenizer= / processing_class=)")
        if ref_model is None or ref_model is model:
            raise ValueError("ref_model must be a separate frozen copy of the policy (e.g. loaded from the same path)")
        if isinstance(args, dict):
            args = DPOTrainingConfig(**args)
        name = getattr(model, "name_or_path", None) or "<in-memory model>"
        raw = {
            "policy_name": str(name),
            "ref_name": str(getattr(ref_model, "name_or_path", None) or name),
            "precision": precision,
            "dataset": to_dict(DatasetConfig(dataset_name="<in-memory dataset>", val_ratio=0.0, max_length=max_length,
                                             max_prompt_length=max_prompt_length)),
            "dpo_training": to_dict(args),
            "deepspeed": to_dict(DeepSpeedConfig(zero_stage=zero_stage)),
            **sections,
        }
        self.config = validate_mapping(raw, self.trainer_name, source=type(self).__name__)
        self.model, self.ref_model, self.tokenizer = model, ref_model, tokenizer
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset

    def train(self) -> dict[str, Any]:
        """Train (or resume from ``args.save_dir``); returns the run summary."""
        from .loop import train

        return train(self.config, self.trainer_name, model=self.model, ref_model=self.ref_model,
                     tokenizer=self.tokenizer, train_rows=self.train_dataset,
                     eval_rows=self.eval_dataset)  # None: val_ratio is 0, so no validation split


class DynamicBetaDPOTrainer(_PreferenceTrainer):
    """Dynamic-Beta DPO (``dynamic_cfg`` holds beta_0, delta, momentum, warmup_steps, alpha, gamma, ...)."""

    trainer_name = "dynamic_beta_dpo"

    def __init__(self, model, ref_model, args, dynamic_cfg: Optional[DynamicBetaDPOConfig] = None,
                 train_dataset=None, eval_dataset=None, tokenizer=None, processing_class=None,
                 precision: str = "fp32", max_length: int = 512, max_prompt_length: int = 256, zero_stage: int = 0):
        d = dynamic_cfg or DynamicBetaDPOConfig()
        sections = {
            "risk_test": {"delta": d.delta, "lambda": d.momentum, "beta_warmup": d.warmup_steps,
                          "risk_stat": d.risk_stat, "hoeffding_eps0": d.hoeffding_eps0,
                          "update_granularity": d.update_granularity, "scope": d.scope},
            "beta_update": {"beta_0": d.beta_0, "alpha": d.alpha, "gamma": d.gamma, "beta_min": d.beta_min,
                            "beta_max": d.beta_max},
        }
        super().__init__(model, ref_model, args, train_dataset, eval_dataset, tokenizer or processing_class,
                         precision, max_length, max_prompt_length, zero_stage, sections)


class BetaDPOTrainer(_PreferenceTrainer):
    """Beta-DPO (``beta_dpo_cfg`` holds beta_0, m, rho, alpha, min_beta, ...)."""

    trainer_name = "beta_dpo"

    def __init__(self, model, ref_model, args, beta_dpo_cfg: Optional[BetaDPOConfig] = None,
                 train_dataset=None, eval_dataset=None, tokenizer=None, processing_class=None,
                 precision: str = "fp32", max_length: int = 512, max_prompt_length: int = 256, zero_stage: int = 0):
        b = beta_dpo_cfg or BetaDPOConfig()
        sections = {"beta_dpo": {"beta_0": b.beta_0, "m": b.m, "rho": b.rho, "alpha": b.alpha, "min_beta": b.min_beta,
                                 "ema_init": b.ema_init, "std": b.std}}
        super().__init__(model, ref_model, args, train_dataset, eval_dataset, tokenizer or processing_class,
                         precision, max_length, max_prompt_length, zero_stage, sections)


__all__ = ["BetaDPOConfig", "BetaDPOTrainer", "DPOTrainingConfig", "DynamicBetaDPOConfig", "DynamicBetaDPOTrainer"]
