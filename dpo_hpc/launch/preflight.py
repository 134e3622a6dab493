"""Pre-flight: what would fail minutes into a job, checked on the login node before anything is
queued (``validate``, ``submit --dry-run``, ``submit``).

For every run (each distinct input checked once): the dataset resolves and its first rows parse
into usable examples in the configured format (with the tokenizer, for chat templates); the
model and tokenizer resolve (a local folder holds a config; a hub name is in the local cache
when the job runs offline, else the exact command to fetch it) and the policy builds with its
attention implementation; the output root is writable; a
container image exists. A run that starts from another run's model is checked against that run
instead (its folder does not exist yet). Problems are errors (exit 2, one line each); what
cannot be known before the job (a hub dataset the job will download) is a note.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..checkpoint.run_dir import SAVED_MODEL_FILES, RunDir, not_loadable
from ..config import ALGORITHMS, ConfigError, validate_mapping
from ..experiment import Plan
from ..fsutil import blocking_file, existing_ancestor
from .prefetch import looks_local
from .sbatch import stage_slurm

FIRST_ROWS = 32
"""Rows parsed per dataset: enough to catch a wrong format or column, cheap on any dataset."""


@dataclass
class Findings:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _seen: dict[tuple, Any] = field(default_factory=dict)

    def once(self, key: tuple, check) -> Any:
        """Run ``check()`` the first time ``key`` is seen (many runs share their inputs)."""
        if key not in self._seen:
            self._seen[key] = check()
        return self._seen[key]


def _offline(env: dict[str, str]) -> bool:
    return (env.get("HF_HUB_OFFLINE") or os.environ.get("HF_HUB_OFFLINE")) == "1"


def check_model(name: str, what: str, env: dict[str, str], found: Findings, where: str) -> bool:
    """A local folder with a config, or a hub name the job can get; False when it cannot."""
    path = Path(name).expanduser()
    if path.is_dir():
        problem = not_loadable(name, what, SAVED_MODEL_FILES)
        if problem is not None:
            found.problems.append(f"{where}: {problem}")
        return problem is None
    if looks_local(name, "model"):
        found.problems.append(f"{where}: {what} '{name}': no such local folder")
        return False
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return True
    fetch = f"`dpo-hpc prefetch EXPERIMENT` on a login node (or `hf download {name}` with the jobs' HF_HOME)"
    if _offline(env):
        found.problems.append(f"{where}: {what} '{name}' is not in the Hugging Face cache and the job runs with "
                              f"HF_HUB_OFFLINE=1; run {fetch}")
        return False
    found.notes.append(f"{what} '{name}' is not in the local cache: the job will download it (compute nodes are often "
                       f"offline: {fetch} first)")
    return False


def check_data(cfg, trainer: str, tokenizer_name: Optional[str], env: dict[str, str], found: Findings,
               where: str) -> None:
    """The dataset, and each ``dataset.mix`` source, resolves and its first rows parse into usable
    examples."""
    from ..trainers.engine import load_tokenizer

    dataset = cfg.dataset
    kind = ALGORITHMS[trainer].kind
    tokenizer, loaded = None, False
    sources = [(dataset, dataset.columns, "dataset"), *((source, source.columns, f"dataset.mix[{index}]")
                                                         for index, source in enumerate(dataset.mix))]
    for source, columns, key in sources:
        raw = _source_rows(source, columns, key, kind, env, found, where)
        if raw is None:
            continue
        if not loaded and tokenizer_name is not None:
            loaded = True
            try:
                tokenizer = load_tokenizer(tokenizer_name, cfg.trust_remote_code, cfg.pad_token, cfg.chat_template)
            except Exception as exc:  # said in one line
                from ..runtime.failures import explain

                found.problems.append(f"{where}: tokenizer: {explain(exc)}")
                return
        _check_rows(raw, source.dataset_name, cfg, kind, tokenizer, found, where, ALGORITHMS[trainer].reads_margins)


def _source_rows(source, columns: dict[str, str], key: str, kind: str, env: dict[str, str], found: Findings,
                 where: str):
    """A source's training rows, columns mapped (its eval split checked too); None when it is not
    checked here (a hub name) or is wrong (said in ``found``)."""
    from ..data.pipeline import mapped_columns
    from ..data.sources import DataError, load_raw

    path = Path(source.dataset_name).expanduser()
    if not path.exists() and not source.dataset_name.startswith((".", "/", "~")) and not _offline(env):
        found.notes.append(f"dataset '{source.dataset_name}' is not a local path: not checked before the job, which "
                           "loads it from the hub or its cache")
        return None
    try:
        raw = mapped_columns(load_raw(source, f"{key}.dataset_name"), columns, kind, source.dataset_name,
                             f"{key}.columns")
        if source.eval_subset is not None:
            mapped_columns(load_raw(source, f"{key}.dataset_name", split_key="eval_subset"), columns, kind,
                           source.dataset_name, f"{key}.columns")
    except DataError as exc:
        found.problems.append(f"{where}: {exc}")
        return None
    return raw


def _check_rows(raw, name: str, cfg, kind: str, tokenizer, found: Findings, where: str, margins: bool) -> None:
    from ..data.formats import RowParser
    from ..data.sources import DataError

    dataset = cfg.dataset
    parse = RowParser(kind, dataset.format, tokenizer, name, dataset.system_prompt,
                      getattr(cfg.training, "assistant_turns", "all"), margins)
    reasons: dict[str, int] = {}
    rows = raw.select(range(min(FIRST_ROWS, len(raw))))
    usable = 0
    for row in rows:
        if parse.format_of(row) == "conversational" and tokenizer is None:
            found.notes.append(f"dataset '{name}': conversational rows, checked once the tokenizer "
                               "(the parent run's) exists")
            return
        try:
            parsed, reason = parse(row)
        except DataError as exc:
            found.problems.append(f"{where}: {exc}")
            return
        if parsed is not None:
            usable += 1
        else:
            reasons[reason] = reasons.get(reason, 0) + 1
    if len(rows) and not usable:
        drops = ", ".join(f"{k}={v}" for k, v in sorted(reasons.items()))
        found.problems.append(f"{where}: dataset '{name}': none of the first {len(rows)} rows is "
                              f"usable (dropped: {drops}); {parse.expected()}")


def check_model_options(cfg, found: Findings, where: str) -> None:
    """The policy builds with ``attn_implementation`` (Gemma-2 has no sdpa) and has a router where
    ``router_aux_loss_coef`` is set: said here, not after the job waited in the queue."""
    from ..trainers.engine import ATTENTION_PACKAGES
    from ..trainers.engine import check_model as builds

    attention = cfg.attn_implementation
    if attention in ATTENTION_PACKAGES:  # the job's image may hold the package that this host lacks
        if not cfg.router_aux_loss_coef:
            return
        attention = "eager"
    from huggingface_hub import try_to_load_from_cache

    try:
        folder = cfg.policy_name
        if not Path(folder).expanduser().is_dir():  # a hub name: its cached config, with no network call
            folder = os.path.dirname(try_to_load_from_cache(cfg.policy_name, "config.json"))
        builds(folder, attention, cfg.trust_remote_code, cfg.router_aux_loss_coef)
    except ConfigError as exc:
        found.problems.extend(f"{where}: {problem}" for problem in exc.problems)
    except Exception:  # a model that does not load is check_model's to say, or the job's
        pass


def check_writable(folder: Path, found: Findings, where: str) -> None:
    probe = existing_ancestor(folder)
    if blocking_file(folder):
        found.problems.append(f"{where}: {probe} is a file, not a folder; choose another output folder")
        return
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".dpo-hpc-preflight-"):
            pass
    except OSError as exc:
        found.problems.append(f"{where}: cannot write in {probe} ({exc.strerror}); choose a folder you can write to")


def check_config(cfg, trainer: str, found: Findings, where: str, env: Optional[dict[str, str]] = None,
                 models_exist: bool = True, made_later=lambda path: False) -> None:
    """Every input of one trainer config (``models_exist=False``: its models are another run's
    output, not there yet; ``made_later(path)``: a [prepare] asset not made yet)."""
    env = env or {}
    if made_later(cfg.policy_name) or any(made_later(name) for name in cfg.dataset.dataset_names):
        return
    tokenizer = cfg.tokenizer_name or cfg.policy_name
    if models_exist:
        names = {cfg.policy_name: "policy_name"}
        if getattr(cfg, "ref_name", None):
            names.setdefault(cfg.ref_name, "ref_name")
        if cfg.tokenizer_name:
            names.setdefault(cfg.tokenizer_name, "tokenizer_name")
        ok = {name: found.once(("model", name), lambda n=name, w=what: check_model(n, w, env, found, where))
              for name, what in names.items()}
        tokenizer = tokenizer if ok.get(tokenizer) else None
        if ok[cfg.policy_name]:
            found.once(("model options", cfg.policy_name, cfg.attn_implementation, bool(cfg.router_aux_loss_coef)),
                       lambda: check_model_options(cfg, found, where))
    elif not cfg.tokenizer_name:
        tokenizer = None
    dataset_key = ("data", trainer, repr(cfg.dataset), tokenizer, cfg.chat_template)
    found.once(dataset_key, lambda: check_data(cfg, trainer, tokenizer, env, found, where))
    found.once(("writable", existing_ancestor(Path(cfg.training.save_dir))),
               lambda: check_writable(Path(cfg.training.save_dir), found, where))


def check_batch(cfg, trainer: str, ranks: int, found: Findings, where: str) -> None:
    """A ``global_batch_size`` that the stage's ranks (nodes x ntasks_per_node) can share."""
    try:
        cfg.training.accumulation_steps(ranks)
    except ValueError as exc:
        found.problems.append(f"{where}: {ALGORITHMS[trainer].training_section}.{exc} (the stage's nodes x "
                              "ntasks_per_node)")


