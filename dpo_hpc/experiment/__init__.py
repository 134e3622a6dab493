"""Experiment files: the schema, strict loading, and the pure expansion into runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..config import ALGORITHMS, ConfigError, detect_trainer, read_mapping, validate_as
from .expand import (EVALUATIONS, GENERATED_PAIRS, GENERATION_FILE, VARIANT, Plan, Run, expand, experiment_root,
                     grid_label, run_id_for, stage_order)
from .schema import REQUEUE_CAUSES, SLURM_DEFAULTS, ExperimentConfig, SlurmConfig, StageConfig, time_to_minutes


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment TOML; every problem is one line naming the file and key."""
    data = read_mapping(path)
    if "experiment" not in data and "stages" not in data and ("policy_name" in data or "dataset" in data):
        trainer = detect_trainer(data)
        raise ConfigError([f"{path} is a trainer config (it has policy_name / dataset), not an experiment file; "
                           f"train it with `dpo-hpc train {ALGORITHMS[trainer].command} --config {path}`, or name "
                           f"it as config_file in a stage of an experiment"])
    return validate_as(ExperimentConfig, data, source=str(path))


def load_plan(path: str | Path, overrides: Sequence[tuple[str, Any]] = ()) -> Plan:
    """The experiment's runs; ``overrides`` are ``--set`` (key, value) pairs."""
    return expand(load_experiment(path), path, overrides)


__all__ = ["EVALUATIONS", "GENERATED_PAIRS", "GENERATION_FILE", "REQUEUE_CAUSES", "SLURM_DEFAULTS", "VARIANT",
           "ExperimentConfig", "Plan", "Run", "SlurmConfig", "StageConfig", "expand", "experiment_root",
           "grid_label", "load_experiment", "load_plan", "run_id_for", "stage_order", "time_to_minutes"]
