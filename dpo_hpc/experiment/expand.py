"""Experiment -> ordered runs: a pure function of the experiment file (and the files it names).

Each run gets a stable id, ``<stage>-<hash>``, from its trainer and resolved config (a parent
model enters as the parent's run id, not its path), so re-expanding the same file gives the same
ids and run directories, and changing a value gives a new run instead of resuming an old one.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from ..config import (ALGORITHMS, ConfigError, read_mapping, set_dotted, to_dict, to_identity, validate_as,
                      validate_mapping)
from ..config.losses import is_reference_free
from .schema import EVALUATION_REPORT_ONLY, ExperimentConfig, StageConfig


SHARED_REF_LOG_PROBS = ".ref_log_probs"
"""Under the experiment root: the reference log-prob tables every run of the experiment shares
(with ``precompute_ref_log_probs``), one per reference and data."""
SHARED_DATA_CACHE = ".data_cache"
"""Under the experiment root: the tokenized splits every run of the experiment shares."""

REFERENCE_PASSES = ".ref_passes"
"""Under the experiment root: the run directories of the reference passes."""

EVALUATIONS = "evaluations"
"""Under a run directory: one folder per evaluate stage that scored the run (``<stage>/evaluation.json``)."""

GENERATED_PAIRS = "pairs.jsonl"
"""In a generate stage's run directory: the pairs that the training stages ``from`` it train on."""
GENERATION_FILE = "generation.json"
"""In a generate stage's run directory, written last: the settings and counts of its pairs."""

ROLES = ("reference", "train", "evaluate", "generate")
"""What a run does (``Run.role``), in the order a stage's arrays are submitted."""

REFERENCE_INPUTS = ("policy_name", "ref_name", "tokenizer_name", "dataset", "precision", "attn_implementation")
"""Top-level keys a reference table depends on. Runs of an experiment that agree on them (and on
the parent, the cache folder, LD-DPO's ``ld_alpha`` and KTO's pairing), in whatever stages, read
one table, made by one reference pass scheduled before them.
The table's cache key (``trainers.ref_cache``) stays the authority: this only decides scheduling."""


@dataclass(frozen=True)
class Run:
    stage: str
    index: int
    """Position in the stage's array (0-based)."""
    run_id: str
    trainer: str
    grid_values: dict[str, Any]
    parent: Optional[str]
    """Run id of the run whose model this one starts from."""
    config: dict[str, Any] = field(repr=False)
    """Validated trainer config in plain-data form (what the array task trains)."""
    run_dir: Path
    role: str = "train"
    """``train``; ``reference``: a pass that computes the reference log-probs that runs of its
    stage and of later ones read; ``evaluate``: the scoring of run ``parent`` by an evaluate stage
    (``trainer`` is "evaluate", ``grid_values`` are the scored run's); ``generate``: preference pairs
    sampled from run ``parent``'s model (``trainer`` is "generate", ``grid_values`` are its)."""
    ref_pass: Optional[str] = None
    """Run id of the reference pass this run reads its reference log-probs from."""
    judge: Optional[str] = None
    """An evaluation's or a generation's: run id of the reward model that scores the replies (a
    reward stage's run)."""

    @property
    def waits_for(self) -> list[str]:
        """Run ids that must be done before this one starts."""
        return [r for r in (self.parent, self.ref_pass, self.judge) if r]

    def what_is(self, run_id: str) -> str:
        """What ``run_id`` is to this run, in words."""
        return {self.parent: "parent", self.ref_pass: "reference pass", self.judge: "reward model"}[run_id]

    def manifest_row(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "stage": self.stage, "index": self.index, "trainer": self.trainer,
                "role": self.role, "grid": self.grid_values, "parent": self.parent, "ref_pass": self.ref_pass,
                **({"judge": self.judge} if self.judge else {}), "run_dir": str(self.run_dir), "config": self.config}


