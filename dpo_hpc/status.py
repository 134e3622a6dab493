"""Where every run of an experiment stands: ``python -m dpo_hpc.status experiments/x.toml [--watch]``.

One row per run: stage, grid values, Slurm job id, state (done, pending, running, requeued,
stopped, failed, cancelled, not submitted ...), step/total, last checkpoint, the latest eval
reward accuracy and margin, and the TensorBoard logdir to open.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from typing import Iterable, Optional, Sequence

from .config import ConfigError
from .experiment import Plan, load_plan
from .hpc.state import ACTIVE_STATES, RunStatus, plan_status
from .submit import ledger_of


def rows(plan: Plan, statuses: dict[str, RunStatus]) -> list[dict]:
    out = []
    for run in plan.runs:
        s = statuses[run.run_id]
        out.append({
            "stage": run.stage, "run_id": run.run_id,
            "grid": " ".join(f"{k.split('.')[-1]}={v}" for k, v in run.grid_values.items()) or "-",
            "job": s.job_id or "-", "state": s.state + (f" ({s.requeues} requeues)" if s.requeues else ""),
            "step": f"{s.step}/{s.total_steps}" if s.step is not None else "-",
            "checkpoint": s.checkpoint or "-",
            "eval acc": f"{s.eval['rewards/accuracies']:.3f}" if "rewards/accuracies" in s.eval else "-",
            "eval margin": f"{s.eval['rewards/margins']:.3f}" if "rewards/margins" in s.eval else
                           (f"loss {s.eval['loss']:.3f}" if "loss" in s.eval else "-"),
            "detail": s.detail,
        })
    return out


def state_counts(states: Iterable[str]) -> str:
    """'3 done, 1 running' (states in alphabetical order)."""
    return ", ".join(f"{n} {state}" for state, n in sorted(Counter(states).items()))


def table(plan: Plan, statuses: dict[str, RunStatus]) -> str:
    data = rows(plan, statuses)
    columns = ["stage", "run_id", "grid", "job", "state", "step", "checkpoint", "eval acc", "eval margin"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in data)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    for r in data:
        lines.append("  ".join(str(r[c]).ljust(widths[c]) for c in columns))
        if r["detail"]:
            lines.append(" " * (widths["stage"] + 2) + f"-> {r['detail']}")
    lines.append("")
    lines.append(f"{state_counts(s.state for s in statuses.values())}; TensorBoard: tensorboard --logdir {plan.root}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo_hpc.status", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment")
    parser.add_argument("--watch", type=float, nargs="?", const=10.0, metavar="SECONDS",
                        help="refresh every SECONDS (default 10) until no run is pending, running or requeued")
    parser.add_argument("--json", action="store_true", help="one JSON object per run instead of the table")
    args = parser.parse_args(argv)
    try:
        plan = load_plan(args.experiment)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 2
    while True:
        statuses = plan_status(plan, ledger_of(plan).latest())
        if args.json:
            for row in rows(plan, statuses):
                print(json.dumps(row))
        else:
            if args.watch:
                print("\033[2J\033[H" + time.strftime("%H:%M:%S"), flush=True)
            print(table(plan, statuses), flush=True)
        if not args.watch or all(s.state not in ACTIVE_STATES for s in statuses.values()):
            return 0
        time.sleep(args.watch)


if __name__ == "__main__":
    sys.exit(main())
