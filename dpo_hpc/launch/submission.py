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
from ..runtime.failures import RunFailure
from .jobs import ACTIVE_STATES, RESUBMITTABLE, RunStatus, plan_status
from .layout import ledger_path, logs_folder, submit_dir
from .ledger import Ledger
from .sbatch import python_command, render_sbatch, sbatch_parameters, stage_slurm, task_settings
from .requeue import caps_of
from .table import state_counts, table


ROLE_WORDS = {"train": "run(s)", "reference": "reference pass(es)", "evaluate": "scoring(s)",
              "generate": "pair set(s)"}
"""How an array of each run role is counted in what submit prints."""


def ledger_of(plan: Plan) -> Ledger:
    return Ledger(ledger_path(plan))


def task_row(plan: Plan, run: Run) -> dict:
    """What the array task receives (and one line of manifest.jsonl); ``workdir`` is where it
    runs, so relative paths in its config mean paths from the experiment file's folder."""
    return {**run.manifest_row(), **task_settings(stage_slurm(plan, run.stage)), "workdir": str(plan.base)}


def _waits_text(plan: Plan, stage: str, role: str) -> Optional[str]:
    """The dependency a dry run shows for one array (job ids exist only at submission)."""
    waits = [f"<job ids of the {parent} tasks>" for parent in plan.experiment.stages[stage].parents]
    if role == "train":  # a pass belongs to the first stage that reads it, maybe an earlier one
        passes = {r.ref_pass for r in plan.stage_runs(stage) if r.ref_pass}
        owners = {r.stage for r in plan.runs if r.run_id in passes}
        waits += [f"<job ids of the {owner} reference passes>" for owner in plan.stage_order if owner in owners]
    judges = {plan.run(r.judge).stage for r in plan.stage_runs(stage, role) if r.judge}
    waits += [f"<job ids of the {judge} tasks>" for judge in sorted(judges)]
    return "afterok:" + ":".join(waits) if waits else None


def write_plan_files(plan: Plan, out: Optional[Path] = None) -> Path:
    """manifest.jsonl (every run and reference pass, sorted keys, byte-stable) and the script of
    every array: sbatch/<stage>.sh (the stage's runs) and sbatch/<stage>.ref.sh (its reference passes)."""
    out = out or submit_dir(plan)
    lines = "".join(json.dumps(task_row(plan, run), sort_keys=True) + "\n" for run in plan.runs)
    atomic_write_bytes(out / "manifest.jsonl", lines.encode())
    for stage, role in plan.arrays():
        runs = plan.stage_runs(stage, role)
        name = f"{stage}.ref.sh" if role == "reference" else f"{stage}.sh"
        atomic_write_bytes(out / "sbatch" / name,
                           render_sbatch(plan, stage, len(runs), _waits_text(plan, stage, role), role).encode())
    return out


def _grid_text(run: Run) -> str:
    if run.role == "reference":
        return "reference log-probs, read by the runs below"
    if run.role == "evaluate":
        return f"scores {run.parent}"
    if run.role == "generate":
        return f"samples from {run.parent}"
    return " ".join(f"{k}={v}" for k, v in run.grid_values.items())


