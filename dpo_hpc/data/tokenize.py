"""Tokenization with one BOS/EOS convention for SFT, DPO and generation.

Every sequence is ``[BOS] + prompt + completion + [EOS]`` (BOS only if the tokenizer has one),
tokenized with ``add_special_tokens=False`` so a tokenizer's own post-processor never adds a
second BOS; a chat template's own BOS is not doubled, and its turns end as it writes them (no EOS
appended, as in TRL). Prompt and completion are tokenized jointly and the prompt's tokens are checked to
be a prefix of the joint tokens; where a BPE merge crosses the boundary, the completion is
tokenized on its own instead and the event is counted. Truncation keeps the end of the prompt
(left truncation) and then the start of the completion; a row with no completion token left is
dropped. Loss masks come from lengths, never from token ids (pad may equal EOS).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .hh import TOO_LONG, LabelledCompletion, PreferencePair, RenderedConversation


@dataclass(frozen=True)
class SpecialTokens:
    bos_id: Optional[int]
    eos_id: int
    pad_id: int

    @classmethod
    def of(cls, tokenizer) -> "SpecialTokens":
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token before training")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(tokenizer.bos_token_id, tokenizer.eos_token_id, pad)

    @property
    def prefix(self) -> list[int]:
        return [] if self.bos_id is None else [self.bos_id]


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one preference pair; completions end with EOS unless truncated."""

    prompt_ids: list[int]  # BOS included
    chosen_ids: list[int]
    rejected_ids: list[int]
    example_id: str = ""  # the source row's content id (set by the pipeline)
    margin: Optional[float] = None  # the row's margin (a reward model's loss reads it), if it has one

    @property
    def length(self) -> int:
        """Tokens of its longer row (what padding is measured against)."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass(frozen=True)
class TokenizedCompletion:
    """Token ids of one labelled completion (KTO); ``kl_completion_ids``: another example's
    completion, which KTO's KL estimate scores after this prompt (set by the trainer, never cached)."""

    prompt_ids: list[int]  # BOS included
    completion_ids: list[int]
    label: bool  # desirable
    example_id: str = ""  # the source row's content id (set by the pipeline; a pair's sides add :chosen/:rejected)
    kl_completion_ids: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + max(len(self.completion_ids), len(self.kl_completion_ids))


@dataclass(frozen=True)
class TokenizedConversation:
    input_ids: list[int]  # BOS included
    loss_mask: list[int]  # 1 on tokens whose prediction is trained (assistant text and final EOS)
    example_id: str = ""  # the source row's content id (set by the pipeline)

    @property
    def length(self) -> int:
        return len(self.input_ids)


def texts_encoded(item: PreferencePair | LabelledCompletion | RenderedConversation) -> tuple[str, ...]:
    """The texts ``tokenize_pair``/``tokenize_completion``/``tokenize_conversation`` encode for
    ``item`` (what a batched encoder prepares): a prompt and each completion joined to it; a
    conversation's text."""
    if isinstance(item, PreferencePair):
        return item.prompt, item.prompt + item.chosen, item.prompt + item.rejected
    if isinstance(item, LabelledCompletion):
        return item.prompt, item.prompt + item.completion
    return (item.text,)


class BatchEncodings:
    """A block of texts encoded in one call of the tokenizer (a fast tokenizer spreads it over
    every core), answering the per-text calls tokenization makes as the tokenizer would; a text
    not in the block goes to the tokenizer itself."""

    def __init__(self, tokenizer, texts: list[str], offsets: bool):
        self.tokenizer, self.offsets = tokenizer, offsets
        self.index = {text: i for i, text in enumerate(dict.fromkeys(texts))}
        self.encoded = tokenizer(list(self.index), add_special_tokens=False,
                                 return_offsets_mapping=offsets) if self.index else {}

    def __call__(self, text: str, add_special_tokens: bool = True, return_offsets_mapping: bool = False) -> dict:
        i = self.index.get(text)
        if i is None or add_special_tokens or (return_offsets_mapping and not self.offsets):
            return self.tokenizer(text, add_special_tokens=add_special_tokens,
                                  return_offsets_mapping=return_offsets_mapping)
        found = {"input_ids": self.encoded["input_ids"][i]}
        if return_offsets_mapping:
            found["offset_mapping"] = self.encoded["offset_mapping"][i]
        return found


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_completion(tokenizer, prompt: str, prompt_ids: list[int], completion: str, stats: Counter) -> list[int]:
    """Completion ids as they appear after ``prompt`` in the joint tokenization."""
    joint = _encode(tokenizer, prompt + completion)
    if joint[: len(prompt_ids)] == prompt_ids:
        return joint[len(prompt_ids):]
    stats["prompt_boundary_merge"] += 1
    return _encode(tokenizer, completion)


def _without_special_ends(special: SpecialTokens, ids: list[int]) -> tuple[list[int], bool]:
    """(ids without a leading BOS, whether they had one): a chat template may write its own BOS."""
    if special.bos_id is not None and ids[:1] == [special.bos_id]:
        return ids[1:], True
    return ids, False


def _ended(special: SpecialTokens, ids: list[int], add_eos: bool) -> list[int]:
    """``ids`` + EOS when asked, unless they already end with it."""
    return ids if not add_eos or ids[-1:] == [special.eos_id] else ids + [special.eos_id]


