"""Raw rows -> tokenized, keyed examples: split, parse, tokenize, count every drop.

Every example carries ``example_id``, a hash of its source row's content, and every split is an
``ExampleSet`` that carries its fingerprint (a hash of its rows' ids in order and of the
tokenization settings): what caches (reference log-probs) and resume checks key on. Dropped rows
are counted by reason, with the dataset positions of the first few, so a researcher can find them;
the report is printed by the trainer and written to the run directory. A split with no usable
row is an error naming the dataset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..config import DatasetConfig
from ..fsutil import atomic_write_json
from .cache import SplitCache, tokenizer_identity
from .formats import DROP_REASONS, RowParser
from .sources import DataError, MixedRows, as_dataset, load_raw
from .hh import LabelledCompletion
from .tokenize import (BatchEncodings, SpecialTokens, TokenizedCompletion, TokenizedPair, texts_encoded,
                       tokenize_completion, tokenize_conversation, tokenize_pair, unpaired)


SHOWN_DROPS = 3
"""Dataset positions kept per drop reason: enough to find the pattern, few enough for a log line."""


@dataclass
class SplitReport:
    rows: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)  # rows kept but altered (truncated, boundary merge)
    dropped_rows: dict[str, list[int]] = field(default_factory=dict)
    """Per reason, the positions (0-based, as ``dataset[i]``; a JSONL file's line i + 1) of its first rows."""
    kept_by_source: Counter = field(default_factory=Counter)
    """In a mixture (``dataset.mix``): the rows kept of each source, by dataset name."""

    @classmethod
    def of(cls, saved: dict[str, Any]) -> "SplitReport":
        """The report ``as_dict`` wrote."""
        return cls(saved["rows"], saved["kept"], Counter(saved["dropped"]), Counter(saved["notes"]),
                   {reason: list(rows) for reason, rows in saved.get("dropped_rows", {}).items()},
                   Counter(saved.get("kept_by_source", {})))

    def keep(self, position) -> None:
        self.kept += 1
        if isinstance(position, str):  # a mixture's row, named ``name[index]``
            self.kept_by_source[position.rsplit("[", 1)[0]] += 1

    def drop(self, reason: str, position: int) -> None:
        self.dropped[reason] += 1
        shown = self.dropped_rows.setdefault(reason, [])
        if len(shown) < SHOWN_DROPS:
            shown.append(position)

    def as_dict(self) -> dict[str, Any]:
        known = [r for r in DROP_REASONS if self.dropped[r]]
        ordered = {r: self.dropped[r] for r in known + sorted(set(self.dropped) - set(DROP_REASONS))}
        saved = {"rows": self.rows, "kept": self.kept, "dropped": ordered,
                 "dropped_rows": {r: self.dropped_rows.get(r, []) for r in ordered},
                 "notes": dict(sorted(self.notes.items()))}
        if self.kept_by_source:
            saved["kept_by_source"] = dict(self.kept_by_source)
        return saved

    def line(self) -> str:
        def shown(reason: str, count: int) -> str:
            positions = self.dropped_rows.get(reason) or []
            more = ", ..." if count > len(positions) else ""
            return f" (row{'s' if count > 1 else ''} {', '.join(map(str, positions))}{more})" if positions else ""

        drops = ", ".join(f"{k}={v}{shown(k, v)}" for k, v in self.as_dict()["dropped"].items()) or "none"
        notes = ", ".join(f"{k}={v}" for k, v in sorted(self.notes.items()))
        return f"{self.kept}/{self.rows} rows kept; dropped: {drops}" + (f"; {notes}" if notes else "")


class ExampleSet(list):
    """The tokenized examples of one split, with the split's fingerprint."""

    def __init__(self, examples: list, fingerprint: str):
        super().__init__(examples)
        self.fingerprint = fingerprint


def row_id(row: dict[str, Any]) -> str:
    """A stable id of a raw row: the hash of its content (the same row has the same id in any file)."""
    blob = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fingerprint(ids: list[str], settings: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for rid in ids:
        digest.update(rid.encode())
    return digest.hexdigest()[:16]


def split_indices(n: int, val_ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/validation index split; at least one validation row when val_ratio > 0."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = 0 if val_ratio == 0 or n < 2 else min(n - 1, max(1, int(round(val_ratio * n))))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def is_flipped(example_id: str, label_noise: float, seed: int) -> bool:
    """Whether ``label_noise`` swaps this pair: a uniform draw from the row's content id and the
    seed (so a pair flipped at one noise level is flipped at every higher one)."""
    if label_noise <= 0.0:
        return False
    draw = int.from_bytes(hashlib.sha256(f"{seed}:{example_id}".encode()).digest()[:8], "big") / 2.0 ** 64
    return draw < label_noise


def flipped(example: TokenizedPair | TokenizedCompletion) -> TokenizedPair | TokenizedCompletion:
    """The pair with chosen and rejected swapped (a labelled completion with its label negated),
    under an id of its own (caches key on ids)."""
    if isinstance(example, TokenizedCompletion):
        return dataclasses.replace(example, label=not example.label, example_id=f"{example.example_id}~flipped")
    return dataclasses.replace(example, chosen_ids=example.rejected_ids, rejected_ids=example.chosen_ids,
                               example_id=f"{example.example_id}~flipped")


BLOCK_ROWS = 1024
"""Rows parsed, then tokenized in one batched call: enough to keep every core busy."""

PROGRESS_EVERY_S = 15.0
"""A progress line while a split is tokenized for longer than this (a large dataset takes minutes)."""


@contextlib.contextmanager
def tokenizer_threads():
    """A fast tokenizer's own threads on while the data is tokenized (every core the job has;
    TOKENIZERS_PARALLELISM, when set, is obeyed), and off after it: processes forked later (compile
    workers, launchers) must not inherit them."""
    if "TOKENIZERS_PARALLELISM" in os.environ:
        yield
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _blocks(ds):
    """The rows of ``ds`` as dicts, BLOCK_ROWS at a time."""
    if isinstance(ds, MixedRows):
        yield from ds.blocks(BLOCK_ROWS)
        return
    for batch in ds.iter(batch_size=BLOCK_ROWS):
        keys = list(batch)
        yield [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]


@dataclass
class SplitReader:
    """How each split of one dataset is read: parsed, tokenized and counted, or found in the cache."""

    parse: RowParser
    tokenizer: Any
    encode: Callable
    """``encode(encoder, parsed, notes)``: one parsed row -> (example, None) or (None, drop reason)."""
    name: str
    settings: dict[str, Any]
    flip: Callable[[str], bool]
    say: Callable[[str], None]
    cache: Optional[SplitCache] = None
    examples_of: Callable[[Any], tuple] = lambda example: (example,)
    """A kept row's examples (KTO's: a pair's two sides)."""

    def read(self, ds, positions, split: str) -> tuple[ExampleSet, SplitReport]:
        """``positions[i]``: where ``ds``'s row i sits in the dataset as the researcher sees it (its
        index, or in a mixture ``name[index]``)."""
        if self.cache is None:
            return self.tokenize(ds, positions, split)
        ids = [row_id(row) for block in _blocks(ds) for row in block]
        split_fingerprint = fingerprint(ids, {**self.settings, "split": split})
        found = self.cache.load(split_fingerprint)
        if found is not None:
            self.say(f"data {split}: {len(found[0]):,} tokenized examples read from "
                     f"{self.cache.path(split_fingerprint)}")
            return ExampleSet(found[0], split_fingerprint), SplitReport.of(found[1])
        examples, report = self.tokenize(ds, positions, split, ids)
        try:
            self.cache.save(split_fingerprint, examples, report.as_dict())
        except OSError as exc:  # a full or read-only cache folder costs the next start time, not this run
            self.say(f"note: the tokenized {split} split was not cached ({type(exc).__name__}: {exc})")
        return examples, report

    def tokenize(self, ds, positions, split: str, ids: Optional[list[str]] = None) -> tuple[ExampleSet, SplitReport]:
        """Every row parsed, then each block tokenized in one batched call; ``ids``: the rows' ids
        when already known."""
        report = SplitReport()
        examples, known = [], ids is not None
        ids = ids if known else []
        started = last_said = time.monotonic()
        for rows in _blocks(ds):
            parsed_rows = [self.parse(row, _position(positions[report.rows + i])) for i, row in enumerate(rows)]
            texts = [text for parsed, _ in parsed_rows if parsed is not None for text in texts_encoded(parsed)]
            encoder = BatchEncodings(self.tokenizer, texts, offsets=self.parse.kind == "sft")
            for row, (parsed, reason) in zip(rows, parsed_rows):
                if not known:
                    ids.append(row_id(row))
                position, example_id = _position(positions[report.rows]), ids[report.rows]
                report.rows += 1
                if parsed is not None:
                    example, reason = self.encode(encoder, parsed, report.notes)
                    if example is not None:
                        example = dataclasses.replace(example, example_id=example_id)
                        if self.flip(example_id):
                            example = flipped(example)
                            report.notes["label_flipped"] += 1
                        examples.extend(self.examples_of(example))
                        report.keep(position)
                        continue
                report.drop(reason, position)
            if time.monotonic() - last_said >= PROGRESS_EVERY_S and report.rows < len(ds):
                last_said, rate = time.monotonic(), report.rows / (time.monotonic() - started)
                self.say(f"tokenizing {split}: {report.rows:,}/{len(ds):,} rows ({report.rows / len(ds):.0%}), "
                         f"{rate:,.0f} rows/s, eta {(len(ds) - report.rows) / rate:.0f} s")
        if report.rows and not examples:
            raise DataError(f"dataset '{self.name}' ({split} split): 0 usable rows out of {report.rows}; "
                            f"{report.line()}; {self.parse.expected()}")
        return ExampleSet(examples, fingerprint(ids, {**self.settings, "split": split})), report


def _position(where):
    return where if isinstance(where, str) else int(where)  # numpy ints are not JSON


def mapped_columns(ds, columns: dict[str, str], kind: str, name: str, key: str = "dataset.columns"):
    """The rows under the names the parsers read (``columns``: ``dataset.columns``, or a mix source's,
    named ``key``, renames), checked: a missing or clashing column is a DataError naming it."""
    found = set(ds.column_names)
    for ours, theirs in columns.items():
        if theirs not in found:
            raise DataError(f"dataset '{name}': {key}.{ours} = '{theirs}', but there is no column "
                            f"'{theirs}'; found {sorted(found)}")
        if ours in found and ours != theirs and ours not in columns.values():
            raise DataError(f"dataset '{name}': {key}.{ours} = '{theirs}', but the dataset already has a "
                            f"column '{ours}'; map that one too or drop it")
    ds = ds.rename_columns({theirs: ours for ours, theirs in columns.items() if theirs != ours})
    columns = set(ds.column_names)
    needs = {"sft": [("chosen",), ("messages",)], "preference": [("chosen", "rejected")],
             "unpaired": [("prompt", "completion", "label"), ("chosen", "rejected")]}[kind]
    if not any(set(need) <= columns for need in needs):
        wanted = " or ".join(" and ".join(need) for need in needs)
        example = ' = { messages = "conversations" } for ShareGPT rows' if "conversations" in columns else ""
        raise DataError(f"dataset '{name}': expected columns {wanted} (optionally prompt; in HH, text or "
                        f"conversational form); found {sorted(columns)}; map other names with {key}{example}")
    return ds


def with_mix(main, cfg: DatasetConfig, kind: str, split_key: str, say: Callable[[str], None]):
    """``main`` (``dataset_name``'s rows in ``split_key``, columns mapped) as it is, or with the
    rows of each ``dataset.mix`` source in that split joined: its own columns mapped, and of its
    training rows a seeded ``fraction``. Says what each source gave."""
    sources = [(k, s) for k, s in enumerate(cfg.mix) if getattr(s, split_key) is not None]
    if not sources:
        return main
    parts = [(cfg.dataset_name, main, list(range(len(main))))]
    for index, source in sources:
        key = f"dataset.mix[{index}]"
        ds = mapped_columns(load_raw(source, f"{key}.dataset_name", split_key), source.columns, kind,
                            source.dataset_name, f"{key}.columns")
        origin = list(range(len(ds)))
        if split_key == "subset" and source.fraction < 1.0:
            taken = max(1, round(source.fraction * len(ds)))
            origin = sorted(np.random.default_rng([cfg.seed, index]).choice(len(ds), taken, replace=False).tolist())
            ds = ds.select(origin)
        parts.append((source.dataset_name, ds, origin))
        say(f"data mix ({split_key}): {len(ds):,} rows of '{source.dataset_name}' {getattr(source, split_key)}"
            + (f" (a {source.fraction:g} share)" if split_key == "subset" and source.fraction < 1.0 else ""))
    return MixedRows(parts)


def _where(raw, indices) -> list:
    """Each row's place as the data report names it: its index, or in a mixture ``name[index]``."""
    return [raw.label(i) for i in indices] if isinstance(raw, MixedRows) else indices


def load_splits(
    cfg: DatasetConfig, tokenizer, kind: str, assistant_turns: str = "all", train_rows=None, eval_rows=None,
    say: Callable[[str], None] = lambda _: None, margins: bool = False,
) -> tuple[ExampleSet, ExampleSet, dict]:
    """Train and validation examples for ``kind`` ('sft', 'preference' or 'unpaired': KTO's
    labelled completions, a preference row giving two) plus the data report.

    Rows come from ``dataset_name``/``subset``, or from ``train_rows`` (a ``datasets.Dataset`` or a
    list of dicts, as the Python API passes them); ``eval_rows``, if given, is the validation
    split instead of a ``val_ratio`` share of the training rows. ``say`` gets the progress lines.
    ``dataset.mix`` sources join the rows loaded by name (rows passed in are the whole dataset).
    ``margins``: pairs carry their rows' ``margin`` column (a reward model's data).
    """
    mixing = bool(cfg.mix) and train_rows is None
    raw = mapped_columns(load_raw(cfg) if train_rows is None else as_dataset(train_rows), cfg.columns, kind,
                         cfg.dataset_name)
    if mixing:
        raw = with_mix(raw, cfg, kind, "subset", say)
    if cfg.format == "text" and "system" in raw.column_names:
        say(f"note: dataset '{cfg.dataset_name}': its system column is not read: format = 'text' renders no chat "
            "template to put a system message in ('auto' or 'conversational' would)")
    special = SpecialTokens.of(tokenizer)
    parse = RowParser(kind, cfg.format, tokenizer, cfg.dataset_name, cfg.system_prompt, assistant_turns, margins)
    settings: dict[str, Any] = {"kind": kind, "max_length": cfg.max_length, "format": cfg.format,
                                "columns": cfg.columns, "system_prompt": cfg.system_prompt,
                                "truncation_mode": cfg.truncation_mode}
    if margins:  # only then: the fingerprints (and cached splits) of other trainers' data stay as they were
        settings["margins"] = True
    if mixing:  # only then: the fingerprints of unmixed data stay as they were
        settings["mix"] = [dataclasses.asdict(source) for source in cfg.mix]
    if kind == "sft":
        if cfg.label_noise:
            raise DataError(f"dataset '{cfg.dataset_name}': dataset.label_noise = {cfg.label_noise} swaps chosen and "
                            "rejected of preference pairs; SFT trains on chosen replies only; set it to 0")
        settings["assistant_turns"] = assistant_turns

        def encode(encoder, conversation, notes):
            return tokenize_conversation(encoder, conversation, special, cfg.max_length, notes, cfg.truncation_mode)
    else:
        settings["max_prompt_length"] = cfg.max_prompt_length
        if cfg.label_noise:
            settings.update(label_noise=cfg.label_noise, label_noise_seed=cfg.label_noise_seed)

        def encode(encoder, parsed, notes):
            tokenize = tokenize_completion if isinstance(parsed, LabelledCompletion) else tokenize_pair
            return tokenize(encoder, parsed, special, cfg.max_length, cfg.max_prompt_length, notes,
                            cfg.truncation_mode)

    if eval_rows is None and cfg.eval_subset is not None and train_rows is None:
        eval_rows = load_raw(cfg, split_key="eval_subset")
    split_of_raw = eval_rows is None
    if split_of_raw:
        train_idx, val_idx = split_indices(len(raw), cfg.val_ratio, cfg.seed)
        train_raw, val_raw = raw.select(train_idx), raw.select(val_idx)
        train_where, val_where = _where(raw, train_idx), _where(raw, val_idx)
    else:
        train_raw = raw
        val_raw = mapped_columns(as_dataset(eval_rows), cfg.columns, kind, f"{cfg.dataset_name} (eval)")
        if mixing:
            val_raw = with_mix(val_raw, cfg, kind, "eval_subset", say)
        train_where, val_where = _where(train_raw, range(len(train_raw))), _where(val_raw, range(len(val_raw)))

    def flip(example_id: str) -> bool:  # SFT refused label_noise above, so this is False there
        return is_flipped(example_id, cfg.label_noise, cfg.label_noise_seed)

    identity = tokenizer_identity(tokenizer) if cfg.cache_dir and train_rows is None else None
    reader = SplitReader(parse, tokenizer, encode, cfg.dataset_name, settings, flip, say,
                         SplitCache(cfg.cache_dir, identity) if identity else None,
                         **({"examples_of": unpaired} if kind == "unpaired" else {}))
    with tokenizer_threads():
        train, train_report = reader.read(train_raw, train_where, "train")
        val, val_report = reader.read(val_raw, val_where, "validation")
    report = {
        "dataset_name": cfg.dataset_name,
        "subset": cfg.subset,
        "eval_subset": cfg.eval_subset,
        "train": {**train_report.as_dict(), "fingerprint": train.fingerprint, **labels_of(train, kind)},
        "validation": {**val_report.as_dict(), "fingerprint": val.fingerprint, **labels_of(val, kind)},
    }
    if mixing:
        # the rows counted are the mixture's training split, and under val_ratio its validation rows too
        kept = train_report.kept_by_source + (val_report.kept_by_source if split_of_raw else Counter())
        report["mix"] = [{"dataset_name": name, "rows": len(ds), "kept": kept[name]} for name, ds, _ in raw.parts]
        for source in report["mix"]:  # a source none of whose rows is usable is a mistake, not a share of 0
            if source["rows"] and not source["kept"]:
                raise DataError(f"dataset '{source['dataset_name']}' (in a dataset.mix mixture): 0 usable rows out "
                                f"of {source['rows']}; {parse.expected()}; a source whose columns are named "
                                "otherwise maps them in its own table (columns = { ... })")
    return train, val, report


def with_kl_completions(examples: ExampleSet, partners, max_length: int) -> ExampleSet:
    """KTO's examples, each with its partner's completion (``partners[i]``: the index of example
    i's) as its KL completion, cut to fit ``max_length`` after its prompt (as TRL cuts the
    sequence); the fingerprint stays the rows'."""
    def paired(example, partner):
        cut = max_length - len(example.prompt_ids)
        return dataclasses.replace(example, kl_completion_ids=partner.completion_ids[:cut])

    return ExampleSet([paired(e, examples[int(j)]) for e, j in zip(examples, partners)], examples.fingerprint)


def labels_of(examples: list, kind: str) -> dict[str, int]:
    """KTO's split: how many of its examples are desirable and how many not (the data report's)."""
    if kind != "unpaired":
        return {}
    desirable = sum(e.label for e in examples)
    return {"desirable": desirable, "undesirable": len(examples) - desirable}


def report_lines(report: dict) -> list[str]:
    lines = []
    for split in ("train", "validation"):
        r = SplitReport.of(report[split])
        labels = (f"; {report[split]['desirable']} desirable and {report[split]['undesirable']} undesirable examples"
                  if "desirable" in report[split] else "")
        lines.append(f"data {split}: {r.line()}{labels} (fingerprint {report[split]['fingerprint']})")
    return lines


def write_report(report: dict, path: Path) -> None:
    atomic_write_json(path, report)
