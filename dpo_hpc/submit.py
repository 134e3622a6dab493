"""Submit an experiment: ``python -m dpo_hpc.submit experiments/x.toml``.

The file is expanded into runs (stages x grid); each stage becomes ONE Slurm array submitted
through submitit, with ``--dependency=afterok:<parent tasks>`` so a run starts only after the run
it starts from succeeded. Without ``sbatch`` on PATH (or with ``--local``) the same runs go through
submitit's local executor, stage after stage. Submitting again is safe: finished runs are skipped,
queued or running ones are not duplicated, failed or stopped ones are submitted again.

    python -m dpo_hpc.submit experiments/tiny.toml --dry-run      # plan, sbatch scripts, manifest.jsonl
    python -m dpo_hpc.submit experiments/tiny.toml                # submit (or run locally)
    python -m dpo_hpc.submit experiments/tiny.toml --only sft --runs sft-1a2b3c4d5e
    python -m dpo_hpc.status experiments/tiny.toml
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .config import ConfigError
from .experiment import Plan, Run, load_plan
from .fsutil import atomic_write_bytes
from .hpc.ledger import Ledger
from .hpc.slurm import (SUBMIT_DIR, logs_folder, python_command, ranks_per_node, render_sbatch, sbatch_parameters,
                        stage_slurm)
from .hpc.state import ACTIVE_STATES, RESUBMITTABLE, RunStatus, error_line, plan_status


def submit_dir(plan: Plan) -> Path:
    return plan.root / SUBMIT_DIR


def ledger_of(plan: Plan) -> Ledger:
    return Ledger(submit_dir(plan) / "ledger.jsonl")


def task_row(plan: Plan, run: Run) -> dict:
    """What the array task receives (and one line of manifest.jsonl)."""
    slurm = stage_slurm(plan, run.stage)
    return {**run.manifest_row(), "max_requeues": slurm["max_requeues"], "cpus_per_task": slurm.get("cpus_per_task")}


def write_plan_files(plan: Plan, cwd: Path, out: Optional[Path] = None) -> Path:
    """manifest.jsonl (every run, sorted keys, byte-stable) and sbatch/<stage>.sh (the full array)."""
    out = out or submit_dir(plan)
    lines = "".join(json.dumps(task_row(plan, run), sort_keys=True) + "\n" for run in plan.runs)
    atomic_write_bytes(out / "manifest.jsonl", lines.encode())
    for stage in plan.stage_order:
        runs = plan.stage_runs(stage)
        parent = plan.experiment.stages[stage].from_
        dependency = f"afterok:<job ids of the {parent} tasks>" if parent else None
        atomic_write_bytes(out / "sbatch" / f"{stage}.sh",
                           render_sbatch(plan, stage, len(runs), cwd, dependency).encode())
    return out


def _grid_text(run: Run) -> str:
    return " ".join(f"{k}={v}" for k, v in run.grid_values.items())


def print_plan(plan: Plan, statuses: Optional[dict[str, RunStatus]], decisions: dict[str, str]) -> None:
    exp = plan.experiment
    print(f"experiment {exp.experiment.name}: {len(plan.runs)} runs in {len(plan.stage_order)} stages -> {plan.root}")
    for stage in plan.stage_order:
        cfg = exp.stages[stage]
        slurm = stage_slurm(plan, stage)
        runs = plan.stage_runs(stage)
        origin = f", from {cfg.from_} ({cfg.pairing})" if cfg.from_ else ""
        print(f"  stage {stage} [{cfg.trainer}{origin}]: {len(runs)} run(s), one array; time {slurm['time']}, "
              f"{slurm['nodes']} node(s) x {ranks_per_node(slurm)} rank(s)")
        for run in runs:
            state = statuses[run.run_id].state if statuses else "-"
            parent = f" <- {run.parent}" if run.parent else ""
            print(f"    {run.run_id:<28} {state:<13} {decisions.get(run.run_id, ''):<14} {_grid_text(run)}{parent}")


def prepare_assets(plan: Plan) -> None:
    """Offline assets of [prepare], made on the submit host if missing (they are inputs of stage configs)."""
    prep = plan.experiment.prepare
    if prep.tiny_model and not (Path(prep.tiny_model.dir) / "config.json").exists():
        from .tiny_model import make_tiny_model

        print(f"[submit] making the tiny model in {prep.tiny_model.dir}")
        make_tiny_model(prep.tiny_model.dir, seed=prep.tiny_model.seed)
    data = prep.reversal_data
    if data and not (Path(data.dir) / "train.jsonl").exists():
        from .data.verifiable import TaskSpec, write_dataset

        print(f"[submit] writing the reversal preference data in {data.dir}")
        write_dataset(data.dir, n_train=data.n_train, n_test=data.n_test, seed=data.seed,
                      label_noise=data.label_noise, spec=TaskSpec(multi_turn_ratio=data.multi_turn_ratio))


def select_runs(plan: Plan, only: Sequence[str], run_ids: Sequence[str]) -> list[Run]:
    for stage in only:
        if stage not in plan.experiment.stages:
            raise ConfigError([f"--only: unknown stage '{stage}'; stages are {', '.join(plan.stage_order)}"])
    known = {r.run_id for r in plan.runs}
    for run_id in run_ids:
        if run_id not in known:
            raise ConfigError([f"--runs: unknown run id '{run_id}' (python -m dpo_hpc.submit FILE --dry-run lists them)"])
    return [r for r in plan.runs if (not only or r.stage in only) and (not run_ids or r.run_id in run_ids)]


def decide(plan: Plan, selected: list[Run], statuses: dict[str, RunStatus]) -> dict[str, str]:
    """run id -> 'submit', 'skip: done', 'skip: queued' ... for every selected run, parents first."""
    decisions: dict[str, str] = {}
    for run in selected:
        state = statuses[run.run_id].state
        if state == "done":
            decisions[run.run_id] = "skip: done"
        elif state in ACTIVE_STATES:
            decisions[run.run_id] = f"skip: {state}"
        elif state in RESUBMITTABLE:
            decisions[run.run_id] = "submit"
    for run in selected:  # a parent that will not be done or queued blocks its children
        if decisions.get(run.run_id) != "submit" or run.parent is None:
            continue
        parent_state = statuses[run.parent].state
        if parent_state != "done" and parent_state not in ACTIVE_STATES and decisions.get(run.parent) != "submit":
            decisions[run.run_id] = f"blocked: parent {run.parent} is {parent_state}"
    return decisions


def _dependency(plan: Plan, stage: str, stage_runs: list[Run], job_of: dict[str, str],
                submitted: dict[str, str]) -> Optional[str]:
    """afterok on the parents still queued or running; aftercorr when the stage zips 1:1 onto a
    parent array submitted just now (task i then waits for parent task i only)."""
    parents = [r.parent for r in stage_runs if r.parent and r.parent in job_of]
    if not parents:
        return None
    jobs = [job_of[p] for p in parents]
    arrays = {j.split("_")[0] for j in jobs}
    zipped = plan.experiment.stages[stage].pairing == "zip" and len(stage_runs) == len(plan.stage_runs(stage))
    if zipped and len(arrays) == 1 and all(p in submitted for p in parents) \
            and all(j.endswith(f"_{r.index}") for j, r in zip(jobs, stage_runs)) and len(parents) == len(stage_runs):
        return f"aftercorr:{arrays.pop()}"
    return "afterok:" + ":".join(sorted(set(jobs)))


def submit_slurm(plan: Plan, runs: list[Run], statuses: dict[str, RunStatus], cwd: Path) -> dict[str, str]:
    """One array per stage, in dependency order; returns run id -> Slurm job id."""
    import submitit

    from .hpc.task import run_task

    job_of = {rid: s.job_id for rid, s in statuses.items() if s.state in ACTIVE_STATES and s.job_id}
    submitted: dict[str, str] = {}
    ledger = ledger_of(plan)
    for stage in plan.stage_order:
        stage_runs = [r for r in runs if r.stage == stage]
        if not stage_runs:
            continue
        dependency = _dependency(plan, stage, stage_runs, job_of, submitted)
        slurm = stage_slurm(plan, stage)
        executor = submitit.SlurmExecutor(folder=logs_folder(plan), max_num_timeout=slurm["max_requeues"],
                                          python=python_command(slurm, plan))
        params = sbatch_parameters(plan, stage, cwd, dependency)
        if dependency:  # a failed parent cancels its children instead of leaving them pending forever
            params["additional_parameters"]["kill-on-invalid-dep"] = "yes"
        executor.update_parameters(**params)
        jobs = executor.map_array(run_task, [task_row(plan, r) for r in stage_runs])
        entries = []
        for run, job in zip(stage_runs, jobs):
            job_of[run.run_id] = submitted[run.run_id] = job.job_id
            entries.append({"run_id": run.run_id, "stage": stage, "job_id": job.job_id, "backend": "slurm"})
        ledger.record(entries)
        array_id = jobs[0].job_id.split("_")[0]
        print(f"[submit] stage {stage}: {len(jobs)} run(s) as Slurm job {array_id}"
              + (f" ({dependency})" if dependency else ""))
    return submitted


def run_local(plan: Plan, runs: list[Run], statuses: dict[str, RunStatus], poll_s: float = 1.0) -> dict[str, str]:
    """Through submitit's LocalExecutor: a run starts once its parent is done, as many at once as
    the CPUs allow at each stage's cpus_per_task (torch threads are capped to it). Returns run id
    -> 'done', 'stopped', 'failed (...)' or 'not run: ...'."""
    import submitit

    from .hpc.task import run_task

    cpus_total = os.cpu_count() or 1
    outcome: dict[str, str] = {}
    ledger = ledger_of(plan)
    pending, running = list(runs), {}
    executor = submitit.LocalExecutor(folder=logs_folder(plan))
    executor.update_parameters(timeout_min=10 ** 6)  # no time limit locally

    def cpus(run: Run) -> int:
        return min(cpus_total, stage_slurm(plan, run.stage).get("cpus_per_task") or 1)

    def parent_state(run: Run) -> str:
        if run.parent is None:
            return "done"
        if run.parent in outcome:
            return "done" if outcome[run.parent] == "done" else "failed"
        if any(r.run_id == run.parent for r in pending) or run.parent in {r.run_id for r, _ in running.values()}:
            return "waiting"
        return "done" if statuses[run.parent].state == "done" else "failed"

    while pending or running:
        for run in list(pending):
            state = parent_state(run)
            if state == "failed":
                pending.remove(run)
                outcome[run.run_id] = f"not run: parent {run.parent} did not finish"
                print(f"[submit]   {run.run_id}: {outcome[run.run_id]}", flush=True)
                ledger.record([{"run_id": run.run_id, "stage": run.stage, "job_id": None, "backend": "local",
                                "result": "cancelled", "detail": outcome[run.run_id]}])
            elif state == "done" and (not running or sum(cpus(r) for r, _ in running.values()) + cpus(run) <= cpus_total):
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


def wait_for(plan: Plan, run_ids: set[str], poll_s: float = 5.0) -> int:
    """Poll until the given runs settle; print the status table; 0 if all are done."""
    from .status import state_counts, table

    last = ""
    while True:
        statuses = plan_status(plan, ledger_of(plan).latest())
        mine = {rid: statuses[rid].state for rid in run_ids}
        counts = state_counts(mine.values())
        if counts != last:
            print(f"[submit] {time.strftime('%H:%M:%S')} {counts}", flush=True)
            last = counts
        if not ACTIVE_STATES.intersection(mine.values()):
            print(table(plan, statuses))
            return 0 if all(state == "done" for state in mine.values()) else 1
        time.sleep(poll_s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dpo_hpc.submit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="experiment TOML file")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan and write the sbatch scripts and manifest.jsonl; submit nothing")
    parser.add_argument("--out", help="with --dry-run: write the scripts and manifest here instead of <root>/.submit")
    parser.add_argument("--only", action="append", default=[], metavar="STAGE", help="submit only this stage (repeatable)")
    parser.add_argument("--runs", default="", metavar="ID,...", help="submit only these run ids")
    parser.add_argument("--local", action="store_true", help="run through the local executor even if sbatch exists")
    parser.add_argument("--wait", action="store_true",
                        help="with Slurm: wait until no submitted run is pending, running or requeued, then print the status table")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cwd = Path.cwd()
    started = time.perf_counter()
    try:
        plan = load_plan(args.experiment, cwd)
        selected = select_runs(plan, args.only, [r for r in args.runs.split(",") if r])
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 2
    if args.dry_run:
        out = write_plan_files(plan, cwd, Path(args.out) if args.out else None)
        print_plan(plan, None, {r.run_id: "would submit" for r in selected})
        print(f"[submit] dry run: {len(plan.runs)} runs planned in {time.perf_counter() - started:.2f} s; "
              f"sbatch scripts and manifest.jsonl in {out}; nothing submitted")
        return 0
    statuses = plan_status(plan, ledger_of(plan).latest())
    decisions = decide(plan, selected, statuses)
    write_plan_files(plan, cwd)
    print_plan(plan, statuses, decisions)
    to_submit = [r for r in selected if decisions.get(r.run_id) == "submit"]
    if not to_submit:
        print("[submit] nothing to submit")
        return 0
    prepare_assets(plan)
    if shutil.which("sbatch") and not args.local:
        submit_slurm(plan, to_submit, statuses, cwd)
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
    sys.exit(main())