@dataclass(frozen=True)
class Plan:
    experiment: ExperimentConfig
    source: Path
    base: Path
    """The experiment file's folder, absolute: relative paths in the file mean paths from here
    (the output root, [prepare] folders, and inside stage configs: jobs run in this folder)."""
    root: Path
    """``<output_root>/<experiment name>``, absolute."""
    stage_order: list[str]
    runs: list[Run]
    copies: dict[str, str] = field(default_factory=dict)
    """The stages of later rounds (``rounds``), each with the stage of the file that it copies."""

    def stage_runs(self, stage: str, role: str = "train") -> list[Run]:
        """One array: the stage's training runs, or its reference passes (``role="reference"``)."""
        return [r for r in self.runs if r.stage == stage and r.role == role]

    def arrays(self) -> list[tuple[str, str]]:
        """(stage, role) of every array in submission order: a stage's reference passes, then its runs."""
        return [(stage, role) for stage in self.stage_order for role in ROLES if self.stage_runs(stage, role)]

    def run(self, run_id: str) -> Run:
        for r in self.runs:
            if r.run_id == run_id:
                return r
        raise KeyError(run_id)

    def children(self, run_id: str) -> list[Run]:
        return [r for r in self.runs if r.parent == run_id]


def _fail(source: Path, where: str, message: str):
    raise ConfigError([f"{source}: {where}: {message}"])


def stage_order(exp: ExperimentConfig, source: Path) -> list[str]:
    """Stages with every parent before its children (file order among independent stages)."""
    stages = exp.stages
    for name, stage in stages.items():
        for parent in stage.parents:
            if parent not in stages:
                _fail(source, f"stages.{name}.from", f"unknown stage '{parent}'; stages are {', '.join(stages)}")
    order: list[str] = []

    def upstream(stage) -> list[str]:  # an evaluate or generate stage also waits for its judge's stage
        section = stage.evaluate or stage.generate
        judge = section.reward_model if section is not None else None
        return stage.parents + ([judge] if judge in stages else [])

    def visit(name: str, chain: list[str]) -> None:
        if name in order:
            return
        if name in chain:
            cycle = chain[chain.index(name):] + [name]
            _fail(source, f"stages.{chain[0]}.from", f"stages form a cycle: {' -> '.join(cycle)}")
        for parent in upstream(stages[name]):
            visit(parent, chain + [name])
        order.append(name)

    for name in stages:
        visit(name, [])
    return order


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _sections(trainer: str) -> set[str]:
    config = ALGORITHMS[trainer].config
    return {info.alias or name for name, info in config.__pydantic_fields__.items()}


_ANY_TRAINER = set().union(*(_sections(name) for name in ALGORITHMS))


