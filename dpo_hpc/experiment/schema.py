"""The experiment file: one TOML that declares stages (trainer + config + parameter grid), how
they chain, and how Slurm runs them. Strict like the trainer configs: unknown keys, wrong types
and out-of-range values are errors naming the key.

    [experiment]            name, output root, seed
    [prepare]               offline assets made on the submit host (tiny model, reversal data)
    [slurm]                 sbatch defaults for every stage (partition, time, GPUs, container ...)
    [stages.NAME]           trainer, config_file and/or inline [stages.NAME.config], from, pairing, rounds
    [stages.NAME.slurm]     per-stage overrides of [slurm]
    [stages.NAME.grid]      "dotted.config.key" = [values ...], expanded as a cartesian product
    [stages.NAME.variants.V]  "dotted.config.key" = value ...: named settings that go together,
                            each crossed with the grid
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator
from pydantic.dataclasses import dataclass

from ..config.registry import TrainerName
from ..config.schema import STRICT

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_TIME = re.compile(r"^(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)$|^(\d+)$")


def time_to_minutes(value: str) -> int:
    """Slurm time ("MM", "HH:MM:SS", "D-HH:MM:SS", "MM:SS") in whole minutes, rounded up."""
    match = _TIME.match(value)
    if not match:
        raise ValueError(f"expected a Slurm time like '90', '01:30:00' or '1-00:00:00', got {value!r}")
    days, hours, minutes, seconds, only_minutes = match.groups()
    if only_minutes is not None:
        return int(only_minutes)
    if hours is None and days is None:  # "MM:SS"
        hours, minutes, seconds = "0", minutes, seconds
    total_s = ((int(days or 0) * 24 + int(hours or 0)) * 60 + int(minutes)) * 60 + int(seconds)
    return max(1, -(-total_s // 60))


@dataclass(config=STRICT, kw_only=True)
class ExperimentSection:
    name: str = Field(pattern=_NAME)
    """Experiment name; runs live under ``<output_root>/<name>/<stage>/<run-id>/``."""
    output_root: str = "runs"
    """Folder for every run of the experiment (relative paths: from the directory of submission)."""
    seed: Optional[int] = None
    """If set, the training seed of every run that does not set its own (``*_training.seed``)."""


@dataclass(config=STRICT, kw_only=True)
class TinyModelAsset:
    dir: str
    """Where ``dpo-hpc make-tiny-model`` writes the random-init tiny Llama and its tokenizer."""
    seed: int = 0
    """Seed of the random initialisation."""


@dataclass(config=STRICT, kw_only=True)
class ReversalDataAsset:
    dir: str
    """Where ``dpo-hpc make-data`` writes train.jsonl / test.jsonl of the verifiable reversal task."""
    n_train: int = Field(4000, ge=1)
    """Preference pairs in train.jsonl."""
    n_test: int = Field(500, ge=0)
    """Held-out prompts with answers in test.jsonl (for ``dpo-hpc evaluate``)."""
    n_dev: int = Field(0, ge=0)
    """More held-out prompts in dev.jsonl, disjoint from test.jsonl: choose settings on these."""
    seed: int = 0
    """Seed of the words, mistakes and flips."""
    label_noise: float = Field(0.0, ge=0.0, le=1.0)
    """Fraction of pairs with chosen and rejected swapped."""
    multi_turn_ratio: float = Field(0.2, ge=0.0, le=1.0)
    """Fraction of rows with one solved exchange before the asked one."""
    format: Literal["text", "conversational"] = "text"
    """Training rows as HH transcripts, or as TRL's conversational message lists."""


@dataclass(config=STRICT, kw_only=True)
class PrepareSection:
    """Offline assets created on the submit host before anything is submitted (skipped if present)."""

    tiny_model: Optional[TinyModelAsset] = None
    reversal_data: Optional[ReversalDataAsset] = None


@dataclass(config=STRICT, kw_only=True)
class ContainerConfig:
    image: str
    """Apptainer/Singularity image (``.sif``); each rank runs ``apptainer exec --nv IMAGE python ...``."""
    runtime: Literal["apptainer", "singularity"] = "apptainer"
    """The container command."""
    binds: list[str] = Field(default_factory=list)
    """``--bind`` specs (``/scratch`` or ``/host/path:/container/path``); the output root is always bound."""
    nv: bool = True
    """Pass ``--nv`` (GPU driver libraries into the container)."""
    exec_args: list[str] = Field(default_factory=list)
    """Further ``apptainer exec`` arguments (e.g. ``--cleanenv``)."""


