"""Where each run of a plan stands: its run directory (manifest, progress, checkpoints), the
ledger of submissions, and Slurm's view of the job (squeue for live jobs, sacct for ended ones)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any, Optional

from ..checkpoint import RunDir, published_checkpoints
from ..checkpoint.run_dir import other_run
from ..experiment import Plan, Run
from .layout import job_log
from .requeue import read_requeues

LIVE = {"PENDING": "pending", "CONFIGURING": "running", "RUNNING": "running", "COMPLETING": "running",
        "SUSPENDED": "running", "STAGE_OUT": "running", "SIGNALING": "running", "RESIZING": "running",
        "REQUEUED": "requeued", "REQUEUE_HOLD": "requeued", "REQUEUE_FED": "requeued"}
FAILED = {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
ACTIVE_STATES = {"pending", "running", "requeued"}
"""States in which Slurm will still do something for the run; every other state waits for the user."""
RESUBMITTABLE = {"not submitted", "failed", "cancelled", "stopped", "interrupted", "unknown"}


@dataclass
class RunStatus:
    state: str
    """done, pending, running, requeued, stopped (checkpointed, not requeued), failed, cancelled,
    interrupted (a local job that ended without finishing), unknown, not submitted."""
    job_id: Optional[str] = None
    detail: str = ""
    step: Optional[int] = None
    total_steps: Optional[int] = None
    checkpoint: Optional[str] = None
    eval: dict[str, float] = field(default_factory=dict)
    requeues: int = 0


def expand_array_ids(job_id: str) -> list[str]:
    """'12_[0-2,5%4]' -> ['12_0', '12_1', '12_2', '12_5'] (how squeue/sacct show pending array tasks)."""
    match = re.match(r"^(\d+)_\[([^\]]+)\]$", job_id)
    if not match:
        return [job_id]
    base, spec = match.groups()
    ids = []
    for part in spec.split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        ids += [f"{base}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return ids


def query_slurm(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """job id -> (Slurm state, reason) for the given ids; empty where Slurm has no CLI here."""
    if not job_ids or shutil.which("squeue") is None:
        return {}
    wanted = set(job_ids)
    found: dict[str, tuple[str, str]] = {}
    live = subprocess.run(["squeue", "-h", "-r", "--me", "-o", "%i|%T|%r"], capture_output=True, text=True, timeout=60)
    for line in live.stdout.splitlines():
        parts = line.split("|")
        if len(parts) == 3:
            for jid in expand_array_ids(parts[0]):
                if jid in wanted:
                    found[jid] = (parts[1], parts[2])
    rest = sorted(wanted - set(found))
    if rest and shutil.which("sacct"):
        # By array id: sacct shows tasks cancelled while pending only as one collapsed '5_[0-1%2]' row.
        bases = sorted({jid.split("_")[0] for jid in rest})
        ended = subprocess.run(["sacct", "-n", "-P", "-X", "-o", "JobID,State,ExitCode", "-j", ",".join(bases)],
                               capture_output=True, text=True, timeout=60)
        for line in ended.stdout.splitlines():
            parts = line.split("|")
            if len(parts) == 3:
                for jid in expand_array_ids(parts[0]):
                    if jid in wanted and jid not in found:
                        found[jid] = (parts[1].split()[0], f"exit {parts[2]}")
    return found


_ERROR_LINE = re.compile(r"^(?:\[rank\d+\]: )?([A-Za-z_][\w.]*(?:Error|Exception|Exit)\b.*)$")


def error_line(text: str) -> str:
    """The last 'SomeError: message' line of a traceback or log ('' if none)."""
    found = ""
    for line in text.splitlines():
        match = _ERROR_LINE.match(line.strip())
        if match:
            found = match.group(1)
    return found


def log_error(plan: Plan, job_id: str) -> str:
    """The error that ended a job, from rank 0's stderr in submitit's log folder."""
    try:
        return error_line(job_log(plan, job_id).read_text(errors="replace")[-200_000:])
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_status(plan: Plan, run: Run, entry: Optional[dict[str, Any]], slurm: dict[str, tuple[str, str]]) -> RunStatus:
    """The run's state, with the reason its run directory recorded for stopping or failing."""
    manifest = RunDir(run.run_dir).read_manifest() or {}
    other = other_run(manifest, run.run_id)
    if other:
        manifest = {}  # another scoring's record: this one is as its ledger entry says
    status = _state_of(plan, run, manifest, entry, slurm)
    if other and status.state == "not submitted":
        status.detail = f"scored under other settings ({other}): submitting scores it again"
    reason = manifest.get("reason")
    if reason and status.state != "done" and reason not in status.detail:
        status.detail = f"{status.detail}; {reason}" if status.detail else reason
    return status


