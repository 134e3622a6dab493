"""KTO (Ethayarajh et al., 2024) on unpaired, labelled completions, as TRL's KTOTrainer computes it.

Each example is one completion of a prompt, desirable or not. Its reward is the policy's
log-ratio to the reference, r = log pi(y|x) - log ref(y|x), and the loss asks a desirable
completion's reward to rise above the reference point z and an undesirable one's to fall below:

    desirable:    w_d (1 - sigmoid(beta (r - z)))
    undesirable:  w_u (1 - sigmoid(beta (z - r)))

z estimates KL(pi || ref) from mismatched sequences (each prompt with another example's
completion), averaged over the global micro-batch, clamped at 0 and never differentiated.
``apo_zero_unpaired`` (APO-zero, D'Oosterlinck et al., 2024) uses no z: 1 - sigmoid(beta r) for a
desirable completion, sigmoid(beta r) for an undesirable one.
"""

from __future__ import annotations

import typing
from typing import Optional

import torch
import torch.nn.functional as F

from ..config.schema import KTOLossType
from ..data.collate import Layout, collate_unpaired, sub_batch
from .beta import Collective
from .logprobs import CompletionScorer
from .stats import StepStateless, with_router_loss

KTO_LOSSES = typing.get_args(KTOLossType)
"""KTO's ``loss_type`` names (TRL's), as the config declares them."""


def kto_losses(logratios: torch.Tensor, labels: torch.Tensor, kl: torch.Tensor, beta: float, loss_type: str,
               desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """Per-example losses (B,) of the completions' log-ratios ``logratios`` (B,), ``labels`` (B,
    bool: desirable) and the reference point ``kl`` (a scalar without gradient)."""
    if loss_type == "kto":
        desirable = 1 - F.sigmoid(beta * (logratios - kl))
        undesirable = 1 - F.sigmoid(beta * (kl - logratios))
    elif loss_type == "apo_zero_unpaired":
        desirable = 1 - F.sigmoid(beta * logratios)
        undesirable = F.sigmoid(beta * logratios)
    else:
        raise ValueError(f"unknown KTO loss_type {loss_type!r}; expected one of {', '.join(KTO_LOSSES)}")
    return torch.where(labels, desirable_weight * desirable, undesirable_weight * undesirable)


def weight_advice(desirable: int, undesirable: int, desirable_weight: float, undesirable_weight: float
                  ) -> str | None:
    """A note when the weights do not balance unequal counts as the KTO paper advises (its Eq. 8:
    desirable_weight x desirable / (undesirable_weight x undesirable) in [1, 4/3]), with the range
    of each weight that would; None when they do, or the counts are equal."""
    if not desirable or not undesirable:
        present, absent = ("desirable", "undesirable") if desirable else ("undesirable", "desirable")
        return (f"note: the training split has no {absent} examples: only the {present} completions' loss "
                "trains, with no counterweight")
    if desirable == undesirable:
        return None
    ratio = desirable_weight * desirable / (undesirable_weight * undesirable)
    if 1.0 <= ratio <= 4.0 / 3.0:
        return None
    lo_d, hi_d = undesirable * undesirable_weight / desirable, undesirable * undesirable_weight / desirable * 4 / 3
    lo_u, hi_u = desirable * desirable_weight / undesirable * 3 / 4, desirable * desirable_weight / undesirable
    return (f"note: {desirable} desirable and {undesirable} undesirable examples with desirable_weight "
            f"{desirable_weight:g} and undesirable_weight {undesirable_weight:g}: the KTO paper advises "
            f"desirable_weight in [{lo_d:.2f}, {hi_d:.2f}] or undesirable_weight in [{lo_u:.2f}, {hi_u:.2f}]")


def kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, collective: Collective) -> torch.Tensor:
    """KTO's reference point: max(0, mean over the global micro-batch of the mismatched sequences'
    log-ratios), without gradient (TRL's: its ranks' means, averaged, then clamped). A collective;
    ranks may hold different counts (an evaluation's last batch)."""
    diffs = (policy_kl_logps - ref_kl_logps).detach().float()
    sums = collective.gather(torch.stack([diffs.sum(), torch.tensor(float(diffs.numel()), device=diffs.device)]))
    return (sums[0::2].sum() / sums[1::2].sum()).clamp(min=0)


