"""TRL's reward-model ``margin`` column: read for a reward model from text and conversational
preference rows (and through ``dataset.columns``), refused when it is not a number, carried through
tokenization, the tokenized cache and collation, absent where the data has none, and neither read
nor checked for the other trainers."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_hpc.data.cache import SplitCache, tokenizer_identity
from dpo_hpc.data.collate import collate_pairs
from dpo_hpc.data.formats import RowParser
from dpo_hpc.data.pipeline import load_splits
from dpo_hpc.data.tokenize import TokenizedPair
from dpo_hpc.tiny_model import build_byte_tokenizer

from test_formats import conversational, cfg, write_jsonl


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def text_row(i: int, **extra) -> dict:
    return {"prompt": f"Reverse: w{i} =", "chosen": f" {i}w", "rejected": " nope", **extra}


def test_margins_of_text_and_conversational_rows_reach_the_tokenized_pairs(tmp_path, tok, hf_cache):
    rows = [text_row(0, margin=1.5), text_row(1), text_row(2, margin=0), {**conversational(3), "margin": 2},
            text_row(4, margin=None)]
    train, _, report = load_splits(cfg(write_jsonl(tmp_path / "d.jsonl", rows)), tok, "preference", margins=True)
    assert [p.margin for p in train] == [1.5, None, 0.0, 2.0, None] and not report["train"]["dropped"]
    ignored, _, _ = load_splits(cfg(write_jsonl(tmp_path / "d.jsonl", rows)), tok, "preference")  # DPO's data
    assert [p.margin for p in ignored] == [None] * 5 and ignored.fingerprint != train.fingerprint


@pytest.mark.parametrize("margin", [True, "2", float("nan"), float("inf"), [1.0]])
def test_a_margin_that_is_not_a_finite_number_drops_its_row(tok, margin):
    """In-memory rows keep their Python types (a JSONL file's column is unified by its loader)."""
    parse = RowParser("preference", "auto", tok, "rows", margins=True)
    assert parse(text_row(1, margin=margin)) == (None, "margin_not_a_number")
    assert parse({**conversational(1), "margin": margin}) == (None, "margin_not_a_number")
    assert parse(text_row(1, margin=-0.5))[0].margin == -0.5
    unread = RowParser("preference", "auto", tok, "rows")  # another trainer's: the column is not its business
    assert unread(text_row(1, margin=margin))[0].margin is None


def test_a_margin_column_of_another_name_is_mapped_like_the_others(tmp_path, tok, hf_cache):
    rows = [text_row(i, strength=i / 2) for i in range(4)]
    train, _, _ = load_splits(cfg(write_jsonl(tmp_path / "d.jsonl", rows), columns={"margin": "strength"}), tok,
                              "preference", margins=True)
    assert [p.margin for p in train] == [0.0, 0.5, 1.0, 1.5]


def test_margins_survive_the_tokenized_cache(tmp_path, tok):
    pairs = [TokenizedPair([1, 4], [5, 2], [6, 2], "a", margin=0.25), TokenizedPair([1], [7, 2], [8, 2], "b")]
    cache = SplitCache(tmp_path, tokenizer_identity(tok))
    cache.save("fp", pairs, {"rows": 2})
    assert cache.load("fp") == (pairs, {"rows": 2})


def test_a_batch_has_margins_only_where_its_pairs_have_any():
    with_one = [TokenizedPair([1], [5, 2], [6, 2], margin=math.pi), TokenizedPair([1], [7, 2], [8, 2])]
    assert collate_pairs(with_one, 0)["margins"].tolist() == pytest.approx([math.pi, 0.0])
    assert collate_pairs(with_one, 0, "packed")["margins"].dtype == torch.float32
    assert "margins" not in collate_pairs([TokenizedPair([1], [5, 2], [6, 2])], 0)