def print_plan(plan: Plan, statuses: Optional[dict[str, RunStatus]], decisions: dict[str, str],
               overrides: Sequence[str] = ()) -> None:
    exp = plan.experiment
    count = {role: sum(r.role == role for r in plan.runs) for role in ROLE_WORDS}
    extra = [f"{count['reference']} reference pass{'es' if count['reference'] > 1 else ''}"] if count["reference"] else []
    extra += [f"{count['evaluate']} scoring{'s' if count['evaluate'] > 1 else ''}"] if count["evaluate"] else []
    extra += [f"{count['generate']} pair set{'s' if count['generate'] > 1 else ''}"] if count["generate"] else []
    print(f"experiment {exp.experiment.name}: {count['train']} runs in {len(plan.stage_order)} stages"
          + (f" (+ {', '.join(extra)})" if extra else "") + f" -> {plan.root}")
    if exp.defaults:
        print(f"  [defaults] under every stage: {json.dumps(exp.defaults, sort_keys=True)}")
    if overrides:
        print(f"  --set over every stage that has the key: {' '.join(overrides)}")
    for stage, role in plan.arrays():
        cfg = exp.stages[stage]
        slurm = stage_slurm(plan, stage)
        runs = plan.stage_runs(stage, role)
        origin = f", from {cfg.from_} ({cfg.pairing})" if cfg.trainer and cfg.from_ else ""
        if role == "evaluate":
            origin = f" of {', '.join(cfg.parents)} on {cfg.evaluate.prompts}"
        if role == "generate":
            origin = f" from {', '.join(cfg.parents)} on {cfg.generate.prompts}, judged by {cfg.generate.judged_by}"
        what = ROLE_WORDS[role]
        print(f"  stage {stage} [{cfg.trainer or cfg.kind}{origin}]: {len(runs)} {what}, one array; "
              f"time {slurm['time']}, "
              f"{slurm['nodes']} node(s) x {slurm['ntasks_per_node']} rank(s)")
        for run in runs:
            state = statuses[run.run_id].state if statuses else "-"
            waits = f" <- {' + '.join(run.waits_for)}" if run.waits_for else ""
            print(f"    {run.run_id:<28} {state:<13} {decisions.get(run.run_id, ''):<14} {_grid_text(run)}{waits}")


def prepare_assets(plan: Plan) -> None:
    """Offline assets of [prepare], made on the submit host if missing (they are inputs of stage configs)."""
    prep = plan.experiment.prepare
    if prep.tiny_model and not (plan.base / prep.tiny_model.dir / "config.json").exists():
        from ..tiny_model import make_tiny_model

        print(f"[submit] making the tiny model in {prep.tiny_model.dir}")
        make_tiny_model(plan.base / prep.tiny_model.dir, seed=prep.tiny_model.seed)
    data = prep.reversal_data
    if data and not (plan.base / data.dir / "train.jsonl").exists():
        from ..data.verifiable import TaskSpec, write_dataset

        print(f"[submit] writing the reversal preference data in {data.dir}")
        write_dataset(plan.base / data.dir, n_train=data.n_train, n_test=data.n_test, n_dev=data.n_dev, seed=data.seed,
                      label_noise=data.label_noise, spec=TaskSpec(multi_turn_ratio=data.multi_turn_ratio),
                      data_format=data.format)


def select_runs(plan: Plan, only: Sequence[str], run_ids: Sequence[str]) -> list[Run]:
    for stage in only:
        if stage not in plan.experiment.stages:
            raise ConfigError([f"--only: unknown stage '{stage}'; stages are {', '.join(plan.stage_order)}"])
    known = {r.run_id for r in plan.runs}
    for run_id in run_ids:
        if run_id not in known:
            raise ConfigError([f"--runs: unknown run id '{run_id}' (python -m dpo_hpc.submit FILE --dry-run lists them)"])
    return [r for r in plan.runs if (not only or r.stage in only) and (not run_ids or r.run_id in run_ids)]


def _by_state(state: str) -> Optional[str]:
    if state == "done":
        return "skip: done"
    if state in ACTIVE_STATES:
        return f"skip: {state}"
    return "submit" if state in RESUBMITTABLE else None


def decide(plan: Plan, selected: list[Run], statuses: dict[str, RunStatus]) -> dict[str, str]:
    """run id -> 'submit', 'skip: done', 'skip: queued' ... for every selected run (and every
    reference pass a submitted run reads), in plan order: what a run waits for comes first."""
    decisions = {run.run_id: d for run in selected if (d := _by_state(statuses[run.run_id].state))}
    for run in selected:  # a run to submit brings its reference pass along
        if decisions.get(run.run_id) == "submit" and run.ref_pass and run.ref_pass not in decisions:
            decisions[run.ref_pass] = _by_state(statuses[run.ref_pass].state) or "submit"
    for run in plan.runs:
        if decisions.get(run.run_id) != "submit":
            continue
        if run.role == "reference" and not any(decisions.get(r.run_id) == "submit" for r in plan.runs
                                               if r.ref_pass == run.run_id):
            decisions[run.run_id] = "skip: no run to submit reads it"
            continue
        for waited in run.waits_for:  # one that will be neither done nor queued blocks this run
            state = statuses[waited].state
            if state != "done" and state not in ACTIVE_STATES and decisions.get(waited) != "submit":
                decisions[run.run_id] = f"blocked: {run.what_is(waited)} {waited} is {state}"
                break
    return decisions