@dataclass(config=STRICT, kw_only=True)
class RequeueCaps:
    """Requeues of one Slurm job per cause before the run stops (and waits for a resubmission)."""

    preemption: int = Field(10, ge=0)
    """After the preemption signal before the time limit (USR2; see ``signal_lead_s``)."""
    time_limit: int = Field(10, ge=0)
    """After the signal that the time limit is near."""
    failure: int = Field(2, ge=0)
    """After an unexpected failure (a node or network fault; never bad input, a full disk or out
    of memory), each needing progress since the previous requeue."""


REQUEUE_CAUSES = {name: field.default for name, field in RequeueCaps.__pydantic_fields__.items()}
"""Cause -> default cap."""


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_KEY_NAMES = {"sbatch": (r"[a-z][a-z0-9-]*", "an sbatch long option name (like mail-type or exclusive)"),
              "env": (r"[A-Za-z_][A-Za-z0-9_]*", "an environment variable name")}
"""What the keys of the ``[slurm]`` tables must look like: they become ``--option`` and ``export NAME``."""


def _strings(value: Any):
    """Every string in a value (keys of tables too)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)
    elif dataclasses.is_dataclass(value):
        for field in dataclasses.fields(value):
            yield from _strings(getattr(value, field.name))


def _slurm(default=None, *, to: str, **constraints):
    """A ``[slurm]`` key and where its value goes (``dpo_hpc.launch.sbatch`` dispatches on it):
    ``submitit`` (the submitit parameter of the same name), ``submitit:NAME`` (another name),
    ``env`` / ``setup`` (lines of the batch script), ``sbatch`` (extra ``#SBATCH`` options),
    ``python`` (the interpreter command of each rank) or ``task`` (the array task's own settings)."""
    return Field(default, json_schema_extra={"to": to}, **constraints)


@dataclass(config=STRICT, kw_only=True)
class SlurmConfig:
    """sbatch settings. Every key is optional; per-stage tables override the experiment's. Each key
    declares where it goes (``_slurm(to=...)``), so a new key cannot be validated and then dropped."""

    partition: Optional[str] = _slurm(to="submitit")
    """``--partition`` (default: the cluster's default partition)."""
    account: Optional[str] = _slurm(to="submitit")
    """``--account`` to charge."""
    qos: Optional[str] = _slurm(to="submitit")
    """``--qos``."""
    time: Optional[str] = _slurm(to="submitit")
    """Time limit per array task (``90``, ``04:00:00``, ``1-00:00:00``); default 60 minutes."""
    nodes: Optional[int] = _slurm(to="submitit", ge=1)
    """Nodes per array task (default 1)."""
    gpus_per_node: Optional[int] = _slurm(to="submitit", ge=0)
    """GPUs per node (default 0)."""
    ntasks_per_node: Optional[int] = _slurm(to="submitit", ge=1)
    """Ranks per node, one srun task each (default: gpus_per_node, at least 1)."""
    cpus_per_task: Optional[int] = _slurm(to="submitit", ge=1)
    """``--cpus-per-task`` per rank; also the rank's torch thread count."""
    mem: Optional[str] = _slurm(to="submitit", pattern=r"^\d+[KMGT]?$")
    """Memory per node, sbatch syntax (``64G``)."""
    constraint: Optional[str] = _slurm(to="submitit")
    """``--constraint`` (node features, e.g. ``a100``)."""
    exclude: Optional[str] = _slurm(to="submitit")
    """``--exclude`` nodes."""
    array_parallelism: Optional[int] = _slurm(to="submitit", ge=1)
    """At most this many tasks of a stage's array run at once (``--array=0-N%P``; default 64)."""
    signal_lead_s: Optional[int] = _slurm(to="submitit:signal_delay_s", ge=10)
    """``--signal=USR2@LEAD``: warn this long before the time limit; size it for one step plus one checkpoint (default 180).
    Each task also stops by itself this long before its job's end time (longer once a step and a save are measured)."""
    max_requeues: Optional[Union[int, RequeueCaps]] = _slurm(to="task")
    """Requeues per Slurm job and cause before the run stops: a table ``{ preemption = 10,
    time_limit = 10, failure = 2 }`` (the defaults; causes left out keep theirs), or one number
    for every cause. A resubmission starts from zero."""
    sbatch: Optional[dict[str, str]] = _slurm(to="sbatch")
    """Further sbatch options by long name (``{ exclusive = "", mail-type = "END" }``)."""
    setup: Optional[list[str]] = _slurm(to="setup")
    """Shell lines run in the batch script before the ranks start (``module load cuda``)."""
    env: Optional[dict[str, str]] = _slurm(to="env")
    """Environment variables exported in the batch script."""
    container: Optional[ContainerConfig] = _slurm(to="python")
    """Run every rank inside an Apptainer/Singularity image (see ``[slurm.container]``)."""

    @field_validator("time")
    @classmethod
    def _valid_time(cls, value):
        if value is not None:
            time_to_minutes(value)
        return value

    @field_validator("*")
    @classmethod
    def _one_line_each(cls, value):
        """Values become ``#SBATCH`` lines and shell words: a newline would start a line of its own."""
        for text in _strings(value):
            if _CONTROL.search(text):
                raise ValueError(f"{text!r} holds a line break or control character; give it on one line")
        return value

    @field_validator("sbatch", "env")
    @classmethod
    def _table_keys(cls, table, info):
        pattern, what = _KEY_NAMES[info.field_name]
        for name in table or {}:
            if not re.fullmatch(pattern, name):
                raise ValueError(f"'{name}' is not {what}")
        return table


SLURM_DEFAULTS = {"time": "60", "nodes": 1, "gpus_per_node": 0, "array_parallelism": 64, "signal_lead_s": 180,
                  "max_requeues": REQUEUE_CAUSES}


@dataclass(config=STRICT, kw_only=True)
class EvaluationSection:
    """Score the models of earlier stages on held-out prompts: the verifiable task's (``data``),
    greedy answers checked by its exact reward, and the log-prob of the right answer; or each run's
    own validation prompts, greedy replies scored by a reward model (``reward_model``). Each run is
    scored by one task of the stage's array, into ``<run dir>/evaluations/<stage>/``."""

    data: Optional[str] = None
    """Prompts with answers (``test.jsonl`` or ``dev.jsonl`` as ``dpo-hpc make-data`` writes them);
    relative to the experiment file."""
    reward_model: Optional[str] = None
    """Instead of ``data``: a reward stage of this experiment (``trainer = "reward"``; its run that
    shares the scored run's start, or its only run), or a reward model's folder, that scores each
    model's greedy replies to the scored run's validation prompts (mean ``reward``, and the win rate
    against the baseline prompt by prompt). Set ``max_new_tokens`` to the replies' length."""
    baseline: Optional[str] = None
    """A stage the scored runs descend from (``sft``): each run is compared with its own ancestor
    in that stage (win rate, change of the right answer's log-prob)."""
    checkpoints: bool = False
    """Also score every checkpoint the run kept (accuracy against step; ZeRO stages 0-2, whose
    checkpoints hold whole weights). Keep them with ``save_total_limit``."""
    limit: Optional[int] = Field(None, ge=1)
    """Score only the first N prompts."""
    max_new_tokens: int = Field(16, ge=1)
    """Longest greedy answer."""
    batch_size: int = Field(64, ge=1)
    """Prompts per generation batch."""
    compare_to: Optional[str] = None
    """Report only: a scored stage (or one variant of it, ``STAGE.VARIANT``) every other run is
    compared with, run by run where they share grid values (same noise, same seed): the mean
    difference with a 95% interval."""
    average_over: list[str] = Field(default_factory=list)
    """Report only: grid axes averaged in the report's table beside the seeds (``dataset.label_noise``
    to rank settings by their mean over noise levels)."""

    @model_validator(mode="after")
    def _one_judge(self):
        if (self.data is None) == (self.reward_model is None):
            raise ValueError("give data (the verifiable task's prompts, scored exactly) or reward_model (a judge of "
                             "replies to each run's validation prompts), one of the two")
        return self

    @property
    def prompts(self) -> str:
        """Which prompts the stage scores, in words (plans and reports)."""
        return self.data or f"each run's validation split, judged by {self.reward_model}"


@dataclass(config=STRICT, kw_only=True)
class GenerationSection:
    """On-policy preference pairs: ``samples`` completions of every prompt drawn from each run of
    the ``from`` stages, each scored by a reward model or by the verifiable task's exact reward,
    the best against the worst (``dpo-hpc make-pairs``). A training stage ``from`` this stage
    starts from the model that drew them and trains on its pairs."""

    prompts: str
    """The prompts: a hub dataset name or a local file or folder (relative to the experiment file)
    whose rows have a ``prompt`` (a string, or messages rendered with the chat template) or an HH
    ``chosen`` transcript (its prompt is read)."""
    subset: str = "train"
    """Split expression of ``prompts`` (``train``, ``test``, ``train[:2000]``)."""
    reward_model: Optional[str] = None
    """A reward stage of this experiment (its run that shares the sampled run's start, or its only
    run), or a reward model's folder: it scores each sample (prompt + sample + EOS, as it trained)."""
    verifiable: bool = False
    """Instead of ``reward_model``: the verifiable task's exact reward (``dpo-hpc make-data`` prompts)."""
    samples: int = Field(4, ge=2)
    """Completions drawn per prompt; the highest and the lowest scored make its pair, and a prompt
    whose samples all score alike makes none (counted)."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature (1: the model's own distribution)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: draw from the smallest set of tokens whose probability reaches it (1: all)."""
    top_k: int = Field(0, ge=0)
    """Draw from the k likeliest tokens only (0: no cut; transformers' own default would be 50)."""
    max_new_tokens: int = Field(128, ge=1)
    """Longest sample; one cut there is kept, and counted."""
    max_prompt_length: int = Field(512, ge=1)
    """Longer prompts keep their last tokens, as training truncates them (``keep_end``)."""
    batch_size: int = Field(16, ge=1)
    """Prompts per generation call, and per chunk that a stopped task need not draw again (the
    chunks, and so the draws, depend on it). The stage's ranks share the chunks."""
    limit: Optional[int] = Field(None, ge=1)
    """The first N usable prompts only (after ``offset``)."""
    offset: int = Field(0, ge=0)
    """Skip the first N usable prompts: with ``limit``, a window of the set."""
    seed: int = 0
    """Each chunk's draws come from (seed, chunk): a resumed task draws what an uninterrupted one did."""

    @model_validator(mode="after")
    def _one_judge(self):
        if (self.reward_model is None) == (not self.verifiable):
            raise ValueError("give reward_model (a judge of the samples) or verifiable = true (the verifiable task's "
                             "exact reward), one of the two")
        return self

    @property
    def judged_by(self) -> str:
        return self.reward_model or "the verifiable task's reward"


GENERATION_LOCATIONS = ("prompts", "subset", "reward_model")
"""Keys of a generation that name where things are; its identity holds what they hold instead.
Its other keys are part of it where they differ from their defaults (``config.to_identity``), so
that a key added later keeps the ids of the sets made before."""

EVALUATION_REPORT_ONLY = ("compare_to", "average_over")
"""Keys of [stages.X.evaluate] that change the report, not the scores (not part of a run's id)."""


def _flat(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


@dataclass(config=STRICT, kw_only=True)
class StageConfig:
    trainer: Optional[TrainerName] = None
    """The trainer every run of the stage uses (or give ``evaluate`` or ``generate`` instead)."""
    evaluate: Optional[EvaluationSection] = None
    """Instead of a trainer: score every run of the ``from`` stages (see ``[stages.X.evaluate]``)."""
    generate: Optional[GenerationSection] = None
    """Instead of a trainer: preference pairs sampled from every run of the ``from`` stages (see
    ``[stages.X.generate]``)."""
    config_file: Optional[str] = None
    """A trainer config file (TOML/YAML/JSON, the trainer CLIs' format); relative to the experiment file."""
    config: dict[str, Any] = Field(default_factory=dict)
    """Trainer config as an inline table, merged over ``config_file`` (same keys and sections)."""
    from_: Optional[Union[str, list[str]]] = Field(None, alias="from")
    """Stage whose saved models become this stage's ``policy_name`` and ``ref_name`` (a generate
    stage: the model that drew its pairs, and the pairs become ``dataset.dataset_name``); for an
    ``evaluate`` or ``generate`` stage, the stage or list of stages whose runs it scores or samples."""
    pairing: Literal["cross", "zip", "match"] = "cross"
    """With ``from``: every parent run x every grid point (cross), parent i with grid point i (zip),
    or each parent run with the grid point that equals its grid values on the keys both have
    (match: a seed sweep continued seed by seed)."""
    rounds: int = Field(1, ge=1)
    """A training stage ``from`` a generate stage: train on pairs from the model before, then draw
    pairs from the model just trained, this many times (iterative DPO). Round k (from 2) adds stages
    ``<name>_round<k>_<generate stage>`` (its settings, seed + k - 1) and ``<name>_round<k>`` (each
    run continues its own run of round k - 1, grid values kept)."""
    round_prompts: Literal["same", "next"] = "same"
    """With ``rounds``: every round samples the generate stage's prompts (same), or round k the
    k-th ``limit`` of them (next: fresh prompts each round, a prompt set split by round)."""
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    """``"section.key" = [values]``; the stage runs once per combination (cartesian product)."""
    variants: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Named sets of settings that go together (``[stages.X.variants.NAME]``, ``"section.key" =
    value``), e.g. a loss with its own beta and options; each variant is crossed with the grid, and
    its name is the runs' ``variant`` grid value."""
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)

    @property
    def parents(self) -> list[str]:
        """The stages this one starts from (a trainer stage has at most one)."""
        return [self.from_] if isinstance(self.from_, str) else list(self.from_ or [])

    @field_validator("grid")
    @classmethod
    def _non_empty_axes(cls, grid):
        for key, values in grid.items():
            if not values:
                raise ValueError(f"grid axis '{key}' is empty; give at least one value")
        return grid

    @field_validator("variants")
    @classmethod
    def _named_and_set(cls, variants):
        """Each variant's settings as dotted keys, however the TOML wrote them (``"a.b" = 1``, or
        ``a.b = 1`` and ``a = { b = 1 }``, which are nested tables)."""
        for name, settings in variants.items():
            if not re.match(_NAME, name):
                raise ValueError(f"variant name '{name}' must be letters, digits, '_', '.' or '-'")
            if not settings:
                raise ValueError(f"variant '{name}' sets nothing; give it \"section.key\" = value entries")
        return {name: _flat(settings) for name, settings in variants.items()}

    @property
    def kind(self) -> str:
        """``trainer``, ``evaluate`` or ``generate``: what the stage's runs do."""
        return "evaluate" if self.evaluate is not None else "generate" if self.generate is not None else "trainer"

    @model_validator(mode="after")
    def _has_config(self):
        kinds = [k for k in ("trainer", "evaluate", "generate") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give one of 'trainer' (a training stage), 'evaluate' (a stage that scores runs) or "
                             f"'generate' (a stage that samples preference pairs from runs); got {kinds or 'none'}")
        if self.kind != "trainer":
            does = {"evaluate": "scores", "generate": "samples from"}[self.kind]
            a = "an" if self.kind == "evaluate" else "a"
            given = [k for k, v in (("config", self.config), ("config_file", self.config_file), ("grid", self.grid),
                                    ("variants", self.variants)) if v]
            if given or self.pairing != "cross":
                raise ValueError(f"{a} {self.kind} stage takes no {', '.join(given) or 'pairing'}; it {does} the runs "
                                 "of 'from'")
            if not self.parents:
                raise ValueError(f"{a} {self.kind} stage needs 'from': the stage (or list of stages) whose runs it "
                                 f"{does}")
        elif isinstance(self.from_, list):
            raise ValueError("a training stage starts from one stage: give 'from' as a string")
        if self.pairing != "cross" and self.from_ is None:
            raise ValueError(f"pairing = '{self.pairing}' needs 'from'")
        if self.rounds > 1 and (self.kind != "trainer" or self.from_ is None):
            raise ValueError("rounds: only a training stage 'from' a generate stage iterates (pairs from its "
                             "models each round)")
        for name, settings in self.variants.items():
            both = sorted(set(settings) & set(self.grid))
            if both:
                raise ValueError(f"variant '{name}' sets {both[0]}, which the grid varies; set it in one of them")
        return self

    @property
    def varied_keys(self) -> set[str]:
        """The config keys the grid or a variant sets (``--set`` may not change them)."""
        return set(self.grid).union(*self.variants.values())


@dataclass(config=STRICT, kw_only=True)
class ExperimentConfig:
    experiment: ExperimentSection
    stages: dict[str, StageConfig]
    defaults: dict[str, Any] = Field(default_factory=dict)
    """Trainer config keys merged under every stage's config (a stage's config_file and config win):
    the dataset, precision or DeepSpeed settings all stages share. A training section here
    (``sft_training``, ``dpo_training``) reaches only the stages whose trainer has it; ``training``
    reaches every stage's."""
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)
    prepare: PrepareSection = Field(default_factory=PrepareSection)

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, stages):
        if not stages:
            raise ValueError("declare at least one [stages.NAME] table")
        for name in stages:
            if not re.match(_NAME, name):
                raise ValueError(f"stage name {name!r} must be letters, digits, '_', '-' or '.'")
        return stages
