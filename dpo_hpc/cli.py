"""Command lines: ``dpo-hpc`` and the original per-trainer commands.

Only argument parsing and exit codes live here. Exit codes: 0 success, 2 bad input (config,
data, usage; one line per problem, no traceback), 1 any other failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from typing import Optional, Sequence

from pathlib import Path

from .launch.guard import guarded
from .config import (ALGORITHMS, ConfigError, by_command, detect_trainer, parse_override, read_mapping, set_dotted,
                     to_dict, validate_mapping)

EXPERIMENT_COMMANDS = {
    "submit": "submit an experiment file (stages x grid) to Slurm, or run it locally",
    "status": "where every run of an experiment stands",
    "report": "tables and plots of an experiment's results",
    "prefetch": "fill the Hugging Face cache with what an experiment reads (on a login node)",
    "cancel": "stop an experiment's queued and running Slurm jobs (running runs checkpoint first)",
}
"""``dpo-hpc <command> EXPERIMENT``: each is its module ``dpo_hpc.<command>``, which parses its own arguments."""

TRAINERS = {algo.command: algo.name for algo in ALGORITHMS.values()}
"""``dpo-hpc train COMMAND`` -> the algorithm's name (from the registry)."""


def load_with_overrides(path: str, trainer: Optional[str], overrides: Sequence[str]):
    """The validated config (trainer given, or detected from the sections after overrides)."""
    data = read_mapping(path)
    if "experiment" in data or "stages" in data:
        raise ConfigError([f"{path} is an experiment file (it has [experiment] / [stages]), not a trainer config; "
                           f"check it with `dpo-hpc submit {path} --dry-run`, run it with `dpo-hpc submit {path}`"])
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(data, key, value, f"--set {text}")
    detected = detect_trainer(data)
    try:
        return validate_mapping(data, trainer or detected, source=path), trainer or detected
    except ConfigError as exc:
        if trainer and trainer != detected:
            exc.problems.append(f"{path}: note: this file's sections look like a '{detected}' config, not '{trainer}'")
        raise


def _run_training(config: str, trainer: str, overrides: Sequence[str]) -> int:
    cfg, _ = load_with_overrides(config, trainer, overrides)
    from .launch.requeue import caps_of
    from .launch.task import DEFAULT_SIGNAL_LEAD_S, train_and_requeue

    # Under sbatch with --signal=USR2@LEAD (see hpc/train.sbatch), a stop signal checkpoints and requeues.
    caps = caps_of(int(os.environ["DPO_HPC_MAX_REQUEUES"]) if "DPO_HPC_MAX_REQUEUES" in os.environ else None)
    try:
        train_and_requeue(cfg, trainer, caps, config, float(os.environ.get("DPO_HPC_SIGNAL_LEAD_S", DEFAULT_SIGNAL_LEAD_S)))
    except ConfigError as exc:  # found once the run met its models (their attention, a router): name the file too
        raise ConfigError([p if p.startswith(f"{config}:") else f"{config}: {p}" for p in exc.problems]) from None
    return 0


def _cmd_train(args) -> int:
    return _run_training(args.config, TRAINERS[args.trainer], args.set)


def _cmd_validate(args) -> int:
    if bool(args.config) == bool(args.config_option):
        raise ConfigError(["validate takes one config file: dpo-hpc validate CONFIG (or --config CONFIG)"])
    args.config = args.config or args.config_option
    trainer = TRAINERS[args.trainer] if args.trainer else None
    cfg, trainer = load_with_overrides(args.config, trainer, args.set)
    resolved = {"trainer": trainer, **to_dict(cfg)}
    print(json.dumps(resolved, indent=2))
    if not args.no_preflight:  # the data, models and folder the run would use
        from .launch.preflight import Findings, check_config

        found = Findings()
        check_config(cfg, trainer, found, args.config)
        for note in found.notes:
            print(f"note: {note}", file=sys.stderr)
        if found.problems:
            raise ConfigError(found.problems)
    print(f"{args.config}: valid", file=sys.stderr)
    return 0