class KTOObjective(StepStateless):
    """KTO on a batch of labelled completions: the policy's log-probs of the completions (with
    gradient) and of the KL sequences (without), the reference's of both (a forward of the
    reference model or a precomputed table), the reference point and ``kto_losses``."""

    kind = "unpaired"

    def __init__(self, reference, pad_id: int, collective: Collective, scorer: CompletionScorer, *, loss_type: str,
                 beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0, ref_table=None,
                 layout: Layout = "padded", router_aux_loss_coef: Optional[float] = None):
        self.reference, self.ref_table = reference, ref_table
        self.pad_id, self.collective, self.scorer, self.layout = pad_id, collective, scorer, layout
        self.loss_type, self.beta = loss_type, beta
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight
        self.router_aux_loss_coef = router_aux_loss_coef
        self.reference_forwards = 0  # proof that a precomputed table leaves the reference model unused

    @property
    def uses_kl(self) -> bool:
        return self.loss_type == "kto"

    def collate(self, examples):
        batch = collate_unpaired(examples, self.pad_id, self.layout)
        if self.ref_table is not None:
            batch["ref_logps"] = self.ref_table.lookup(examples)  # completions, then KL sequences
        return batch

    def units(self, batch):
        return torch.tensor(float(batch["labels"].numel()))

    def _losses(self, model, batch):
        """(per-example losses, log-ratios, policy log-probs, reference point, router loss)."""
        policy = self.scorer.score(model, batch)
        logps = policy.sequence_sums()
        kl_batch, examples = sub_batch(batch, "kl_"), logps.shape[0]
        with torch.no_grad():
            policy_kl = self.scorer.sequence_logps(model, kl_batch) if self.uses_kl else None
            if "ref_logps" in batch:
                ref, ref_kl = batch["ref_logps"][:examples], batch["ref_logps"][examples:]
            else:
                ref = self.scorer.sequence_logps(self.reference, batch)
                ref_kl = self.scorer.sequence_logps(self.reference, kl_batch) if self.uses_kl else None
                self.reference_forwards += 1
        kl = kl_estimate(policy_kl, ref_kl, self.collective) if self.uses_kl else torch.zeros((), device=logps.device)
        logratios = logps - ref.to(logps.device)
        labels = batch["labels"].to(logps.device)
        losses = kto_losses(logratios, labels, kl, self.beta, self.loss_type, self.desirable_weight,
                            self.undesirable_weight)
        return losses, logratios.detach(), logps.detach(), kl, policy.aux_loss

    def _stats(self, losses, logratios, logps, kl, labels):
        """TRL's KTO metrics as (sum, count): the means over the desirable completions (``chosen``)
        and the undesirable ones (``rejected``) of the global batch."""
        labels = labels.to(logps.device)
        desirable, undesirable = labels.float(), (~labels).float()
        count = torch.tensor(float(labels.numel()))
        rewards = self.beta * logratios.float()
        return {"loss": (losses.detach().sum(), count), "kl": (kl.detach() * count, count),
                "rewards/chosen": ((rewards * desirable).sum(), desirable.sum()),
                "rewards/rejected": ((rewards * undesirable).sum(), undesirable.sum()),
                "logps/chosen": ((logps.float() * desirable).sum(), desirable.sum()),
                "logps/rejected": ((logps.float() * undesirable).sum(), undesirable.sum()),
                "desirable_fraction": (desirable.sum(), count)}

    def loss_and_stats(self, model, batch):
        losses, logratios, logps, kl, aux_loss = self._losses(model, batch)
        stats = self._stats(losses, logratios, logps, kl, batch["labels"])
        return with_router_loss(losses.sum(), stats, aux_loss, self.router_aux_loss_coef, self.units(batch))

    def eval_stats(self, model, batch):
        with torch.no_grad():
            return self.loss_and_stats(model, batch)[1]

    def derived(self, metrics: dict[str, float]) -> dict[str, float]:
        """``rewards/margins``: the desirable completions' mean reward minus the undesirable ones' (TRL's)."""
        if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
            return {"rewards/margins": metrics["rewards/chosen"] - metrics["rewards/rejected"]}
        return {}
