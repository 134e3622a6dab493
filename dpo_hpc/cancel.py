"""Stop an experiment's runs on Slurm: ``python -m dpo_hpc.cancel experiments/x.toml [--only STAGE]``.

Each pending, running or requeued run of the experiment (or of the stages and runs named) gets
``scancel`` on its own array task: a running run checkpoints at its next step boundary and stops
(state ``stopped``; submitting again resumes it from there), a queued one leaves the queue
(``cancelled``). Only the Slurm jobs this experiment's submissions recorded are touched, never
another job of the user's. Runs of the local executor are stopped with Ctrl-C in their submit.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Optional, Sequence

from .launch.guard import guarded
from .launch.jobs import ACTIVE_STATES, plan_status
from .launch.plans import add_selection, open_plan, plan_parser, selection
from .launch.submission import ledger_of, select_runs
from .runtime.failures import RunFailure


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = plan_parser("python -m dpo_hpc.cancel", __doc__)
    add_selection(parser, "cancel")
    parser.add_argument("--dry-run", action="store_true", help="list the runs that would be cancelled; cancel nothing")
    args = parser.parse_args(argv)
    plan, _ = open_plan(args.experiment, args.set or None)
    chosen = select_runs(plan, *selection(args))
    latest = ledger_of(plan).latest()
    statuses = plan_status(plan, latest)
    active = [run for run in chosen if statuses[run.run_id].state in ACTIVE_STATES]
    local = [run for run in active if latest[run.run_id].get("backend") != "slurm"]
    jobs = {run.run_id: statuses[run.run_id].job_id for run in active if run not in local}
    for run in local:
        print(f"[cancel] {run.run_id}: runs through the local executor (submit pid "
              f"{latest[run.run_id].get('submitter_pid')}); stop that command with Ctrl-C")
    for run_id, job in jobs.items():
        print(f"[cancel] {run_id}: Slurm job {job} ({statuses[run_id].state})"
              + (" would be cancelled" if args.dry_run else ""))
    if not jobs:
        print(f"[cancel] nothing to cancel: none of the {len(chosen)} run(s) is pending, running or requeued on Slurm")
        return 0
    if args.dry_run:
        return 0
    done = subprocess.run(["scancel", *jobs.values()], capture_output=True, text=True)
    if done.returncode:
        raise RunFailure(f"scancel {' '.join(jobs.values())} failed: {done.stderr.strip() or done.stdout.strip()}")
    print(f"[cancel] {len(jobs)} run(s) cancelled: running ones checkpoint and stop (submit again to resume "
          f"them), queued ones leave the queue; follow with: python -m dpo_hpc.status {args.experiment}")
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
