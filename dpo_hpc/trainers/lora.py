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
import math
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint.run_dir import ADAPTER_CONFIG, MERGED, is_adapter_folder
from ..config import ConfigError
from ..config.schema import LoraConfig

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
"""What peft puts before a layer's name in the adapter file's keys."""
NOT_PLAIN_LORA = ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "layer_replication", "lora_bias",
                  "trainable_token_indices")
"""Adapter options that make a merge more than ``W += B @ A x scaling`` (or add whole layers):
such an adapter is merged by peft, which needs its base whole."""


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError(["lora: needs the peft package, which is not installed here; "
                           "pip install 'dpo-hpc[peft]' (or remove the [lora] section)"]) from None
    return peft


def add_adapters(model, cfg: LoraConfig, base_name: Optional[str] = None, task_type: str = "CAUSAL_LM",
                 seed: int = 0):
    """The model with fresh LoRA adapters (B = 0: the policy starts equal to its base; A drawn
    from ``seed`` alone, whatever loading the base drew before: peft's merge of an adapter folder
    draws, the ZeRO-3 merge in slices does not, and both must give a run the same adapters).
    ``base_name`` is what the saved adapter names as its base: the name the policy was loaded by
    (for a policy that was itself a LoRA run, that run's folder, not the model under it).
    ``task_type`` is peft's: ``SEQ_CLS`` (a reward model) also trains the new score head whole."""
    peft = _peft()
    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                             target_modules=cfg.target_modules, bias="none", task_type=task_type)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = peft.get_peft_model(model, config)
    except ValueError as exc:  # e.g. target modules not found in the model
        raise ConfigError([f"lora.target_modules = {cfg.target_modules!r}: {exc}"]) from None
    if base_name is not None:
        model.peft_config["default"].base_model_name_or_path = str(Path(base_name).resolve()) \
            if Path(base_name).exists() else base_name
    return model


def load_merged(folder: str, load_base, in_slices: bool = False):
    """An adapter-only folder -> its base model (``load_base(name)``) with the adapter merged in;
    ``in_slices``: the base loads in ZeRO-3 slices and the adapter is added one layer at a time
    (``merge_in_slices``; only for ``merges_in_slices(folder)``)."""
    base_name = json.loads((Path(folder) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base_name:
        raise ConfigError([f"{folder}: {ADAPTER_CONFIG} names no base model (base_model_name_or_path)"])
    if in_slices:
        return merge_in_slices(load_base(base_name), folder)
    return _peft().PeftModel.from_pretrained(load_base(base_name), folder).merge_and_unload()


def merges_in_slices(folder: str) -> bool:
    """Whether the adapter in ``folder``, and every adapter folder its base chain goes through, is
    plain LoRA on weight matrices in safetensors, which ``merge_in_slices`` adds to a base that
    ZeRO-3 loaded in slices (anything else is merged by peft, into a whole base)."""
    from safetensors import safe_open

    path = Path(folder)
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    if (config.get("peft_type") != "LORA" or config.get("bias", "none") != "none"
            or any(config.get(option) for option in NOT_PLAIN_LORA) or not (path / ADAPTER_WEIGHTS).is_file()):
        return False
    with safe_open(path / ADAPTER_WEIGHTS, "pt") as tensors:
        if not all(key.endswith((".lora_A.weight", ".lora_B.weight")) for key in tensors.keys()):
            return False
    base = config.get("base_model_name_or_path")
    return not (base and is_adapter_folder(base)) or merges_in_slices(base)


def merge_in_slices(model, folder: str):
    """``model``, its weights in ZeRO-3 slices, with the plain-LoRA adapter in ``folder`` added:
    ``W += B @ A x scaling`` as peft merges it (the same float32 arithmetic), each weight gathered
    alone, so a rank holds at most one whole weight matrix beyond its slice."""
    import deepspeed
    from safetensors.torch import load_file

    config = json.loads((Path(folder) / ADAPTER_CONFIG).read_text())
    rank = config["r"]
    scaling = config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)
    tensors = load_file(Path(folder) / ADAPTER_WEIGHTS)
    layers = dict(model.named_modules())
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):  # every rank gathers in the same order
        name = key.removesuffix(".lora_A.weight").removeprefix(PEFT_PREFIX)
        weight = getattr(layers.get(name), "weight", None)
        if not isinstance(weight, torch.nn.Parameter):
            raise ConfigError([f"{folder}: the adapter has {name}, which is not a layer of its base model"])
        delta = tensors[key.replace(".lora_A.", ".lora_B.")].float() @ tensors[key].float()
        if config.get("fan_in_fan_out"):
            delta = delta.T
        with deepspeed.zero.GatheredParameters([weight], modifier_rank=0):
            if weight.shape != delta.shape:
                raise ConfigError([f"{folder}: the adapter of {name} is for a {tuple(delta.shape)} weight; "
                                   f"its base model's is {tuple(weight.shape)}"])
            weight.data += delta * scaling  # each rank alike; rank 0's result is cut into the slices
    return model


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
