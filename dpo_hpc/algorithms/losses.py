"""Pairwise preference losses, one class each (declared in ``dpo_hpc.config.losses``).

A loss says which margin the beta policies read (``margins``: the summed log-ratio margin M, or
a length-averaged one) and maps the batch's pairs and the beta in force (a float, or one value
per pair, never trained) to the loss of every pair. Most losses are a function of that margin
alone; a few weigh the chosen and the rejected log-ratio apart, and read them from the pairs.
Either way a policy never needs to know which loss it is combined with. To add a loss: a class
here (its constructor takes the training options it reads), an entry in
``dpo_hpc.config.losses.LOSSES``, and a test against a naive implementation.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F

from .preference import PairLogps


class PairwiseLoss(Protocol):
    def margins(self, pairs: PairLogps) -> torch.Tensor:
        """The margin of every pair that the beta policies read (with gradient)."""

    def __call__(self, margins: torch.Tensor, beta: float | torch.Tensor, pairs: PairLogps) -> torch.Tensor:
        """The loss of every pair; ``margins`` is ``self.margins(pairs)``."""


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

    def __call__(self, margins, beta, pairs=None):
        if not self.eps:
            return dpo_sigmoid_loss(margins, beta)
        z = _beta(beta, margins) * margins
        return -(1 - self.eps) * F.logsigmoid(z) - self.eps * F.logsigmoid(-z)


class Robust(SummedMargin):
    """Robust DPO: [-(1-eps) log s(bM) + eps log s(-bM)] / (1 - 2 eps), unbiased for labels
    flipped with probability eps."""

    def __init__(self, label_smoothing: float = 0.0):
        self.eps = label_smoothing

    def __call__(self, margins, beta, pairs=None):
        z = _beta(beta, margins) * margins
        return (-(1 - self.eps) * F.logsigmoid(z) + self.eps * F.logsigmoid(-z)) / (1 - 2 * self.eps)


class Hinge(SummedMargin):
    """SLiC / RSO: max(0, 1 - bM)."""

    def __call__(self, margins, beta, pairs=None):
        return torch.relu(1 - _beta(beta, margins) * margins)


class ExoPair(SummedMargin):
    """EXO (Ji et al., 2024, eq. 16): KL(q || p) between q = (s(bM), s(-bM)) over the pair and the
    target p = (1 - eps, eps); eps > 0 (``label_smoothing``; the paper uses 1e-3)."""

    def __init__(self, label_smoothing: float):
        self.log_p = (math.log1p(-label_smoothing), math.log(label_smoothing))

    def __call__(self, margins, beta, pairs=None):
        z = _beta(beta, margins) * margins
        log_q_chosen, log_q_rejected = F.logsigmoid(z), F.logsigmoid(-z)
        return (log_q_chosen.exp() * (log_q_chosen - self.log_p[0])
                + log_q_rejected.exp() * (log_q_rejected - self.log_p[1]))


class DiscoPOP(SummedMargin):
    """DiscoPOP (Lu et al., 2024, eq. 5): the logistic loss -log s(bM) blended into the
    exponential exp(-bM) by s(bM / tau) (``discopop_tau``)."""

    def __init__(self, discopop_tau: float = 0.05):
        self.tau = discopop_tau

    def __call__(self, margins, beta, pairs=None):
        z = _beta(beta, margins) * margins
        blend = torch.sigmoid(z / self.tau)
        return -F.logsigmoid(z) * (1 - blend) + torch.exp(-z) * blend


class LengthAveragedMargin:
    """Losses of the margin over length-averaged log-probs (each sequence's sum divided by its
    completion tokens, as TRL computes them)."""

    @staticmethod
    def margins(pairs: PairLogps) -> torch.Tensor:
        return pairs.mean_margins


class IPO(LengthAveragedMargin):
    """IPO: (M_avg - 1/(2b))^2; b plays the paper's tau."""

    def __call__(self, margins, beta, pairs=None):
        return (margins - 1 / (2 * _beta(beta, margins))) ** 2


class SigmoidNorm(LengthAveragedMargin):
    """DPO's -log s(b M_avg) on the length-averaged margin (TRL's ``sigmoid_norm``)."""

    def __call__(self, margins, beta, pairs=None):
        return -F.logsigmoid(_beta(beta, margins) * margins)


