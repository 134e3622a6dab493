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
    options: tuple[str, ...] = ()
    """The ``dpo_training`` keys the loss reads besides beta (its constructor's arguments); the
    others are refused with it."""
    reference_free: bool = False
    """The loss reads no reference log-probs: no reference model is loaded, and no reference pass
    runs (``ref_name`` and ``precompute_ref_log_probs`` have nothing to do)."""
    f_divergence: bool = False
    """The loss is a function of the chosen-minus-rejected score, which ``f_divergence_type`` can
    make another f-divergence's (TRL's set); the losses of each side's log-ratio have none."""


LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in (
    LossSpec("sigmoid", "dpo_hpc.algorithms.losses:Sigmoid",
             "DPO (Rafailov et al., 2023); with label_smoothing: conservative DPO (Mitchell, 2023)",
             ("label_smoothing",), f_divergence=True),
    LossSpec("robust", "dpo_hpc.algorithms.losses:Robust",
             "robust DPO (Chowdhury et al., 2024), unbiased under label_smoothing flipped labels", ("label_smoothing",),
             f_divergence=True),
    LossSpec("hinge", "dpo_hpc.algorithms.losses:Hinge", "SLiC-HF (Zhao et al., 2023) / RSO (Liu et al., 2024)",
             f_divergence=True),
    LossSpec("ipo", "dpo_hpc.algorithms.losses:IPO",
             "IPO (Azar et al., 2024), on length-averaged log-probs as TRL computes it; beta plays tau",
             f_divergence=True),
    LossSpec("sigmoid_norm", "dpo_hpc.algorithms.losses:SigmoidNorm", "DPO on length-averaged log-probs (TRL)",
             f_divergence=True),
    LossSpec("exo_pair", "dpo_hpc.algorithms.losses:ExoPair",
             "EXO (Ji et al., 2024); label_smoothing > 0 is its target's weight on the rejected reply",
             ("label_smoothing",), f_divergence=True),
    LossSpec("discopop", "dpo_hpc.algorithms.losses:DiscoPOP", "DiscoPOP (Lu et al., 2024)", ("discopop_tau",),
             f_divergence=True),
    LossSpec("nca_pair", "dpo_hpc.algorithms.losses:NCAPair", "NCA (Chen et al., 2024)"),
    LossSpec("bco_pair", "dpo_hpc.algorithms.losses:BCOPair", "BCO (Jung et al., 2024), on pairs as TRL has it"),
    LossSpec("sppo_hard", "dpo_hpc.algorithms.losses:SPPOHard", "SPPO (Wu et al., 2024) with hard win probabilities"),
    LossSpec("apo_zero", "dpo_hpc.algorithms.losses:APOZero", "APO-zero (D'Oosterlinck et al., 2024)"),
    LossSpec("apo_down", "dpo_hpc.algorithms.losses:APODown", "APO-down (D'Oosterlinck et al., 2024)"),
    LossSpec("simpo", "dpo_hpc.algorithms.losses:SimPO",
             "SimPO (Meng et al., 2024): no reference model, length-averaged log-probs, a target margin",
             ("simpo_gamma", "label_smoothing"), reference_free=True),
    LossSpec("orpo", "dpo_hpc.algorithms.losses:ORPO",
             "ORPO (Hong et al., 2024): the chosen NLL plus an odds-ratio term, no reference model",
             reference_free=True),
    LossSpec("sft", "dpo_hpc.algorithms.losses:ChosenNLL",
             "the chosen reply's mean token NLL (TRL's sft loss type; MPO's generation term, RPO's NLL)",
             reference_free=True, f_divergence=True),
)}

REFERENCE_AGNOSTIC = ("sft",)
"""Losses that read neither the reference nor a margin: they mix with any other loss. A loss that
is reference-free because its margin is the policy's own (simpo) does not mix with losses that
read the reference."""


def loss_types(loss_type: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``dpo_training.loss_type`` as a tuple: one loss, or TRL's list of losses to mix."""
    return (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)


def is_reference_free(loss_type) -> bool:
    """Whether a run of this ``loss_type`` (one, or a mixture) reads no reference log-probs."""
    return all(LOSSES[name].reference_free for name in loss_types(loss_type))


LOSS_OPTIONS = tuple(dict.fromkeys(option for spec in LOSSES.values() for option in spec.options))
"""Every loss-specific ``dpo_training`` key."""

LossType = Literal[tuple(LOSSES)]  # type: ignore[valid-type]
