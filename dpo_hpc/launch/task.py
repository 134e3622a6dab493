"""What one Slurm array task (or one local job) runs: train one run of the plan, on every rank
(or compute a stage's reference log-probs, for a reference pass).

On a stop signal the loop checkpoints on all ranks and returns ``preempted``; rank 0 then asks
Slurm to requeue this array task, unless the run has been requeued ``max_requeues`` times or made
no progress since its last requeue (a crash loop would otherwise requeue forever). The requeued
task starts the same pickled call again and the loop resumes from the checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REQUEUES = "requeues.jsonl"


def _rendezvous_from_slurm() -> None:
    """MASTER_ADDR = first host of the allocation; the loop derives MASTER_PORT from the job id."""
    if "SLURM_JOB_NODELIST" in os.environ and "MASTER_ADDR" not in os.environ:
        import submitit

        hosts = submitit.JobEnvironment().hostnames
        if len(hosts) > 1:
            os.environ["MASTER_ADDR"] = hosts[0]


def slurm_job_id() -> str | None:
    env = os.environ
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def read_requeues(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / REQUEUES
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def requeue_decision(history: list[dict[str, Any]], step: int, max_requeues: int) -> str:
    """'' to requeue, else why not."""
    if len(history) >= max_requeues:
        return f"already requeued {len(history)} times (max_requeues = {max_requeues})"
    if history and history[-1]["step"] >= step:
        return f"no progress since the last requeue (still at step {step})"
    return ""


def requeue(run_dir: Path, step: int, max_requeues: int) -> str:
    """Rank 0: requeue this Slurm task; returns '' on success or why it was not requeued."""
    job_id = slurm_job_id()
    if job_id is None:
        return "not running under Slurm (resubmit to resume)"
    history = read_requeues(run_dir)
    reason = requeue_decision(history, step, max_requeues)
    if not reason:
        with open(run_dir / REQUEUES, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "job_id": job_id, "step": step,
                                "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0))}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            reason = f"scontrol requeue {job_id} failed: {result.stderr.strip()}"
    return reason


def train_and_requeue(cfg, trainer: str, max_requeues: int, label: str) -> dict[str, Any]:
    """Train on every rank with the stop signal bound; after a stop, rank 0 requeues the Slurm
    task and every rank exits (status 0 if requeued, 3 if not: the checkpoint is kept either way)."""
    from ..runtime import init_distributed, shutdown
    from ..runtime.stop import StopSignal
    from ..trainers.trainer import train

    stop = StopSignal().install()
    try:
        summary = train(cfg, trainer, stop=stop)
    finally:
        stop.restore()
    dist_env = init_distributed()
    if summary.get("status") == "interrupted":  # Ctrl-C or scancel: the checkpoint stays, nothing is requeued
        shutdown()
        if dist_env.is_main:
            print(f"[dpo-hpc] {label}: stopped by {summary['signal']} at step {summary['step']}; checkpoint kept, "
                  "run again to resume", flush=True)
        sys.exit(128 + getattr(signal, summary["signal"]).value)
    if summary.get("status") == "preempted":
        reason = requeue(Path(cfg.training.save_dir), summary["step"], max_requeues) if dist_env.is_main else ""
        shutdown()
        if dist_env.is_main:
            print(f"[dpo-hpc] {label}: stopped at step {summary['step']}; "
                  + (f"not requeued: {reason}" if reason else "requeued"), flush=True)
        # No return value: submitit must not record the task as finished; a requeued task reruns this call.
        sys.exit(0 if not reason else 3)
    shutdown()
    return summary


def run_task(row: dict[str, Any]) -> dict[str, Any]:
    """Train ``row`` (a line of the plan's manifest.jsonl) on this rank; every rank calls it."""
    from ..config import validate_mapping

    # Ranks come from srun (SLURM_PROCID/SLURM_NTASKS) or are a lone local process; torch-style
    # variables seen here were inherited from the shell that submitted (sbatch exports it all)
    # and would make every rank believe it is rank 0 of 1.
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
    if row.get("workdir"):  # relative paths in the config are relative to the experiment file's folder
        os.chdir(row["workdir"])
    _rendezvous_from_slurm()
    # Slurm without cgroups (and the local executor) does not stop torch from using every core;
    # keep each rank to the CPUs it asked for.
    threads = os.environ.get("SLURM_CPUS_PER_TASK") or row.get("cpus_per_task")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    cfg = validate_mapping(row["config"], row["trainer"], source=f"run {row['run_id']}")
    if row.get("role") == "reference":
        return {"run_id": row["run_id"], **reference_pass(cfg, row["trainer"])}
    return {"run_id": row["run_id"], **train_and_requeue(cfg, row["trainer"], row["max_requeues"], row["run_id"])}


def reference_pass(cfg, trainer: str) -> dict[str, Any]:
    """The reference log-probs of a stage's runs, into their shared cache (no training, no
    checkpoint: a pass that is stopped runs again from the start when resubmitted)."""
    from ..runtime import shutdown
    from ..trainers.trainer import reference_pass as compute

    summary = compute(cfg, trainer)
    shutdown()
    return summary
