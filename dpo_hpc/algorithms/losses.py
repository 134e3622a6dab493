"""Pairwise preference losses, one class each (declared in ``dpo_hpc.config.losses``).

A loss says which margin it is a function of (``margins``: the summed log-ratio margin M, or
IPO's length-averaged one) and maps that margin and the beta in force (a float, or one value
per pair, never trained) to the loss of every pair. The beta policy reads the same margin, so a
policy never needs to know which loss it is combined with. To add a loss: a class here, an
entry in ``dpo_hpc.config.losses.LOSSES``, and a test against a naive implementation.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from .preference import PairLogps


class PairwiseLoss(Protocol):
    def margins(self, pairs: PairLogps) -> torch.Tensor:
        """The margin of every pair the loss is a function of (with gradient)."""

    def __call__(self, margins: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
        """The loss of every pair."""


def _beta(beta: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(beta, dtype=like.dtype, device=like.device).detach()


def dpo_sigmoid_loss(margin: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """Per-pair loss -log sigmoid(beta * M); beta is a scalar or one value per pair, never trained."""
    return -F.logsigmoid(_beta(beta, margin) * margin)


class SummedMargin:
    """Losses of the log-ratio margin M over summed completion log-probs."""

    @staticmethod
    def margins(pairs: PairLogps) -> torch.Tensor:
        return pairs.margins


class Sigmoid(SummedMargin):
    """DPO; with label smoothing eps, conservative DPO: -(1-eps) log s(bM) - eps log s(-bM)."""

    def __init__(self, label_smoothing: float = 0.0):
        self.eps = label_smoothing

    def __call__(self, margins, beta):
        if not self.eps:
            return dpo_sigmoid_loss(margins, beta)
        z = _beta(beta, margins) * margins
        return -(1 - self.eps) * F.logsigmoid(z) - self.eps * F.logsigmoid(-z)


class Robust(SummedMargin):
    """Robust DPO: [-(1-eps) log s(bM) + eps log s(-bM)] / (1 - 2 eps), unbiased for labels
    flipped with probability eps."""

    def __init__(self, label_smoothing: float = 0.0):
        self.eps = label_smoothing

    def __call__(self, margins, beta):
        z = _beta(beta, margins) * margins
        return (-(1 - self.eps) * F.logsigmoid(z) + self.eps * F.logsigmoid(-z)) / (1 - 2 * self.eps)


class Hinge(SummedMargin):
    """SLiC / RSO: max(0, 1 - bM)."""

    def __init__(self, label_smoothing: float = 0.0):
        pass

    def __call__(self, margins, beta):
        return torch.relu(1 - _beta(beta, margins) * margins)


class IPO:
    """IPO: (M_avg - 1/(2b))^2 over length-averaged log-probs (each sequence's sum divided by its
    completion tokens, as TRL does); b plays the paper's tau."""

    def __init__(self, label_smoothing: float = 0.0):
        pass

    @staticmethod
    def margins(pairs: PairLogps) -> torch.Tensor:
        return pairs.mean_margins

    def __call__(self, margins, beta):
        return (margins - 1 / (2 * _beta(beta, margins))) ** 2
