"""Anthropic HH transcripts -> prompt/chosen/rejected pairs and SFT conversations (pure strings);
and TRL's unpaired rows (prompt, completion, label) -> labelled completions.

A transcript is ``"\\n\\nHuman: ...\\n\\nAssistant: ...(\\n\\nHuman: ...\\n\\nAssistant: ...)*"``.
The prompt is everything up to and including the LAST ``"\\n\\nAssistant:"``; a response keeps its
leading space, which gives a clean token boundary after the colon. Rows that cannot be used are
not silently lost: each parser returns a drop reason that the loader counts and reports.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Optional

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")

# Drop reasons, in the order the report lists them.
MISSING_FIELD = "missing_field"
NOT_STRING = "not_string"
NO_ASSISTANT_TURN = "no_assistant_turn"
PROMPT_MISMATCH = "rejected_prompt_mismatch"
EMPTY_PROMPT = "empty_prompt"
EMPTY_RESPONSE = "empty_response"
IDENTICAL_RESPONSES = "identical_responses"
TOO_LONG = "too_long_after_truncation"
NOT_BOOL_LABEL = "label_not_bool"
NOT_NUMBER_MARGIN = "margin_not_a_number"
DROP_REASONS = (
    MISSING_FIELD, NOT_STRING, NO_ASSISTANT_TURN, PROMPT_MISMATCH,
    EMPTY_PROMPT, EMPTY_RESPONSE, IDENTICAL_RESPONSES, NOT_BOOL_LABEL, NOT_NUMBER_MARGIN, TOO_LONG,
)


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    add_eos: bool = True
    """Text rows: EOS is appended to each completion (unless there already). A chat template ends
    its turns itself (as in TRL)."""
    margin: Optional[float] = None
    """The row's ``margin``: how much better chosen is than rejected (TRL's reward-model column)."""


@dataclass(frozen=True)
class LabelledCompletion:
    """One completion of a prompt, desirable (``label`` True) or not: KTO's unpaired example."""

    prompt: str
    completion: str
    label: bool
    add_eos: bool = True
    """As ``PreferencePair.add_eos``."""


@dataclass(frozen=True)
class RenderedConversation:
    """A conversation as the text the tokenizer sees, and the character spans whose tokens carry
    the loss (the assistant replies trained on)."""

    text: str
    spans: tuple[tuple[int, int], ...]
    add_eos: bool = True
    """As ``PreferencePair.add_eos``: a trained EOS after text rows; a template's own end of turn."""


@dataclass(frozen=True)
class Turn:
    role: str  # "human" or "assistant"
    text: str  # as in the transcript: the assistant's text keeps its leading space


def normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def split_prompt(transcript: str) -> Optional[tuple[str, str]]:
    """(prompt ending in '\\n\\nAssistant:', response) or None if there is no assistant turn."""
    cut = transcript.rfind(ASSISTANT)
    if cut < 0:
        return None
    end = cut + len(ASSISTANT)
    return transcript[:end], transcript[end:]


def _check_strings(row: dict[str, Any], keys: tuple[str, ...]) -> Optional[str]:
    for key in keys:
        if row.get(key) is None:
            return MISSING_FIELD
    for key in keys:
        if not isinstance(row[key], str):
            return NOT_STRING
    return None


def parse_preference_row(row: dict[str, Any]) -> tuple[Optional[PreferencePair], Optional[str]]:
    """One dataset row -> (pair, None) or (None, drop reason).

    Accepts HH rows (full ``chosen``/``rejected`` transcripts) and rows that already carry a
    ``prompt`` with ``chosen``/``rejected`` completions.
    """
    if "prompt" in row and row["prompt"] is not None:
        problem = _check_strings(row, ("prompt", "chosen", "rejected"))
        if problem:
            return None, problem
        prompt = normalize_newlines(row["prompt"])
        chosen, rejected = normalize_newlines(row["chosen"]), normalize_newlines(row["rejected"])
    else:
        problem = _check_strings(row, ("chosen", "rejected"))
        if problem:
            return None, problem
        chosen_text, rejected_text = normalize_newlines(row["chosen"]), normalize_newlines(row["rejected"])
        split = split_prompt(chosen_text)
        if split is None:  # a null in a prompt column is a missing prompt, unless chosen is a transcript
            return None, MISSING_FIELD if "prompt" in row else NO_ASSISTANT_TURN
        prompt, chosen = split
        if not rejected_text.startswith(prompt):
            return None, PROMPT_MISMATCH
        rejected = rejected_text[len(prompt):]
    if not _TURN.sub("", prompt).strip():
        return None, EMPTY_PROMPT
    if not chosen.strip() or not rejected.strip():
        return None, EMPTY_RESPONSE
    if chosen == rejected:
        return None, IDENTICAL_RESPONSES
    return PreferencePair(prompt, chosen, rejected), None


