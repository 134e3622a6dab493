"""The model card: ``README.md`` in a finished run's directory, in the Hugging Face Hub's form
(YAML metadata, then Markdown), so that the folder says what it holds wherever it is copied, shared
on the cluster or pushed to the hub from a login node.

It is made from the run's own records (its config, manifest and data report) and the run
directories its model descends from, so ``dpo-hpc model-card RUN_DIR`` writes the same card again
for a run finished before cards existed. A ``README.md`` that another hand wrote is left alone.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Optional

import yaml

from .. import __version__
from ..config import ALGORITHMS, ConfigError, to_identity, validate_mapping
from ..config.losses import LOSSES, loss_types
from ..fsutil import atomic_write_bytes, looks_local
from .run_dir import DATA_REPORT, MERGED, RESOLVED_CONFIG, RunDir, _read_json, is_adapter_folder

CARD = "README.md"
MARK = "<!-- model card written by dpo-hpc (dpo-hpc model-card RUN_DIR writes it again) -->"
"""Tells our card from a README.md someone else put in the folder, which is never overwritten."""
PEFT_TEMPLATE = "# Model Card for Model ID"
"""The heading of the blank card peft's ``save_pretrained`` writes beside an adapter: the run wrote
it (through peft), and the run's own card replaces it."""
UNITS = {"sft": "sequences", "preference": "pairs", "unpaired": "completions"}
"""What one example of each algorithm kind is, as the card counts them."""
PIPELINES = {"causal_lm": "text-generation", "reward_model": "text-classification"}
LOADERS = {"causal_lm": "AutoModelForCausalLM", "reward_model": "AutoModelForSequenceClassification"}
LINEAGE_LIMIT = 32
"""Run directories followed back at most (a chain that loops is cut, not followed forever)."""


def lineage(model: str) -> list[tuple[str, Optional[str]]]:
    """``model`` and what it descends from: (name, trainer) for each dpo-hpc run directory on the
    way, then the first model that is not one (trainer None), e.g. a hub name."""
    chain: list[tuple[str, Optional[str]]] = []
    while len(chain) < LINEAGE_LIMIT:
        resolved = _read_json(Path(model).expanduser() / RESOLVED_CONFIG)
        if resolved is None or not isinstance(resolved.get("policy_name"), str) or model in dict(chain):
            return chain + [(model, None)]
        chain.append((model, resolved.get("trainer")))
        model = resolved["policy_name"]
    return chain


def hub_name(name: Optional[str]) -> Optional[str]:
    """``name`` if it is a hub id (not a path here, nor written like one), else None."""
    if not name or looks_local(name) or Path(name).expanduser().exists():
        return None
    return name