def _cmd_make_tiny_model(args) -> int:
    from .tiny_model import make_tiny_model

    out = make_tiny_model(args.dir, seed=args.seed, hidden_size=args.hidden_size, num_layers=args.layers)
    print(f"tiny model and tokenizer written to {out} (use policy_name = \"{out}\")")
    return 0


def _cmd_make_data(args) -> int:
    from .data.verifiable import TaskSpec, write_dataset

    if not 0.0 <= args.multi_turn_ratio <= 1.0:
        raise SystemExit(f"make-data: --multi-turn-ratio must lie in [0, 1], got {args.multi_turn_ratio}")
    paths = write_dataset(args.dir, n_train=args.n_train, n_test=args.n_test, n_dev=args.n_dev, seed=args.seed,
                          label_noise=args.label_noise, spec=TaskSpec(multi_turn_ratio=args.multi_turn_ratio),
                          data_format=args.format)
    shown = "HH format" if args.format == "text" else "conversational"
    print(f"reversal preference data written: {paths['train']} (train, {shown}), {paths['test']} (held-out prompts)")
    return 0


def _cmd_make_pairs(args) -> int:
    from .config import validate_as
    from .experiment.schema import GenerationSection
    from .pairs import make_pairs

    given = {key: value for key, value in vars(args).items()
             if key in GenerationSection.__pydantic_fields__ and value is not None and value is not False}
    settings = validate_as(GenerationSection, given, source="make-pairs")
    from .launch.task import pair_ranks
    from .runtime import shutdown

    ranks = pair_ranks()  # under torchrun the ranks share the chunks
    make_pairs(args.model, settings, args.out, ranks=ranks, say=print if ranks.rank == 0 else lambda line: None)
    if ranks.world > 1:
        shutdown()
    return 0


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    """``make-pairs``' options: the keys of [stages.X.generate], their meaning and defaults declared there."""
    from .experiment.schema import GenerationSection

    for key, field in GenerationSection.__pydantic_fields__.items():
        words = (field.description or "").replace("``", "'")
        default = "" if field.is_required() or field.default is None or field.default is False \
            else f" (default {field.default})"
        flag = f"--{key.replace('_', '-')}"
        if field.annotation is bool:
            p.add_argument(flag, action="store_true", help=words)
        else:
            kind = next(t for t in (int, float, str) if t in (field.annotation, *typing.get_args(field.annotation)))
            p.add_argument(flag, type=kind, required=field.is_required(), help=words + default)


def _accept_launcher_rank(parser: argparse.ArgumentParser) -> None:
    """The deepspeed launcher passes --local_rank=N (and sets LOCAL_RANK, which is what we read)."""
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _cmd_model_card(args) -> int:
    from .checkpoint import RunDir
    from .checkpoint.model_card import rewrite_model_card
    from .launch.plans import open_plan

    for target in args.target:
        if Path(target).is_file():  # an experiment file: each of its training runs that completed
            plan, _ = open_plan(target)
            trained = [r.run_dir for r in plan.runs if r.role == "train"]
            done = [d for d in trained if (RunDir(d).read_manifest() or {}).get("status") == "completed"]
            print(f"[model-card] {target}: {len(done)} of its {len(trained)} training run(s) completed")
            here = os.getcwd()
            os.chdir(plan.base)  # where its jobs ran: the relative paths in their configs are from there
            try:
                for run_dir in done:
                    print(rewrite_model_card(run_dir))
            finally:
                os.chdir(here)
        else:
            print(rewrite_model_card(target))
    return 0


