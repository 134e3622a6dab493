"""When a Slurm task puts itself back in the queue, and when it stops instead.

A run is requeued after a stop signal (``preemption``, or ``time_limit`` when the signal came
within the signal lead of the job's end) or after an unexpected failure (``failure``: a node or
network fault, not a bad config, bad data or a known failure worded for the user). Each cause
has its own cap (``[slurm] max_requeues``), counted per Slurm job: a resubmission is a new job and
starts from zero. A requeue also needs progress: the step it would resume from must be past the
step of the previous requeue, so a crash loop stops. ``requeues.jsonl`` in the run directory keeps
one line per requeue; a stop that is not requeued records its reason in the run manifest, which
``dpo-hpc status`` shows as ``stopped: <cause> cap N reached``.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ..checkpoint import CheckpointError, RunDir, published_checkpoints
from ..checkpoint.layout import step_of
from ..config import ConfigError
from ..data import DataError
from ..experiment import REQUEUE_CAUSES
from ..runtime.failures import RunFailure
from ..runtime.slurm import job_id

REQUEUES = "requeues.jsonl"
CAUSE_WORDS = {"preemption": "preemption", "time_limit": "time limit", "failure": "failure"}
_NOT_TRANSIENT = (ConfigError, DataError, CheckpointError, RunFailure, MemoryError)


def read_requeues(run_dir: Path, job: Optional[str] = None) -> list[dict[str, Any]]:
    """The requeues recorded in the run directory (of Slurm job ``job`` only, when given)."""
    path = Path(run_dir) / REQUEUES
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a crash mid-append
            continue
        if isinstance(entry, dict) and (job is None or entry.get("job_id") == job):
            entries.append(entry)
    return entries


def signal_cause(end_time: Optional[float], lead_s: float, now: Optional[float] = None) -> str:
    """``time_limit`` when the signal came within the signal lead (plus Slurm's up to one minute of
    signal-timer slack) of the job's end, else ``preemption``."""
    now = time.time() if now is None else now
    return "time_limit" if end_time is not None and end_time - now <= lead_s + 90 else "preemption"


def is_transient(exc: BaseException) -> bool:
    """Worth a requeue: not bad input, not a failure already worded for the user, not a full disk."""
    if isinstance(exc, _NOT_TRANSIENT) or not isinstance(exc, Exception):
        return False
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EACCES):  # the next attempt fails alike
        return False
    return type(exc).__name__ != "OutOfMemoryError"


def requeue_decision(history: list[dict[str, Any]], cause: str, step: int, caps: dict[str, int]) -> str:
    """'' to requeue, else why not (``history``: this job's requeues, oldest first)."""
    done = sum(1 for entry in history if entry.get("cause", "preemption") == cause)
    if done >= caps[cause]:
        return f"{CAUSE_WORDS[cause]} cap {caps[cause]} reached"
    if history and history[-1]["step"] >= step:
        return f"no progress since the last requeue (still at step {step})"
    return ""


def resume_step(run_dir: Path) -> int:
    """The step a new attempt would resume from (the newest published checkpoint's)."""
    found = published_checkpoints(Path(run_dir) / "checkpoints")
    return step_of(found[0]) if found else 0


def requeue(run_dir: Path, cause: str, step: int, caps: dict[str, int],
            announce: Callable[[str], None] = lambda outcome: None) -> str:
    """Rank 0: requeue this Slurm task; returns '' when requeued, else why not (also recorded in
    the run manifest as ``not_requeued``). ``announce`` gets the outcome for the job's log:
    "requeued" just BEFORE ``scontrol requeue``, which ends this job at once (a line printed after
    it is often lost), or "not requeued: <why>"."""
    job = job_id()
    if job is None:
        reason = "not running under Slurm (resubmit to resume)"
        announce(f"not requeued: {reason}")
        return reason
    reason = requeue_decision(read_requeues(run_dir, job), cause, step, caps)
    if not reason:
        with open(Path(run_dir) / REQUEUES, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "job_id": job, "cause": cause,
                                "step": step, "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0))}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        announce("requeued")
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            reason = f"scontrol requeue {job} failed: {result.stderr.strip()}"
    if reason:
        RunDir(run_dir).annotate(not_requeued=reason)
        announce(f"not requeued: {reason}")
    return reason


def caps_of(value: Any) -> dict[str, int]:
    """``max_requeues`` (an int for every cause, or a table by cause) -> cap per cause."""
    if isinstance(value, int):
        return {cause: value for cause in REQUEUE_CAUSES}
    return {**REQUEUE_CAUSES, **{k: v for k, v in (value or {}).items() if v is not None}}
