"""The dynamic-beta risk test (pure functions over floats and margin tensors).

After warmup, each update moves the threshold tau toward the (1 - delta)-quantile of the new
margins, measures how often margins reach it (p_hat), standardises the deviation from delta
(u), and steps log(beta) by at most alpha in that direction: beta grows (more conservative)
when the upper tail of margins is heavier than the target.
"""

from __future__ import annotations

import math

import torch

from ..quantile import linear_quantile


def tau_update(tau: float, margins: torch.Tensor, delta: float, ema_lambda: float) -> float:
    """tau <- (1 - lambda) tau + lambda Quantile_{1-delta}(margins); unchanged for an empty batch."""
    if margins.numel() == 0:
        return tau
    return (1.0 - ema_lambda) * tau + ema_lambda * linear_quantile(margins, 1.0 - delta)


def exceedance_rate(margins: torch.Tensor, tau: float) -> float:
    """p_hat = fraction of margins >= tau (>=, not >)."""
    return (margins.detach().double() >= tau).double().mean().item()


def z_statistic(p_hat: float, delta: float, n: int) -> float:
    """(p_hat - delta) / sqrt(delta (1 - delta) / n): the one-sample z for H0 P(M >= tau) = delta."""
    return (p_hat - delta) / math.sqrt(delta * (1.0 - delta) / n)


def hoeffding_statistic(p_hat: float, delta: float, n: int, eps0: float) -> tuple[float, float]:
    """The early variant: eps = sqrt(ln(1/eps0) / (2n)); returns (u, delta + eps)."""
    eps = math.sqrt(math.log(1.0 / eps0) / (2.0 * n))
    return (p_hat - delta - eps) / eps, delta + eps


def beta_step(beta: float, u: float, alpha: float, gamma: float, beta_min: float, beta_max: float) -> tuple[float, float]:
    """beta <- clip(beta exp(alpha tanh(gamma u)), beta_min, beta_max); returns (beta, s = tanh(gamma u))."""
    s = math.tanh(gamma * u)
    return min(beta_max, max(beta_min, beta * math.exp(alpha * s))), s
