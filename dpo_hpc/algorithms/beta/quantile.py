"""Quantiles with linear interpolation (numpy's default, torch.quantile's default)."""

from __future__ import annotations

import torch


def linear_quantile(values: torch.Tensor, q: float) -> float:
    """The q-quantile of a 1-D tensor: x[floor(h)] + (h - floor(h)) * (x[ceil(h)] - x[floor(h)]),
    h = q * (n - 1) over the sorted values, computed in float64."""
    if values.numel() == 0:
        raise ValueError("quantile of an empty tensor")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must lie in [0, 1], got {q}")
    return torch.quantile(values.detach().reshape(-1).double().cpu(), q).item()