def with_margin(pair: Optional[PreferencePair], reason: Optional[str],
                row: dict[str, Any]) -> tuple[Optional[PreferencePair], Optional[str]]:
    """A parsed pair with its row's ``margin`` (a finite number, where the row has one), or the
    row's drop reason."""
    margin = row.get("margin")
    if pair is None or margin is None:
        return pair, reason
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        return None, NOT_NUMBER_MARGIN
    return dataclasses.replace(pair, margin=float(margin)), None


def row_label(row: dict[str, Any]) -> Optional[bool]:
    """An unpaired row's ``label`` as a bool (true/false, or 1/0 as CSV files store it); None if it is neither."""
    label = row.get("label")
    if isinstance(label, bool):
        return label
    if isinstance(label, int) and label in (0, 1):
        return bool(label)
    return None


def parse_unpaired_row(row: dict[str, Any]) -> tuple[Optional[LabelledCompletion], Optional[str]]:
    """A row of TRL's unpaired form, ``prompt`` + ``completion`` strings and a bool ``label``
    (desirable or not) -> (completion, None) or (None, drop reason)."""
    problem = _check_strings(row, ("prompt", "completion"))
    if problem:
        return None, problem
    if row.get("label") is None:
        return None, MISSING_FIELD
    label = row_label(row)
    if label is None:
        return None, NOT_BOOL_LABEL
    prompt, completion = normalize_newlines(row["prompt"]), normalize_newlines(row["completion"])
    if not _TURN.sub("", prompt).strip():
        return None, EMPTY_PROMPT
    if not completion.strip():
        return None, EMPTY_RESPONSE
    return LabelledCompletion(prompt, completion, label), None


def parse_turns(transcript: str) -> list[Turn]:
    """Split a transcript into turns; text before the first marker is ignored."""
    transcript = normalize_newlines(transcript)
    marks = list(_TURN.finditer(transcript))
    turns = []
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(transcript)
        turns.append(Turn(mark.group(1).lower(), transcript[mark.end():end]))
    return turns


def render_turns(turns: list[Turn]) -> str:
    """Inverse of parse_turns for well-formed transcripts (HH's plain-text template)."""
    return "".join((HUMAN if t.role == "human" else ASSISTANT) + t.text for t in turns)


def render_hh(turns: list[Turn], assistant_turns: str) -> RenderedConversation:
    """The transcript with the spans of its assistant replies: every one, or the last only."""
    text, spans = "", []
    last_assistant = max(i for i, t in enumerate(turns) if t.role == "assistant")
    for i, turn in enumerate(turns):
        text += HUMAN if turn.role == "human" else ASSISTANT
        if turn.role == "assistant" and (assistant_turns == "all" or i == last_assistant):
            spans.append((len(text), len(text) + len(turn.text)))
        text += turn.text
    return RenderedConversation(text, tuple(spans))


def parse_sft_row(row: dict[str, Any],
                  assistant_turns: str = "all") -> tuple[Optional[RenderedConversation], Optional[str]]:
    """A row's chosen conversation -> (its text with the spans trained on, None) or (None, reason).

    An HH transcript (in ``chosen``, or split over ``prompt`` + ``chosen``) trains its assistant
    replies (``assistant_turns``: all, or the last); a plain ``prompt`` string with a ``chosen``
    completion (TRL's prompt-completion form, the same rows DPO reads) trains the completion.
    """
    if "prompt" in row and row["prompt"] is not None:
        problem = _check_strings(row, ("prompt", "chosen"))
        if problem:
            return None, problem
        prompt, completion = normalize_newlines(row["prompt"]), normalize_newlines(row["chosen"])
        if not _TURN.search(prompt):
            return _prompt_completion(prompt, completion)
        text = prompt + completion
    else:
        problem = _check_strings(row, ("chosen",))
        if problem:
            return None, problem
        text = row["chosen"]
    turns = parse_turns(text)
    while turns and turns[-1].role != "assistant":
        turns.pop()  # a trailing human turn has no reply to learn
    if not turns:  # as for preference rows: a prompt column's null is a missing prompt
        return None, MISSING_FIELD if "prompt" in row else NO_ASSISTANT_TURN
    if not any(t.role == "human" and t.text.strip() for t in turns):
        return None, EMPTY_PROMPT
    if not turns[-1].text.strip():
        return None, EMPTY_RESPONSE
    return render_hh(turns, assistant_turns), None


def _prompt_completion(prompt: str, completion: str) -> tuple[Optional[RenderedConversation], Optional[str]]:
    if not prompt.strip():
        return None, EMPTY_PROMPT
    if not completion.strip():
        return None, EMPTY_RESPONSE
    return RenderedConversation(prompt + completion, ((len(prompt), len(prompt) + len(completion)),)), None