def _dependency(plan: Plan, stage: str, array_runs: list[Run], job_of: dict[str, str],
                submitted: dict[str, str]) -> Optional[str]:
    """afterok on the parents, reference passes and reward models still queued or running; aftercorr
    when task i of the whole array starts from task i of one parent array submitted just now (a zip
    or a match, a round's pairs, an evaluation of one stage): task i then waits for parent task i only."""
    conditions = []
    after_ok = {job_of[w] for r in array_runs for w in r.waits_for if w != r.parent and w in job_of}
    parents = [r.parent for r in array_runs if r.parent and r.parent in job_of]
    if parents:
        jobs = [job_of[p] for p in parents]
        arrays = {j.split("_")[0] for j in jobs}
        whole = len(array_runs) > 1 and array_runs == plan.stage_runs(stage, array_runs[0].role)  # one: afterok
        if whole and len(arrays) == 1 and all(p in submitted for p in parents) \
                and all(j.endswith(f"_{r.index}") for j, r in zip(jobs, array_runs)) and len(parents) == len(array_runs):
            conditions.append(f"aftercorr:{arrays.pop()}")
        else:
            after_ok.update(jobs)
    if after_ok:
        conditions.append("afterok:" + ":".join(sorted(after_ok)))
    return ",".join(conditions) or None


def submit_slurm(plan: Plan, runs: list[Run], statuses: dict[str, RunStatus]) -> dict[str, str]:
    """One array per stage, in dependency order; returns run id -> Slurm job id."""
    import submitit
    from submitit.core.utils import FailedJobError

    from .task import run_task

    job_of = {rid: s.job_id for rid, s in statuses.items() if s.state in ACTIVE_STATES and s.job_id}
    submitted: dict[str, str] = {}
    ledger = ledger_of(plan)
    for stage, role in plan.arrays():
        array_runs = [r for r in runs if r.stage == stage and r.role == role]
        if not array_runs:
            continue
        dependency = _dependency(plan, stage, array_runs, job_of, submitted)
        slurm = stage_slurm(plan, stage)
        executor = submitit.SlurmExecutor(folder=logs_folder(plan), max_num_timeout=caps_of(slurm["max_requeues"])["time_limit"],
                                          python=python_command(slurm, plan))
        params = sbatch_parameters(plan, stage, dependency, role)
        if dependency:  # a failed parent cancels its children instead of leaving them pending forever
            params["additional_parameters"]["kill-on-invalid-dep"] = "yes"
        executor.update_parameters(**params)
        try:
            jobs = executor.map_array(run_task, [task_row(plan, r) for r in array_runs])
        except FailedJobError as exc:  # sbatch said why: that line is the message
            raise sbatch_refused(plan, stage, str(exc), submitted) from exc
        entries = []
        for run, job in zip(array_runs, jobs):
            job_of[run.run_id] = submitted[run.run_id] = job.job_id
            entries.append({"run_id": run.run_id, "stage": stage, "job_id": job.job_id, "backend": "slurm"})
        ledger.record(entries)
        array_id = jobs[0].job_id.split("_")[0]
        what = ROLE_WORDS[role]
        print(f"[submit] stage {stage}: {len(jobs)} {what} as Slurm job {array_id}"
              + (f" ({dependency})" if dependency else ""))
    return submitted


def sbatch_refused(plan: Plan, stage: str, stderr: str, submitted: dict[str, str]) -> RunFailure:
    said = " ".join(line.strip() for line in stderr.splitlines() if line.strip()) or "no message"
    before = (f"; the {len(submitted)} run(s) of the stages before it are queued and recorded, so submitting "
              "again sends only the rest") if submitted else ""
    return RunFailure(f"sbatch refused stage {stage}: {said}{before}; check the cluster (`sinfo`) and the stage's "
                      f"[slurm] table (`dpo-hpc submit {plan.source} --dry-run` writes the sbatch scripts), or run "
                      "here with --local")


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


