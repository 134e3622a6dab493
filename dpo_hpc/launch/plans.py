"""Opening an experiment's plan the way its last submission saw it.

``--set`` values change run ids (a shorter ``max_steps`` is another run), so ``status`` and
``report`` must expand the file with the same values ``submit`` used: submit records them in
``.submit/overrides.json``, and the other commands read them unless given their own.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

from ..config import ConfigError, parse_override
from ..experiment import Plan, expand, experiment_root, load_experiment
from ..fsutil import atomic_write_bytes, blocking_file
from .layout import overrides_path


def open_plan(path: str | Path, overrides: Optional[Sequence[str]] = None) -> tuple[Plan, list[str]]:
    """(plan, the ``--set`` texts it was expanded with): ``overrides`` when given, else those of
    the last submission."""
    exp = load_experiment(path)
    blocked = blocking_file(experiment_root(exp, path))
    if blocked:
        raise ConfigError([f"{path}: experiment.output_root: {blocked} is a file, not a folder; choose another "
                           "output folder"])
    if overrides is None:
        recorded = overrides_path(experiment_root(exp, path))
        try:
            overrides = json.loads(recorded.read_text()) if recorded.exists() else []
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError([f"{recorded}: unreadable ({exc}); submit again to rewrite it"]) from None
    texts = list(overrides)
    return expand(exp, path, [parse_override(text) for text in texts]), texts


def record_overrides(plan: Plan, texts: Sequence[str]) -> None:
    atomic_write_bytes(overrides_path(plan.root), (json.dumps(list(texts)) + "\n").encode())


def plan_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The arguments every command that reads a submitted plan takes: the file, and ``--set``
    (default: the last submission's)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment")
    parser.add_argument("--set", "-s", action="append", default=[], metavar="[STAGE.]KEY.PATH=VALUE",
                        help="the plan with these overrides (default: those of the last submission)")
    return parser


def add_selection(parser: argparse.ArgumentParser, verb: str) -> None:
    """``--only STAGE`` and ``--runs ID,...``: the part of a plan a command acts on (``selection``)."""
    parser.add_argument("--only", action="append", default=[], metavar="STAGE",
                        help=f"{verb} only this stage (repeatable)")
    parser.add_argument("--runs", default="", metavar="ID,...", help=f"{verb} only these run ids")


def selection(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(stages, run ids) of ``add_selection``'s options."""
    return args.only, [r for r in args.runs.split(",") if r]