def _state_of(plan: Plan, run: Run, manifest: dict[str, Any], entry: Optional[dict[str, Any]],
              slurm: dict[str, tuple[str, str]]) -> RunStatus:
    run_dir = RunDir(run.run_dir)
    progress = run_dir.read_progress() or {}
    checkpoints = published_checkpoints(run_dir.checkpoints)
    status = RunStatus(state="not submitted", job_id=entry.get("job_id") if entry else None,
                       step=progress.get("step"), total_steps=progress.get("total_steps"),
                       checkpoint=checkpoints[0].name if checkpoints else None,
                       eval=progress.get("eval") or {},
                       requeues=len(read_requeues(run.run_dir, entry.get("job_id"))) if entry else 0)
    recorded = manifest.get("status")
    if recorded == "completed":  # the manifest holds the final eval; progress.json the last logged one
        status.state = "done"
        status.step = status.total_steps = manifest.get("final_step", status.step)
        status.eval = manifest.get("final_eval") or status.eval
        return status
    if entry is None:
        if recorded:
            status.state, status.detail = "interrupted", f"run dir says '{recorded}' but no submission is recorded"
        return status
    if entry.get("backend") == "local":
        pid = entry.get("submitter_pid")
        if entry.get("result") in ("failed", "cancelled"):
            status.state, status.detail = entry["result"], entry.get("detail", "")
        elif pid and _pid_alive(pid) and recorded in (None, "running"):
            status.state = "running"
        elif recorded == "preempted":
            status.state, status.detail = "stopped", "stop signal: checkpointed; resubmit to resume"
        else:
            status.state = "interrupted"
        return status
    state, reason = slurm.get(entry["job_id"], ("", ""))
    if state in LIVE:
        status.state = LIVE[state]
        if state == "PENDING" and reason in ("DependencyNeverSatisfied",):
            status.detail = "a parent run failed; this run will not start"
        elif reason and reason != "None":
            status.detail = reason
    elif recorded == "preempted" and state in FAILED | {"COMPLETED"}:
        why = manifest.get("not_requeued") or "not requeued"
        status.state, status.detail = "stopped", f"stopped: {why}; checkpoint kept, resubmit to resume"
    elif recorded == "interrupted" and state in FAILED | {"COMPLETED", "CANCELLED"}:
        status.state = "stopped"
        status.detail = f"stopped by {manifest.get('reason', 'a signal')} (scancel?); checkpoint kept, resubmit to resume"
    elif state == "COMPLETED":
        status.state, status.detail = "failed", "the task ended without finishing the run"
    elif state in FAILED:
        cause = log_error(plan, entry["job_id"])
        status.state, status.detail = "failed", f"Slurm {state} ({reason})" + (f": {cause}" if cause else "")
        if manifest.get("not_requeued"):
            status.detail += f"; not requeued: {manifest['not_requeued']}"
    elif state == "CANCELLED":
        status.state, status.detail = "cancelled", "cancelled (a parent run failed, or scancel)"
    else:
        status.state, status.detail = "unknown", "Slurm no longer knows the job"
    return status


def plan_status(plan: Plan, ledger_latest: dict[str, dict[str, Any]]) -> dict[str, RunStatus]:
    job_ids = [e["job_id"] for e in ledger_latest.values() if e.get("backend") == "slurm"]
    slurm = query_slurm(job_ids)
    return {run.run_id: run_status(plan, run, ledger_latest.get(run.run_id), slurm) for run in plan.runs}