def for_trainer(mapping: dict[str, Any], trainer: str) -> dict[str, Any]:
    """The part of a shared mapping (``[defaults]``, ``--set``) that is a ``trainer`` stage's:
    ``training`` means its training section; sections only other trainers have are left out."""
    own = _sections(trainer)
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if key == "training":
            key = ALGORITHMS[trainer].training_section
        elif key in _ANY_TRAINER and key not in own:
            continue
        out[key] = _deep_merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def _dotted_keys(mapping: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in mapping.items():
        keys += _dotted_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return keys


def overrides_by_stage(exp: ExperimentConfig, source: Path, overrides: Sequence[tuple[str, Any]]) -> dict[str, dict]:
    """``--set`` values as a patch per stage: ``STAGE.KEY=VALUE`` for one stage, ``KEY=VALUE`` for
    every stage it applies to (``training.KEY`` for every training section). A key no stage takes,
    or one that a stage varies in its grid, is an error."""
    patches: dict[str, dict] = {name: {} for name in exp.stages}
    for key, value in overrides:
        first, _, rest = key.partition(".")
        targets = [first] if first in exp.stages and rest else list(exp.stages)
        dotted = rest if first in exp.stages and rest else key
        nested: dict[str, Any] = {}
        set_dotted(nested, dotted, value, f"--set {key}")
        taken = []
        for name in targets:
            if exp.stages[name].trainer is None:  # an evaluate stage has no trainer config
                continue
            part = for_trainer(nested, exp.stages[name].trainer)
            if not part:
                continue
            axis = next((k for k in _dotted_keys(part) if k in exp.stages[name].varied_keys), None)
            if axis:
                _fail(source, f"--set {key}", f"stage '{name}' varies {axis} in its grid or variants; change them "
                                              "instead")
            patches[name] = _deep_merge(patches[name], part)
            taken.append(name)
        if not taken:
            _fail(source, f"--set {key}", f"no stage has this key's section; stages are {', '.join(exp.stages)}")
    return patches


VARIANT = "variant"
"""The grid value that names a run's variant (``[stages.X.variants.NAME]``)."""


def _grid_points(stage: StageConfig) -> list[dict[str, Any]]:
    """The stage's grid values per run: each variant's name (if any) x each grid combination."""
    axes = list(stage.grid)
    points = [dict(zip(axes, values)) for values in itertools.product(*(stage.grid[a] for a in axes))]
    if not stage.variants:
        return points
    return [{VARIANT: name, **point} for name in stage.variants for point in points]


def _settings(stage: StageConfig, point: dict[str, Any]) -> dict[str, Any]:
    """The config keys a grid point sets: its variant's settings and its grid values."""
    if not stage.variants:
        return point
    return {**stage.variants[point[VARIANT]], **{key: value for key, value in point.items() if key != VARIANT}}


def grid_label(values: Iterable[tuple[str, Any]]) -> str:
    """Grid values as runs are named and shown: each key's last part, ``beta=0.1 seed=1``."""
    return " ".join(f"{key.split('.')[-1]}={value}" for key, value in values)


def run_id_for(stage: str, trainer: str, identity: dict, parent: Optional[str], parent_dir: Optional[str] = None,
               pairs_file: Optional[str] = None) -> str:
    """``<stage>-<10 hex>`` over the trainer, the config's identity (``config.to_identity``) without
    its run-dependent paths (the parent's model, a generate parent's pairs), and the parent id."""
    identity = copy.deepcopy(identity)
    for key in ("policy_name", "ref_name"):
        if parent_dir is not None and identity.get(key) == parent_dir:
            identity.pop(key)
    if pairs_file is not None and identity.get("dataset", {}).get("dataset_name") == pairs_file:
        identity["dataset"].pop("dataset_name")
    blob = json.dumps({"trainer": trainer, "config": identity, "parent": parent}, sort_keys=True, default=str)
    return f"{stage}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def experiment_base(source: str | Path) -> Path:
    return Path(source).resolve().parent


def experiment_root(exp: ExperimentConfig, source: str | Path) -> Path:
    """``<output_root>/<name>``, absolute (a relative output_root is relative to the file's folder):
    where the experiment's runs and bookkeeping live."""
    return (experiment_base(source) / exp.experiment.output_root / exp.experiment.name).resolve()


def expand(exp: ExperimentConfig, source: str | Path, overrides: Sequence[tuple[str, Any]] = ()) -> Plan:
    """All runs of the experiment, stage by stage in dependency order, each validated.

    ``source`` is the experiment file: relative paths in it are relative to its folder, whatever
    the working directory. A stage's config is ``[defaults]`` <- its ``config_file`` <- its
    ``config`` <- ``overrides`` (``--set``) <- its grid values.
    """
    source = Path(source)
    root = experiment_root(exp, source)
    patches = overrides_by_stage(exp, source, overrides)
    exp, copies = with_rounds(exp, source)
    patches.update((copy_name, patches[original]) for copy_name, original in copies.items())
    order = stage_order(exp, source)
    runs: list[Run] = []
    by_stage: dict[str, list[Run]] = {}
    for name in order:
        stage = exp.stages[name]
        where = f"stages.{name}"
        if stage.evaluate is not None or stage.generate is not None:
            made = evaluation_runs(name, stage, by_stage, runs, source) if stage.evaluate is not None \
                else generation_runs(name, stage, by_stage, runs, source, root)
            by_stage[name] = made
            runs.extend(made)
            continue
        base: dict[str, Any] = for_trainer(exp.defaults, stage.trainer)
        if stage.config_file:
            path = Path(stage.config_file)
            base = _deep_merge(base, read_mapping(path if path.is_absolute() else source.parent / path))
        base = _deep_merge(_deep_merge(base, stage.config), patches[name])
        section = ALGORITHMS[stage.trainer].training_section
        if "save_dir" in (stage.config.get(section) or {}) or f"{section}.save_dir" in stage.varied_keys:
            _fail(source, f"{where}.config.{section}.save_dir", "each run of an experiment writes its own "
                  "<output_root>/<name>/<stage>/<run id>; remove save_dir here (a config_file's is replaced)")
        if exp.experiment.seed is not None:
            base.setdefault(section, {}).setdefault("seed", exp.experiment.seed)
        parents = by_stage[stage.from_] if stage.from_ else [None]
        if stage.from_:
            _refuse_reward_models(parents, source, f"{where}.from", "a trainer starts from a policy (a causal LM)")
            if parents and parents[0].role == "evaluate":
                _fail(source, f"{where}.from", f"'{stage.from_}' is an evaluate stage; start from a training stage "
                                               "(or a generate stage, to train on its pairs)")
            if parents and parents[0].role == "generate" and "dataset_name" in (stage.config.get("dataset") or {}):
                _fail(source, f"{where}.config.dataset.dataset_name", f"a stage from generate stage '{stage.from_}' "
                      "trains on its pairs; remove dataset_name here (dataset.mix adds other data)")
        if stage.from_ and "policy_name" in stage.config:
            _fail(source, f"{where}.config", f"'from = \"{stage.from_}\"' sets policy_name; remove policy_name here")
        points = _grid_points(stage)
        if stage.pairing == "zip" and len(points) not in (1, len(parents)):
            _fail(source, f"{where}.grid", f"pairing = 'zip' needs as many grid points ({len(points)}) "
                                           f"as runs of stage '{stage.from_}' ({len(parents)})")
        if stage.pairing == "zip":
            pairs = [(p, points[i] if len(points) > 1 else points[0]) for i, p in enumerate(parents)]
        elif stage.pairing == "match":
            pairs = [(p, _matching_point(points, p, source, f"{where}.pairing")) for p in parents]
        else:
            pairs = [(p, point) for p in parents for point in points]
        stage_runs: list[Run] = []
        for parent, point in pairs:
            config = copy.deepcopy(base)
            for key, value in _settings(stage, point).items():
                set_dotted(config, key, value, f"{source}: {where}.grid")
            start = start_model(parent)
            pairs_file = str(parent.run_dir / GENERATED_PAIRS) if parent is not None and parent.role == "generate" \
                else None
            if parent is not None:  # replaces the config file's names; an inline ref_name pins another reference
                config["policy_name"] = start
                if ALGORITHMS[stage.trainer].uses_reference:
                    config["ref_name"] = stage.config.get("ref_name", start)
            if pairs_file is not None:  # the pairs, in place of [defaults]' or a config file's data (one file)
                config["dataset"] = {**config.get("dataset", {}), "dataset_name": pairs_file, "subset": "train",
                                     "eval_subset": None, "columns": {}}
            label = f"{where} (grid {json.dumps(point)})" if point else where
            config.setdefault(section, {})["save_dir"] = "<run dir>"
            try:
                validated = validate_mapping(config, stage.trainer, source=label)
            except ConfigError as exc:
                raise ConfigError([f"{source}: {p}" for p in exc.problems]) from None
            resolved = to_dict(validated)
            run_id = run_id_for(name, stage.trainer, to_identity(validated), parent.run_id if parent else None,
                                start, pairs_file)
            run_dir = root / name / run_id
            resolved[section]["save_dir"] = str(run_dir)
            grid_text = grid_label(point.items())
            resolved[section]["run_name"] = f"{resolved[section].get('run_name') or run_id} {grid_text}".strip()
            if resolved[section].get("precompute_ref_log_probs") and not resolved[section]["ref_log_probs_cache"]:
                resolved[section]["ref_log_probs_cache"] = str(root / SHARED_REF_LOG_PROBS)
            if not resolved["dataset"]["cache_dir"]:  # every run on the same data tokenizes it once
                resolved["dataset"]["cache_dir"] = str(root / SHARED_DATA_CACHE)
            if any(r.run_id == run_id for r in stage_runs):
                _fail(source, label, f"duplicates another run of stage '{name}' (same resolved config)")
            stage_runs.append(Run(stage=name, index=len(stage_runs), run_id=run_id, trainer=stage.trainer,
                                  grid_values=point, parent=parent.run_id if parent else None, config=resolved,
                                  run_dir=run_dir))
        by_stage[name] = stage_runs
        runs.extend(stage_runs)
    return Plan(experiment=exp, source=source, base=experiment_base(source), root=root, stage_order=order,
                runs=with_reference_passes(runs, root), copies=copies)


def with_rounds(exp: ExperimentConfig, source: Path) -> tuple[ExperimentConfig, dict[str, str]]:
    """``exp`` with the rounds of each iterated stage as stages of their own, and the stage each new
    one copies. Round k of stage T from generate stage G: ``T_round<k>_<G>`` draws pairs from every
    run of round k - 1 (G's settings, its seed + k - 1, so that no two rounds draw alike; with
    ``round_prompts = "next"`` the k-th ``limit`` of its prompts) and
    ``T_round<k>`` trains each of those runs on its pairs, with its grid values (pairing "match").
    A stage that reads T's runs (evaluate, generate) reads every round's; a training stage from T
    continues from the last round."""
    stages: dict[str, StageConfig] = {}
    copies: dict[str, str] = {}
    rounds: dict[str, list[str]] = {}
    for name, stage in exp.stages.items():
        stages[name] = stage
        if stage.rounds == 1:
            continue
        sampler = exp.stages.get(stage.from_)
        if sampler is None or sampler.generate is None:
            _fail(source, f"stages.{name}.rounds", f"each round trains on pairs from the round before, so 'from' must "
                                                    f"be a generate stage; '{stage.from_}' is not one")
        drawn_from = sampler.generate
        if stage.round_prompts == "next" and drawn_from.limit is None:
            _fail(source, f"stages.{name}.round_prompts", f"'next' takes the next `limit` prompts each round; set "
                                                           f"stages.{stage.from_}.generate.limit (prompts per round)")
        rounds[name] = [name]
        for k in range(2, stage.rounds + 1):
            drawn, trained = f"{name}_round{k}_{stage.from_}", f"{name}_round{k}"
            for new in (drawn, trained):
                if new in exp.stages:
                    _fail(source, f"stages.{new}", f"round {k} of stage '{name}' has this name; rename this stage")
            offset = drawn_from.offset + (k - 1) * drawn_from.limit if stage.round_prompts == "next" \
                else drawn_from.offset
            stages[drawn] = _stage_like(sampler, from_=rounds[name][-1],
                                        generate=replace(drawn_from, seed=drawn_from.seed + k - 1, offset=offset))
            stages[trained] = _stage_like(stage, from_=drawn, rounds=1, pairing="match")
            copies.update({drawn: stage.from_, trained: name})
            rounds[name].append(trained)
    for name, stage in stages.items():
        if name in copies or not set(stage.parents) & set(rounds):
            continue
        if stage.kind == "trainer":
            stages[name] = _stage_like(stage, from_=rounds[stage.from_][-1])
        else:
            stages[name] = _stage_like(stage, from_=[r for p in stage.parents for r in rounds.get(p, [p])])
    return (replace(exp, stages=stages) if copies else exp), copies


def _stage_like(stage: StageConfig, **changes) -> StageConfig:
    """A copy of ``stage`` with ``changes`` (by field name), validated as the file's stages are."""
    data = to_dict(stage)  # the file's key names: ``from``, not ``from_``
    for key, value in changes.items():
        data[StageConfig.__pydantic_fields__[key].alias or key] = to_dict(value) if is_dataclass(value) else value
    return validate_as(StageConfig, data)


def _matching_point(points: list[dict[str, Any]], parent: Run, source: Path, where: str) -> dict[str, Any]:
    """The grid point that agrees with ``parent``'s grid values on the keys both have."""
    found = [p for p in points if all(parent.grid_values.get(key, value) == value for key, value in p.items())]
    if len(found) != 1:
        values = grid_label(parent.grid_values.items()) or "no grid values"
        _fail(source, where, f"pairing = 'match': run {parent.run_id} ({values}) agrees with {len(found)} of the "
                             f"{len(points)} grid points; it needs exactly one")
    return found[0]


def start_model(parent: Optional[Run]) -> Optional[str]:
    """The model a run ``from`` ``parent`` starts from: the parent's, or for a generate stage's run
    the model that drew its pairs."""
    if parent is None:
        return None
    return parent.config["model"] if parent.role == "generate" else str(parent.run_dir)


def ancestor_in(run: Run, stage: str, runs: list[Run]) -> Optional[Run]:
    """The nearest run of ``stage`` that ``run`` descends from (not ``run`` itself)."""
    by_id = {r.run_id: r for r in runs}
    node = by_id.get(run.parent or "")
    while node is not None and node.stage != stage:
        node = by_id.get(node.parent or "")
    return node


def _refuse_reward_models(parents: list[Optional[Run]], source: Path, where: str, needs: str) -> None:
    for parent in parents:
        if parent is not None and parent.role == "train" and ALGORITHMS[parent.trainer].model == "reward_model":
            _fail(source, where, f"stage '{parent.stage}' trains a reward model, and {needs}; "
                                 "start from a policy's stage")


def evaluation_runs(name: str, stage: StageConfig, by_stage: dict[str, list[Run]], runs: list[Run],
                    source: Path) -> list[Run]:
    """One scoring per run of the ``from`` stages, into ``<run dir>/evaluations/<name>/``; its id
    comes from what it scores and how (not from the report-only keys)."""
    section = to_dict(stage.evaluate)
    where = f"stages.{name}.evaluate"
    compared = section["compare_to"]
    if compared is not None and compared not in by_stage and "." in compared:  # STAGE.VARIANT
        compared, _, variant = compared.rpartition(".")
        if compared in by_stage and not any(r.grid_values.get(VARIANT) == variant for r in by_stage[compared]):
            _fail(source, f"{where}.compare_to", f"stage '{compared}' has no variant '{variant}'")
    for key, value in (("baseline", section["baseline"]), ("compare_to", compared)):
        if value is not None and value not in by_stage:
            _fail(source, f"{where}.{key}", f"unknown stage '{value}'; stages are {', '.join(by_stage)}")
    if compared is not None and compared not in stage.parents:
        _fail(source, f"{where}.compare_to", f"'{compared}' is not scored here; from = {stage.parents}")
    judges = _judge_stage(section["reward_model"], by_stage, source, where)
    out: list[Run] = []
    for target in _policy_runs(name, stage, by_stage, source, "scoring answers a policy (a causal LM) generates"):
        baseline = ancestor_in(target, section["baseline"], runs) if section["baseline"] else None
        judge = _judge_of(target, judges, runs, source, f"{where}.reward_model") if judges is not None else None
        parent = next(r for r in runs if r.run_id == target.parent) if target.parent else None
        config = {"evaluate": section, "target": str(target.run_dir),
                  "baseline": str(baseline.run_dir) if baseline else None,
                  "baseline_is_start": baseline is not None and str(baseline.run_dir) == start_model(parent),
                  "reward_model": str(judge.run_dir) if judge else section["reward_model"]}
        identity = {k: v for k, v in to_identity(stage.evaluate).items() if k not in EVALUATION_REPORT_ONLY}
        blob = json.dumps({"evaluate": identity, "target": target.run_id, "baseline": baseline.run_id if baseline
                           else None, **({"judge": judge.run_id} if judge else {})}, sort_keys=True, default=str)
        out.append(Run(stage=name, index=len(out), run_id=f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}",
                       trainer="evaluate", grid_values=target.grid_values, parent=target.run_id, config=config,
                       run_dir=target.run_dir / EVALUATIONS / name, role="evaluate",
                       judge=judge.run_id if judge else None))
    if section["baseline"] and not any(r.config["baseline"] for r in out):
        _fail(source, f"{where}.baseline", f"no scored run descends from stage '{section['baseline']}'")
    return out


