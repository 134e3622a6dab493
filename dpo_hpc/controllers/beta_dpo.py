"""Beta-DPO controller: running gap mean/std, the filtering generator, the batch beta."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..losses.beta_dpo import batch_beta, ema, gap_std, gaussian_weights, keep_count, sample_keep_mask


@dataclass(frozen=True)
class BetaDPOConfig:
    """The original framework's ``BetaDPOConfig`` (``beta_dpo`` keys) plus parity switches."""

    beta_0: float = 0.1
    m: float = 0.9
    rho: float = 0.8
    alpha: float = 0.6
    min_beta: float = 1e-3
    eps: float = 1e-6
    ema_init: str = "first_batch"  # or "zeros" (official beta-DPO code)
    std: str = "population"  # or "unbiased" (official beta-DPO code)
    seed: int = 0  # of the filtering generator

    def __post_init__(self):
        checks = [
            (self.beta_0 > 0, f"beta_0 must be > 0, got {self.beta_0}"),
            (0 <= self.m < 1, f"m must lie in [0, 1), got {self.m}"),
            (0 < self.rho <= 1, f"rho must lie in (0, 1], got {self.rho}"),
            (self.alpha >= 0, f"alpha must be >= 0, got {self.alpha}"),
            (self.min_beta > 0, f"min_beta must be > 0, got {self.min_beta}"),
            (self.ema_init in ("first_batch", "zeros"), f"ema_init must be 'first_batch' or 'zeros', got {self.ema_init!r}"),
            (self.std in ("population", "unbiased"), f"std must be 'population' or 'unbiased', got {self.std!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class BetaDPOController:
    """``select(gaps)`` takes the gaps of the GLOBAL micro-batch (identical on every rank) and
    returns the keep mask over it and the batch beta. Every rank draws the same mask because the
    generator starts from the same seed and is advanced identically."""

    def __init__(self, cfg: BetaDPOConfig):
        self.cfg = cfg
        self.mu = 0.0
        self.sigma = 0.0
        self.initialised = cfg.ema_init == "zeros"
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def _update_statistics(self, gaps: torch.Tensor) -> None:
        mean, std = gaps.double().mean().item(), gap_std(gaps, self.cfg.std)
        if not self.initialised:
            self.mu, self.sigma, self.initialised = mean, max(std, self.cfg.eps), True
        else:
            self.mu = ema(self.mu, mean, self.cfg.m)
            self.sigma = max(ema(self.sigma, std, self.cfg.m), self.cfg.eps)

    def select(self, gaps: torch.Tensor, train: bool = True) -> tuple[torch.Tensor, float, dict[str, float]]:
        """Training: update mu/sigma, draw the mask, compute beta. Eval: keep all rows, beta_0,
        no state change (deterministic)."""
        gaps = gaps.detach().reshape(-1).double().cpu()
        if not train:
            return torch.ones(gaps.numel(), dtype=torch.bool), self.cfg.beta_0, {}
        self._update_statistics(gaps)
        k = keep_count(gaps.numel(), self.cfg.rho)
        mask = sample_keep_mask(gaussian_weights(gaps, self.mu, self.sigma, self.cfg.eps), k, self.generator)
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
