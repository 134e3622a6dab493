"""Fill the Hugging Face cache for an experiment, on a login node, before its jobs run offline:
``dpo-hpc prefetch experiments/x.toml``.

Every model, tokenizer and dataset the runs name is checked (local paths) or found in, else
fetched into, the hub cache the jobs will use (``HF_HOME`` / ``HF_HUB_CACHE`` from the stage's
``[slurm] env``, else this shell's). With ``HF_HUB_OFFLINE=1`` nothing is fetched: the command
lists what is missing. Exit 0 when everything is there, 1 when something is missing.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from .launch.guard import guarded
from .launch.plans import open_plan, plan_parser
from .launch.prefetch import prefetch


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = plan_parser("dpo-hpc prefetch", __doc__).parse_args(argv)
    plan, _ = open_plan(args.experiment, args.set or None)
    missing = prefetch(plan)
    for line in missing:
        print(f"error: {line}", file=sys.stderr)
    print(f"[prefetch] {'everything the runs read is here' if not missing else f'{len(missing)} missing'}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(guarded(main))