def generation_runs(name: str, stage: StageConfig, by_stage: dict[str, list[Run]], runs: list[Run], source: Path,
                    root: Path) -> list[Run]:
    """One set of pairs per run of the ``from`` stages, sampled from its model into
    ``<root>/<stage>/<id>/``; its id comes from the model's run, the judge and the settings."""
    section = to_dict(stage.generate)
    where = f"stages.{name}.generate"
    judges = _judge_stage(section["reward_model"], by_stage, source, where)
    settings = {k: v for k, v in to_identity(stage.generate).items() if k != "reward_model"}  # defaults vanish
    out: list[Run] = []
    for model in _policy_runs(name, stage, by_stage, source, "sampling needs a policy (a causal LM)"):
        judge = _judge_of(model, judges, runs, source, f"{where}.reward_model") if judges is not None else None
        blob = json.dumps({"generate": settings, "model": model.run_id,
                           "judge": judge.run_id if judge else section["reward_model"]}, sort_keys=True, default=str)
        run_id = f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"
        config = {"generate": {**section, "reward_model": str(judge.run_dir) if judge else section["reward_model"]},
                  "model": str(model.run_dir)}
        out.append(Run(stage=name, index=len(out), run_id=run_id, trainer="generate", grid_values=model.grid_values,
                       parent=model.run_id, config=config, run_dir=root / name / run_id, role="generate",
                       judge=judge.run_id if judge else None))
    return out


