"""Plain DPO: one beta for the whole run."""

from __future__ import annotations

from typing import Optional

import torch

from . import Collective


class FixedBeta:
    def __init__(self, beta: float):
        self.beta = beta

    @classmethod
    def from_config(cls, cfg, collective: Collective) -> "FixedBeta":
        return cls(cfg.beta)

    def train_beta(self, margins: torch.Tensor) -> tuple[float, Optional[torch.Tensor]]:
        return self.beta, None

    def eval_beta(self) -> float:
        return self.beta

    def loss_units(self, local_pairs: int, world_size: int) -> float:
        return float(local_pairs)

    def end_step(self, step_margins: torch.Tensor) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