def check_resumable(cfg, ranks: int, found: Findings, where: str) -> None:
    """A stopped run resubmitted on another shape: its checkpoint's global batch must be what this
    shape gives, or the trainer refuses to resume, once the job starts (maybe hours later)."""
    from ..checkpoint.manager import peek_shared

    run = RunDir(cfg.training.save_dir)
    if (run.read_manifest() or {}).get("status") == "completed":
        return  # not resubmitted
    newest = peek_shared(run.checkpoints, "progress")
    try:
        batch = cfg.training.batch_size * cfg.training.accumulation_steps(ranks) * ranks
    except ValueError:
        return  # check_batch says why
    if newest is not None and newest[1].get("global_batch") not in (None, batch):
        found.problems.append(f"{where}: its checkpoint {newest[0].name} was trained with a global batch of "
                              f"{newest[1]['global_batch']}, which this stage's {ranks} rank(s) (nodes x "
                              f"ntasks_per_node) make {batch}, so it would not resume; give the stage its shape back "
                              "(global_batch_size keeps the global batch on any shape, in a new run)")


def check_plan(plan: Plan, root_only: bool = False) -> Findings:
    """Every run of an experiment, before anything is queued (``root_only``: the output root)."""
    found = Findings()
    found.once(("writable", existing_ancestor(plan.root)), lambda: check_writable(plan.root, found,
                                                                                  "experiment.output_root"))
    if root_only:
        return found
    prepare = plan.experiment.prepare
    assets = [plan.base / a.dir for a in (prepare.tiny_model, prepare.reversal_data) if a is not None]
    pending = [a.resolve() for a in assets if not a.exists()]
    if pending:
        found.notes.append(f"[prepare] makes {', '.join(map(str, pending))} at submission; runs that read them are "
                           "checked then")

    generated = [r.run_dir for r in plan.runs if r.role == "generate"]  # pairs made by the jobs

    def made_later(name: str) -> bool:
        path = (plan.base / name).resolve()
        return any(path == a or a in path.parents for a in pending + generated)

    here = os.getcwd()
    os.chdir(plan.base)  # paths in stage configs are relative to the experiment file's folder
    try:
        for stage in plan.stage_order:
            slurm = stage_slurm(plan, stage)
            container = slurm.get("container")
            if container and not Path(container["image"]).expanduser().exists() and "$" not in container["image"]:
                found.once(("image", container["image"]), lambda: found.problems.append(
                    f"stages.{stage}.slurm.container.image: '{container['image']}' does not exist"))
            copied = stage in plan.copies  # a later round: checked as the stage it copies, whose key the file has
            section = None if copied else plan.experiment.stages[stage].evaluate
            if section is not None and section.data and not Path(section.data).exists() \
                    and not made_later(section.data):
                found.problems.append(f"{plan.source}: stages.{stage}.evaluate.data: '{section.data}' does not exist "
                                      f"(relative to {plan.base}); `dpo-hpc make-data` writes test.jsonl and dev.jsonl")
            generation = None if copied else plan.experiment.stages[stage].generate
            if generation is not None and looks_local(generation.prompts, "dataset") \
                    and not Path(generation.prompts).expanduser().exists() and not made_later(generation.prompts):
                found.problems.append(f"{plan.source}: stages.{stage}.generate.prompts: '{generation.prompts}' does "
                                      f"not exist (relative to {plan.base})")
            judge = (section or generation).reward_model if (section or generation) is not None else None
            if judge and judge not in plan.experiment.stages and not Path(judge).exists() and "/" not in judge:
                kind = plan.experiment.stages[stage].kind
                found.problems.append(f"{plan.source}: stages.{stage}.{kind}.reward_model: "
                                      f"'{judge}' is neither a stage of this experiment "
                                      f"({', '.join(plan.experiment.stages)}) nor a folder (relative to {plan.base})")
            ranks = slurm["nodes"] * slurm["ntasks_per_node"]
            for run in plan.stage_runs(stage):
                cfg = validate_mapping(run.config, run.trainer, source=run.run_id)
                where = f"{plan.source}: stages.{stage} ({run.run_id})"
                check_batch(cfg, run.trainer, ranks, found, where)
                check_resumable(cfg, ranks, found, where)
                check_config(cfg, run.trainer, found, where, slurm.get("env") or {}, models_exist=run.parent is None,
                             made_later=made_later)
    finally:
        os.chdir(here)
    return found
