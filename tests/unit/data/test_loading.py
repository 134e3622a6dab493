"""Dataset loading by path or name, splits, drop reports, and the step-indexed data order."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from dpo_hpc.config import DatasetConfig
from dpo_hpc.data.pipeline import SplitReport, load_splits, report_lines, split_indices
from dpo_hpc.data.sampler import eval_batch_indices, global_batch_indices
from dpo_hpc.data.sources import DataError, load_raw
from dpo_hpc.tiny_model import build_byte_tokenizer

P = "\n\nHuman: Reverse: {w}\n\nAssistant:"


def rows(n):
    return [{"chosen": P.format(w=f"w{i}") + f" {i}w", "rejected": P.format(w=f"w{i}") + " nope"} for i in range(n)]


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def cfg(path, **kw):
    return DatasetConfig(dataset_name=str(path), **{"val_ratio": 0.2, "max_length": 64, "max_prompt_length": 48, **kw})


def test_jsonl_with_bad_rows_counts_each_reason(tmp_path, tok, hf_cache):
    bad = [
        {"chosen": P.format(w="x") + " a", "rejected": None},
        {"chosen": P.format(w="x") + " a", "rejected": 3},
        {"chosen": "\n\nHuman: no answer", "rejected": "\n\nHuman: no answer"},
        {"chosen": P.format(w="x") + " a", "rejected": P.format(w="y") + " b"},
        {"chosen": P.format(w="x") + " ", "rejected": P.format(w="x") + " b"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows(20) + bad)
    train, val, report = load_splits(cfg(path, val_ratio=0.0), tok, "preference")
    assert len(train) == 20 and val == []
    assert report["train"]["rows"] == 25 and report["train"]["kept"] == 20
    assert report["train"]["dropped"] == {"missing_field": 1, "not_string": 1, "no_assistant_turn": 1,
                                          "rejected_prompt_mismatch": 1, "empty_response": 1}
    # each reason names its rows by dataset position (the bad rows follow the 20 good ones)
    assert report["train"]["dropped_rows"] == {"missing_field": [20], "not_string": [21], "no_assistant_turn": [22],
                                               "rejected_prompt_mismatch": [23], "empty_response": [24]}
    assert "missing_field=1 (row 20)" in report_lines(report)[0]


def test_dropped_rows_are_named_by_their_place_in_the_dataset_across_the_split(tmp_path, tok, hf_cache):
    """Positions are the dataset's, not the split's (the validation rows are drawn from anywhere),
    and a log line names the first three of a reason."""
    bad = {"chosen": P.format(w="x") + " a", "rejected": None}
    data = rows(40)
    for i in (3, 17, 33):
        data[i] = bad
    train, val, report = load_splits(cfg(write_jsonl(tmp_path / "d.jsonl", data), val_ratio=0.5), tok, "preference")
    shown = [p for split in ("train", "validation") for p in report[split]["dropped_rows"].get("missing_field", [])]
    assert sorted(shown) == [3, 17, 33]
    many = SplitReport(rows=10)
    for position in (3, 9, 17, 25, 33):
        many.drop("empty_response", position)
    assert many.line().endswith("empty_response=5 (rows 3, 9, 17, ...)")


class CountingTokenizer:
    """The byte tokenizer, counting its calls on one text and on a batch of texts."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, Counter()

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __call__(self, text, **kwargs):
        self.calls["batch" if isinstance(text, list) else "one"] += 1
        return self.tokenizer(text, **kwargs)


@pytest.mark.parametrize("kind", ["preference", "sft"])
def test_each_block_of_rows_is_tokenized_in_one_batched_call(tmp_path, tok, hf_cache, monkeypatch, kind):
    from dpo_hpc.data import pipeline

    monkeypatch.setattr(pipeline, "BLOCK_ROWS", 16)
    counting = CountingTokenizer(tok)
    train, val, _ = load_splits(cfg(write_jsonl(tmp_path / "d.jsonl", rows(40)), val_ratio=0.25), counting, kind)
    assert len(train) == 30 and len(val) == 10
    assert counting.calls == {"batch": 2 + 1}  # 30 training rows in blocks of 16, 10 validation rows
    assert (train, val) == load_splits(cfg(tmp_path / "d.jsonl", val_ratio=0.25), tok, kind)[:2]


