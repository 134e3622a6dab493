"""Tokenized splits cached on disk, so that a run tokenizes its data once and not at every start,
requeue and rank, and the runs of a sweep over the same data and tokenizer share one tokenization.

A split's file is keyed by all its examples depend on: the split's fingerprint (its rows' content
ids in order and the tokenization settings), the tokenizer (its vocabulary and rules, chat
template and special tokens), and the code that makes examples::

    <cache_dir>/<key>.safetensors   the token ids, flat, with each example's offsets;
                                    metadata: example ids, the split's data report, a checksum

It is written aside and renamed into place (writers of the same key write the same bytes), and
read back only when its checksum and shapes hold; anything else is a miss and the split is
tokenized again.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Optional

import numpy as np

from ..fsutil import write_aside
from .tokenize import TokenizedCompletion, TokenizedConversation, TokenizedPair

FORMAT = 1


FIELDS = {"pair": ("prompt_ids", "chosen_ids", "rejected_ids"), "conversation": ("input_ids", "loss_mask"),
          "completion": ("prompt_ids", "completion_ids")}
"""The token lists stored per example kind (each as one flat array with offsets)."""

KINDS = {"pair": TokenizedPair, "conversation": TokenizedConversation, "completion": TokenizedCompletion}


@functools.lru_cache(maxsize=None)
def code_identity() -> str:
    """A hash of the code that turns rows into examples (this package's sources) and of the
    libraries that tokenize and render: a changed parser or tokenizer library is a new key, with
    no version number to remember to bump."""
    import tokenizers
    import transformers

    digest = hashlib.sha256(f"{tokenizers.__version__} {transformers.__version__}".encode())
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()


def tokenizer_identity(tokenizer) -> Optional[str]:
    """A hash of everything in a tokenizer that decides the tokens: its rules and vocabulary, chat
    template and special tokens; None for a slow tokenizer, whose rules live in Python code."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    parts = [tokenizer.backend_tokenizer.to_str(), getattr(tokenizer, "chat_template", None),
             tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


class SplitCache:
    """Tokenized splits of one tokenizer under ``folder``."""

    def __init__(self, folder: str | Path, tokenizer_id: str):
        self.folder, self.tokenizer_id = Path(folder), tokenizer_id

    def path(self, split_fingerprint: str) -> Path:
        made_of = {"format": FORMAT, "code": code_identity(), "tokenizer": self.tokenizer_id,
                   "split": split_fingerprint}
        key = hashlib.sha256(json.dumps(made_of, sort_keys=True).encode()).hexdigest()[:20]
        return self.folder / f"{key}.safetensors"

    def save(self, split_fingerprint: str, examples: list, report: dict) -> None:
        from safetensors.numpy import save_file

        kind = next((k for k, made in KINDS.items() if examples and isinstance(examples[0], made)), "pair")
        arrays = {}
        if kind == "completion":  # KTO's: one bool per example
            arrays["label"] = np.array([e.label for e in examples], dtype=np.int8)
        if kind == "pair":  # each row's margin, NaN where it has none
            arrays["margin"] = np.array([np.nan if e.margin is None else e.margin for e in examples], dtype=np.float64)
        for name in FIELDS[kind]:
            lists = [getattr(e, name) for e in examples]
            arrays[name] = np.fromiter((t for ids in lists for t in ids), dtype=np.int32)
            arrays[f"{name}_offsets"] = np.cumsum([0] + [len(ids) for ids in lists], dtype=np.int64)
        metadata = {"kind": kind, "example_ids": json.dumps([e.example_id for e in examples]),
                    "report": json.dumps(report), "sha256": _checksum(arrays)}
        write_aside(self.path(split_fingerprint), lambda tmp: save_file(arrays, str(tmp), metadata=metadata))

    def load(self, split_fingerprint: str) -> Optional[tuple[list, dict]]:
        """(examples, the split's data report), or None when absent or not whole."""
        from safetensors import safe_open

        path = self.path(split_fingerprint)
        try:
            with safe_open(str(path), framework="numpy") as f:
                metadata = f.metadata()
                arrays = {name: f.get_tensor(name) for name in f.keys()}
            kind, ids = metadata["kind"], json.loads(metadata["example_ids"])
            if metadata["sha256"] != _checksum(arrays):
                return None
            columns = []
            for name in FIELDS[kind]:
                flat, offsets = arrays[name], arrays[f"{name}_offsets"].tolist()
                if len(offsets) != len(ids) + 1 or offsets[-1] != len(flat):
                    return None
                # per example: one whole-split list of Python ints would double the peak memory
                columns.append([flat[a:b].tolist() for a, b in zip(offsets, offsets[1:])])
            extra: list[dict] = [{} for _ in ids]
            if kind == "completion":
                if len(arrays["label"]) != len(ids):
                    return None
                columns.append(arrays["label"].astype(bool).tolist())
            if kind == "pair":
                if len(arrays["margin"]) != len(ids):
                    return None
                extra = [{"margin": None if np.isnan(m) else float(m)} for m in arrays["margin"]]
            examples = [KINDS[kind](*fields, example_id=i, **more)
                        for i, fields, more in zip(ids, zip(*columns), extra)]
            return examples, json.loads(metadata["report"])
        except Exception:  # missing, torn or not ours: tokenized again
            return None


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()
