"""Where raw rows come from: a hub dataset name or a local path (JSON/JSONL/parquet/CSV file, a
folder of such files, a ``save_to_disk`` folder), or rows passed in by the Python API."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from ..config import DatasetConfig
from ..fsutil import looks_local

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(Exception):
    """The dataset cannot be used; the message names it and says what was expected."""


def _slice(ds, spec: str):
    """Apply a split spec such as ``train[:30%]`` to an in-memory split (for save_to_disk folders)."""
    import datasets

    name = spec.split("[", 1)[0]
    if "[" not in spec:
        return ds
    absolute = datasets.ReadInstruction.from_spec(spec).to_absolute({name: len(ds)})
    indices = [i for instr in absolute for i in range(instr.from_, instr.to)]
    return ds.select(indices)


def load_raw(cfg: DatasetConfig, source: str = "dataset.dataset_name", split_key: str = "subset"):
    """The raw rows named by ``dataset_name`` and the split expression in ``split_key`` (``subset``,
    or ``eval_subset``) as a ``datasets.Dataset``."""
    import datasets

    name, subset = cfg.dataset_name, getattr(cfg, split_key)
    path = Path(name).expanduser()
    try:
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(f"{source}: {path}: unsupported file type; expected one of {', '.join(FILE_BUILDERS)}")
            if subset.split("[", 1)[0] != "train":
                raise DataError(f"{source}: {path} is a single file, so its only split is 'train'; got {split_key} "
                                f"'{subset}' (a folder of train.jsonl and test.jsonl has both splits)")
            return datasets.load_dataset(builder, data_files={"train": str(path)}, split=subset)
        if path.is_dir():
            if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
                loaded = datasets.load_from_disk(str(path))
                if isinstance(loaded, datasets.DatasetDict):
                    split_name = subset.split("[", 1)[0]
                    if split_name not in loaded:
                        raise DataError(f"{source}: {path} has splits {sorted(loaded)}; {split_key} asks for "
                                        f"'{split_name}'")
                    loaded = loaded[split_name]
                return _slice(loaded, subset)
            return datasets.load_dataset(str(path), split=subset)
        if looks_local(name, tuple(FILE_BUILDERS)):
            raise DataError(f"{source}: local path '{name}' does not exist")
        snapshot = _offline_snapshot(name)
        if snapshot is not None:  # fetched by `dpo-hpc prefetch`: the repository's files, read as a folder
            return datasets.load_dataset(snapshot, split=subset)
        return datasets.load_dataset(name, split=subset)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs the name and the cause
        if path.is_file() and FILE_BUILDERS.get(path.suffix.lower()) == "json":
            found = json_file_problem(path)
            if found:
                raise DataError(f"{source}: {path}: {found}") from exc
        if _offline() and not path.exists() and "offline" in f"{type(exc).__name__} {exc}".lower():
            raise DataError(f"{source}: '{name}' is not in the Hugging Face cache and the job runs offline "
                            "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); run `dpo-hpc prefetch EXPERIMENT` on a login "
                            f"node (or `hf download --repo-type dataset {name}` with the jobs' HF_HOME)"
                            ) from exc
        detail = " ".join(str(exc).split())[:400]
        raise DataError(f"{source}: could not load '{name}' ({split_key} '{subset}'): {type(exc).__name__}: "
                        f"{detail}") from exc


def _offline() -> bool:
    import os

    return "1" in (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("HF_DATASETS_OFFLINE"))


def _offline_snapshot(name: str) -> str | None:
    """The hub cache's copy of dataset repository ``name`` when offline (None online, or when not
    cached: ``datasets`` then says what it says)."""
    if not _offline():
        return None
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, repo_type="dataset", local_files_only=True)
    except Exception:  # not in the cache (or not a repo id)
        return None


def json_file_problem(path: Path) -> str | None:
    """What is wrong with a JSON or JSON Lines file, by line number, when ``datasets`` could not
    read it (its own errors name neither the line nor what was expected); None if nothing is found."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text (offset {exc.start})"
    if not text.strip():
        return "the file is empty; expected one JSON object per line (a row with prompt/chosen/rejected or messages)"
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            return f"not valid JSON: line {exc.lineno}: {exc.msg}"
        bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
        return None if bad is None else f"item {bad} is a {_json_type(rows[bad])}; expected a JSON object per row"
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            return f"line {number}: not valid JSON ({exc.msg} at column {exc.colno})"
        if not isinstance(row, dict):
            return f"line {number}: a JSON {_json_type(row)}; expected one JSON object per line"
    return None


def _json_type(value) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def as_dataset(rows):
    import datasets

    return rows if isinstance(rows, datasets.Dataset) else datasets.Dataset.from_list(list(rows))


class MixedRows:
    """The rows of several datasets read as one (``dataset.mix``): each source's chosen rows in
    order, then the next source's, each row as its own source has it (the sources may differ in
    columns and forms). What the pipeline reads of a ``datasets.Dataset``: ``len``, ``select``,
    ``column_names``, and ``blocks`` of rows; ``label(i)`` names row i as ``name[index in its
    source]``, for the data report."""

    def __init__(self, parts: list[tuple[str, Any, list[int]]], picks: list[tuple[int, int]] | None = None):
        self.parts = parts  # (name, dataset, each of its rows' index in the source as loaded)
        self.picks = picks if picks is not None else [
            (part, row) for part, (_, ds, _) in enumerate(parts) for row in range(len(ds))]

    def __len__(self) -> int:
        return len(self.picks)

    @property
    def column_names(self) -> list[str]:
        return sorted({column for _, ds, _ in self.parts for column in ds.column_names})

    def select(self, indices) -> "MixedRows":
        return MixedRows(self.parts, [self.picks[int(i)] for i in indices])

    def label(self, index: int) -> str:
        part, row = self.picks[int(index)]
        name, _, origin = self.parts[part]
        return f"{name}[{origin[row]}]"

    def blocks(self, size: int):
        """The rows as dicts, ``size`` at a time; a source's run of rows is read in one call."""
        for start in range(0, len(self.picks), size):
            rows: list[dict] = []
            for part, run in itertools.groupby(self.picks[start:start + size], key=lambda pick: pick[0]):
                batch = self.parts[part][1].select([row for _, row in run])[:]
                keys = list(batch)
                rows += [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]
            yield rows
