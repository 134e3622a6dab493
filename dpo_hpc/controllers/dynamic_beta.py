"""Dynamic-Beta DPO controller: warmup, tau EMA, risk test, multiplicative beta update."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..losses.dynamic_beta import beta_step, exceedance_rate, hoeffding_statistic, tau_update, z_statistic
from ..quantile import linear_quantile


@dataclass(frozen=True)
class DynamicBetaDPOConfig:
    """The original framework's ``DynamicBetaDPOConfig`` (``risk_test`` and ``beta_update`` keys)."""

    beta_0: float = 0.1
    delta: float = 0.1
    momentum: float = 0.05  # risk_test.lambda (the original dataclass default; its YAML uses 0.1)
    warmup_steps: int = 120  # risk_test.beta_warmup
    alpha: float = 0.005
    gamma: float = 2.0
    beta_min: float = 0.0
    beta_max: float = 2.0
    risk_stat: str = "z"  # "z" or "hoeffding" (the early variant)
    hoeffding_eps0: float = 0.05
    update_granularity: str = "optimizer_step"  # or "micro_batch" (original framework)
    scope: str = "global"  # or "local": each rank on its own margins (original framework)

    def __post_init__(self):
        checks = [
            (0 < self.delta < 1, f"delta must lie in (0, 1), got {self.delta}"),
            (0 < self.momentum <= 1, f"momentum (lambda) must lie in (0, 1], got {self.momentum}"),
            (self.warmup_steps >= 1, f"warmup_steps must be >= 1 (0 leaves tau at 0 forever), got {self.warmup_steps}"),
            (self.beta_min <= self.beta_0 <= self.beta_max,
             f"need beta_min <= beta_0 <= beta_max, got {self.beta_min}, {self.beta_0}, {self.beta_max}"),
            (self.alpha >= 0 and self.gamma > 0, "alpha must be >= 0 and gamma > 0"),
            (self.risk_stat in ("z", "hoeffding"), f"risk_stat must be 'z' or 'hoeffding', got {self.risk_stat!r}"),
            (0 < self.hoeffding_eps0 < 1, f"hoeffding_eps0 must lie in (0, 1), got {self.hoeffding_eps0}"),
            (self.update_granularity in ("optimizer_step", "micro_batch"),
             f"update_granularity must be 'optimizer_step' or 'micro_batch', got {self.update_granularity!r}"),
            (self.scope in ("global", "local"), f"scope must be 'global' or 'local', got {self.scope!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class DynamicBetaController:
    """Holds beta, tau and the warmup buffer. ``update(margins)`` is called once per update
    (optimizer step or micro-batch) with every margin of that update; the beta it returns
    applies from the next update on (the loss never depends on its own batch's beta step)."""

    def __init__(self, cfg: DynamicBetaDPOConfig):
        self.cfg = cfg
        self.beta = cfg.beta_0
        self.tau = 0.0
        self.updates = 0
        self.warmup_done = False
        self._buffer: list[torch.Tensor] = []

    def update(self, margins: torch.Tensor) -> dict[str, float]:
        """Advance one update; returns the values to log (risk/* and dpo/beta)."""
        cfg = self.cfg
        margins = margins.detach().reshape(-1).double().cpu()
        self.updates += 1
        if not self.warmup_done:
            self._buffer.append(margins)
            if self.updates == cfg.warmup_steps:
                self.tau = linear_quantile(torch.cat(self._buffer), 1.0 - cfg.delta)
                self.warmup_done = True
                self._buffer = []
            return {"dpo/beta": self.beta, "risk/warmup": 1.0, "risk/tau": self.tau}
        self.tau = tau_update(self.tau, margins, cfg.delta, cfg.momentum)
        n = margins.numel()
        stats = {"dpo/beta": self.beta, "risk/warmup": 0.0, "risk/tau": self.tau}
        if n == 0:
            return stats
        p_hat = exceedance_rate(margins, self.tau)
        if cfg.risk_stat == "z":
            u, threshold = z_statistic(p_hat, cfg.delta, n), cfg.delta
        else:
            u, threshold = hoeffding_statistic(p_hat, cfg.delta, n, cfg.hoeffding_eps0)
        self.beta, s = beta_step(self.beta, u, cfg.alpha, cfg.gamma, cfg.beta_min, cfg.beta_max)
        stats.update({"dpo/beta": self.beta, "risk/p_hat": p_hat, "risk/u_k": u, "risk/s_k": s,
                      "risk/fail": float(p_hat > threshold)})
        return stats

    def state_dict(self) -> dict[str, Any]:
        buffer = torch.cat(self._buffer) if self._buffer else torch.zeros(0, dtype=torch.float64)
        sizes = torch.tensor([b.numel() for b in self._buffer], dtype=torch.long)
        return {"beta": self.beta, "tau": self.tau, "updates": self.updates, "warmup_done": self.warmup_done,
                "warmup_buffer": buffer, "warmup_buffer_sizes": sizes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta, self.tau = float(state["beta"]), float(state["tau"])
        self.updates, self.warmup_done = int(state["updates"]), bool(state["warmup_done"])
        self._buffer = list(torch.split(state["warmup_buffer"].double(), state["warmup_buffer_sizes"].tolist()))