def flat(settings: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """(key path, value) of each leaf of nested settings, in the order they come."""
    out = []
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            out += flat(value, prefix + (key,))
        else:
            out.append((prefix + (key,), value))
    return out


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def toml_value(value: Any) -> str:
    """``value`` (JSON data, no null) written as TOML. Strings as JSON writes them with ensure_ascii
    off: a TOML basic string (its \\uXXXX escapes are TOML's; surrogate pairs are not)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _shown(name: str) -> str:
    """A local path as an absolute one (an experiment's are relative to its file's folder), else
    the name as given."""
    path = Path(name).expanduser()
    return f"`{path.resolve() if path.exists() else name}`"


def _starts(chain: list[tuple[str, Optional[str]]]) -> str:
    parts = [_shown(name) + (f" (a dpo-hpc {trainer} run)" if trainer else "") for name, trainer in chain]
    return ", from ".join(parts)


def _data_line(cfg, report: Optional[dict[str, Any]], unit: str) -> str:
    data = cfg.dataset
    names = [f"{_shown(data.dataset_name)} ({data.subset})"] + [f"{_shown(m.dataset_name)} ({m.fraction:g} of it)"
                                                                for m in data.mix]
    line = " with ".join(names)
    if report:
        counts = []
        for split in ("train", "validation"):
            part = report.get(split) or {}
            if "kept" in part:
                dropped = part.get("rows", part["kept"]) - part["kept"]
                counts.append(f"{part['kept']:,} {split} {unit}" + (f" ({dropped:,} rows dropped)" if dropped else ""))
        line += ": " + ", ".join(counts) if counts else ""
    return line


def _snippet(module: str, loader: str, folder: Path, tokenizer: Path, load: str = "") -> list[str]:
    imports = [f"from {module} import {loader}, AutoTokenizer"] if module == "transformers" else \
        [f"from {module} import {loader}", "from transformers import AutoTokenizer"]
    return ["```python", *imports, "", f'tokenizer = AutoTokenizer.from_pretrained("{tokenizer}")',
            f'model = {loader}("{folder}"{load})' if load else f'model = {loader}.from_pretrained("{folder}")', "```"]


def _use(folder: Path, model: str, cfg, merged: bool) -> list[str]:
    """How the run's model loads: the folder with transformers; a LoRA run's adapter with peft, or
    its merged model. peft cannot load an adapter whose base is another run's adapter folder (it
    would not merge the base's adapter in): such a model loads through dpo-hpc."""
    loader = LOADERS[model]
    if cfg.lora is None:
        return _snippet("transformers", loader, folder, folder)
    if merged:
        return _snippet("transformers", loader, folder, folder) + [
            "", "The LoRA adapter merged into this model is in the folder above, with the run's records."]
    if cfg.lora.merge:
        return _snippet("transformers", loader, folder / MERGED, folder) + [
            "", f"`{MERGED}/` holds the model with the LoRA adapter merged in; the folder itself holds the adapter."]
    if not is_adapter_folder(cfg.policy_name):
        return _snippet("peft", loader.replace("Auto", "AutoPeft", 1), folder, folder) + [
            "", "The folder holds the LoRA adapter: peft loads its base model and applies it."]
    note = ("", f"The folder holds a LoRA adapter whose base, `{cfg.policy_name}`, is another run's adapter, which "
                "peft's loaders would not merge in; dpo-hpc merges each adapter of the chain into its base "
                f"(or train with `lora.merge = true` for a plain transformers folder in `{MERGED}/`).")
    if model != "causal_lm":
        return list(note[1:])
    return _snippet("dpo_hpc.trainers.engine", "load_causal_lm", folder, folder, ', "fp32", trainable=False') \
        + list(note)


def _metadata(cfg, algo, chain: list[tuple[str, Optional[str]]], name: str, adapter: bool) -> dict[str, Any]:
    """The hub's YAML header: what the model is, what it came from and what it read. ``base_model``
    is the hub model at the root of the lineage; for an adapter, only the model it applies to (the
    hub reads an adapter's base_model as that), so none when that is another run's model."""
    root = chain[-1][0] if not adapter or len(chain) == 1 else None
    meta: dict[str, Any] = {"base_model": hub_name(root)} if hub_name(root) else {}
    meta.update(library_name="peft" if adapter else "transformers", model_name=name,
                pipeline_tag=PIPELINES[algo.model], tags=["dpo-hpc", algo.command] + (["lora"] if cfg.lora else []))
    datasets = [d for d in dict.fromkeys(cfg.dataset.dataset_names) if hub_name(d)]
    return {**meta, "datasets": datasets} if datasets else meta


def _training(cfg, algo, manifest: dict[str, Any], report: Optional[dict[str, Any]], chain) -> list[str]:
    """The training table: loss, lineage, data, steps and batch, precision, compute."""
    unit, training = UNITS[algo.kind], cfg.training
    rows = []
    if algo.kind == "preference" and algo.model == "causal_lm":
        rows.append(("loss", "; ".join(f"`{t}`: {LOSSES[t].source}" for t in loss_types(training.loss_type))))
    rows.append(("started from", _starts(chain)))
    if getattr(cfg, "ref_name", None):
        rows.append(("reference", _shown(cfg.ref_name)))
    rows.append(("data", _data_line(cfg, report, unit)))
    if manifest.get("final_step") is not None:
        world = manifest.get("world_size") or 1
        accumulated = training.accumulation_steps(world)
        rows.append(("steps", f"{manifest['final_step']:,} optimizer steps of "
                              f"{training.batch_size * accumulated * world:,} {unit} ({training.batch_size} per "
                              f"micro-batch x {accumulated} accumulated x {world} rank(s)), seed {training.seed}"))
    rows.append(("precision", f"{cfg.precision}, DeepSpeed ZeRO stage {cfg.deepspeed.zero_stage}"
                              + (f"; LoRA r = {cfg.lora.r}, alpha = {cfg.lora.alpha:g}" if cfg.lora else "")))
    if manifest.get("train_seconds") is not None:
        speed = manifest.get("median_tokens_per_sec")
        rows.append(("compute", f"{manifest['train_seconds']:,.0f} s on {manifest.get('device') or 'unknown'}"
                                + (f", {speed:,.0f} tokens/s (median)" if speed else "")))
    return ["## Training", "", "| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows), ""]


def _settings(cfg) -> list[str]:
    """The run's identity (its non-default values) as TOML that loads back into a config."""
    identity = flat(to_identity(cfg))
    keys = [".".join(map(toml_key, path)) for path, _ in identity]
    lines = [f"# {key}: none" if value is None else f"{key} = {toml_value(value)}"
             for key, (_, value) in zip(keys, identity)]
    return ["Settings other than the defaults (every value is in `config.resolved.json`):", "", "```toml",
            *lines, "```", ""] if lines else []


def _results(manifest: dict[str, Any]) -> list[str]:
    results = manifest.get("final_eval") or {}
    if not results:
        return []
    return [f"## Evaluation (validation split, after step {manifest.get('final_step')})", "", "| metric | value |",
            "|---|---|", *(f"| {metric} | {_number(value)} |" for metric, value in sorted(results.items())), ""]


def _versions(manifest: dict[str, Any]) -> list[str]:
    versions = {"dpo-hpc": manifest.get("package_version", __version__), "python": manifest.get("python"),
                **dict(sorted((manifest.get("libraries") or {}).items()))}  # as the manifest file has them
    lines = ["## Framework versions", "", *(f"- {k}: {v}" for k, v in versions.items() if v)]
    if manifest.get("git_sha"):
        edits = " with local changes" if manifest.get("git_dirty") else ""
        lines.append(f"- dpo-hpc source: git {manifest['git_sha']}{edits}")
    return lines


def model_card(cfg, trainer: str, manifest: dict[str, Any], data_report: Optional[dict[str, Any]],
               folder: Path, name: str, merged: bool = False) -> str:
    """The card of a run of ``trainer`` with config ``cfg``, from its manifest and data report, for
    the model in ``folder``: the run directory, or (``merged``) a LoRA run's merged model."""
    algo = ALGORITHMS[trainer]
    chain = lineage(cfg.policy_name)
    meta = _metadata(cfg, algo, chain, name, adapter=cfg.lora is not None and not merged)
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---",
             MARK, "", f"# {name}", "",
             f"Trained with dpo-hpc {manifest.get('package_version', __version__)}: {algo.method}.", "",
             "## Use", "", *_use(folder.resolve(), algo.model, cfg, merged), "",
             *_training(cfg, algo, manifest, data_report, chain), *_settings(cfg), *_results(manifest),
             *_versions(manifest)]
    return "\n".join(lines) + "\n"


def _ours(path: Path) -> bool:
    """Whether the README.md at ``path`` is a card the run wrote (ours, or peft's blank one)."""
    try:
        text = path.read_text(errors="replace") if path.is_file() else ""
    except OSError:
        return False
    return any(mark in text for mark in (MARK, PEFT_TEMPLATE))


def write_model_card(run: RunDir, cfg, trainer: str, manifest: dict[str, Any]) -> Optional[str]:
    """Write the card into the run directory, and into a LoRA run's merged model (atomically); a
    message for each README.md that is not ours, which stays."""
    report, name, left = _read_json(run.root / DATA_REPORT), cfg.training.run_name or run.root.name, []
    merged = run.root / MERGED
    for folder in [run.root] + ([merged] if cfg.lora is not None and cfg.lora.merge and merged.is_dir() else []):
        path = folder / CARD  # a link planted there is replaced, never read or written through
        if not path.is_symlink() and path.exists() and not _ours(path):
            left.append(f"left {path} as it is (not a model card dpo-hpc wrote)")
            continue
        card = model_card(cfg, trainer, manifest, report, folder, name, merged=folder == merged)
        atomic_write_bytes(path, card.encode())
    return "; ".join(left) or None


def rewrite_model_card(run_dir: str | Path) -> str:
    """Write the card of a completed run again from its records (``dpo-hpc model-card``); what was done."""
    run = RunDir(run_dir)
    resolved, manifest = _read_json(run.root / RESOLVED_CONFIG), run.read_manifest()
    if resolved is None or manifest is None:
        raise ConfigError([f"{run.root}: not a dpo-hpc run directory (no readable {RESOLVED_CONFIG} and manifest)"])
    if manifest.get("status") != "completed":
        raise ConfigError([f"{run.root}: its run has not completed (status {manifest.get('status')!r}); the card "
                           "describes a finished model, and the run writes it when it completes"])
    trainer = resolved.pop("trainer", None)
    if trainer not in ALGORITHMS:
        raise ConfigError([f"{run.root / RESOLVED_CONFIG}: unknown trainer {trainer!r}"])
    cfg = validate_mapping(resolved, trainer, source=str(run.root / RESOLVED_CONFIG))
    return write_model_card(run, cfg, trainer, manifest) or f"wrote {run.root / CARD}"
