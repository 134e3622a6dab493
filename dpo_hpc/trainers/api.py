"""The original framework's Python API, on dpo-hpc's DeepSpeed trainer.

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

``DynamicBetaDPOConfig`` and ``BetaDPOConfig`` keep the original names, but each of their fields
is the config file's key under another name: ranges, defaults and checks are declared once, in
the sections (``[risk_test]``, ``[beta_update]``, ``[beta_dpo]``).
"""

from __future__ import annotations

from typing import Any, Optional

from ..config import (ALGORITHMS, BetaDPOSectionConfig, BetaUpdateConfig, ConfigError, DatasetConfig, DeepSpeedConfig,
                      DPOTrainingConfig, KTOTrainingConfig, RewardTrainingConfig, RiskTestConfig, to_dict, validate_as,
                      validate_mapping)


class _SectionView:
    """An original-API config object: keyword names mapped onto config-file sections."""

    FIELDS: dict[str, tuple[str, str]] = {}  # original name -> (section, key in the file)
    SECTIONS: dict[str, type] = {}  # section -> its config dataclass
    DEFAULTS: dict[str, Any] = {}  # where the original dataclass's default differs from the file's
    EXTRA: dict[str, Any] = {}  # original fields that are not config keys, with their defaults

    def __init__(self, **values: Any):
        unknown = sorted(set(values) - set(self.FIELDS) - set(self.EXTRA))
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown field(s) {', '.join(unknown)}; "
                            f"expected {', '.join([*self.FIELDS, *self.EXTRA])}")
        tables: dict[str, dict[str, Any]] = {section: {} for section in self.SECTIONS}
        for name, value in {**self.DEFAULTS, **values}.items():
            if name in self.FIELDS:
                section, key = self.FIELDS[name]
                tables[section][key] = value
        renamed = {f"{section}.{key}": name for name, (section, key) in self.FIELDS.items()}
        problems = []
        for section, cls in self.SECTIONS.items():
            try:
                setattr(self, section, validate_as(cls, tables[section], source=type(self).__name__))
            except ConfigError as exc:
                problems += [_rename(line, section, renamed) for line in exc.problems]
        if problems:
            raise ConfigError(problems)
        self._extra = {**self.EXTRA, **{k: v for k, v in values.items() if k in self.EXTRA}}

    def __getattr__(self, name: str) -> Any:
        if name in type(self).FIELDS:
            section, key = self.FIELDS[name]
            return to_dict(getattr(self, section))[key]
        if name in type(self).EXTRA:
            return self.__dict__["_extra"][name]
        raise AttributeError(name)

    def sections(self) -> dict[str, Any]:
        """The config-file sections (plain data) these values stand for."""
        return {section: to_dict(getattr(self, section)) for section in self.SECTIONS}


def _rename(line: str, section: str, renamed: dict[str, str]) -> str:
    """'X: delta: expected ...' -> 'X: delta (risk_test.delta): expected ...' in the original's words."""
    head, _, rest = line.partition(": ")
    key, _, message = rest.partition(": ")
    original = renamed.get(f"{section}.{key}", key)
    return f"{head}: {original} ({section}.{key}): {message}"


class DynamicBetaDPOConfig(_SectionView):
    """The original ``DynamicBetaDPOConfig``: beta_0, delta, momentum, warmup_steps, alpha, gamma,
    beta_min, beta_max, risk_stat, hoeffding_eps0, update_granularity, scope."""

    FIELDS = {
        "beta_0": ("beta_update", "beta_0"), "delta": ("risk_test", "delta"), "momentum": ("risk_test", "lambda"),
        "warmup_steps": ("risk_test", "beta_warmup"), "alpha": ("beta_update", "alpha"),
        "gamma": ("beta_update", "gamma"), "beta_min": ("beta_update", "beta_min"),
        "beta_max": ("beta_update", "beta_max"), "risk_stat": ("risk_test", "risk_stat"),
        "hoeffding_eps0": ("risk_test", "hoeffding_eps0"), "update_granularity": ("risk_test", "update_granularity"),
        "scope": ("risk_test", "scope"),
    }
    SECTIONS = {"risk_test": RiskTestConfig, "beta_update": BetaUpdateConfig}
    DEFAULTS = {"momentum": 0.05}  # the original dataclass's default; its YAML (and [risk_test]) use 0.1


class BetaDPOConfig(_SectionView):
    """The original ``BetaDPOConfig``: beta_0, m, rho, alpha, min_beta, ema_init, std, plus the
    controller's ``eps`` and ``seed``."""

    FIELDS = {name: ("beta_dpo", name) for name in ("beta_0", "m", "rho", "alpha", "min_beta", "ema_init", "std")}
    SECTIONS = {"beta_dpo": BetaDPOSectionConfig}
    EXTRA = {"eps": 1e-6, "seed": 0}