def test_a_long_tokenization_says_how_far_it_is(tmp_path, tok, hf_cache, monkeypatch):
    from dpo_hpc.data import pipeline

    monkeypatch.setattr(pipeline, "BLOCK_ROWS", 10)
    monkeypatch.setattr(pipeline, "PROGRESS_EVERY_S", 0.0)
    said = []
    load_splits(cfg(write_jsonl(tmp_path / "d.jsonl", rows(40)), val_ratio=0.0), tok, "preference", say=said.append)
    assert [line.split(" rows (")[0] for line in said] == [f"tokenizing train: {n}/40" for n in (10, 20, 30)]
    assert said[0].startswith("tokenizing train: 10/40 rows (25%), ") and " rows/s, eta " in said[0]


@pytest.mark.parametrize("preset, during, after", [(None, "true", "false"), ("false", "false", "false"),
                                                   ("true", "true", "true")])
def test_tokenizer_threads_run_while_tokenizing_unless_told_otherwise(monkeypatch, preset, during, after):
    import os

    from dpo_hpc.data.pipeline import tokenizer_threads

    if preset is None:
        monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    else:
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", preset)
    with tokenizer_threads():
        assert os.environ["TOKENIZERS_PARALLELISM"] == during
    assert os.environ["TOKENIZERS_PARALLELISM"] == after  # what later forks inherit


def test_too_long_rows_are_dropped_and_reported(tmp_path, tok, hf_cache):
    long_reply = [{"chosen": P.format(w="x") + " " + "y" * 20, "rejected": P.format(w="x") + " n"}] * 3
    path = write_jsonl(tmp_path / "d.jsonl", rows(10) + long_reply)
    train, _, report = load_splits(cfg(path, val_ratio=0.0, max_length=12, max_prompt_length=6), tok, "sft")
    assert len(train) == 10 and report["train"]["dropped"] == {"too_long_after_truncation": 3}
    assert report["train"]["notes"]["prompt_truncated"] == 10


def test_zero_usable_rows_is_an_error_naming_the_dataset(tmp_path, tok, hf_cache):
    path = write_jsonl(tmp_path / "d.jsonl", [{"chosen": "no markers", "rejected": "none"}] * 4)
    with pytest.raises(DataError, match=r"d.jsonl' \(train split\): 0 usable rows out of 4"):
        load_splits(cfg(path, val_ratio=0.0), tok, "preference")


def test_missing_columns_and_paths(tmp_path, tok, hf_cache):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match=r"expected columns chosen and rejected .* found \['text'\]"):
        load_splits(cfg(path), tok, "preference")
    with pytest.raises(DataError, match="local path './nope.jsonl' does not exist"):
        load_raw(cfg("./nope.jsonl"))
    with pytest.raises(DataError, match="single file, so its only split is 'train'"):
        load_raw(cfg(path, subset="test"))


def test_parquet_saved_dataset_and_split_slices(tmp_path, tok, hf_cache):
    import datasets

    ds = datasets.Dataset.from_list(rows(40))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    assert len(load_raw(cfg(tmp_path / "d.parquet", subset="train[:25%]"))) == 10
    datasets.DatasetDict({"train": ds, "test": ds.select(range(5))}).save_to_disk(str(tmp_path / "saved"))
    assert len(load_raw(cfg(tmp_path / "saved", subset="test"))) == 5
    assert len(load_raw(cfg(tmp_path / "saved", subset="train[:50%]"))) == 20
    with pytest.raises(DataError, match="has splits"):
        load_raw(cfg(tmp_path / "saved", subset="validation"))


def test_eval_subset_validates_on_the_datasets_own_test_split(tmp_path, tok, hf_cache):
    """TRL's dataset_test_split: a folder of train.jsonl + test.jsonl (or a saved DatasetDict, or a
    hub dataset's splits); the whole training split then trains."""
    import datasets

    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows(30))
    write_jsonl(folder / "test.jsonl", rows(36)[30:])
    train, val, report = load_splits(cfg(folder, eval_subset="test"), tok, "preference")
    assert (len(train), len(val)) == (30, 6) and report["eval_subset"] == "test"
    held_out, _, _ = load_splits(cfg(folder), tok, "preference")
    assert {e.example_id for e in val}.isdisjoint({e.example_id for e in train})
    assert len(held_out) == 24  # without it: a val_ratio share of the training split
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows(30)),
                          "test_prefs": datasets.Dataset.from_list(rows(40)[30:])}).save_to_disk(str(tmp_path / "saved"))
    _, val, _ = load_splits(cfg(tmp_path / "saved", eval_subset="test_prefs[:4]"), tok, "preference")
    assert len(val) == 4
    with pytest.raises(DataError, match=r"has splits \['test_prefs', 'train'\]; eval_subset asks for 'test'"):
        load_splits(cfg(tmp_path / "saved", eval_subset="test"), tok, "preference")
    with pytest.raises(DataError, match=r"is a single file, so its only split is 'train'; got eval_subset 'test' "
                                        r"\(a folder of train.jsonl and test.jsonl has both splits\)"):
        load_splits(cfg(folder / "train.jsonl", eval_subset="test"), tok, "preference")


