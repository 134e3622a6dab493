"""HH transcript parsing: prompt split, multi-turn, and every drop reason."""

from __future__ import annotations

import pytest

from dpo_hpc.data import hh
from dpo_hpc.data.hh import (PreferencePair, RenderedConversation, Turn, parse_preference_row, parse_sft_row,
                             parse_turns, render_turns)

P = "\n\nHuman: Hi there\n\nAssistant:"


def test_single_turn_split_keeps_leading_space():
    pair, reason = parse_preference_row({"chosen": P + " Hello!", "rejected": P + " Go away."})
    assert reason is None
    assert pair == PreferencePair(P, " Hello!", " Go away.")


def test_multi_turn_prompt_ends_at_last_assistant_marker():
    history = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    pair, _ = parse_preference_row({"chosen": history + " d", "rejected": history + " e"})
    assert pair.prompt == history and (pair.chosen, pair.rejected) == (" d", " e")


def test_crlf_is_normalised():
    pair, reason = parse_preference_row({"chosen": "\r\n\r\nHuman: x\r\n\r\nAssistant: y", "rejected": "\n\nHuman: x\n\nAssistant: z"})
    assert reason is None and pair.prompt == "\n\nHuman: x\n\nAssistant:"


def test_explicit_prompt_rows_are_accepted():
    pair, reason = parse_preference_row({"prompt": P, "chosen": " a", "rejected": " b"})
    assert reason is None and pair == PreferencePair(P, " a", " b")


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"chosen": P + " a"}, hh.MISSING_FIELD),
        ({"chosen": None, "rejected": P + " a"}, hh.MISSING_FIELD),
        ({"chosen": P + " a", "rejected": 5}, hh.NOT_STRING),
        ({"chosen": ["x"], "rejected": P + " a"}, hh.NOT_STRING),
        ({"chosen": "\n\nHuman: no reply here", "rejected": "\n\nHuman: no reply here"}, hh.NO_ASSISTANT_TURN),
        ({"chosen": P + " a", "rejected": "\n\nHuman: other\n\nAssistant: b"}, hh.PROMPT_MISMATCH),
        ({"chosen": "\n\nAssistant: a", "rejected": "\n\nAssistant: b"}, hh.EMPTY_PROMPT),
        ({"chosen": P + "   ", "rejected": P + " b"}, hh.EMPTY_RESPONSE),
        ({"chosen": P + " a", "rejected": P}, hh.EMPTY_RESPONSE),
        ({"chosen": P + " same", "rejected": P + " same"}, hh.IDENTICAL_RESPONSES),
        ({"prompt": P, "chosen": " a", "rejected": None}, hh.MISSING_FIELD),
        ({"prompt": None, "chosen": " a", "rejected": " b"}, hh.MISSING_FIELD),  # a prompt column's null
    ],
)
def test_malformed_rows_get_a_reason(row, reason):
    assert parse_preference_row(row) == (None, reason)


def test_a_null_prompt_beside_hh_transcripts_reads_them_as_transcripts():
    pair, reason = parse_preference_row({"prompt": None, "chosen": P + " a", "rejected": P + " b"})
    assert reason is None and pair == PreferencePair(P, " a", " b")


def test_turns_round_trip():
    text = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d"
    turns = parse_turns(text)
    assert [t.role for t in turns] == ["human", "assistant", "human", "assistant"]
    assert turns[1] == Turn("assistant", " b") and render_turns(turns) == text


def test_sft_row_drops_trailing_human_turn():
    conversation, reason = parse_sft_row({"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c"})
    assert reason is None and conversation.text == "\n\nHuman: a\n\nAssistant: b"
    assert [conversation.text[lo:hi] for lo, hi in conversation.spans] == [" b"]


def test_sft_hh_prompt_column_trains_every_reply_or_the_last():
    row = {"prompt": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:", "chosen": " d"}
    every, _ = parse_sft_row(row)
    assert [every.text[lo:hi] for lo, hi in every.spans] == [" b", " d"]
    last, _ = parse_sft_row(row, "last")
    assert [last.text[lo:hi] for lo, hi in last.spans] == [" d"]


def test_sft_prompt_completion_rows_train_the_completion():
    """TRL's prompt-completion form (plain strings, no HH markers): the rows DPO reads also train SFT."""
    conversation, reason = parse_sft_row({"prompt": "Q: 2+2?\r\n", "chosen": " 4", "rejected": " 5"})
    assert reason is None and conversation == RenderedConversation("Q: 2+2?\n 4", ((8, 10),))


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"chosen": "\n\nHuman: only a question"}, hh.NO_ASSISTANT_TURN),
        ({"chosen": "\n\nAssistant: hello"}, hh.EMPTY_PROMPT),
        ({"chosen": "\n\nHuman: q\n\nAssistant:  "}, hh.EMPTY_RESPONSE),
        ({"chosen": 7}, hh.NOT_STRING),
        ({}, hh.MISSING_FIELD),
        ({"prompt": None, "chosen": " an answer"}, hh.MISSING_FIELD),
        ({"prompt": " ", "chosen": " an answer"}, hh.EMPTY_PROMPT),
        ({"prompt": "Q?", "chosen": "\n"}, hh.EMPTY_RESPONSE),
        ({"prompt": "Q?", "chosen": None}, hh.MISSING_FIELD),
    ],
)
def test_sft_drop_reasons(row, reason):
    assert parse_sft_row(row) == (None, reason)
