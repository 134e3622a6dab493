"""Where every run of an experiment stands: ``python -m dpo_hpc.status experiments/x.toml [--watch]``.

One row per run: stage, grid values, Slurm job id, state (done, pending, running, requeued,
stopped, failed, cancelled, not submitted ...), step/total, last checkpoint, the latest eval
reward accuracy and margin, and the TensorBoard logdir to open.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Optional, Sequence

from .launch.guard import guarded
from .launch.plans import open_plan, plan_parser
from .launch.jobs import ACTIVE_STATES, plan_status
from .launch.submission import ledger_of
from .launch.table import json_rows, table


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = plan_parser("python -m dpo_hpc.status", __doc__)
    parser.add_argument("--watch", type=float, nargs="?", const=10.0, metavar="SECONDS",
                        help="refresh every SECONDS (default 10) until no run is pending, running or requeued")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per run with raw values (grid mapping, integer steps, metrics, log path)")
    args = parser.parse_args(argv)
    plan, _ = open_plan(args.experiment, args.set or None)
    while True:
        statuses = plan_status(plan, ledger_of(plan).latest())
        if args.json:
            for row in json_rows(plan, statuses):
                print(json.dumps(row))
        else:
            if args.watch:
                print("\033[2J\033[H" + time.strftime("%H:%M:%S"), flush=True)
            print(table(plan, statuses), flush=True)
        if not args.watch or all(s.state not in ACTIVE_STATES for s in statuses.values()):
            return 0
        time.sleep(args.watch)


if __name__ == "__main__":
    sys.exit(guarded(main))
