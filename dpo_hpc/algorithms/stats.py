"""What an objective reports for a micro-batch: its metrics as (sum, count) pairs, which the
trainer reduces over ranks and micro-batches, and the router loss of a mixture of experts."""

from __future__ import annotations

from typing import Optional

import torch

Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]  # metric -> (sum, count)


def with_router_loss(loss_sum: torch.Tensor, stats: Stats, aux_loss: Optional[torch.Tensor],
                     coef: Optional[float], units: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    """A mixture of experts' router load-balancing loss (``router_aux_loss_coef``) added as TRL adds
    it, ``coef * aux_loss`` on top of the mean loss, and logged as ``aux_loss``. In the sum the
    trainer normalises it stands once per loss unit, so a step weighs its micro-batches' router
    losses by their units, whatever the split over ranks and accumulation steps."""
    if coef is None or aux_loss is None:
        return loss_sum, stats
    aux_loss = aux_loss.to(loss_sum.device, torch.float32)
    total, count = stats["loss"]
    stats = {**stats, "loss": (total + coef * aux_loss.detach() * count, count),
             "aux_loss": (aux_loss.detach(), torch.tensor(1.0))}
    return loss_sum + coef * aux_loss * units.to(loss_sum.device), stats


class StepStateless:
    """An objective's hooks when it keeps nothing across steps (SFT's, KTO's): nothing derived,
    logged at a step's end, drawn, saved or restored."""

    def derived(self, metrics: dict[str, float]) -> dict[str, float]:
        return {}

    def end_step(self) -> dict[str, float]:
        return {}

    def histograms(self) -> dict[str, torch.Tensor]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
