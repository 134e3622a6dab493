"""Dynamic-Beta DPO: the risk test on the margin tail, its controller, and the beta policy.

After warmup, each update moves the threshold tau toward the (1 - delta)-quantile of the new
margins, measures how often margins reach it (p_hat), standardises the deviation from delta
(u), and steps log(beta) by at most alpha in that direction: beta grows (more conservative)
when the upper tail of margins is heavier than the target. Every hyperparameter is declared
once, in the ``[risk_test]`` and ``[beta_update]`` config sections the controller takes.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ...config.schema import BetaUpdateConfig, RiskTestConfig
from . import Collective
from .quantile import linear_quantile

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


class DynamicBetaController:
    """Holds beta, tau and the warmup buffer. ``update(margins)`` is called once per update
    (optimizer step or micro-batch) with every margin of that update; the beta it returns
    applies from the next update on (the loss never depends on its own batch's beta step)."""

    def __init__(self, risk: RiskTestConfig, update: BetaUpdateConfig):
        self.risk, self.beta_update = risk, update
        self.beta = update.beta_0
        self.tau = 0.0
        self.updates = 0
        self.warmup_done = False
        self._buffer: list[torch.Tensor] = []

    def update(self, margins: torch.Tensor) -> dict[str, float]:
        """Advance one update; returns the values to log (risk/* and dpo/beta)."""
        risk, step = self.risk, self.beta_update
        margins = margins.detach().reshape(-1).double().cpu()
        self.updates += 1
        if not self.warmup_done:
            self._buffer.append(margins)
            if self.updates == risk.beta_warmup:
                self.tau = linear_quantile(torch.cat(self._buffer), 1.0 - risk.delta)
                self.warmup_done = True
                self._buffer = []
            return {"dpo/beta": self.beta, "risk/warmup": 1.0, "risk/tau": self.tau}
        self.tau = tau_update(self.tau, margins, risk.delta, risk.lambda_)
        n = margins.numel()
        stats = {"dpo/beta": self.beta, "risk/warmup": 0.0, "risk/tau": self.tau}
        if n == 0:
            return stats
        p_hat = exceedance_rate(margins, self.tau)
        if risk.risk_stat == "z":
            u, threshold = z_statistic(p_hat, risk.delta, n), risk.delta
        else:
            u, threshold = hoeffding_statistic(p_hat, risk.delta, n, risk.hoeffding_eps0)
        self.beta, s = beta_step(self.beta, u, step.alpha, step.gamma, step.beta_min, step.beta_max)
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


class DynamicBetaPolicy:
    """The loss of a step uses the beta in force at its start; the controller then updates once
    on the margins of every micro-batch of the step from every rank (or per micro-batch / per
    rank in the original framework's mode: ``update_granularity``, ``scope``)."""

    def __init__(self, controller: DynamicBetaController, collective: Collective):
        self.controller = controller
        self.collective = collective
        self._last: dict[str, float] = {}

    @classmethod
    def from_config(cls, cfg, collective: Collective) -> "DynamicBetaPolicy":
        return cls(DynamicBetaController(cfg.risk_test, cfg.beta_update), collective)

    def _update(self, local_margins: torch.Tensor) -> None:
        everyone = self.controller.risk.scope == "global"
        self._last = self.controller.update(self.collective.gather(local_margins) if everyone else local_margins)

    def train_beta(self, margins: torch.Tensor) -> tuple[float, Optional[torch.Tensor]]:
        beta = self.controller.beta
        if self.controller.risk.update_granularity == "micro_batch":
            self._update(margins)
        return beta, None

    def eval_beta(self) -> float:
        return self.controller.beta

    def loss_units(self, local_pairs: int, world_size: int) -> float:
        return float(local_pairs)

    def end_step(self, step_margins: torch.Tensor) -> dict[str, float]:
        if self.controller.risk.update_granularity == "optimizer_step" and step_margins.numel():
            self._update(step_margins)
        return dict(self._last)

    def state_dict(self) -> dict:
        return {"dynamic_beta": self.controller.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state["dynamic_beta"])