def _judge_stage(reward_model: Optional[str], by_stage: dict[str, list[Run]], source: Path,
                 where: str) -> Optional[list[Run]]:
    """The runs of the reward stage ``reward_model`` names; None when it names a folder (or nothing)."""
    judges = by_stage.get(reward_model or "")
    if judges is not None and not all(ALGORITHMS[r.trainer].model == "reward_model" for r in judges):
        _fail(source, f"{where}.reward_model", f"stage '{reward_model}' trains no reward model; name a "
                                               "stage with trainer = \"reward\" (or a reward model's folder)")
    return judges


def _policy_runs(name: str, stage: StageConfig, by_stage: dict[str, list[Run]], source: Path, needs: str) -> list[Run]:
    """The training runs of the stages an evaluate or generate stage reads (refusing other stages)."""
    found: list[Run] = []
    for parent_stage in stage.parents:
        role = by_stage[parent_stage][0].role if by_stage[parent_stage] else "train"
        if role != "train":
            _fail(source, f"stages.{name}.from", f"'{parent_stage}' is {'an' if role[0] in 'aeiou' else 'a'} {role} "
                                                 "stage; name training stages")
        _refuse_reward_models(by_stage[parent_stage], source, f"stages.{name}.from", needs)
        found += by_stage[parent_stage]
    return found


