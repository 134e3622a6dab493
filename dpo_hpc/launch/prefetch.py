"""Fill the Hugging Face cache the jobs will read, on a login node with network, before they run
on compute nodes without it.

Every model, tokenizer and dataset an experiment's runs name (a stage that starts from another
stage's output names none of its own) is one asset. A local path is only checked. A hub name is
looked up in the hub cache of its stage (``HF_HUB_CACHE`` or ``HF_HOME`` from the stage's
``[slurm] env``, else this shell's, else ``~/.cache/huggingface``) and downloaded there when
missing, unless ``HF_HUB_OFFLINE=1``: then what is missing is reported, and nothing is fetched.
Datasets are fetched as their repository's files; the trainer reads them from there when offline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .. import fsutil
from ..config import validate_mapping
from ..experiment import GENERATED_PAIRS, Plan
from .sbatch import stage_slurm

IGNORED_MODEL_FILES = ["original/*", "*.pth", "*.pt", "*.gguf", "*.onnx", "*.msgpack", "*.h5", "*.ot", "*.tflite"]
"""Other formats' copies of the weights (Meta's original checkpoint, GGUF, ONNX, TF, Flax):
transformers loads safetensors (or .bin) only, and the copies can double the download."""


@dataclass(frozen=True)
class Asset:
    kind: str          # "model" (a model or tokenizer) or "dataset"
    name: str
    cache: Optional[Path]  # the hub cache of the stage; None for a local path

    @property
    def repo_type(self) -> str:
        return "dataset" if self.kind == "dataset" else "model"


def hub_cache(env: dict[str, str]) -> Path:
    """The hub cache a job with the stage's ``[slurm] env`` uses (the same rules as huggingface_hub)."""
    def pick(name: str) -> Optional[str]:
        return env.get(name) or os.environ.get(name)

    if pick("HF_HUB_CACHE"):
        return Path(pick("HF_HUB_CACHE")).expanduser()
    home = pick("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def looks_local(name: str, kind: str) -> bool:
    """A path, not a hub id (``org/name``): as the loaders tell them apart."""
    from ..data.sources import FILE_BUILDERS

    return fsutil.looks_local(name, tuple(FILE_BUILDERS) if kind == "dataset" else ())


def plan_assets(plan: Plan) -> list[Asset]:
    """Each distinct input of the plan's runs, in stage order (relative paths: from the experiment's folder)."""
    found: dict[tuple, Asset] = {}
    generated = {str(r.run_dir / GENERATED_PAIRS) for r in plan.runs if r.role == "generate"}  # made by the jobs
    for stage in plan.stage_order:
        cache = hub_cache(stage_slurm(plan, stage).get("env") or {})
        names = []
        generation = plan.experiment.stages[stage].generate
        if generation is not None:  # its model is a run's; its judge may be a hub model
            names += [("dataset", generation.prompts)]
            if generation.reward_model and generation.reward_model not in plan.experiment.stages:
                names += [("model", generation.reward_model)]
        for run in plan.stage_runs(stage):
            cfg = validate_mapping(run.config, run.trainer, source=run.run_id)
            names += [("dataset", name) for name in cfg.dataset.dataset_names if name not in generated]
            if run.parent is None:  # a stage started from another stage's output names none of its own
                names += [("model", n) for n in (cfg.policy_name, getattr(cfg, "ref_name", None), cfg.tokenizer_name) if n]
        for kind, name in names:
            path = plan.base / Path(name).expanduser()
            local = path.exists() or looks_local(name, kind)
            asset = Asset(kind, str(path), None) if local else Asset(kind, name, cache)
            found.setdefault((asset.kind, asset.name, asset.cache), asset)
    return list(found.values())


def cached(asset: Asset) -> Optional[str]:
    """The asset's snapshot folder in its hub cache, or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(asset.name, repo_type=asset.repo_type, cache_dir=asset.cache, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None


def fetch(asset: Asset) -> str:
    """Download the asset into its hub cache; returns its snapshot folder."""
    from huggingface_hub import snapshot_download

    ignore = IGNORED_MODEL_FILES if asset.kind == "model" else None
    return snapshot_download(asset.name, repo_type=asset.repo_type, cache_dir=asset.cache, ignore_patterns=ignore)


def prefetch(plan: Plan, say=print) -> list[str]:
    """Check or fetch every asset; returns what is still missing, one line each."""
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    missing = []
    for asset in plan_assets(plan):
        label = f"{asset.kind} {asset.name}"
        if asset.cache is None:
            if Path(asset.name).exists():
                say(f"[prefetch] {label}: local, present")
            else:
                missing.append(f"{label}: no such local path")
            continue
        snapshot = cached(asset)
        if snapshot:
            say(f"[prefetch] {label}: already in {asset.cache}")
            continue
        if offline:
            missing.append(f"{label}: not in {asset.cache}, and HF_HUB_OFFLINE=1 forbids fetching it; run "
                           "`dpo-hpc prefetch` where there is network, with the jobs' HF_HOME")
            continue
        say(f"[prefetch] {label}: fetching into {asset.cache} ...")
        try:
            snapshot = fetch(asset)
        except Exception as exc:  # network, gated repo, no such repo: one line each, go on with the rest
            missing.append(f"{label}: could not be fetched: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
            continue
        say(f"[prefetch] {label}: fetched into {snapshot}")
    return missing