def encode_prompt(tokenizer, prompt_text: str, special: SpecialTokens) -> list[int]:
    """A prompt's ids as training reads them: BOS (once, a chat template may write its own), then the text."""
    return special.prefix + _without_special_ends(special, _encode(tokenizer, prompt_text))[0]


def _prompt_and_completions(
    tokenizer, prompt_text: str, completions: tuple[str, ...], add_eos: bool, special: SpecialTokens, max_length: int,
    max_prompt_length: int, stats: Counter, truncation_mode: str,
) -> tuple[Optional[tuple[list[int], list[list[int]]]], Optional[str]]:
    """Tokenize a prompt and its completions and truncate them alike -> ((prompt ids, completion
    ids), None) or (None, drop reason)."""
    prompt_body = _encode(tokenizer, prompt_text)
    replies = [_ended(special, encode_completion(tokenizer, prompt_text, prompt_body, text, stats), add_eos)
               for text in completions]
    prompt = special.prefix + _without_special_ends(special, prompt_body)[0]  # encode_prompt's, body reused
    if len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:] if truncation_mode == "keep_end" else prompt[:max_prompt_length]
        stats["prompt_truncated"] += 1
    budget = max_length - len(prompt)
    if budget < 1:
        return None, TOO_LONG
    if any(len(reply) > budget for reply in replies):
        stats["completion_truncated"] += 1
    return (prompt, [reply[:budget] for reply in replies]), None


def tokenize_pair(
    tokenizer, pair: PreferencePair, special: SpecialTokens, max_length: int, max_prompt_length: int, stats: Counter,
    truncation_mode: str = "keep_end",
) -> tuple[Optional[TokenizedPair], Optional[str]]:
    """Tokenize and truncate one pair -> (pair, None) or (None, drop reason)."""
    tokens, reason = _prompt_and_completions(tokenizer, pair.prompt, (pair.chosen, pair.rejected), pair.add_eos,
                                             special, max_length, max_prompt_length, stats, truncation_mode)
    return (None, reason) if tokens is None else (TokenizedPair(tokens[0], *tokens[1], margin=pair.margin), None)


def tokenize_completion(
    tokenizer, item: LabelledCompletion, special: SpecialTokens, max_length: int, max_prompt_length: int,
    stats: Counter, truncation_mode: str = "keep_end",
) -> tuple[Optional[TokenizedCompletion], Optional[str]]:
    """Tokenize and truncate one labelled completion as a pair's sides are -> (completion, None)
    or (None, drop reason)."""
    tokens, reason = _prompt_and_completions(tokenizer, item.prompt, (item.completion,), item.add_eos, special,
                                             max_length, max_prompt_length, stats, truncation_mode)
    return (None, reason) if tokens is None else (TokenizedCompletion(tokens[0], tokens[1][0], item.label), None)


def unpaired(example: TokenizedPair | TokenizedCompletion) -> tuple[TokenizedCompletion, ...]:
    """KTO's examples of a tokenized row: a pair's chosen side desirable and its rejected side not,
    each under an id of its own; a labelled completion as it is."""
    if isinstance(example, TokenizedCompletion):
        return (example,)
    return (TokenizedCompletion(example.prompt_ids, example.chosen_ids, True, f"{example.example_id}:chosen"),
            TokenizedCompletion(example.prompt_ids, example.rejected_ids, False, f"{example.example_id}:rejected"))


def tokenize_conversation(
    tokenizer, conversation: RenderedConversation, special: SpecialTokens, max_length: int, stats: Counter,
    truncation_mode: str = "keep_end",
) -> tuple[Optional[TokenizedConversation], Optional[str]]:
    """Tokenize a conversation with the loss on its spans (the assistant replies trained on).

    Token ownership comes from character offsets of the joint tokenization, so a token is
    trained exactly when it starts inside a span; an appended final EOS is trained too.
    """
    spans = conversation.spans
    encoding = tokenizer(conversation.text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoding["offset_mapping"]
    ids, had_bos = _without_special_ends(special, encoding["input_ids"])
    offsets = offsets[1:] if had_bos else offsets
    starts = np.fromiter((start for start, _ in offsets), dtype=np.int64, count=len(offsets))
    trained = np.zeros(len(starts), dtype=bool)  # array ops: a Python test per token was most of SFT loading
    for lo, hi in spans:
        trained |= (starts >= lo) & (starts < hi)
    ended = _ended(special, ids, conversation.add_eos)
    mask = [0] * len(special.prefix) + trained.astype(int).tolist() + [1] * (len(ended) - len(ids))
    ids = special.prefix + ended
    final_start = int(np.flatnonzero(starts >= spans[-1][0])[0]) + len(special.prefix)
    if len(ids) > max_length and truncation_mode == "keep_end":
        cut = len(ids) - max_length
        if cut > final_start:
            return None, TOO_LONG  # the final reply itself would lose its start
        ids, mask = ids[cut:], mask[cut:]
        stats["prompt_truncated"] += 1
    elif len(ids) > max_length:  # keep_start: the end goes, with whatever replies it held
        ids, mask = ids[:max_length], mask[:max_length]
        if not any(mask[1:]):
            return None, TOO_LONG
        stats["completion_truncated"] += 1
    return TokenizedConversation(ids, mask), None
