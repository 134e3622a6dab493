"""Slurm settings of a stage -> the sbatch script submitit submits (one array per stage).

Every ``[slurm]`` key declares where it goes (``to=`` in ``experiment.schema.SlurmConfig``); this
module dispatches on that, so no key is listed twice and none can be dropped. The same parameter
dict feeds ``submitit.SlurmExecutor.update_parameters`` at submission and submitit's own sbatch
renderer for ``--dry-run``, so the script a dry run writes is the script that would be submitted
(paths and the dependency aside, which exist only at submission).
"""

from __future__ import annotations

import re
import shlex
import sys
from typing import Any, Callable, Optional

from ..config import to_dict
from ..experiment import SLURM_DEFAULTS, Plan, SlurmConfig, time_to_minutes
from .layout import logs_folder
from .requeue import caps_of

ROUTES: dict[str, str] = {name: field.json_schema_extra["to"] for name, field in SlurmConfig.__pydantic_fields__.items()}
"""[slurm] key -> where it goes (declared on the key)."""

# Values submitit takes in another form; None leaves the option out.
_SUBMITIT_FORM: dict[str, Callable[[Any], Any]] = {
    "time": time_to_minutes,
    "gpus_per_node": lambda gpus: gpus or None,  # no --gpus-per-node=0
}


def stage_slurm(plan: Plan, stage: str) -> dict[str, Any]:
    """Defaults <- experiment [slurm] <- [stages.X.slurm], key by key (the sbatch and env tables
    merge too); ``ntasks_per_node`` defaults to the GPUs per node (at least 1)."""
    merged: dict[str, Any] = dict(SLURM_DEFAULTS)
    for layer in (plan.experiment.slurm, plan.experiment.stages[stage].slurm):
        for key, value in to_dict(layer).items():
            if value is None:
                continue
            if ROUTES[key] in ("sbatch", "env") and key in merged:
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    merged.setdefault("ntasks_per_node", max(1, merged.get("gpus_per_node") or 0))
    return merged


def task_settings(slurm: dict[str, Any]) -> dict[str, Any]:
    """The ``to = "task"`` keys (read by the array task, not by sbatch), requeue caps per cause;
    cpus_per_task sizes threads, signal_lead_s tells a time limit from a preemption."""
    settings = {key: slurm.get(key) for key, to in ROUTES.items() if to == "task"}
    return {**settings, "max_requeues": caps_of(settings["max_requeues"]), "cpus_per_task": slurm.get("cpus_per_task"),
            "signal_lead_s": slurm.get("signal_lead_s")}


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


def array_name(plan: Plan, stage: str, role: str = "train") -> str:
    """``<experiment>.<stage>``, and ``<experiment>.<stage>.ref`` for the stage's reference passes."""
    return f"{plan.experiment.experiment.name}.{stage}" + (".ref" if role == "reference" else "")


def sbatch_parameters(plan: Plan, stage: str, dependency: Optional[str] = None,
                      role: str = "train") -> dict[str, Any]:
    """Keyword arguments of ``SlurmExecutor.update_parameters`` for one array of the stage (its
    runs, or its reference passes: same resources, since a pass loads the same reference)."""
    slurm = stage_slurm(plan, stage)
    params: dict[str, Any] = {"job_name": array_name(plan, stage, role)}
    # --requeue lets our preemption handler put the task back in the queue; --chdir makes relative
    # paths in stage configs mean paths from the experiment file's folder, as everywhere else.
    extra: dict[str, Any] = {"requeue": True, "chdir": str(plan.base)}
    env_lines: list[str] = []
    setup_lines: list[str] = []
    for key, to in ROUTES.items():
        value = slurm.get(key)
        if value is None:
            continue
        kind, _, name = to.partition(":")
        if kind == "submitit":
            value = _SUBMITIT_FORM.get(key, lambda v: v)(value)
            if value is not None:
                params[name or key] = value
        elif kind == "env":
            env_lines += [f"export {var}={shlex.quote(text)}" for var, text in sorted(value.items())]
        elif kind == "setup":
            setup_lines += list(value)
        elif kind == "sbatch":
            extra.update({k: (True if v == "" else v) for k, v in value.items()})
        elif kind not in ("python", "task"):  # python: python_command(); task: task_settings()
            raise ValueError(f"[slurm] {key}: unknown destination {to!r}")
    if env_lines or setup_lines:
        params["setup"] = env_lines + setup_lines
    params["additional_parameters"] = extra
    if dependency:
        params["dependency"] = dependency
    return params


def render_sbatch(plan: Plan, stage: str, n_tasks: int, dependency: Optional[str] = None,
                  role: str = "train") -> str:
    """The array script submitit writes for ``n_tasks`` runs (or reference passes) of the stage."""
    from submitit.slurm.slurm import _make_sbatch_string

    slurm = stage_slurm(plan, stage)
    command = f"{python_command(slurm, plan)} -u -m submitit.core._submit {shlex.quote(str(logs_folder(plan)))}"
    params = sbatch_parameters(plan, stage, dependency, role)
    return _make_sbatch_string(command=command, folder=logs_folder(plan), map_count=n_tasks, **params)
