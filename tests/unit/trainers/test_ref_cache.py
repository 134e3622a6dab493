"""The reference log-prob table: lookup layout, the cache on disk, and what its key depends on."""

from __future__ import annotations

import torch

from dpo_hpc.data.tokenize import TokenizedPair
from dpo_hpc.runtime import DistEnv
from dpo_hpc.tiny_model import build_byte_tokenizer
from dpo_hpc.trainers.ref_cache import RefLogpsTable, cache_key, load_or_compute

ONE = DistEnv(0, 0, 1)


def pair(rid: str) -> TokenizedPair:
    return TokenizedPair([1], [2], [3], example_id=rid)


def test_lookup_is_in_the_collators_layout_and_survives_disk(tmp_path):
    table = RefLogpsTable(["a", "b", "c"], torch.tensor([[1.0, -1.0], [2.0, -2.0], [3.0, -3.0]]))
    assert table.lookup([pair("c"), pair("a")]).tolist() == [3.0, 1.0, -3.0, -1.0]  # chosen rows, then rejected
    table.save(tmp_path / "k", {"why": "test"})
    again = RefLogpsTable.load(tmp_path / "k")
    assert again.ids == table.ids and torch.equal(again.logps, table.logps)
    assert again.covers([pair("a")]) and not again.covers([pair("z")])
    (tmp_path / "k" / "logps.safetensors").write_bytes(b"torn")
    assert RefLogpsTable.load(tmp_path / "k") is None


def test_a_table_that_does_not_cover_the_data_is_computed_again(tmp_path):
    said, calls = [], []

    def compute():
        calls.append(1)
        return RefLogpsTable(["a", "b"], torch.zeros(2, 2))

    table, cached = load_or_compute(tmp_path / "k", {}, [pair("a"), pair("b")], compute, ONE, said.append)
    assert not cached and len(calls) == 1
    table, cached = load_or_compute(tmp_path / "k", {}, [pair("a")], compute, ONE, said.append)
    assert cached and len(calls) == 1 and "read from" in said[-1]


def test_the_key_follows_reference_tokenizer_data_and_numerics(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    tok = build_byte_tokenizer()
    key, made_of = cache_key(str(model), tok, ["fp-train", "fp-val"], "fp32", "sdpa")
    assert key == cache_key(str(model), tok, ["fp-train", "fp-val"], "fp32", "sdpa")[0]
    assert made_of["reference_files"] == [("model.safetensors", 7, (model / "model.safetensors").stat().st_mtime_ns)]
    assert key != cache_key(str(model), tok, ["fp-train", "other"], "fp32", "sdpa")[0]
    assert key != cache_key(str(model), tok, ["fp-train", "fp-val"], "bf16", "sdpa")[0]
    (model / "model.safetensors").write_bytes(b"new weights")
    assert key != cache_key(str(model), tok, ["fp-train", "fp-val"], "fp32", "sdpa")[0]


def test_runs_needing_one_table_at_once_compute_it_once(tmp_path):
    import threading
    import time

    calls, said = [], []

    def compute():
        calls.append(1)
        time.sleep(0.5)
        return RefLogpsTable(["a"], torch.ones(1, 2))

    results = []

    def run():
        results.append(load_or_compute(tmp_path / "k", {}, [pair("a")], compute, ONE, said.append, poll_s=0.05))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and sorted(cached for _, cached in results) == [False, True, True]
    assert any(line.startswith("waiting for the reference pass that") for line in said)
    assert not (tmp_path / "k.lock").exists()


def test_a_stale_lock_is_reclaimed_with_a_message(tmp_path):
    import os

    lock = tmp_path / "k.lock"
    lock.write_text('{"host": "node7", "pid": 123, "job": "99_1"}')
    os.utime(lock, (0, 0))  # its holder stopped refreshing it long ago
    said = []
    table, cached = load_or_compute(tmp_path / "k", {}, [pair("a")], lambda: RefLogpsTable(["a"], torch.zeros(1, 2)),
                                    ONE, said.append, poll_s=0.01)
    assert not cached and table.ids == ["a"]
    assert any("held by node7:123 (Slurm job 99_1) went stale" in line for line in said)
