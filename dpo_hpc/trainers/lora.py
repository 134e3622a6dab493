"""LoRA through peft (an optional extra: ``pip install 'dpo-hpc[peft]'``).

The policy is the loaded model with adapters on ``lora.target_modules``; only the adapters train
and only they have optimizer state. A DPO reference that is the policy's own base model is the
same module with its adapters switched off (``AdaptersOff``), so no second model is in memory.
The run directory gets the adapter in peft's layout (``adapter_model.safetensors``,
``adapter_config.json``) and, with ``lora.merge``, the merged model in ``merged/``; a folder holding
an adapter loads as its base with the adapter merged in, so a DPO stage can start from a LoRA SFT run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint.run_dir import ADAPTER_CONFIG, MODEL_CONFIG
from ..config import ConfigError
from ..config.schema import LoraConfig

MERGED = "merged"
"""Subfolder of a LoRA run's directory with the merged model (beside the adapter, transformers
would load the adapter from the same folder)."""


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError(["lora: needs the peft package, which is not installed here; "
                           "pip install 'dpo-hpc[peft]' (or remove the [lora] section)"]) from None
    return peft


def add_adapters(model, cfg: LoraConfig, base_name: Optional[str] = None, task_type: str = "CAUSAL_LM"):
    """The model with fresh LoRA adapters (B = 0: the policy starts equal to its base).
    ``base_name`` is what the saved adapter names as its base: the name the policy was loaded by
    (for a policy that was itself a LoRA run, that run's folder, not the model under it).
    ``task_type`` is peft's: ``SEQ_CLS`` (a reward model) also trains the new score head whole."""
    peft = _peft()
    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                             target_modules=cfg.target_modules, bias="none", task_type=task_type)
    try:
        model = peft.get_peft_model(model, config)
    except ValueError as exc:  # e.g. target modules not found in the model
        raise ConfigError([f"lora.target_modules = {cfg.target_modules!r}: {exc}"]) from None
    if base_name is not None:
        model.peft_config["default"].base_model_name_or_path = str(Path(base_name).resolve()) \
            if Path(base_name).exists() else base_name
    return model


def is_adapter_folder(name: str) -> bool:
    path = Path(name)
    return path.is_dir() and (path / ADAPTER_CONFIG).exists() and not (path / MODEL_CONFIG).exists()


def load_merged(folder: str, load_base):
    """An adapter-only folder -> its base model (``load_base(name)``) with the adapter merged in."""
    peft = _peft()
    base_name = json.loads((Path(folder) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base_name:
        raise ConfigError([f"{folder}: {ADAPTER_CONFIG} names no base model (base_model_name_or_path)"])
    return peft.PeftModel.from_pretrained(load_base(base_name), folder).merge_and_unload()


class AdaptersOff(torch.nn.Module):
    """The policy's base model: the same module with its LoRA adapters disabled for the call.
    (Not registered as a submodule: it owns no weights of its own.)"""

    def __init__(self, peft_model):
        super().__init__()
        self.__dict__["peft_model"] = peft_model  # not a child: the policy owns it

    def forward(self, **inputs):
        with self.peft_model.disable_adapter():
            return self.peft_model(**inputs)

    def get_output_embeddings(self):
        return self.peft_model.get_output_embeddings()

    @property
    def config(self):
        return self.peft_model.config


def uses_adapters(model) -> bool:
    return hasattr(model, "peft_config")


def save_adapter(module, state_dict: dict, tokenizer, folder: Path, merge: bool) -> None:
    """peft's adapter files into ``folder`` and, with ``merge``, the merged model (with the
    tokenizer) into ``folder/merged``."""
    module.save_pretrained(folder, state_dict=state_dict)
    if merge:
        merged = module.merge_and_unload()
        merged.config.use_cache = True
        merged.save_pretrained(folder / MERGED)
        tokenizer.save_pretrained(folder / MERGED)


def trainable_summary(model) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"LoRA: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.2f}%)"
