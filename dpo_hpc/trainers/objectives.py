"""How a batch becomes a loss, per trainer. The loop in ``loop.py`` drives these.

An objective returns the SUM of its per-unit losses (tokens for SFT, pairs for DPO) and
per-metric (sum, count) pairs; the loop normalises by the global unit count of the optimizer
step, so the gradient is the same however the global batch is split over ranks and
accumulation steps.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..data.collate import collate_conversations, collate_pairs
from ..losses import dpo_sigmoid_loss, margins, preference_metrics, sequence_logps, split_chosen_rejected, token_logps

Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]  # metric -> (sum, count)


class Objective(Protocol):
    data_kind: str  # "sft" or "preference": what load_splits produces for it

    def collate(self, examples: list) -> dict[str, torch.Tensor]: ...

    def units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """How many loss units (tokens or pairs) the batch holds."""

    def loss_and_stats(self, engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]: ...

    def eval_stats(self, engine, batch: dict[str, torch.Tensor]) -> Stats: ...


def _forward_logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


class SFTObjective:
    """Next-token NLL on assistant tokens, averaged over the loss tokens of the global batch."""

    data_kind = "sft"

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def collate(self, examples):
        return collate_conversations(examples, self.pad_id)

    def units(self, batch):
        return batch["loss_mask"][:, 1:].sum().float()

    def _stats(self, engine, batch):
        logps = token_logps(_forward_logits(engine, batch), batch["input_ids"])
        mask = batch["loss_mask"][:, 1:].float()
        nll_sum = -(logps * mask).sum()
        tokens = mask.sum()
        return nll_sum, {"loss": (nll_sum.detach(), tokens)}

    def loss_and_stats(self, engine, batch):
        return self._stats(engine, batch)

    def eval_stats(self, engine, batch):
        with torch.no_grad():
            return self._stats(engine, batch)[1]


class DPOObjective:
    """Sigmoid DPO with a fixed beta; one policy and one reference forward over chosen+rejected."""

    data_kind = "preference"

    def __init__(self, reference, beta: float, pad_id: int):
        self.reference = reference
        self.beta = beta
        self.pad_id = pad_id

    def collate(self, examples):
        return collate_pairs(examples, self.pad_id)

    def units(self, batch):
        return torch.tensor(batch["input_ids"].shape[0] // 2, dtype=torch.float32)

    def _logps(self, engine, batch):
        policy = sequence_logps(_forward_logits(engine, batch), batch["input_ids"], batch["loss_mask"])
        with torch.no_grad():
            ref = sequence_logps(_forward_logits(self.reference, batch), batch["input_ids"], batch["loss_mask"])
        return (*split_chosen_rejected(policy), *split_chosen_rejected(ref))

    def _stats(self, logps, losses) -> Stats:
        pairs = torch.tensor(float(losses.shape[0]))
        per_pair = preference_metrics(*logps, beta=self.beta)
        stats = {"loss": (losses.detach().sum(), pairs)}
        stats.update({name: (values.sum(), pairs) for name, values in per_pair.items()})
        return stats

    def loss_and_stats(self, engine, batch):
        logps = self._logps(engine, batch)
        losses = dpo_sigmoid_loss(margins(*logps), self.beta)
        return losses.sum(), self._stats(logps, losses)

    def eval_stats(self, engine, batch):
        with torch.no_grad():
            logps = self._logps(engine, batch)
            return self._stats(logps, dpo_sigmoid_loss(margins(*logps), self.beta))