def test_hub_name_fails_clearly_offline(tok, hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"'nobody/no-such-dataset' is not in the Hugging Face cache and the job runs "
                                        r"offline .* run `dpo-hpc prefetch EXPERIMENT` on a login node"):
        load_raw(cfg("nobody/no-such-dataset"))


def test_split_is_deterministic_and_disjoint():
    a_train, a_val = split_indices(100, 0.1, seed=3)
    b_train, b_val = split_indices(100, 0.1, seed=3)
    assert a_train.tolist() == b_train.tolist() and len(a_val) == 10
    assert set(a_train) | set(a_val) == set(range(100)) and not set(a_train) & set(a_val)
    assert split_indices(100, 0.1, seed=4)[1].tolist() != a_val.tolist()
    assert len(split_indices(5, 0.01, seed=0)[1]) == 1  # a requested validation split is never empty


def test_global_batch_is_the_same_set_for_any_rank_accumulation_split():
    n, seed = 50, 7
    for step in range(8):
        one_rank = [i for mb in global_batch_indices(n, step, 4, 2, 1, 0, seed) for i in mb]
        two_ranks = [i for r in range(2) for mb in global_batch_indices(n, step, 4, 1, 2, r, seed) for i in mb]
        assert one_rank == two_ranks and len(set(one_rank)) == 8


def test_data_order_covers_each_epoch_once_and_depends_only_on_step():
    n = 40  # 5 steps per epoch of 8 rows
    epoch0 = [i for s in range(5) for mb in global_batch_indices(n, s, 4, 2, 1, 0, 1) for i in mb]
    assert sorted(epoch0) == list(range(40))
    epoch1 = [i for s in range(5, 10) for mb in global_batch_indices(n, s, 4, 2, 1, 0, 1) for i in mb]
    assert sorted(epoch1) == list(range(40)) and epoch1 != epoch0
    assert global_batch_indices(n, 7, 4, 2, 1, 0, 1) == global_batch_indices(n, 7, 4, 2, 1, 0, 1)
    with pytest.raises(DataError, match="fewer than one global batch"):
        global_batch_indices(5, 0, 4, 2, 1, 0, 1)


def padding(batches, lengths):
    return sum(len(mb) * max(lengths[i] for i in mb) - sum(lengths[i] for i in mb) for mb in batches if mb)


def test_grouping_by_length_keeps_each_epoch_and_the_invariances_and_cuts_padding():
    import numpy as np

    from dpo_hpc.data.sampler import LENGTH_GROUP

    n, seed = 2 * LENGTH_GROUP * 8 + 13, 3  # two length groups per epoch, a tail that is skipped
    lengths = np.random.default_rng(0).integers(5, 500, n)
    steps = n // 8
    grouped = [global_batch_indices(n, s, 4, 2, 1, 0, seed, lengths) for s in range(steps)]
    plain = [global_batch_indices(n, s, 4, 2, 1, 0, seed) for s in range(steps)]
    rows = [i for step in grouped for mb in step for i in mb]
    assert sorted(rows) == sorted(i for step in plain for mb in step for i in mb)  # the same rows per epoch
    for s in range(steps):
        two_ranks = [i for r in range(2) for mb in global_batch_indices(n, s, 4, 1, 2, r, seed, lengths) for i in mb]
        assert [i for mb in grouped[s] for i in mb] == two_ranks
    assert grouped[5] == global_batch_indices(n, 5, 4, 2, 1, 0, seed, lengths)  # a function of the step
    grouped_padding = sum(padding(step, lengths) for step in grouped)
    assert grouped_padding < 0.1 * sum(padding(step, lengths) for step in plain)


