"""Submitting a plan: what to submit (the decision per run), the files a submission writes, one
Slurm array per stage chained with job dependencies, and waiting for the runs to settle.

Submitting again is safe: finished runs are skipped, queued or running ones are not duplicated,
failed or stopped ones are submitted again (and resume from their checkpoints).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence

from ..config import ConfigError
from ..experiment import Plan, Run
from ..fsutil import atomic_write_bytes
from .jobs import ACTIVE_STATES, RESUBMITTABLE, RunStatus, plan_status
from .layout import ledger_path, logs_folder, submit_dir
from .ledger import Ledger
from .sbatch import python_command, render_sbatch, sbatch_parameters, stage_slurm, task_settings
from .table import state_counts, table


def ledger_of(plan: Plan) -> Ledger:
    return Ledger(ledger_path(plan))


def task_row(plan: Plan, run: Run) -> dict:
    """What the array task receives (and one line of manifest.jsonl)."""
    return {**run.manifest_row(), **task_settings(stage_slurm(plan, run.stage))}


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
              f"{slurm['nodes']} node(s) x {slurm['ntasks_per_node']} rank(s)")
        for run in runs:
            state = statuses[run.run_id].state if statuses else "-"
            parent = f" <- {run.parent}" if run.parent else ""
            print(f"    {run.run_id:<28} {state:<13} {decisions.get(run.run_id, ''):<14} {_grid_text(run)}{parent}")


def prepare_assets(plan: Plan) -> None:
    """Offline assets of [prepare], made on the submit host if missing (they are inputs of stage configs)."""
    prep = plan.experiment.prepare
    if prep.tiny_model and not (Path(prep.tiny_model.dir) / "config.json").exists():
        from ..tiny_model import make_tiny_model

        print(f"[submit] making the tiny model in {prep.tiny_model.dir}")
        make_tiny_model(prep.tiny_model.dir, seed=prep.tiny_model.seed)
    data = prep.reversal_data
    if data and not (Path(data.dir) / "train.jsonl").exists():
        from ..data.verifiable import TaskSpec, write_dataset

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

    from .task import run_task

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


def wait_for(plan: Plan, run_ids: set[str], poll_s: float = 5.0) -> int:
    """Poll until the given runs settle; print the status table; 0 if all are done."""
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


