"""What the running Slurm job knows about itself: its id (array task ids as ``<array>_<task>``,
the form squeue, sacct and scontrol take) and when its time limit ends."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Optional


def job_id() -> Optional[str]:
    env = os.environ
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def parse_end_time(text: str) -> Optional[float]:
    """squeue's ``%e`` (``2026-12-05T23:07:31``, local time) as epoch seconds; None for no limit."""
    text = text.strip()
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:  # "N/A", "NONE", "Unknown": no time limit, or Slurm does not say
        return None


def job_end_time() -> Optional[float]:
    """When this job's time limit ends (epoch seconds), or None when unknown or unlimited.
    ``SLURM_JOB_END_TIME`` where Slurm sets it, else squeue (the limit can change while queued)."""
    if os.environ.get("SLURM_JOB_END_TIME", "").isdigit():
        return float(os.environ["SLURM_JOB_END_TIME"])
    job = os.environ.get("SLURM_JOB_ID")
    if job is None or shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%e"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_end_time(out.stdout.splitlines()[0]) if out.returncode == 0 and out.stdout.strip() else None
