"""Right-padded batches with loss masks built from lengths.

A DPO batch stacks the B chosen sequences on top of the B rejected ones (2B rows), so the
policy and the reference each run one forward per batch. ``loss_mask[b, t]`` is 1 when token t
of row b is a completion token; the log-prob of token t is read from the logits at t - 1.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .tokenize import TokenizedConversation, TokenizedPair


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
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask}


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """-> input_ids, attention_mask, loss_mask of shape (2B, T): rows [0, B) chosen, [B, 2B) rejected."""
    rows, masks = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for pair in pairs:
            completion = getattr(pair, side)
            rows.append(pair.prompt_ids + completion)
            masks.append([0] * len(pair.prompt_ids) + [1] * len(completion))
    return pad_rows(rows, masks, pad_id)


def collate_conversations(convs: Sequence[TokenizedConversation], pad_id: int) -> dict[str, torch.Tensor]:
    """-> input_ids, attention_mask, loss_mask of shape (B, T)."""
    return pad_rows([c.input_ids for c in convs], [c.loss_mask for c in convs], pad_id)
