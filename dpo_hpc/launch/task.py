"""What one Slurm array task (or one local job) runs: train one run of the plan, on every rank
(or compute a stage's reference log-probs, for a reference pass).

On a stop signal the loop checkpoints on all ranks and returns ``preempted``; rank 0 then asks
Slurm to requeue this array task, and after an unexpected failure it does the same, each cause
within its cap (``launch.requeue``). The requeued task starts the same pickled call again and the
loop resumes from the checkpoint.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
from pathlib import Path
from typing import Any

from .requeue import is_transient, requeue, resume_step, signal_cause

DEFAULT_SIGNAL_LEAD_S = 180


def _rendezvous_from_slurm() -> None:
    """MASTER_ADDR = first host of the allocation; the loop derives MASTER_PORT from the job id."""
    if "SLURM_JOB_NODELIST" in os.environ and "MASTER_ADDR" not in os.environ:
        import submitit

        hosts = submitit.JobEnvironment().hostnames
        if len(hosts) > 1:
            os.environ["MASTER_ADDR"] = hosts[0]


def _is_main() -> bool:
    from ..runtime import init_distributed

    try:
        return init_distributed().is_main
    except Exception:  # the process group itself is what failed: leave the failure as it is
        return False


def train_and_requeue(cfg, trainer: str, caps: dict[str, int], label: str,
                      signal_lead_s: float = DEFAULT_SIGNAL_LEAD_S) -> dict[str, Any]:
    """Train on every rank with the stop signal bound. After a preemption or time-limit signal,
    rank 0 requeues the Slurm task and every rank exits (status 0 if requeued, 3 if not: the
    checkpoint is kept either way); after an unexpected failure it requeues the task if the cap
    allows, else the failure is raised as it was."""
    from ..runtime import init_distributed, shutdown
    from ..runtime.slurm import job_end_time
    from ..runtime.stop import DEADLINE, StopSignal
    from ..trainers.trainer import train

    # A rank that dies in native code (an abort in a collective or its teardown, a segfault in a
    # kernel) prints every thread's Python stack to its log: where it died, not only that it did.
    faulthandler.enable()
    run_dir = Path(cfg.training.save_dir)
    stop = StopSignal(end_time=job_end_time(), lead_s=signal_lead_s).install()
    try:
        summary = train(cfg, trainer, stop=stop)
    except Exception as exc:
        if is_transient(exc) and _is_main():
            failed = f"[dpo-hpc] {label}: failed ({type(exc).__name__}: {exc}); "
            reason = requeue(run_dir, "failure", resume_step(run_dir), caps, lambda outcome: print(
                failed + outcome + (" to resume from the last checkpoint" if outcome == "requeued" else ""), flush=True))
            if not reason:
                sys.exit(0)
        raise
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
        # the end time read at the start: a signal this near it is the time limit's
        cause = "time_limit" if summary["signal"] == DEADLINE else signal_cause(stop.end_time, signal_lead_s)
        stopped = f"[dpo-hpc] {label}: stopped at step {summary['step']} ({cause.replace('_', ' ')}); "
        reason = requeue(run_dir, cause, summary["step"], caps,
                         lambda outcome: print(stopped + outcome, flush=True)) if dist_env.is_main else ""
        shutdown()
        # No return value: submitit must not record the task as finished; a requeued task reruns this call.
        sys.exit(0 if not reason else 3)
    shutdown()
    return summary


def run_task(row: dict[str, Any]) -> dict[str, Any]:
    """Train ``row`` (a line of the plan's manifest.jsonl) on this rank, every rank calling it;
    or score a run (an evaluate stage's task, one rank), or sample pairs from one (a generate stage's)."""
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
    if row.get("role") == "evaluate":
        from ..evaluate import evaluate_run

        return {"run_id": row["run_id"], **evaluate_run(row["config"], row["run_dir"], row["run_id"])}
    if row.get("role") == "generate":
        return {"run_id": row["run_id"], **generate_and_requeue(row)}
    cfg = validate_mapping(row["config"], row["trainer"], source=f"run {row['run_id']}")
    if row.get("role") == "reference":
        return {"run_id": row["run_id"], **reference_pass(cfg, row["trainer"])}
    return {"run_id": row["run_id"], **train_and_requeue(cfg, row["trainer"], row["max_requeues"], row["run_id"],
                                                          row.get("signal_lead_s") or DEFAULT_SIGNAL_LEAD_S)}


def generate_and_requeue(row: dict[str, Any]) -> dict[str, Any]:
    """A generate stage's task, stoppable between its chunks: on the preemption signal, or near the
    job's time limit, it stops after the chunk it is drawing and requeues itself (within
    ``max_requeues``); the requeued task goes on from its chunks. Ctrl-C or scancel stops it alike,
    not requeued."""
    from ..pairs import generate_run
    from ..runtime import shutdown
    from ..runtime.slurm import job_end_time
    from ..runtime.stop import DEADLINE, StopSignal

    lead_s = row.get("signal_lead_s") or DEFAULT_SIGNAL_LEAD_S
    ranks = pair_ranks()
    stop = StopSignal(end_time=job_end_time(), lead_s=lead_s).install()
    try:
        summary = generate_run(row["config"], row["run_dir"], stop=lambda chunk_s: stop.agreed(
            ranks.world, ranks.device, step_s=chunk_s), is_preemption=stop.is_preemption, ranks=ranks)
    finally:
        stop.restore()
    if ranks.world > 1:
        ranks.barrier()
        shutdown()
    label, status, main = row["run_id"], summary["status"], ranks.rank == 0
    if status == "interrupted":
        if main:
            print(f"[dpo-hpc] {label}: stopped by {summary['signal']} with {summary['chunks']} chunk(s) made; they "
                  "are kept, run again to go on", flush=True)
        sys.exit(128 + getattr(signal, summary["signal"]).value)
    if status == "preempted":
        cause = "time_limit" if summary["signal"] == DEADLINE else signal_cause(stop.end_time, lead_s)
        stopped = f"[dpo-hpc] {label}: stopped with {summary['chunks']} chunk(s) made ({cause.replace('_', ' ')}); "
        reason = requeue(Path(row["run_dir"]), cause, summary["chunks"], row["max_requeues"],
                         lambda outcome: print(stopped + outcome, flush=True)) if main else ""
        sys.exit(0 if not reason else 3)  # no return value: submitit must not record the task as finished
    return summary


def pair_ranks():
    """This process's place among the ranks of a generate task (srun, torchrun, or alone), each on
    its own GPU where there are GPUs. A lone rank needs no process group and sets up none (nor
    tears one down: in a process that trains too, DeepSpeed keeps its groups)."""
    import torch

    from ..pairs import Ranks
    from ..runtime import barrier, init_distributed, launched_ranks

    if launched_ranks().world_size == 1:
        return Ranks()
    from deepspeed.accelerator import get_accelerator

    dist_env = init_distributed()  # its backend follows DeepSpeed's accelerator, and so does the device
    on_gpu = get_accelerator().device_name() == "cuda"
    device = torch.device("cuda", dist_env.local_rank) if on_gpu else torch.device("cpu")
    return Ranks(dist_env.rank, dist_env.world_size, device, barrier)


def reference_pass(cfg, trainer: str) -> dict[str, Any]:
    """The reference log-probs of a stage's runs, into their shared cache (no training, no
    checkpoint: a pass that is stopped runs again from the start when resubmitted)."""
    from ..runtime import shutdown
    from ..trainers.trainer import reference_pass as compute

    summary = compute(cfg, trainer)
    shutdown()
    return summary
