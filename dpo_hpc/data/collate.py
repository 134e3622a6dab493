"""Batches of token rows with loss masks built from lengths: right-padded, or packed.

A DPO batch holds the B chosen sequences and then the B rejected ones (2B sequences), so the
policy and the reference each run one forward per batch. A KTO batch holds B labelled
completions (``labels``) and, under ``kl_`` keys, the same layout of each prompt with another
example's completion (the KL estimate's sequences, scored without gradient); the reference pass
lays both out as one batch of 2B sequences instead. ``loss_mask[r, t]`` is 1 when token t
of row r is a completion token; the log-prob of token t is read from the logits at t - 1.

Layouts (``Layout``):
- ``padded``: one sequence per row, ``attention_mask`` marks the real tokens.
- ``packed`` (``padding_free``): sequences placed whole, first-fit by decreasing length, into
  rows of the width (from the longest sequence up to longest² / mean length) that leaves the
  fewest token slots, which every layer pays for, among those whose attention work under a dense
  mask over each row is no more than the padded batch's (rows x width² <= sequences x longest²).
- ``flat`` (``padding_free`` with an attention that skips the masked pairs): every sequence in
  one row, no slot spent on padding. The row also carries the boundaries as variable-length
  kernels take them (transformers' flash-attention kwargs): ``cu_seq_lens`` (int32, the offsets
  0, n0, n0 + n1, ...) and ``max_length``, a host int, so no kernel launch waits on the device.
Packed rows have ``position_ids`` that restart at 0 for every sequence and no ``attention_mask``:
transformers then keeps the sequences apart (a block-diagonal causal mask, a block-sparse one
for flex attention, or flash-attention's variable-length kernel). ``sequence_ids`` names each
token's sequence (-1 in a row's unfilled tail).

Either way ``sequence_lengths`` and ``loss_tokens`` (per sequence, in sequence order) say what
the batch holds, whatever its layout, and ``loss_rows``/``loss_positions`` where the hidden
states that predict loss tokens are. A batch's values are tensors but for ``max_length``:
``to_device`` moves the tensors.
"""

from __future__ import annotations

import itertools
from typing import Literal, Sequence

import torch

from .tokenize import TokenizedCompletion, TokenizedConversation, TokenizedPair


