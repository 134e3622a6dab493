"""Load a preference dataset by hub name or local path, split it, parse and tokenize it.

Every dropped row is counted by reason; the report is printed by the trainer and written to
the run directory. A split with no usable row is an error naming the dataset.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import DatasetConfig
from .hh import DROP_REASONS, parse_preference_row, parse_sft_row
from .tokenize import SpecialTokens, tokenize_conversation, tokenize_pair

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(Exception):
    """The dataset cannot be used; the message names it and says what was expected."""


@dataclass
class SplitReport:
    rows: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)  # rows kept but altered (truncated, boundary merge)

    def as_dict(self) -> dict[str, Any]:
        ordered = {r: self.dropped[r] for r in DROP_REASONS if self.dropped[r]}
        return {"rows": self.rows, "kept": self.kept, "dropped": ordered, "notes": dict(sorted(self.notes.items()))}

    def line(self) -> str:
        drops = ", ".join(f"{k}={v}" for k, v in self.as_dict()["dropped"].items()) or "none"
        notes = ", ".join(f"{k}={v}" for k, v in sorted(self.notes.items()))
        return f"{self.kept}/{self.rows} rows kept; dropped: {drops}" + (f"; {notes}" if notes else "")


def _slice(ds, spec: str):
    """Apply a split spec such as ``train[:30%]`` to an in-memory split (for save_to_disk folders)."""
    import datasets

    name = spec.split("[", 1)[0]
    if "[" not in spec:
        return ds
    absolute = datasets.ReadInstruction.from_spec(spec).to_absolute({name: len(ds)})
    indices = [i for instr in absolute for i in range(instr.from_, instr.to)]
    return ds.select(indices)


def load_raw(cfg: DatasetConfig, source: str = "dataset.dataset_name"):
    """The raw rows named by ``dataset_name`` / ``subset`` as a ``datasets.Dataset``."""
    import datasets

    name, subset = cfg.dataset_name, cfg.subset
    path = Path(name).expanduser()
    try:
        if path.is_file():
            builder = _FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(f"{source}: {path}: unsupported file type; expected one of {', '.join(_FILE_BUILDERS)}")
            if subset.split("[", 1)[0] != "train":
                raise DataError(f"{source}: {path} is a single file, so its only split is 'train'; got subset '{subset}'")
            return datasets.load_dataset(builder, data_files={"train": str(path)}, split=subset)
        if path.is_dir():
            if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
                loaded = datasets.load_from_disk(str(path))
                if isinstance(loaded, datasets.DatasetDict):
                    split_name = subset.split("[", 1)[0]
                    if split_name not in loaded:
                        raise DataError(f"{source}: {path} has splits {sorted(loaded)}; subset asks for '{split_name}'")
                    loaded = loaded[split_name]
                return _slice(loaded, subset)
            return datasets.load_dataset(str(path), split=subset)
        if name.startswith((".", "/", "~")) or name.endswith(tuple(_FILE_BUILDERS)):
            raise DataError(f"{source}: local path '{name}' does not exist")
        return datasets.load_dataset(name, split=subset)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs the name and the cause
        detail = " ".join(str(exc).split())[:400]
        raise DataError(f"{source}: could not load '{name}' (subset '{subset}'): {type(exc).__name__}: {detail}") from exc


def split_indices(n: int, val_ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/validation index split; at least one validation row when val_ratio > 0."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = 0 if val_ratio == 0 or n < 2 else min(n - 1, max(1, int(round(val_ratio * n))))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _process(ds, parse: Callable, encode: Callable, name: str, split: str) -> tuple[list, SplitReport]:
    report = SplitReport()
    examples = []
    for batch in ds.iter(batch_size=1024):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            report.rows += 1
            parsed, reason = parse(dict(zip(keys, values)))
            if parsed is not None:
                example, reason = encode(parsed, report.notes)
                if example is not None:
                    examples.append(example)
                    continue
            report.dropped[reason] += 1
    report.kept = len(examples)
    if report.rows and not examples:
        raise DataError(f"dataset '{name}' ({split} split): 0 usable rows out of {report.rows}; {report.line()}")
    return examples, report


def _check_columns(ds, required: tuple[str, ...], name: str):
    columns = set(ds.column_names)
    if not set(required) <= columns:
        raise DataError(
            f"dataset '{name}': expected columns {' and '.join(required)} (HH format) or prompt/chosen/rejected; "
            f"found {sorted(columns)}"
        )


def _as_dataset(rows):
    import datasets

    return rows if isinstance(rows, datasets.Dataset) else datasets.Dataset.from_list(list(rows))


def load_splits(
    cfg: DatasetConfig, tokenizer, kind: str, assistant_turns: str = "all", train_rows=None, eval_rows=None
) -> tuple[list, list, dict]:
    """Train and validation examples for ``kind`` ('sft' or 'preference') plus the data report.

    Rows come from ``dataset_name``/``subset``, or from ``train_rows`` (a ``datasets.Dataset`` or a
    list of dicts, as the Python API passes them); ``eval_rows``, if given, is the validation
    split instead of a ``val_ratio`` share of the training rows.
    """
    raw = load_raw(cfg) if train_rows is None else _as_dataset(train_rows)
    required = ("chosen",) if kind == "sft" else ("chosen", "rejected")
    _check_columns(raw, required, cfg.dataset_name)
    special = SpecialTokens.of(tokenizer)
    if kind == "sft":
        parse = parse_sft_row

        def encode(turns, notes):
            return tokenize_conversation(tokenizer, turns, special, cfg.max_length, assistant_turns, notes)
    else:
        parse = parse_preference_row

        def encode(pair, notes):
            return tokenize_pair(tokenizer, pair, special, cfg.max_length, cfg.max_prompt_length, notes)

    if eval_rows is None:
        train_idx, val_idx = split_indices(len(raw), cfg.val_ratio, cfg.seed)
        train_raw, val_raw = raw.select(train_idx), raw.select(val_idx)
    else:
        train_raw, val_raw = raw, _as_dataset(eval_rows)
        _check_columns(val_raw, required, f"{cfg.dataset_name} (eval)")
    train, train_report = _process(train_raw, parse, encode, cfg.dataset_name, "train")
    val, val_report = _process(val_raw, parse, encode, cfg.dataset_name, "validation")
    report = {
        "dataset_name": cfg.dataset_name,
        "subset": cfg.subset,
        "fingerprint": getattr(raw, "_fingerprint", None),
        "train": train_report.as_dict(),
        "validation": val_report.as_dict(),
    }
    return train, val, report


def report_lines(report: dict) -> list[str]:
    lines = []
    for split in ("train", "validation"):
        r = SplitReport(report[split]["rows"], report[split]["kept"], Counter(report[split]["dropped"]),
                        Counter(report[split]["notes"]))
        lines.append(f"data {split}: {r.line()}")
    return lines


def write_report(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")


def num_batches(n: int, batch: int) -> int:
    return math.ceil(n / batch)


def global_batch_indices(
    n: int, step: int, micro_batch: int, grad_accum: int, world_size: int, rank: int, seed: int
) -> list[list[int]]:
    """This rank's micro-batches (``grad_accum`` lists of indices) for optimizer step ``step``.

    The data order is a function of (seed, step) alone: epoch e is a permutation of all rows
    drawn from ``seed + e``, cut into global batches of micro_batch x grad_accum x world_size
    (the incomplete tail of an epoch is skipped). Micro-step k on rank r reads rows
    ``[(k * world_size + r) * micro_batch, ... + micro_batch)`` of the global batch, so the
    global batch is the same set of rows for 1 rank x 2 accumulation steps and 2 ranks x 1,
    and resuming at any step needs no saved sampler state.
    """
    global_batch = micro_batch * grad_accum * world_size
    steps_per_epoch = n // global_batch
    if steps_per_epoch == 0:
        raise DataError(f"the training split has {n} rows, fewer than one global batch ({global_batch})")
    epoch, within = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    batch = order[within * global_batch:(within + 1) * global_batch]
    out = []
    for k in range(grad_accum):
        start = (k * world_size + rank) * micro_batch
        out.append(batch[start:start + micro_batch].tolist())
    return out


def eval_batch_indices(n: int, batch: int, world_size: int, rank: int) -> list[list[int]]:
    """This rank's evaluation micro-batches; every rank gets the same number (ZeRO-3 forwards are
    collective), so trailing batches may be empty and are skipped in the sums but still run."""
    per_round = batch * world_size
    rounds = num_batches(n, per_round)
    out = []
    for b in range(rounds):
        start = b * per_round + rank * batch
        out.append(list(range(start, min(start + batch, n))))
    return out
