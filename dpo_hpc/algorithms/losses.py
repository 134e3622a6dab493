"""Pairwise preference losses, looked up by name (TRL's ``loss_type`` names).

Each takes the batch's ``PairLogps`` and the beta in force (a float, or one value per pair, never
trained) and returns the loss of every pair; the objective sums them. A beta policy never needs
to know which loss it is combined with. To add a loss: a function here, an entry in
``PAIRWISE_LOSSES``, and a test against a naive implementation.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .preference import PairLogps

PairwiseLoss = Callable[[PairLogps, "float | torch.Tensor"], torch.Tensor]


def dpo_sigmoid_loss(margin: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """Per-pair loss -log sigmoid(beta * M); beta is a scalar or one value per pair, never trained."""
    beta = torch.as_tensor(beta, dtype=margin.dtype, device=margin.device).detach()
    return -F.logsigmoid(beta * margin)


def sigmoid(pairs: PairLogps, beta: float | torch.Tensor) -> torch.Tensor:
    """DPO (Rafailov et al., 2023)."""
    return dpo_sigmoid_loss(pairs.margins, beta)


PAIRWISE_LOSSES: dict[str, PairwiseLoss] = {"sigmoid": sigmoid}