def test_eval_batches_cover_every_row_once_with_equal_counts():
    n, batch, world = 11, 3, 2
    per_rank = [eval_batch_indices(n, batch, world, r) for r in range(world)]
    assert len(per_rank[0]) == len(per_rank[1])
    assert sorted(i for r in per_rank for mb in r for i in mb) == list(range(n))


def test_examples_carry_their_row_id_and_splits_their_fingerprint(tmp_path, tok, hf_cache):
    from dpo_hpc.data.pipeline import row_id

    data = rows(12)
    train, val, report = load_splits(cfg(write_jsonl(tmp_path / "a.jsonl", data)), tok, "preference")
    ids = {row_id(r) for r in data}
    assert len(ids) == 12 and {e.example_id for e in [*train, *val]} == ids  # every example keyed by its row
    assert report["train"]["fingerprint"] == train.fingerprint != val.fingerprint

    same, _, _ = load_splits(cfg(write_jsonl(tmp_path / "b.jsonl", data)), tok, "preference")
    assert same.fingerprint == train.fingerprint  # content, not path, decides
    reordered, _, _ = load_splits(cfg(write_jsonl(tmp_path / "c.jsonl", data[::-1]), val_ratio=0.0), tok,
                                  "preference")
    unshuffled, _, _ = load_splits(cfg(write_jsonl(tmp_path / "d.jsonl", data), val_ratio=0.0), tok, "preference")
    assert sorted(e.example_id for e in reordered) == sorted(e.example_id for e in unshuffled)
    assert reordered.fingerprint != unshuffled.fingerprint  # the order is part of the data
    shorter, _, _ = load_splits(cfg(tmp_path / "d.jsonl", val_ratio=0.0, max_length=60), tok, "preference")
    assert shorter.fingerprint != unshuffled.fingerprint  # so are the tokenization settings


