"""Every pairwise preference loss, declared once: ``dpo_training.loss_type`` (TRL's names).

The config schema's ``loss_type`` values, the documentation and the objective builder read this
table. No torch here: the implementation is named as ``"module:Class"`` and imported only by the
trainer. Every loss composes with every beta policy (fixed, Dynamic-Beta, Beta-DPO).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class LossSpec:
    name: str
    implementation: str
    """``"module:Class"`` of the loss (``dpo_hpc.algorithms.losses``)."""
    source: str
    """Where the loss is defined."""
    label_smoothing: bool
    """Whether ``label_smoothing`` (assumed fraction of flipped labels) applies to it."""


LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in (
    LossSpec("sigmoid", "dpo_hpc.algorithms.losses:Sigmoid",
             "DPO (Rafailov et al., 2023); with label_smoothing: conservative DPO (Mitchell, 2023)", True),
    LossSpec("robust", "dpo_hpc.algorithms.losses:Robust",
             "robust DPO (Chowdhury et al., 2024), unbiased under label_smoothing flipped labels", True),
    LossSpec("hinge", "dpo_hpc.algorithms.losses:Hinge", "SLiC-HF (Zhao et al., 2023) / RSO (Liu et al., 2024)", False),
    LossSpec("ipo", "dpo_hpc.algorithms.losses:IPO",
             "IPO (Azar et al., 2024), on length-averaged log-probs as TRL computes it; beta plays tau", False),
)}

LossType = Literal[tuple(LOSSES)]  # type: ignore[valid-type]
