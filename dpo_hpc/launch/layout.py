"""Where an experiment's submission files live: the one place that knows these names.

::

    <output_root>/<experiment>/.submit/
      manifest.jsonl     one line per run: what each array task trains
      ledger.jsonl       run id -> job id, one line per submission
      sbatch/<stage>.sh  the array script of each stage
      overrides.json     the --set values of the last submission (status and report use them)
      logs/<job id>/     submitit's pickles and the tasks' stdout/stderr
"""

from __future__ import annotations

from pathlib import Path

from ..experiment import Plan

SUBMIT_DIR = ".submit"


def submit_dir(plan: Plan) -> Path:
    return plan.root / SUBMIT_DIR


def ledger_path(plan: Plan) -> Path:
    return submit_dir(plan) / "ledger.jsonl"


def logs_folder(plan: Plan) -> Path:
    """submitit's folder pattern (``%j`` is the job id)."""
    return submit_dir(plan) / "logs" / "%j"


def job_log(plan: Plan, job_id: str, rank: int = 0, stream: str = "err") -> Path:
    """The log of one rank of one job (``stream``: ``out`` or ``err``)."""
    return submit_dir(plan) / "logs" / job_id / f"{job_id}_{rank}_log.{stream}"


def overrides_path(root: Path) -> Path:
    """``root``: the experiment's root (known before its plan is, since ``--set`` shapes the plan)."""
    return root / SUBMIT_DIR / "overrides.json"
