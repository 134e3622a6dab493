"""The status of a plan: one row per run as a table for people and as typed JSON for programs."""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from ..experiment import Plan, grid_label
from .jobs import RunStatus
from .layout import job_log, logs_folder


def rows(plan: Plan, statuses: dict[str, RunStatus]) -> list[dict]:
    out = []
    for run in plan.runs:
        s = statuses[run.run_id]
        out.append({
            "stage": run.stage, "run_id": run.run_id,
            "grid": "(reference pass)" if run.role == "reference" else
                    grid_label(run.grid_values.items()) or "-",
            "job": s.job_id or "-", "state": s.state + (f" ({s.requeues} requeues)" if s.requeues else ""),
            "step": f"{s.step}/{s.total_steps}" if s.step is not None else "-",
            "checkpoint": s.checkpoint or "-",
            "eval acc": _first(s.eval, ("rewards/accuracies", "accuracy")),  # a trainer's, an evaluation's
            "eval margin": f"{s.eval['pairs']}/{s.eval['prompts']} pairs" if run.role == "generate" and s.eval
                           else _first(s.eval, ("rewards/margins", "loss", "reward"), labelled=("loss", "reward")),
            "detail": s.detail,
        })
    return out


def _first(metrics: dict, names: tuple[str, ...], labelled: tuple[str, ...] = ()) -> str:
    """The first of ``names`` the metrics hold, to 3 decimals (named where it is in ``labelled``)."""
    name = next((n for n in names if n in metrics), None)
    if name is None:
        return "-"
    return f"{name} {metrics[name]:.3f}" if name in labelled else f"{metrics[name]:.3f}"


def json_rows(plan: Plan, statuses: dict[str, RunStatus]) -> list[dict]:
    """Raw values (``status --json``): the grid as a mapping, steps as integers, metrics as numbers,
    the run directory and the log of rank 0 (stderr; stdout beside it)."""
    out = []
    for run in plan.runs:
        s = statuses[run.run_id]
        out.append({"stage": run.stage, "run_id": run.run_id, "role": run.role, "grid": run.grid_values,
                    "job": s.job_id, "state": s.state, "detail": s.detail, "requeues": s.requeues,
                    "step": s.step, "total_steps": s.total_steps, "checkpoint": s.checkpoint, "eval": s.eval,
                    "run_dir": str(run.run_dir), "log": str(job_log(plan, s.job_id)) if s.job_id else None})
    return out


def state_counts(states: Iterable[str]) -> str:
    """'3 done, 1 running' (states in alphabetical order)."""
    return ", ".join(f"{n} {state}" for state, n in sorted(Counter(states).items()))


def table(plan: Plan, statuses: dict[str, RunStatus]) -> str:
    data = rows(plan, statuses)
    columns = ["stage", "run_id", "grid", "job", "state", "step", "checkpoint", "eval acc", "eval margin"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in data)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    for r in data:
        lines.append("  ".join(str(r[c]).ljust(widths[c]) for c in columns))
        if r["detail"]:
            lines.append(" " * (widths["stage"] + 2) + f"-> {r['detail']}")
        status = statuses[r["run_id"]]
        if status.job_id and status.state in ("failed", "stopped", "interrupted"):
            lines.append(" " * (widths["stage"] + 2) + f"-> log: {job_log(plan, status.job_id)}")
    lines.append("")
    lines.append(f"{state_counts(s.state for s in statuses.values())}; TensorBoard: tensorboard --logdir {plan.root}")
    lines.append(f"logs: {logs_folder(plan).parent}/<job>/<job>_<rank>_log.{{out,err}}")
    return "\n".join(lines)
