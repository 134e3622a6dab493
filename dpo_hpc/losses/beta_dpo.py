"""Beta-DPO (Wu et al., 2024): gap statistics, Gaussian-weighted filtering and the batch beta.

Pure functions over tensors; the running mean/std and the sampling generator live in
``dpo_hpc.controllers.beta_dpo``.
"""

from __future__ import annotations

import math

import torch


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