Layout = Literal["padded", "packed", "flat"]
Batch = dict[str, "torch.Tensor | int"]


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _summary(rows: Sequence[Sequence[int]], masks: Sequence[Sequence[int]],
             loss_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    # (row, position) of every hidden state whose NEXT token carries loss, found here on the host:
    # nonzero() on a GPU would stall the forward's launch queue until the device catches up
    loss_rows, loss_positions = loss_mask[:, 1:].nonzero(as_tuple=True)
    return {"sequence_lengths": torch.tensor([len(r) for r in rows], dtype=torch.long),
            # position 0 predicts nothing: its token has no preceding context in the sequence
            "loss_tokens": torch.tensor([sum(m[1:]) for m in masks], dtype=torch.long),
            "loss_rows": loss_rows, "loss_positions": loss_positions}


def pad_rows(rows: Sequence[Sequence[int]], masks: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, mask) in enumerate(zip(rows, masks)):
        n = len(row)
        input_ids[i, :n] = torch.tensor(row, dtype=torch.long)
        attention[i, :n] = 1
        loss_mask[i, :n] = torch.tensor(mask, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask,
            **_summary(rows, masks, loss_mask)}


def pack_rows(rows: Sequence[Sequence[int]], masks: Sequence[Sequence[int]], pad_id: int,
              flat: bool = False) -> Batch:
    lengths = [len(r) for r in rows]
    longest, total = max(lengths), sum(lengths)
    if flat:
        width, bins = total, [list(range(len(rows)))]
    else:
        widest = max(longest, longest * longest * len(lengths) // total)
        budget = len(lengths) * longest * longest  # the padded batch's attention work
        packings = [(width, first_fit(lengths, width))
                    for width in sorted({longest + (widest - longest) * k // 8 for k in range(9)})]
        width, bins = min(((w, b) for w, b in packings if len(b) * w * w <= budget),
                          key=lambda packing: (len(packing[1]) * packing[0], packing[0]))
    input_ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(bins), width), dtype=torch.long)
    loss_mask = torch.zeros((len(bins), width), dtype=torch.long)
    sequence_ids = torch.full((len(bins), width), -1, dtype=torch.long)  # -1: a row's unfilled tail
    for r, members in enumerate(bins):
        start = 0
        for i in members:
            n = len(rows[i])
            span = slice(start, start + n)
            input_ids[r, span] = torch.tensor(rows[i], dtype=torch.long)
            position_ids[r, span] = torch.arange(n)
            # a sequence's first token follows another sequence's last here: never a target
            loss_mask[r, span] = torch.tensor([0, *masks[i][1:]], dtype=torch.long)
            sequence_ids[r, span] = i
            start += n
        # the unfilled tail: a sequence of its own (positions from 0), never attended to by real tokens
        position_ids[r, start:] = torch.arange(width - start)
    batch = {"input_ids": input_ids, "position_ids": position_ids, "loss_mask": loss_mask,
             "sequence_ids": sequence_ids, **_summary(rows, masks, loss_mask)}
    if flat:
        batch["cu_seq_lens"] = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
        batch["max_length"] = longest
    return batch


def first_fit(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Sequence indices per row: first fit by decreasing length (ties by index: deterministic)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = next((k for k, free in enumerate(room) if free >= lengths[i]), len(bins))
        if k == len(bins):
            bins.append([])
            room.append(width)
        bins[k].append(i)
        room[k] -= lengths[i]
    return bins


def layout_rows(rows: Sequence[Sequence[int]], masks: Sequence[Sequence[int]], pad_id: int,
                layout: Layout) -> Batch:
    if layout == "padded":
        return pad_rows(rows, masks, pad_id)
    return pack_rows(rows, masks, pad_id, flat=layout == "flat")


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int, layout: Layout = "padded") -> Batch:
    """Sequences [0, B) chosen, [B, 2B) rejected, in ``layout``; and, where any pair has a
    ``margin``, the pairs' ``margins`` (B,), 0 where one has none."""
    rows, masks = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for pair in pairs:
            completion = getattr(pair, side)
            rows.append(pair.prompt_ids + completion)
            masks.append([0] * len(pair.prompt_ids) + [1] * len(completion))
    batch = layout_rows(rows, masks, pad_id, layout)
    if any(pair.margin is not None for pair in pairs):
        batch["margins"] = torch.tensor([pair.margin or 0.0 for pair in pairs], dtype=torch.float32)
    return batch


def collate_conversations(convs: Sequence[TokenizedConversation], pad_id: int,
                          layout: Layout = "padded") -> Batch:
    """B sequences in ``layout``."""
    return layout_rows([c.input_ids for c in convs], [c.loss_mask for c in convs], pad_id, layout)


def _prompted(examples: Sequence[TokenizedCompletion], kl: bool) -> tuple[list[list[int]], list[list[int]]]:
    """Each prompt with its completion (or, with ``kl``, its KL completion), and their loss masks."""
    replies = [e.kl_completion_ids if kl else e.completion_ids for e in examples]
    return ([e.prompt_ids + reply for e, reply in zip(examples, replies)],
            [[0] * len(e.prompt_ids) + [1] * len(reply) for e, reply in zip(examples, replies)])


def collate_completions(examples: Sequence[TokenizedCompletion], pad_id: int, layout: Layout = "padded",
                        kl: bool = True) -> Batch:
    """Sequences [0, B) each prompt with its completion and, with ``kl``, [B, 2B) each prompt with
    its KL completion, in one batch (what the reference scores)."""
    rows, masks = _prompted(examples, kl=False)
    if kl:
        kl_rows, kl_masks = _prompted(examples, kl=True)
        rows, masks = rows + kl_rows, masks + kl_masks
    return layout_rows(rows, masks, pad_id, layout)


def collate_unpaired(examples: Sequence[TokenizedCompletion], pad_id: int, layout: Layout = "padded") -> Batch:
    """KTO's training batch: the B completions in ``layout`` with their ``labels``, and the KL
    sequences as a batch of their own under ``kl_`` keys (``sub_batch(batch, "kl_")``)."""
    batch = layout_rows(*_prompted(examples, kl=False), pad_id, layout)
    kl = layout_rows(*_prompted(examples, kl=True), pad_id, layout)
    return {**batch, "labels": torch.tensor([e.label for e in examples], dtype=torch.bool),
            **{f"kl_{key}": value for key, value in kl.items()}}


def sub_batch(batch: Batch, prefix: str) -> Batch:
    """The batch stored under ``prefix``'d keys, with its own key names."""
    return {key[len(prefix):]: value for key, value in batch.items() if key.startswith(prefix)}


def sequence_ends(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, position) of each sequence's last token, in sequence order, in any layout: where a
    reward model reads its score. Found on the host, before the batch moves to the device."""
    if "sequence_ids" not in batch:  # padded: one sequence per row
        lengths = batch["sequence_lengths"]
        return torch.arange(len(lengths)), lengths - 1
    ids = batch["sequence_ids"]
    following = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -1)], dim=1)
    rows, positions = ((ids >= 0) & (ids != following)).nonzero(as_tuple=True)
    order = ids[rows, positions].argsort()
    return rows[order], positions[order]
