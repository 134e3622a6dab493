"""Running a plan without Slurm, through submitit's LocalExecutor: same task, same ledger."""

from __future__ import annotations

import os
import time
from typing import Optional

from ..experiment import Plan, Run
from .jobs import RunStatus, error_line
from .layout import logs_folder
from .sbatch import stage_slurm
from .submission import ledger_of, task_row


def run_local(plan: Plan, runs: list[Run], statuses: dict[str, RunStatus], poll_s: float = 0.5) -> dict[str, str]:
    """Through submitit's LocalExecutor: a run starts once its parent and its reference pass are
    done, as many at once as the CPUs allow at each stage's cpus_per_task (torch threads are capped
    to it). Returns run id -> 'done', 'stopped', 'failed (...)' or 'not run: ...'."""
    import submitit

    from .task import run_task

    cpus_total = os.cpu_count() or 1
    outcome: dict[str, str] = {}
    ledger = ledger_of(plan)
    pending, running = list(runs), {}
    executor = submitit.LocalExecutor(folder=logs_folder(plan))
    executor.update_parameters(timeout_min=10 ** 6)  # no time limit locally

    def cpus(run: Run) -> int:
        return min(cpus_total, stage_slurm(plan, run.stage).get("cpus_per_task") or 1)

    def unfinished(run: Run) -> Optional[str]:
        """None when what the run waits for is done; '' while it is pending or running; else the
        id of one that did not finish."""
        active = {r.run_id for r in pending} | {r.run_id for r, _ in running.values()}
        for waited in run.waits_for:
            if waited in outcome:
                if outcome[waited] != "done":
                    return waited
            elif waited in active:
                return ""
            elif statuses[waited].state != "done":
                return waited
        return None

    while pending or running:
        for run in list(pending):
            blocker = unfinished(run)
            if blocker:
                pending.remove(run)
                what = "parent" if blocker == run.parent else "reference pass"
                outcome[run.run_id] = f"not run: {what} {blocker} did not finish"
                print(f"[submit]   {run.run_id}: {outcome[run.run_id]}", flush=True)
                ledger.record([{"run_id": run.run_id, "stage": run.stage, "job_id": None, "backend": "local",
                                "result": "cancelled", "detail": outcome[run.run_id]}])
            elif blocker is None and (not running or sum(cpus(r) for r, _ in running.values()) + cpus(run) <= cpus_total):
                pending.remove(run)
                job = executor.submit(run_task, task_row(plan, run))
                running[job.job_id] = (run, job)
                ledger.record([{"run_id": run.run_id, "stage": run.stage, "job_id": job.job_id, "backend": "local",
                                "submitter_pid": os.getpid()}])
                print(f"[submit] {run.stage}: {run.run_id} started locally; progress in {job.paths.stdout}", flush=True)
        for job_id, (run, job) in list(running.items()):
            if not job.done():
                continue
            del running[job_id]
            detail = ""
            try:
                summary = job.result()
                outcome[run.run_id] = "done" if summary.get("status") == "completed" else "stopped"
            except Exception as exc:  # the job's own log has the traceback
                detail = f"{error_line(str(exc)) or type(exc).__name__}; log: {job.paths.stderr}"
                outcome[run.run_id] = f"failed ({detail})"
            ledger.record([{"run_id": run.run_id, "stage": run.stage, "job_id": job_id, "backend": "local",
                            "result": outcome[run.run_id].split(" ")[0], "detail": detail}])
            print(f"[submit]   {run.run_id}: {outcome[run.run_id]}", flush=True)
        time.sleep(poll_s)
    return outcome