class _PreferenceTrainer:
    trainer_name = ""
    args_class: type = DPOTrainingConfig

    def __init__(self, model, ref_model, args, train_dataset, eval_dataset, tokenizer, precision, max_length,
                 max_prompt_length, zero_stage, sections: dict[str, Any]):
        uses_reference = ALGORITHMS[self.trainer_name].uses_reference
        if tokenizer is None:
            raise ValueError("tokenizer is required (the original API's tokenizer= / processing_class=)")
        if uses_reference and (ref_model is None or ref_model is model):
            raise ValueError("ref_model must be a separate frozen copy of the policy (e.g. loaded from the same path)")
        if isinstance(args, dict):
            args = self.args_class(**args)
        name = model if isinstance(model, str) else getattr(model, "name_or_path", None) or "<in-memory model>"
        model = None if isinstance(model, str) else model  # a name loads as the config's policy_name
        raw = {
            "policy_name": str(name),
            **({"ref_name": str(getattr(ref_model, "name_or_path", None) or name)} if uses_reference else {}),
            "precision": precision,
            "dataset": to_dict(DatasetConfig(dataset_name="<in-memory dataset>", val_ratio=0.0, max_length=max_length,
                                             max_prompt_length=max_prompt_length)),
            ALGORITHMS[self.trainer_name].training_section: to_dict(args),
            "deepspeed": to_dict(DeepSpeedConfig(zero_stage=zero_stage)),
            **sections,
        }
        self.config = validate_mapping(raw, self.trainer_name, source=type(self).__name__)
        self.model, self.ref_model, self.tokenizer = model, ref_model, tokenizer
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset

    def train(self) -> dict[str, Any]:
        """Train (or resume from ``args.save_dir``); returns the run summary."""
        from .trainer import train

        return train(self.config, self.trainer_name, model=self.model, ref_model=self.ref_model,
                     tokenizer=self.tokenizer, train_rows=self.train_dataset,
                     eval_rows=self.eval_dataset)  # None: val_ratio is 0, so no validation split


class DynamicBetaDPOTrainer(_PreferenceTrainer):
    """Dynamic-Beta DPO (``dynamic_cfg`` holds beta_0, delta, momentum, warmup_steps, alpha, gamma, ...)."""

    trainer_name = "dynamic_beta_dpo"

    def __init__(self, model, ref_model, args, dynamic_cfg: Optional[DynamicBetaDPOConfig] = None,
                 train_dataset=None, eval_dataset=None, tokenizer=None, processing_class=None,
                 precision: str = "fp32", max_length: int = 512, max_prompt_length: int = 256, zero_stage: int = 0):
        super().__init__(model, ref_model, args, train_dataset, eval_dataset, tokenizer or processing_class,
                         precision, max_length, max_prompt_length, zero_stage,
                         (dynamic_cfg or DynamicBetaDPOConfig()).sections())


class BetaDPOTrainer(_PreferenceTrainer):
    """Beta-DPO (``beta_dpo_cfg`` holds beta_0, m, rho, alpha, min_beta, ...)."""

    trainer_name = "beta_dpo"

    def __init__(self, model, ref_model, args, beta_dpo_cfg: Optional[BetaDPOConfig] = None,
                 train_dataset=None, eval_dataset=None, tokenizer=None, processing_class=None,
                 precision: str = "fp32", max_length: int = 512, max_prompt_length: int = 256, zero_stage: int = 0):
        super().__init__(model, ref_model, args, train_dataset, eval_dataset, tokenizer or processing_class,
                         precision, max_length, max_prompt_length, zero_stage,
                         (beta_dpo_cfg or BetaDPOConfig()).sections())


class KTOTrainer(_PreferenceTrainer):
    """KTO (TRL's ``KTOTrainer``): ``train_dataset`` rows of ``prompt``/``completion``/``label`` (or
    preference rows, each a desirable and an undesirable completion); ``args`` a
    ``KTOTrainingConfig`` or a dict of the ``kto_training`` keys."""

    trainer_name = "kto"
    args_class = KTOTrainingConfig

    def __init__(self, model, ref_model, args, train_dataset=None, eval_dataset=None, tokenizer=None,
                 processing_class=None, precision: str = "fp32", max_length: int = 512, max_prompt_length: int = 256,
                 zero_stage: int = 0):
        super().__init__(model, ref_model, args, train_dataset, eval_dataset, tokenizer or processing_class,
                         precision, max_length, max_prompt_length, zero_stage, {})


class RewardTrainer(_PreferenceTrainer):
    """A reward model (TRL's ``RewardTrainer``): ``model`` a sequence-classification model with one
    output (``AutoModelForSequenceClassification``, ``num_labels=1``), or a model's name or folder,
    which loads as one (a causal LM's head gives way to a fresh score head); ``train_dataset``
    preference rows; ``args`` a ``RewardTrainingConfig`` or a dict of the ``reward_training`` keys."""

    trainer_name = "reward"
    args_class = RewardTrainingConfig

    def __init__(self, model, args, train_dataset=None, eval_dataset=None, tokenizer=None, processing_class=None,
                 precision: str = "fp32", max_length: int = 512, max_prompt_length: int = 256, zero_stage: int = 0):
        super().__init__(model, None, args, train_dataset, eval_dataset, tokenizer or processing_class,
                         precision, max_length, max_prompt_length, zero_stage, {})


__all__ = ["BetaDPOConfig", "BetaDPOTrainer", "DPOTrainingConfig", "DynamicBetaDPOConfig", "DynamicBetaDPOTrainer",
           "KTOTrainer", "KTOTrainingConfig", "RewardTrainer", "RewardTrainingConfig"]