def _cmd_evaluate(args) -> int:
    from .evaluate import evaluate

    if (args.data is None) == (args.reward_model is None):
        raise ConfigError(["evaluate: give --data (the verifiable task's prompts) or --reward-model (a judge of "
                           "replies to the run's validation prompts), one of the two"])
    result = evaluate(args.model, args.data, baseline=args.baseline, limit=args.limit,
                      max_new_tokens=args.max_new_tokens, reward_model=args.reward_model)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        from .fsutil import atomic_write_bytes

        atomic_write_bytes(args.out, (text + "\n").encode())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="dpo-hpc", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dpo-hpc {__version__}")
    _accept_launcher_rank(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    for name, text in EXPERIMENT_COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)  # listed here; main() hands their arguments over

    def config_args(p):
        p.add_argument("--config", "-c", required=True, help="trainer config file (.toml, .yaml, .json)")
        p.add_argument("--set", "-s", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="override a config value (TOML syntax), e.g. --set dpo_training.max_steps=10")

    p = sub.add_parser("train", help="train with one trainer")
    p.add_argument("trainer", choices=list(TRAINERS))
    config_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("validate", help="print the resolved config, or every error in it")
    p.add_argument("config", nargs="?", help="trainer config file (or --config FILE, as train takes it)")
    p.add_argument("--config", "-c", dest="config_option", metavar="CONFIG", help=argparse.SUPPRESS)
    p.add_argument("--trainer", choices=list(TRAINERS), help="schema to check against (default: from the sections)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.add_argument("--no-preflight", action="store_true", help="check the file only, not its data, models and folder")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("make-tiny-model", help="write a tiny random Llama + byte tokenizer (offline)")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden-size", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.set_defaults(func=_cmd_make_tiny_model)

    p = sub.add_parser("make-data", help="write the verifiable reversal preference dataset")
    p.add_argument("dir")
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--n-dev", type=int, default=0, help="held-out prompts in dev.jsonl, for choosing settings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label-noise", type=float, default=0.0, help="fraction of pairs with chosen/rejected swapped")
    p.add_argument("--multi-turn-ratio", type=float, default=0.2,
                   help="fraction of rows with one solved exchange before the asked one")
    p.add_argument("--format", choices=["text", "conversational"], default="text",
                   help="training rows as HH transcripts (text) or TRL's message lists (conversational)")
    p.set_defaults(func=_cmd_make_data)

    p = sub.add_parser("evaluate", help="greedy answers on held-out prompts, scored exactly (the verifiable task) "
                                        "or by a reward model")
    p.add_argument("model", help="model folder (save_pretrained; a run directory with --reward-model)")
    p.add_argument("--data", help="test.jsonl written by make-data")
    p.add_argument("--reward-model", help="a reward model's folder: it scores greedy replies to the run's "
                   "validation prompts instead")
    p.add_argument("--baseline", help="second model folder: report its scores and the win rate against it")
    p.add_argument("--limit", type=int, help="first N prompts only")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--out", help="also write the JSON result here")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("make-pairs", help="on-policy preference pairs: samples of a model, judged, best against worst")
    p.add_argument("model", help="the policy's folder (save_pretrained; a run directory) or hub name")
    p.add_argument("--out", required=True, help="folder for pairs.jsonl, samples.jsonl and generation.json")
    _add_generation_options(p)
    p.set_defaults(func=_cmd_make_pairs)

    p = sub.add_parser("model-card", help="write a completed run's model card (README.md) again from its records")
    p.add_argument("target", nargs="+", metavar="RUN_DIR_OR_EXPERIMENT",
                   help="a run directory, or an experiment file (each of its completed training runs)")
    p.set_defaults(func=_cmd_model_card)
    return parser


def _experiment_command(name: str):
    """The ``main`` of ``dpo_hpc.<name>`` (one of EXPERIMENT_COMMANDS)."""
    import importlib

    return importlib.import_module(f"{__package__}.{name}").main


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXPERIMENT_COMMANDS:
        return guarded(_experiment_command(argv[0]), argv[1:])
    args = build_parser().parse_args(argv)
    return guarded(args.func, args)


def legacy_main(argv: Optional[Sequence[str]] = None, command: Optional[str] = None) -> int:
    """The original framework's commands (``train-sft``, ``train-dpo``, ``train-beta-dpo``): which
    trainer runs is the registry's ``legacy_command`` matching the name this was invoked as."""
    command = command or Path(sys.argv[0]).name
    trainer = by_command(command).name
    parser = argparse.ArgumentParser(prog=command)
    _accept_launcher_rank(parser)
    parser.add_argument("--config", "-c", required=True)
    parser.add_argument("--set", "-s", action="append", default=[], metavar="KEY.PATH=VALUE")
    args = parser.parse_args(argv)
    return guarded(_run_training, args.config, trainer, args.set)


if __name__ == "__main__":
    sys.exit(main())
