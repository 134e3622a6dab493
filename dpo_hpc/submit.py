"""Submit an experiment: ``python -m dpo_hpc.submit experiments/x.toml``.

The file is expanded into runs (stages x grid); each stage becomes ONE Slurm array submitted
through submitit, with ``--dependency=afterok:<parent tasks>`` so a run starts only after the run
it starts from succeeded. Without ``sbatch`` on PATH (or with ``--local``) the same runs go through
submitit's local executor, stage after stage. Submitting again is safe: finished runs are skipped,
queued or running ones are not duplicated, failed or stopped ones are submitted again.

    python -m dpo_hpc.submit experiments/tiny.toml --dry-run      # plan, sbatch scripts, manifest.jsonl
    python -m dpo_hpc.submit experiments/tiny.toml                # submit (or run locally)
    python -m dpo_hpc.submit experiments/tiny.toml --only sft --runs sft-1a2b3c4d5e
    python -m dpo_hpc.submit experiments/tiny.toml --set training.max_steps=10   # every stage, shortened
    python -m dpo_hpc.status experiments/tiny.toml
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .experiment import Plan, Run
from .filelock import FileLock
from .launch.jobs import plan_status
from .launch.layout import submit_dir
from .launch.local import run_local
from .launch.guard import error_lines, guarded
from .launch.plans import add_selection, open_plan, record_overrides, selection
from .launch.preflight import check_plan
from .launch.submission import (decide, ledger_of, prepare_assets, print_plan, select_runs, submit_slurm, wait_for,
                                write_plan_files)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dpo_hpc.submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="experiment TOML file")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan and write the sbatch scripts and manifest.jsonl; submit nothing")
    parser.add_argument("--out", help="with --dry-run: write the scripts and manifest here instead of <root>/.submit")
    add_selection(parser, "submit")
    parser.add_argument("--local", action="store_true", help="run through the local executor even if sbatch exists")
    parser.add_argument("--set", "-s", action="append", default=[], metavar="[STAGE.]KEY.PATH=VALUE",
                        help="override a trainer config value of every stage that has it (or of STAGE only), "
                             "e.g. --set training.max_steps=10; status and report reuse the last submission's")
    parser.add_argument("--no-preflight", action="store_true",
                        help="skip the checks of data, models and folders before anything is queued")
    parser.add_argument("--wait", action="store_true",
                        help="with Slurm: wait until no submitted run is pending, running or requeued, then print the status table")
    return parser


def preflight_passed(plan, before_assets: bool = False) -> bool:
    """Print what the pre-flight found; False when a run would fail (nothing is then queued).
    ``before_assets``: only the output root, which [prepare] writes into."""
    started = time.perf_counter()
    found = check_plan(plan, root_only=before_assets)
    if before_assets and not found.problems:
        return True
    for note in found.notes:
        print(f"[preflight] note: {note}")
    if found.problems:
        print("\n".join(error_lines(found.problems)), file=sys.stderr)
        print(f"[preflight] {len(found.problems)} problem(s); nothing submitted (--no-preflight skips the checks)",
              file=sys.stderr)
        return False
    print(f"[preflight] data, models and folders of {len(plan.runs)} run(s) checked in "
          f"{time.perf_counter() - started:.1f} s")
    return True


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    plan, overrides = open_plan(args.experiment, args.set)
    selected = select_runs(plan, *selection(args))
    if args.dry_run:
        statuses = plan_status(plan, ledger_of(plan).latest())  # read only: what a submission would skip
        decisions = {rid: "would submit" if d == "submit" else d for rid, d in decide(plan, selected, statuses).items()}
        print_plan(plan, statuses, decisions, overrides)
        if not args.no_preflight and not preflight_passed(plan):
            return 2
        out = write_plan_files(plan, Path(args.out) if args.out else None)
        print(f"[submit] dry run: {sum(r.role == 'train' for r in plan.runs)} runs planned in {time.perf_counter() - started:.2f} s; "
              f"sbatch scripts and manifest.jsonl in {out}; nothing submitted")
        return 0
    if not args.no_preflight and not preflight_passed(plan, before_assets=True):  # the output root, first
        return 2
    return _submit(plan, selected, overrides, args)


def _submit(plan: Plan, selected: list[Run], overrides: list[str], args: argparse.Namespace) -> int:
    """Decide, make the [prepare] assets, check every run, then launch under the submission lock."""
    statuses = plan_status(plan, ledger_of(plan).latest())
    decisions = decide(plan, selected, statuses)
    print_plan(plan, statuses, decisions, overrides)
    to_submit = [r for r in plan.runs if decisions.get(r.run_id) == "submit"]
    if not to_submit:
        print("[submit] nothing to submit")
        return 0
    prepare_assets(plan)  # runs read them: made before the pre-flight, which checks what the runs read
    if not args.no_preflight and not preflight_passed(plan):  # before anything is queued
        return 2
    lock = FileLock(submit_dir(plan) / "submit.lock")  # one submission of an experiment at a time
    if not lock.try_acquire():
        lock.reclaim_if_stale(print)
        if not lock.try_acquire():
            print(f"error: {args.experiment} is being submitted by {lock.holder()} (with --local it runs its jobs "
                  f"until they end); wait for it, or follow it with `dpo-hpc status {args.experiment}`", file=sys.stderr)
            return 2
    try:
        statuses = plan_status(plan, ledger_of(plan).latest())  # again, under the lock
        to_submit = [r for r in plan.runs if decide(plan, selected, statuses).get(r.run_id) == "submit"]
        return _launch(plan, to_submit, statuses, overrides, args) if to_submit else 0
    finally:
        lock.release()


def _launch(plan: Plan, to_submit: list[Run], statuses: dict, overrides: list[str], args: argparse.Namespace) -> int:
    """Write the plan files and submit to Slurm, or run through the local executor."""
    write_plan_files(plan)
    record_overrides(plan, overrides)
    if shutil.which("sbatch") and not args.local:
        submit_slurm(plan, to_submit, statuses)
        if not args.wait:
            print(f"[submit] follow with: python -m dpo_hpc.status {args.experiment}")
            return 0
        return wait_for(plan, {r.run_id for r in to_submit})
    print("[submit] no sbatch on PATH: running through the local executor" if not args.local else
          "[submit] --local: running through the local executor")
    outcome = run_local(plan, to_submit, statuses)
    failed = [rid for rid, text in outcome.items() if text != "done"]
    print(f"[submit] {len(outcome) - len(failed)} of {len(outcome)} run(s) done"
          + (f"; not done: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(guarded(main))