def _judge_of(target: Run, judges: list[Run], runs: list[Run], source: Path, where: str) -> Run:
    """The reward stage's run that scores ``target``: its only run, else the one that starts from an
    ancestor of ``target`` (the reward model trained from the scored run's SFT model)."""
    if len(judges) == 1:
        return judges[0]
    by_id, ancestors, node = {r.run_id: r for r in runs}, set(), target
    while node is not None:
        ancestors.add(node.run_id)
        node = by_id.get(node.parent or "")
    related = [j for j in judges if j.parent in ancestors]
    if len(related) != 1:
        _fail(source, where, f"{len(judges)} reward models, and {len(related)} of them start from an ancestor of "
                             f"{target.run_id}; give the reward stage one run, or one per model it could score")
    return related[0]


def with_reference_passes(runs: list[Run], root: Path) -> list[Run]:
    """``runs`` with one reference pass per group of two or more runs of the experiment, in any
    stages, that precompute the same reference table (a lone run computes its own): the pass sits
    before its first reader, belongs to that reader's stage, and every reader waits for it. The
    pass id names the parent by its id and the experiment's cache relative to the root, so a moved
    experiment keeps its ids."""
    run_dirs = {r.run_id: str(r.run_dir) for r in runs}
    groups: dict[str, list[Run]] = {}
    for run in runs:
        if run.role != "train":
            continue
        algo = ALGORITHMS[run.trainer]
        training = run.config.get(algo.training_section, {})
        reference_free = (algo.kind == "preference" and "loss_type" in training
                          and is_reference_free(training["loss_type"]))
        if training.get("precompute_ref_log_probs") and not reference_free:
            parent_dir = run_dirs.get(run.parent or "")
            inputs = {key: "<parent>" if parent_dir and run.config.get(key) == parent_dir else run.config.get(key)
                      for key in REFERENCE_INPUTS}
            inputs["dataset"] = {k: v for k, v in inputs["dataset"].items() if k != "cache_dir"}  # a location
            cache = training.get("ref_log_probs_cache")
            inputs.update(parent=run.parent, cache=SHARED_REF_LOG_PROBS if cache == str(root / SHARED_REF_LOG_PROBS)
                          else cache)
            if training.get("ld_alpha") is not None:  # LD-DPO's weights are in the table's sums
                inputs["ld_alpha"] = training["ld_alpha"]
            if algo.kind == "unpaired":  # KTO's KL completions pair the examples by these
                inputs["kl_pairing"] = {key: training.get(key) for key in ("seed", "batch_size", "eval_batch_size")}
            groups.setdefault(json.dumps(inputs, sort_keys=True, default=str), []).append(run)
    pass_before: dict[str, Run] = {}
    reads: dict[str, str] = {}
    per_stage: dict[str, int] = {}
    for key, members in groups.items():
        if len(members) < 2:
            continue
        first = members[0]
        section = ALGORITHMS[first.trainer].training_section
        pass_id = f"{first.stage}-ref-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
        run_dir = root / REFERENCE_PASSES / pass_id
        config = copy.deepcopy(first.config)
        config[section]["save_dir"] = str(run_dir)
        index = per_stage[first.stage] = per_stage.get(first.stage, -1) + 1
        pass_before[first.run_id] = Run(stage=first.stage, index=index, run_id=pass_id, trainer=first.trainer,
                                        grid_values={}, parent=first.parent, config=config, run_dir=run_dir,
                                        role="reference")
        reads.update((m.run_id, pass_id) for m in members)
    out: list[Run] = []
    for run in runs:
        if run.run_id in pass_before:
            out.append(pass_before[run.run_id])
        out.append(replace(run, ref_pass=reads[run.run_id]) if run.run_id in reads else run)
    return out