@pytest.mark.parametrize("content, problem", [
    ("", r"the file is empty; expected one JSON object per line"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n[1, 2]\n', r"line 2: a JSON array; expected one JSON object per line"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n"text"\n', r"line 3: a JSON string; expected one JSON object"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": broken\n', r"line 2: not valid JSON \(Expecting value"),
])
def test_a_json_lines_file_that_cannot_be_read_is_named_by_line(tmp_path, hf_cache, content, problem):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=rf"dataset.dataset_name: {path}: {problem}"):
        load_raw(cfg(path))


def test_label_noise_swaps_a_seeded_nested_share_of_pairs_and_counts_them(tmp_path, tok, hf_cache):
    path = write_jsonl(tmp_path / "pairs.jsonl", rows(400))
    clean, _, _ = load_splits(cfg(path, val_ratio=0.0), tok, "preference")

    def swapped(label_noise, seed=0):
        noisy, _, report = load_splits(cfg(path, val_ratio=0.0, label_noise=label_noise, label_noise_seed=seed),
                                       tok, "preference")
        flips = {c.example_id for c, n in zip(clean, noisy)
                 if (n.chosen_ids, n.rejected_ids) == (c.rejected_ids, c.chosen_ids)}
        assert all(n.example_id == c.example_id + "~flipped" for c, n in zip(clean, noisy) if c.example_id in flips)
        assert report["train"]["notes"].get("label_flipped", 0) == len(flips)
        assert noisy.fingerprint != clean.fingerprint or not flips
        return flips

    low, high = swapped(0.2), swapped(0.4)
    assert 50 <= len(low) <= 110 and 130 <= len(high) <= 190  # 80 and 160 expected of 400
    assert low < high  # the pairs flipped at 0.2 are flipped at 0.4 too
    assert swapped(0.2) == low and swapped(0.2, seed=1) != low
    assert swapped(0.0) == set()
    with pytest.raises(DataError, match="label_noise = 0.2 swaps chosen and rejected.*set it to 0"):
        load_splits(cfg(path, label_noise=0.2), tok, "sft")


def test_a_mixture_joins_each_sources_rows_with_its_own_columns_and_a_seeded_share(tmp_path, tok, hf_cache):
    """dataset.mix: HH rows, plus prompt/chosen/rejected strings under other names (a 0.5 share,
    the same rows every time), plus a source with a bad row, named by its source in the report."""
    from dpo_hpc.config import MixSource

    main = write_jsonl(tmp_path / "hh.jsonl", rows(20))
    named = write_jsonl(tmp_path / "named.jsonl", [{"question": f"Reverse: q{i}", "good": f" {i}q", "bad": " no"}
                                                   for i in range(10)])
    broken = rows(6)
    broken[2] = {"chosen": P.format(w="x") + " a", "rejected": None}
    other = write_jsonl(tmp_path / "other.jsonl", broken)
    mix = [MixSource(dataset_name=str(named), fraction=0.5,
                     columns={"prompt": "question", "chosen": "good", "rejected": "bad"}),
           MixSource(dataset_name=str(other))]
    said = []
    train, val, report = load_splits(cfg(main, val_ratio=0.0, mix=mix), tok, "preference", say=said.append)
    assert len(train) == 20 + 5 + 5 and val == []
    assert report["mix"] == [{"dataset_name": str(main), "rows": 20, "kept": 20},
                             {"dataset_name": str(named), "rows": 5, "kept": 5},
                             {"dataset_name": str(other), "rows": 6, "kept": 5}]
    assert report["train"]["kept_by_source"] == {str(main): 20, str(named): 5, str(other): 5}
    assert report["train"]["dropped_rows"] == {"missing_field": [f"{other}[2]"]}
    assert f"5 rows of '{named}' train (a 0.5 share)" in " ".join(said)
    questions = [tok.decode(e.prompt_ids) for e in train[20:25]]
    assert all("Reverse: q" in q for q in questions)
    again, _, _ = load_splits(cfg(main, val_ratio=0.0, mix=mix), tok, "preference")
    assert [e.example_id for e in again] == [e.example_id for e in train] and again.fingerprint == train.fingerprint
    alone, _, _ = load_splits(cfg(main, val_ratio=0.0), tok, "preference")
    assert alone.fingerprint != train.fingerprint and "mix" not in load_splits(cfg(main), tok, "preference")[2]
    other_seed, _, _ = load_splits(cfg(main, val_ratio=0.0, mix=mix, seed=7), tok, "preference")
    assert {e.example_id for e in other_seed[20:25]} != {e.example_id for e in train[20:25]}
    shared, val, _ = load_splits(cfg(main, val_ratio=0.25, mix=mix), tok, "preference")
    assert len(shared) + len(val) == 30 and len(val) == 8  # the mixture is split as one


def test_a_mixture_validates_on_each_sources_own_test_split(tmp_path, tok, hf_cache):
    from dpo_hpc.config import MixSource

    for name, count in (("a", 12), ("b", 8)):
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / "train.jsonl", rows(count))
        write_jsonl(tmp_path / name / "test.jsonl", rows(count + 3)[count:])
    with_test = cfg(tmp_path / "a", eval_subset="test", mix=[MixSource(dataset_name=str(tmp_path / "b"),
                                                                       eval_subset="test")])
    train, val, _ = load_splits(with_test, tok, "preference")
    assert (len(train), len(val)) == (20, 6)
    train_only = cfg(tmp_path / "a", eval_subset="test", mix=[MixSource(dataset_name=str(tmp_path / "b"))])
    train, val, _ = load_splits(train_only, tok, "preference")
    assert (len(train), len(val)) == (20, 3)
    unusable = write_jsonl(tmp_path / "unusable.jsonl", [{"chosen": "no transcript", "rejected": "here"}] * 4)
    with pytest.raises(DataError, match=r"dataset '.*unusable.jsonl' \(in a dataset.mix mixture\): 0 usable rows out "
                                        r"of 4; expected"):
        load_splits(cfg(tmp_path / "a", mix=[MixSource(dataset_name=str(unusable))]), tok, "preference")
    with pytest.raises(DataError, match=r"dataset.mix\[0\].columns.prompt = 'question', but there is no column"):
        load_splits(cfg(tmp_path / "a", mix=[MixSource(dataset_name=str(tmp_path / "b"),
                                                        columns={"prompt": "question"})]), tok, "preference")


def test_mixture_settings_are_checked():
    from pydantic import ValidationError

    from dpo_hpc.config import MixSource

    with pytest.raises(ValidationError, match="mix.0..eval_subset: validation rows come from a val_ratio share"):
        DatasetConfig(dataset_name="d", mix=[MixSource(dataset_name="e", eval_subset="test")])
    with pytest.raises(ValidationError, match="columns: unknown field"):
        MixSource(dataset_name="e", columns={"answer": "x"})
    with pytest.raises(ValidationError):
        MixSource(dataset_name="e", fraction=0.0)
