"""Tokenization with one BOS/EOS convention for SFT, DPO and generation.

Every sequence is ``[BOS] + prompt + completion + [EOS]`` (BOS only if the tokenizer has one),
tokenized with ``add_special_tokens=False`` so a tokenizer's own post-processor never adds a
second BOS. Prompt and completion are tokenized jointly and the prompt's tokens are checked to
be a prefix of the joint tokens; where a BPE merge crosses the boundary, the completion is
tokenized on its own instead and the event is counted. Truncation keeps the end of the prompt
(left truncation) and then the start of the completion; a row with no completion token left is
dropped. Loss masks come from lengths, never from token ids (pad may equal EOS).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

from .hh import TOO_LONG, PreferencePair, Turn


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

    @property
    def length(self) -> int:
        """Tokens of its longer row (what padding is measured against)."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass(frozen=True)
class TokenizedConversation:
    input_ids: list[int]  # BOS included
    loss_mask: list[int]  # 1 on tokens whose prediction is trained (assistant text and final EOS)
    example_id: str = ""  # the source row's content id (set by the pipeline)

    @property
    def length(self) -> int:
        return len(self.input_ids)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_completion(tokenizer, prompt: str, prompt_ids: list[int], completion: str, stats: Counter) -> list[int]:
    """Completion ids as they appear after ``prompt`` in the joint tokenization."""
    joint = _encode(tokenizer, prompt + completion)
    if joint[: len(prompt_ids)] == prompt_ids:
        return joint[len(prompt_ids):]
    stats["prompt_boundary_merge"] += 1
    return _encode(tokenizer, completion)


def tokenize_pair(
    tokenizer, pair: PreferencePair, special: SpecialTokens, max_length: int, max_prompt_length: int, stats: Counter
) -> tuple[Optional[TokenizedPair], Optional[str]]:
    """Tokenize and truncate one pair -> (pair, None) or (None, drop reason)."""
    prompt_body = _encode(tokenizer, pair.prompt)
    chosen = encode_completion(tokenizer, pair.prompt, prompt_body, pair.chosen, stats) + [special.eos_id]
    rejected = encode_completion(tokenizer, pair.prompt, prompt_body, pair.rejected, stats) + [special.eos_id]
    prompt = special.prefix + prompt_body
    if len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:]
        stats["prompt_truncated"] += 1
    budget = max_length - len(prompt)
    if budget < 1:
        return None, TOO_LONG
    if len(chosen) > budget or len(rejected) > budget:
        stats["completion_truncated"] += 1
    return TokenizedPair(prompt, chosen[:budget], rejected[:budget]), None


def tokenize_conversation(
    tokenizer, turns: Sequence[Turn], special: SpecialTokens, max_length: int, assistant_turns: str, stats: Counter
) -> tuple[Optional[TokenizedConversation], Optional[str]]:
    """Tokenize a conversation with loss on assistant text: every assistant turn, or the last only.

    Token ownership comes from character offsets of the joint tokenization, so a token is
    trained exactly when it starts inside a selected assistant reply.
    """
    text_parts, spans, cursor = [], [], 0
    last_assistant = max(i for i, t in enumerate(turns) if t.role == "assistant")
    for i, turn in enumerate(turns):
        marker = "\n\nHuman:" if turn.role == "human" else "\n\nAssistant:"
        cursor += len(marker)
        if turn.role == "assistant" and (assistant_turns == "all" or i == last_assistant):
            spans.append((cursor, cursor + len(turn.text)))
        text_parts.append(marker + turn.text)
        cursor += len(turn.text)
    text = "".join(text_parts)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    mask = [int(any(lo <= start < hi for lo, hi in spans)) for start, _ in offsets]
    ids = special.prefix + ids + [special.eos_id]
    mask = [0] * len(special.prefix) + mask + [1]
    final_start = next(i for i, (start, _) in enumerate(offsets) if start >= spans[-1][0]) + len(special.prefix)
    if len(ids) > max_length:
        cut = len(ids) - max_length
        if cut > final_start:
            return None, TOO_LONG  # the final reply itself would lose its start
        ids, mask = ids[cut:], mask[cut:]
        stats["prompt_truncated"] += 1
    return TokenizedConversation(ids, mask), None