class SimPO(LengthAveragedMargin):
    """SimPO: -log s(b M_avg - gamma) (``simpo_gamma``), with label smoothing as TRL's CPO has it.
    Reference-free: the objective gives it zero reference log-probs, so M_avg is the policy's own
    length-averaged margin."""

    def __init__(self, simpo_gamma: float = 0.5, label_smoothing: float = 0.0):
        self.gamma, self.eps = simpo_gamma, label_smoothing

    def __call__(self, margins, beta, pairs=None):
        z = _beta(beta, margins) * margins - self.gamma
        return -(1 - self.eps) * F.logsigmoid(z) - self.eps * F.logsigmoid(-z)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler, 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class ORPO:
    """ORPO (Hong et al., 2024), as published and as TRL's ORPOTrainer computes it: the chosen
    reply's NLL plus b x -log s(log odds ratio), the odds p / (1 - p) of each reply's length-averaged
    probability p. Reference-free; the beta policies read the log odds ratio."""

    @staticmethod
    def margins(pairs: PairLogps) -> torch.Tensor:
        chosen, rejected = pairs.policy_means
        return (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))

    def __call__(self, margins, beta, pairs):
        return pairs.chosen_nll - _beta(beta, margins) * F.logsigmoid(margins)


class NCAPair(SummedMargin):
    """NCA (Chen et al., 2024), pairwise: -log s(r_w) - log s(-r_w)/2 - log s(-r_l)/2 with each
    side's reward r = b x its log-ratio: the chosen likelihood is pushed up, not only the margin."""

    def __call__(self, margins, beta, pairs):
        b = _beta(beta, margins)
        chosen, rejected = b * pairs.chosen_logratios, b * pairs.rejected_logratios
        return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


class BCOPair(SummedMargin):
    """BCO on pairs (Jung et al., 2024; TRL's form): chosen classified good, rejected bad,
    -log s(r_w) - log s(-r_l)."""

    def __call__(self, margins, beta, pairs):
        b = _beta(beta, margins)
        return -F.logsigmoid(b * pairs.chosen_logratios) - F.logsigmoid(-b * pairs.rejected_logratios)


class SPPOHard(SummedMargin):
    """SPPO with hard win probabilities (Wu et al., 2024, eq. 4.7 with P = 1 for the winner):
    (log-ratio_w - 1/(2b))^2 + (log-ratio_l + 1/(2b))^2."""

    def __call__(self, margins, beta, pairs):
        half = 0.5 / _beta(beta, margins)
        return (pairs.chosen_logratios - half) ** 2 + (pairs.rejected_logratios + half) ** 2


class APOZero(SummedMargin):
    """APO-zero (D'Oosterlinck et al., 2024, eq. 7), for chosen replies better than the model's own:
    1 - s(r_w) + s(r_l): the chosen likelihood up, the rejected down."""

    def __call__(self, margins, beta, pairs):
        b = _beta(beta, margins)
        return 1 - torch.sigmoid(b * pairs.chosen_logratios) + torch.sigmoid(b * pairs.rejected_logratios)


class APODown(SummedMargin):
    """APO-down (eq. 8), for chosen replies worse than the model's own: s(r_w) + 1 - s(bM): both
    likelihoods down, the rejected more."""

    def __call__(self, margins, beta, pairs):
        b = _beta(beta, margins)
        return torch.sigmoid(b * pairs.chosen_logratios) + 1 - torch.sigmoid(b * margins)


class ChosenNLL(SummedMargin):
    """The chosen reply's mean token NLL under the policy (TRL's ``sft`` loss type, per pair as
    ``rpo_alpha``'s term: TRL averages over every chosen token of the batch instead)."""

    def __call__(self, margins, beta, pairs):
        return pairs.chosen_nll


class Mixture:
    """TRL's list of loss types with ``loss_weights`` (MPO, Wang et al., 2024): the weighted sum
    of each loss of a pair. The beta policies read the first loss's margin; each other loss reads
    its own from the pairs."""

    def __init__(self, losses: list, weights: list[float]):
        self.losses, self.weights = losses, weights

    def margins(self, pairs: PairLogps) -> torch.Tensor:
        return self.losses[0].margins(pairs)

    def __call__(self, margins, beta, pairs):
        total = self.weights[0] * self.losses[0](margins, beta, pairs)
        for loss, weight in zip(self.losses[1:], self.weights[1:]):
            total = total + weight * loss(loss.margins(pairs), beta, pairs)
        return total
