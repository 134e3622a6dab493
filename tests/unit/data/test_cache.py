"""Tokenized splits cached on disk: read back equal, keyed by all they depend on, verified."""

from __future__ import annotations

import json

import pytest

from dpo_hpc.config import DatasetConfig
from dpo_hpc.data.cache import SplitCache, tokenizer_identity
from dpo_hpc.data.pipeline import load_splits
from dpo_hpc.tiny_model import build_byte_tokenizer
from test_loading import CountingTokenizer, rows, write_jsonl


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def cached(path, cache, **kw) -> DatasetConfig:
    settings = dict(dataset_name=str(path), max_length=64, max_prompt_length=32, val_ratio=0.2,
                    cache_dir=None if cache is None else str(cache))
    return DatasetConfig(**{**settings, **kw})


def bad_rows():
    return [{"chosen": "\n\nHuman: x\n\nAssistant: a", "rejected": None}]


@pytest.mark.parametrize("kind", ["preference", "sft"])
def test_a_cached_split_reads_back_equal_without_tokenizing(tmp_path, tok, hf_cache, kind):
    data = write_jsonl(tmp_path / "d.jsonl", rows(30) + bad_rows())
    first = load_splits(cached(data, tmp_path / "cache"), tok, kind)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # train and validation
    counting, said = CountingTokenizer(tok), []
    again = load_splits(cached(data, tmp_path / "cache"), counting, kind, say=said.append)
    assert counting.calls == {}  # not one text tokenized
    assert again == first and [s.fingerprint for s in again[:2]] == [s.fingerprint for s in first[:2]]
    assert [type(e) for e in again[0]] == [type(e) for e in first[0]]
    assert len(said) == 2 and "tokenized examples read from" in said[0]
    assert load_splits(cached(data, None), tok, kind) == first  # the cache changes nothing but the time


def test_the_key_holds_everything_the_tokens_depend_on(tmp_path, tok, hf_cache):
    data = write_jsonl(tmp_path / "d.jsonl", rows(30))
    load_splits(cached(data, tmp_path / "c"), tok, "preference")
    changed = {
        "a setting": (cached(data, tmp_path / "c", truncation_mode="keep_start"), tok),
        "the rows": (cached(write_jsonl(tmp_path / "e.jsonl", rows(29) + rows(31)[30:]), tmp_path / "c"), tok),
        "the chat template": (cached(data, tmp_path / "c"), build_byte_tokenizer()),
    }
    changed["the chat template"][1].chat_template = "{{ messages }}"
    for what, (cfg, tokenizer) in changed.items():
        counting = CountingTokenizer(tokenizer)
        load_splits(cfg, counting, "preference")
        assert counting.calls["batch"] >= 1, f"{what}: read from the cache"
    assert tokenizer_identity(tok) != tokenizer_identity(changed["the chat template"][1])


def test_changed_example_making_code_is_a_new_key(tmp_path, tok, hf_cache, monkeypatch):
    from dpo_hpc.data import cache

    data = write_jsonl(tmp_path / "d.jsonl", rows(30))
    load_splits(cached(data, tmp_path / "c"), tok, "preference")
    monkeypatch.setattr(cache, "code_identity", lambda: "a parser fixed since")
    counting = CountingTokenizer(tok)
    load_splits(cached(data, tmp_path / "c"), counting, "preference")
    assert counting.calls["batch"] >= 1


def test_a_damaged_file_is_a_miss_and_is_written_again(tmp_path, tok, hf_cache):
    data = write_jsonl(tmp_path / "d.jsonl", rows(30))
    first = load_splits(cached(data, tmp_path / "c"), tok, "preference")
    for damage in ("flip a token", "truncate"):
        for path in (tmp_path / "c").glob("*.safetensors"):
            blob = bytearray(path.read_bytes())
            if damage == "flip a token":
                blob[-3] ^= 0xFF  # inside the last array: the checksum catches it
            else:
                blob = blob[: len(blob) // 2]
            path.write_bytes(bytes(blob))
        counting = CountingTokenizer(tok)
        assert load_splits(cached(data, tmp_path / "c"), counting, "preference") == first
        assert counting.calls["batch"] >= 2, damage  # both splits tokenized again
        counting = CountingTokenizer(tok)
        load_splits(cached(data, tmp_path / "c"), counting, "preference")
        assert counting.calls == {}, damage  # and cached whole again


def test_a_cache_that_cannot_be_written_costs_a_note_not_the_run(tmp_path, tok, hf_cache):
    data = write_jsonl(tmp_path / "d.jsonl", rows(30))
    (tmp_path / "c").write_text("a file where the folder should be")
    said = []
    train, _, _ = load_splits(cached(data, tmp_path / "c"), tok, "preference", say=said.append)
    assert len(train) == 24 and len(said) == 2 and said[0].startswith("note: the tokenized train split was not cached")


def test_rows_passed_in_and_slow_tokenizers_are_not_cached(tmp_path, tok, hf_cache):
    data = write_jsonl(tmp_path / "d.jsonl", rows(30))
    load_splits(cached(data, tmp_path / "c"), tok, "preference", train_rows=rows(30))
    assert not (tmp_path / "c").exists()  # the Python API's rows have no file to key on
    slow = type("Slow", (), {"is_fast": False})()
    assert tokenizer_identity(slow) is None


def test_save_and_load_keep_every_field(tmp_path, tok, hf_cache):
    data = write_jsonl(tmp_path / "d.jsonl", rows(10))
    train, _, report = load_splits(cached(data, tmp_path / "c", val_ratio=0.0), tok, "sft")
    cache = SplitCache(tmp_path / "other", tokenizer_identity(tok))
    cache.save("fp", list(train), report["train"])
    examples, saved = cache.load("fp")
    assert examples == list(train) and saved == json.loads(json.dumps(report["train"]))
    assert cache.load("another fingerprint") is None
