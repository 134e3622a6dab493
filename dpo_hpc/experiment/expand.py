"""Experiment -> ordered runs: a pure function of the experiment file (and the files it names).

Each run gets a stable id, ``<stage>-<hash>``, from its trainer and resolved config (a parent
model enters as the parent's run id, not its path), so re-expanding the same file gives the same
ids and run directories, and changing a value gives a new run instead of resuming an old one.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..config import ALGORITHMS, ConfigError, read_mapping, set_dotted, to_dict, to_identity, validate_mapping
from .schema import ExperimentConfig, StageConfig


SHARED_REF_LOG_PROBS = ".ref_log_probs"
"""Under the experiment root: the reference log-prob tables every run of the experiment shares
(with ``precompute_ref_log_probs``), one per reference and data."""


@dataclass(frozen=True)
class Run:
    stage: str
    index: int
    """Position in the stage's array (0-based)."""
    run_id: str
    trainer: str
    grid_values: dict[str, Any]
    parent: Optional[str]
    """Run id of the run whose model this one starts from."""
    config: dict[str, Any] = field(repr=False)
    """Validated trainer config in plain-data form (what the array task trains)."""
    run_dir: Path

    def manifest_row(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "stage": self.stage, "index": self.index, "trainer": self.trainer,
                "grid": self.grid_values, "parent": self.parent, "run_dir": str(self.run_dir), "config": self.config}


@dataclass(frozen=True)
class Plan:
    experiment: ExperimentConfig
    source: Path
    root: Path
    """``<output_root>/<experiment name>``, absolute."""
    stage_order: list[str]
    runs: list[Run]

    def stage_runs(self, stage: str) -> list[Run]:
        return [r for r in self.runs if r.stage == stage]

    def run(self, run_id: str) -> Run:
        for r in self.runs:
            if r.run_id == run_id:
                return r
        raise KeyError(run_id)

    def children(self, run_id: str) -> list[Run]:
        return [r for r in self.runs if r.parent == run_id]


def _fail(source: Path, where: str, message: str):
    raise ConfigError([f"{source}: {where}: {message}"])


def stage_order(exp: ExperimentConfig, source: Path) -> list[str]:
    """Stages with every parent before its children (file order among independent stages)."""
    stages = exp.stages
    for name, stage in stages.items():
        if stage.from_ is not None and stage.from_ not in stages:
            _fail(source, f"stages.{name}.from", f"unknown stage '{stage.from_}'; stages are {', '.join(stages)}")
    order: list[str] = []
    for name in stages:
        chain, node = [], name
        while node is not None and node not in order:
            if node in chain:
                cycle = chain[chain.index(node):] + [node]
                _fail(source, f"stages.{name}.from", f"stages form a cycle: {' -> '.join(cycle)}")
            chain.append(node)
            node = stages[node].from_
        order.extend(reversed(chain))
    return order


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _grid_points(stage: StageConfig) -> list[dict[str, Any]]:
    axes = list(stage.grid)
    return [dict(zip(axes, values)) for values in itertools.product(*(stage.grid[a] for a in axes))]


def run_id_for(stage: str, trainer: str, identity: dict, parent: Optional[str], parent_dir: Optional[str] = None) -> str:
    """``<stage>-<10 hex>`` over the trainer, the config's identity (``config.to_identity``) without
    its run-dependent paths, and the parent id."""
    identity = copy.deepcopy(identity)
    for key in ("policy_name", "ref_name"):
        if parent_dir is not None and identity.get(key) == parent_dir:
            identity.pop(key)
    blob = json.dumps({"trainer": trainer, "config": identity, "parent": parent}, sort_keys=True, default=str)
    return f"{stage}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def expand(exp: ExperimentConfig, source: str | Path, cwd: str | Path) -> Plan:
    """All runs of the experiment, stage by stage in dependency order, each validated.

    ``source`` is the experiment file (``config_file`` paths are relative to its folder);
    ``cwd`` anchors a relative ``output_root``.
    """
    source = Path(source)
    root = (Path(cwd) / exp.experiment.output_root / exp.experiment.name).resolve()
    order = stage_order(exp, source)
    runs: list[Run] = []
    by_stage: dict[str, list[Run]] = {}
    for name in order:
        stage = exp.stages[name]
        where = f"stages.{name}"
        base: dict[str, Any] = {}
        if stage.config_file:
            path = Path(stage.config_file)
            base = read_mapping(path if path.is_absolute() else source.parent / path)
        base = _deep_merge(base, stage.config)
        section = ALGORITHMS[stage.trainer].training_section
        if exp.experiment.seed is not None:
            base.setdefault(section, {}).setdefault("seed", exp.experiment.seed)
        parents = by_stage[stage.from_] if stage.from_ else [None]
        if stage.from_ and "policy_name" in stage.config:
            _fail(source, f"{where}.config", f"'from = \"{stage.from_}\"' sets policy_name; remove policy_name here")
        points = _grid_points(stage)
        if stage.pairing == "zip" and len(points) not in (1, len(parents)):
            _fail(source, f"{where}.grid", f"pairing = 'zip' needs as many grid points ({len(points)}) "
                                           f"as runs of stage '{stage.from_}' ({len(parents)})")
        if stage.pairing == "zip":
            pairs = [(p, points[i] if len(points) > 1 else points[0]) for i, p in enumerate(parents)]
        else:
            pairs = [(p, point) for p in parents for point in points]
        stage_runs: list[Run] = []
        for parent, point in pairs:
            config = copy.deepcopy(base)
            for key, value in point.items():
                set_dotted(config, key, value, f"{source}: {where}.grid")
            if parent is not None:  # replaces the config file's names; an inline ref_name pins another reference
                config["policy_name"] = str(parent.run_dir)
                if stage.trainer != "sft":
                    config["ref_name"] = stage.config.get("ref_name", str(parent.run_dir))
            label = f"{where} (grid {json.dumps(point)})" if point else where
            config.setdefault(section, {})["save_dir"] = "<run dir>"
            try:
                validated = validate_mapping(config, stage.trainer, source=label)
            except ConfigError as exc:
                raise ConfigError([f"{source}: {p}" for p in exc.problems]) from None
            resolved = to_dict(validated)
            run_id = run_id_for(name, stage.trainer, to_identity(validated), parent.run_id if parent else None,
                                str(parent.run_dir) if parent else None)
            run_dir = root / name / run_id
            resolved[section]["save_dir"] = str(run_dir)
            if resolved[section].get("precompute_ref_log_probs") and not resolved[section]["ref_log_probs_cache"]:
                resolved[section]["ref_log_probs_cache"] = str(root / SHARED_REF_LOG_PROBS)
            if any(r.run_id == run_id for r in stage_runs):
                _fail(source, label, f"duplicates another run of stage '{name}' (same resolved config)")
            stage_runs.append(Run(stage=name, index=len(stage_runs), run_id=run_id, trainer=stage.trainer,
                                  grid_values=point, parent=parent.run_id if parent else None, config=resolved,
                                  run_dir=run_dir))
        by_stage[name] = stage_runs
        runs.extend(stage_runs)
    return Plan(experiment=exp, source=source, root=root, stage_order=order, runs=runs)
