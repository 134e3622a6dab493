"""Reference log-probs computed once: a table by example id, cached on disk.

The table's key is everything its values depend on: the reference model (its config and weight
files), the tokenizer, the train and validation fingerprints (rows, order, truncation), the
precision and the attention kernel. Any run with the same key reads the table instead of
running the reference, so a sweep over beta makes one reference pass::

    <cache>/<key>/logps.safetensors   (N, 2) fp32: chosen, rejected (KTO: completion, KL completion)
    <cache>/<key>/ids.json            the N example ids, in the table's order
    <cache>/<key>/meta.json           what the key was made of

A table is written aside and renamed into place. Runs that need the same table at once wait
for the one holding ``<key>.lock`` (a lock file with a heartbeat; a stale one is reclaimed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ..data.cache import tokenizer_identity
from ..data.collate import to_device
from ..data.sampler import eval_batch_indices
from ..filelock import FileLock
from ..fsutil import aside_suffix, files_identity, remove_tree, seal_tree
from ..runtime import DistEnv, barrier

FORMAT = 2  # 2: the tokenizer's chat template and special tokens are part of the key


class RefLogpsTable:
    def __init__(self, ids: list[str], logps: torch.Tensor):
        self.ids = ids
        self.logps = logps  # (N, 2) fp32
        self._row = {rid: i for i, rid in enumerate(ids)}

    def covers(self, examples) -> bool:
        return all(e.example_id in self._row for e in examples)

    def lookup(self, examples) -> torch.Tensor:
        """(2B,) in the collator's layout: every chosen row, then every rejected row."""
        rows = self.logps[[self._row[e.example_id] for e in examples]]
        return torch.cat([rows[:, 0], rows[:, 1]])

    def save(self, folder: Path, made_of: dict) -> None:
        from safetensors.torch import save_file

        tmp = folder.with_name(f".{folder.name}.tmp-{aside_suffix()}")
        remove_tree(tmp)
        tmp.mkdir(parents=True)
        save_file({"logps": self.logps.contiguous()}, tmp / "logps.safetensors")
        (tmp / "ids.json").write_text(json.dumps(self.ids))
        (tmp / "meta.json").write_text(json.dumps(made_of, indent=2, sort_keys=True, default=str))
        seal_tree(tmp)
        remove_tree(folder)  # a table that no longer covers the data (saved under the lock)
        try:
            os.replace(tmp, folder)
        except OSError:  # another writer published the same key first: the same values
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def load(cls, folder: Path) -> Optional["RefLogpsTable"]:
        from safetensors.torch import load_file

        try:
            ids = json.loads((folder / "ids.json").read_text())
            logps = load_file(folder / "logps.safetensors")["logps"]
        except Exception:  # missing, torn or not ours: computed again
            return None
        if logps.shape != (len(ids), 2):
            return None
        return cls(ids, logps.float())


def kl_pairing(examples: list) -> Optional[str]:
    """KTO's: a hash of every example's KL completion (a table holds their log-probs too); None
    for other examples."""
    if not examples or not hasattr(examples[0], "kl_completion_ids"):
        return None
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps(example.kl_completion_ids).encode())
    return digest.hexdigest()[:16]


def cache_key(reference: str, tokenizer, fingerprints: list[str], precision: str, attn: str,
              ld_alpha: Optional[float] = None, kl_pairs: Optional[str] = None) -> tuple[str, dict]:
    """(key, what it is made of). A hub name stands for itself; a local folder for its files.
    LD-DPO's ``ld_alpha`` weighs the sums and KTO's KL completions (``kl_pairing``) are scored,
    so each is part of the key where set (and only there: the keys of tables without them stay
    as they were)."""
    ref_path = Path(reference)
    made_of = {
        "format": FORMAT,
        "reference": str(ref_path.resolve()) if ref_path.exists() else reference,
        "reference_files": files_identity(ref_path) if ref_path.is_dir() else None,
        # the chat template too: the data fingerprints hash the rows, not how they were rendered
        "tokenizer": tokenizer_identity(tokenizer) or hashlib.sha256(repr(tokenizer).encode()).hexdigest(),
        "data": fingerprints,
        "precision": precision,
        "attn_implementation": attn,
    }
    if ld_alpha is not None:
        made_of["ld_alpha"] = ld_alpha
    if kl_pairs is not None:
        made_of["kl_pairing"] = kl_pairs
    blob = json.dumps(made_of, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16], made_of


def compute(reference, scorer, collate: Callable, examples: list, batch_size: int, dist: DistEnv,
            device: torch.device, say: Callable[[str], None]) -> RefLogpsTable:
    """Run the reference over every example once (every rank takes its share; a collective)."""
    started, local_ids, local_values = time.perf_counter(), [], []
    batches = eval_batch_indices(len(examples), batch_size, dist.world_size, dist.rank)
    with torch.no_grad():
        for done, indices in enumerate(batches, 1):
            chunk = [examples[i] for i in (indices or [0])]  # an empty slot still runs: ZeRO-3 is collective
            batch = to_device(collate(chunk), device)
            logps = scorer.sequence_logps(reference, batch).float()  # left on the device: no wait per batch
            if indices:
                half = len(chunk)
                local_ids += [e.example_id for e in chunk]
                local_values.append(torch.stack([logps[:half], logps[half:]], dim=1))
            if done in (1, len(batches)) or done % 50 == 0:  # the first: compiled kernels make it the slow one
                say(f"reference log-probs: {done}/{len(batches)} batches ({time.perf_counter() - started:.0f} s)")
    values = torch.cat(local_values).cpu() if local_values else torch.zeros(0, 2)
    if dist.world_size > 1:
        gathered: list = [None] * dist.world_size
        torch.distributed.all_gather_object(gathered, (local_ids, values))
        local_ids = [rid for ids, _ in gathered for rid in ids]
        values = torch.cat([v for _, v in gathered])
    return RefLogpsTable(local_ids, values)


def load_or_compute(folder: Path, made_of: dict, examples: list, compute_table: Callable[[], RefLogpsTable],
                    dist: DistEnv, say: Callable[[str], None], poll_s: float = 10.0) -> tuple[RefLogpsTable, bool]:
    """The cached table when it covers every example, else a new one (written by rank 0).
    Returns (table, whether it came from the cache). Every rank calls.

    Runs that need the same table at once (an array of a sweep) do not all compute it: the first
    takes ``<key>.lock`` and computes; the others wait for the table and read it."""
    lock = FileLock(folder.with_name(folder.name + ".lock"))
    announced, table = False, None
    while True:  # rank 0 decides; every rank learns it at once (no rank blocks in a collective for long)
        decision = ["wait"]
        if dist.is_main:
            table = RefLogpsTable.load(folder)
            if table is not None and table.covers(examples):
                decision = ["read"]
            elif lock.try_acquire():
                decision = ["compute"]
            else:
                if not announced:
                    say(f"waiting for the reference pass that {lock.holder()} is running ({folder})")
                    announced = True
                lock.reclaim_if_stale(say)
        if dist.world_size > 1:
            torch.distributed.broadcast_object_list(decision, src=0)
        if decision[0] != "wait":
            break
        time.sleep(poll_s)
    if decision[0] == "read":
        say(f"reference log-probs read from {folder}")
        return (table if dist.is_main else RefLogpsTable.load(folder)), True  # rank 0 read it to decide
    try:
        table = compute_table()
        if dist.is_main:
            table.save(folder, made_of)
            say(f"reference log-probs of {len(table.ids)} pairs cached in {folder}")
    finally:
        lock.release()
    barrier()
    return table, False
