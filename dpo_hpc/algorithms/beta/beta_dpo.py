"""Beta-DPO (Wu et al., 2024): gap statistics, Gaussian-weighted filtering, the batch beta, its
controller and the beta policy. Every hyperparameter is declared once, in the ``[beta_dpo]``
config section the controller takes.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ...config.schema import BetaDPOSectionConfig
from . import Collective


def gap_std(gaps: torch.Tensor, kind: str) -> float:
    """Standard deviation of the gaps: 'population' (ddof 0) or 'unbiased' (ddof 1; 0 for one gap)."""
    if gaps.numel() < 2:
        return 0.0
    return gaps.detach().double().std(correction=1 if kind == "unbiased" else 0).item()


def ema(previous: float, current: float, momentum: float) -> float:
    """m * previous + (1 - m) * current."""
    return momentum * previous + (1.0 - momentum) * current


def gaussian_weights(gaps: torch.Tensor, mu: float, sigma: float, eps: float = 1e-6) -> torch.Tensor:
    """w_i = exp(-(M_i - mu)^2 / (2 sigma^2)) with sigma >= eps; non-finite weights become 0 and
    all-zero weights become uniform, so sampling is always defined."""
    sigma = max(sigma, eps)
    z = (gaps.detach().double() - mu) / sigma
    weights = torch.exp(-0.5 * z * z)
    weights = torch.where(torch.isfinite(weights), weights, torch.zeros_like(weights))
    if weights.sum() <= 0:
        weights = torch.ones_like(weights)
    return weights


def keep_count(n: int, rho: float) -> int:
    """max(1, min(n, floor(rho n))), with rho n rounded to 9 decimals first so 0.29 * 100 keeps 29."""
    return max(1, min(n, math.floor(round(rho * n, 9))))


def sample_keep_mask(weights: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Boolean mask of k rows drawn without replacement with probability proportional to weights."""
    chosen = torch.multinomial(weights.double().cpu(), k, replacement=False, generator=generator)
    mask = torch.zeros(weights.numel(), dtype=torch.bool)
    mask[chosen] = True
    return mask


def batch_beta(beta_0: float, alpha: float, gaps: torch.Tensor, mask: torch.Tensor, mu: float, min_beta: float) -> float:
    """max(beta_0 (1 + alpha (mean of selected gaps - mu)), min_beta); never carries gradient."""
    selected = gaps.detach().double().cpu()[mask.cpu()]
    mean = selected.mean().item() if selected.numel() else gaps.detach().double().mean().item()
    return max(beta_0 * (1.0 + alpha * (mean - mu)), min_beta)


def masked_mean(losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(mask * loss) / max(sum(mask), 1): the mean over the selected rows."""
    mask = mask.to(losses.device, losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)


class BetaDPOController:
    """``select(gaps)`` takes the gaps of the GLOBAL micro-batch (identical on every rank) and
    returns the keep mask over it and the batch beta. Every rank draws the same mask because the
    generator starts from the same seed and is advanced identically."""

    def __init__(self, cfg: BetaDPOSectionConfig, seed: int = 0, eps: float = 1e-6):
        self.cfg = cfg
        self.eps = eps  # floor of sigma (the original framework's constant)
        self.mu = 0.0
        self.sigma = 0.0
        self.initialised = cfg.ema_init == "zeros"
        self.generator = torch.Generator().manual_seed(seed)

    def _update_statistics(self, gaps: torch.Tensor) -> None:
        mean, std = gaps.double().mean().item(), gap_std(gaps, self.cfg.std)
        if not self.initialised:
            self.mu, self.sigma, self.initialised = mean, max(std, self.eps), True
        else:
            self.mu = ema(self.mu, mean, self.cfg.m)
            self.sigma = max(ema(self.sigma, std, self.cfg.m), self.eps)

    def select(self, gaps: torch.Tensor, train: bool = True) -> tuple[torch.Tensor, float, dict[str, float]]:
        """Training: update mu/sigma, draw the mask, compute beta. Eval: keep all rows, beta_0,
        no state change (deterministic)."""
        gaps = gaps.detach().reshape(-1).double().cpu()
        if not train:
            return torch.ones(gaps.numel(), dtype=torch.bool), self.cfg.beta_0, {}
        self._update_statistics(gaps)
        k = keep_count(gaps.numel(), self.cfg.rho)
        mask = sample_keep_mask(gaussian_weights(gaps, self.mu, self.sigma, self.eps), k, self.generator)
        beta = batch_beta(self.cfg.beta_0, self.cfg.alpha, gaps, mask, self.mu, self.cfg.min_beta)
        stats = {"beta_dpo/beta_used": beta, "beta_dpo/M0": self.mu, "beta_dpo/sigma": self.sigma,
                 "beta_dpo/gap_mean": gaps.mean().item(), "beta_dpo/gap_selected_mean": gaps[mask].mean().item(),
                 "beta_dpo/kept": float(k), "beta_dpo/keep_ratio": k / gaps.numel()}
        return mask, beta, stats

    def state_dict(self) -> dict[str, Any]:
        return {"mu": self.mu, "sigma": self.sigma, "initialised": self.initialised,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mu, self.sigma, self.initialised = float(state["mu"]), float(state["sigma"]), bool(state["initialised"])
        self.generator.set_state(state["generator"])


class BetaDPOPolicy:
    """Per micro-batch, the gaps of the global micro-batch (all ranks) update mu/sigma, a
    Gaussian-weighted sample of k = floor(rho N) rows is kept (the same draw on every rank), and
    the loss over the kept rows uses the batch beta. Evaluation keeps every row and uses beta_0."""

    def __init__(self, controller: BetaDPOController, collective: Collective):
        self.controller = controller
        self.collective = collective
        self._records: list[dict[str, float]] = []

    @classmethod
    def from_config(cls, cfg, collective: Collective) -> "BetaDPOPolicy":
        return cls(BetaDPOController(cfg.beta_dpo, seed=cfg.training.seed), collective)

    def train_beta(self, margins: torch.Tensor) -> tuple[float, Optional[torch.Tensor]]:
        mask, beta, record = self.controller.select(self.collective.gather(margins), train=True)
        self._records.append(record)
        pairs, rank = margins.shape[0], self.collective.rank
        return beta, mask[rank * pairs:(rank + 1) * pairs]

    def eval_beta(self) -> float:
        return self.controller.cfg.beta_0

    def loss_units(self, local_pairs: int, world_size: int) -> float:
        # k rows are kept per global micro-batch; each rank counts its share so the sum over ranks is k.
        return keep_count(local_pairs * world_size, self.controller.cfg.rho) / world_size

    def end_step(self, step_margins: torch.Tensor) -> dict[str, float]:
        records, self._records = self._records, []
        return {name: sum(r[name] for r in records) / len(records) for name in records[0]} if records else {}

    def state_dict(self) -> dict:
        return {"beta_dpo": self.controller.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state["beta_dpo"])
