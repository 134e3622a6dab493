"""Slurm settings of a stage -> the sbatch script submitit submits (one array per stage).

The same parameter dict feeds ``submitit.SlurmExecutor.update_parameters`` at submission and
submitit's own sbatch renderer for ``--dry-run``, so the script a dry run writes is the script
that would be submitted (paths and the dependency aside, which exist only at submission).
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

from ..config import to_dict
from ..experiment import SLURM_DEFAULTS, Plan, time_to_minutes

SUBMIT_DIR = ".submit"
"""Under the experiment root: manifest.jsonl, ledger.jsonl, sbatch/, logs/ (submitit's folder)."""


def stage_slurm(plan: Plan, stage: str) -> dict[str, Any]:
    """Defaults <- experiment [slurm] <- [stages.X.slurm], key by key (the sbatch dict merges too)."""
    merged: dict[str, Any] = dict(SLURM_DEFAULTS)
    for layer in (plan.experiment.slurm, plan.experiment.stages[stage].slurm):
        for key, value in to_dict(layer).items():
            if value is None:
                continue
            if key in ("sbatch", "env") and key in merged:
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    return merged


def ranks_per_node(slurm: dict[str, Any]) -> int:
    return slurm.get("ntasks_per_node") or max(1, slurm.get("gpus_per_node") or 0)


def python_command(slurm: dict[str, Any], plan: Plan) -> str:
    """The interpreter each rank runs: this venv's python, or python inside the container."""
    container = slurm.get("container")
    if not container:
        return shlex.quote(sys.executable)
    words = [container["runtime"], "exec"]
    if container["nv"]:
        words.append("--nv")
    for bind in [str(plan.root.parent), *container["binds"]]:
        words += ["--bind", bind]
    words += [*container["exec_args"], container["image"], "python"]
    # Plain path-like words stay unquoted so $HOME / $SCRATCH in binds expand on the compute node.
    return " ".join(w if re.fullmatch(r"[\w$/.:{}~@%+=,-]+", w) else shlex.quote(w) for w in words)


def sbatch_parameters(plan: Plan, stage: str, cwd: Path, dependency: Optional[str] = None) -> dict[str, Any]:
    """Keyword arguments of ``SlurmExecutor.update_parameters`` for the stage's array."""
    slurm = stage_slurm(plan, stage)
    params: dict[str, Any] = {
        "job_name": f"{plan.experiment.experiment.name}.{stage}",
        "time": time_to_minutes(slurm["time"]),
        "nodes": slurm["nodes"],
        "ntasks_per_node": ranks_per_node(slurm),
        "signal_delay_s": slurm["signal_lead_s"],
        "array_parallelism": slurm["array_parallelism"],
    }
    for key in ("partition", "account", "qos", "constraint", "exclude", "cpus_per_task", "mem"):
        if slurm.get(key) is not None:
            params[key] = slurm[key]
    if slurm.get("gpus_per_node"):
        params["gpus_per_node"] = slurm["gpus_per_node"]
    setup = [f"export {name}={shlex.quote(value)}" for name, value in sorted((slurm.get("env") or {}).items())]
    setup += list(slurm.get("setup") or [])
    if setup:
        params["setup"] = setup
    # --requeue lets our preemption handler put the task back in the queue; --chdir makes relative
    # paths in configs mean the same on the compute node as at submission.
    extra: dict[str, Any] = {"requeue": True, "chdir": str(cwd)}
    extra.update({k: (True if v == "" else v) for k, v in (slurm.get("sbatch") or {}).items()})
    params["additional_parameters"] = extra
    if dependency:
        params["dependency"] = dependency
    return params


def logs_folder(plan: Plan) -> Path:
    return plan.root / SUBMIT_DIR / "logs" / "%j"


def render_sbatch(plan: Plan, stage: str, n_tasks: int, cwd: Path, dependency: Optional[str] = None) -> str:
    """The array script submitit writes for ``n_tasks`` runs of the stage."""
    from submitit.slurm.slurm import _make_sbatch_string

    slurm = stage_slurm(plan, stage)
    command = f"{python_command(slurm, plan)} -u -m submitit.core._submit {shlex.quote(str(logs_folder(plan)))}"
    params = sbatch_parameters(plan, stage, cwd, dependency)
    return _make_sbatch_string(command=command, folder=logs_folder(plan), map_count=n_tasks, **params)
