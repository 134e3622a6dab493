"""Beta policies: how the beta of a preference loss is chosen, with the math and state behind it.

- ``fixed``: plain DPO's constant beta.
- ``dynamic_beta``: the risk test on the margin tail (quantile warmup, EMA of tau, p_hat,
  tanh step, clip) and its controller.
- ``beta_dpo``: Beta-DPO's batch beta from reward-gap statistics and Gaussian-weighted filtering.

A policy sees detached margins only; collectives come in through a ``Collective`` (the runtime's
``DistEnv`` in training, ``LOCAL`` in tests), so the math runs without processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch


class Collective(Protocol):
    rank: int
    world_size: int

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate a 1-D tensor from every rank in rank order (every rank calls)."""


@dataclass(frozen=True)
class LocalCollective:
    """One process: gathering returns the tensor itself."""

    rank: int = 0
    world_size: int = 1

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


LOCAL = LocalCollective()


class BetaPolicy(Protocol):
    def train_beta(self, margins: torch.Tensor) -> tuple[float, Optional[torch.Tensor]]:
        """For one training micro-batch (its detached local margins): the beta its loss uses and
        per-pair weights (None: every pair counts once). Called once per micro-batch on every rank."""

    def eval_beta(self) -> float:
        """The beta of evaluation losses and rewards (no state change)."""

    def loss_units(self, local_pairs: int, world_size: int) -> float:
        """How many pairs of a micro-batch carry loss on this rank (sums to the global count)."""

    def end_step(self, step_margins: torch.Tensor) -> dict[str, float]:
        """After the micro-batches of an optimizer step (this rank's margins of the step); returns
        values to log that are identical on every rank. Every rank calls."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...
