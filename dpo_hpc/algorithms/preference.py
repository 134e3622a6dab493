"""Preference-pair log-probabilities, their margin, and the TRL-named metrics."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


def split_chosen_rejected(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [0, B) are chosen and [B, 2B) rejected (the collator's layout)."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


def margins(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor
) -> torch.Tensor:
    """M = (logp_w - ref_w) - (logp_l - ref_l), per pair, with gradient through the policy terms."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


@dataclass(frozen=True)
class PairLogps:
    """Summed completion log-probs of a batch of pairs under the policy and the reference, with
    their margin: what every pairwise loss and beta policy reads."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor

    @cached_property
    def margins(self) -> torch.Tensor:
        """Computed once per batch: the loss and the beta policy read the same tensor."""
        return margins(self.policy_chosen, self.policy_rejected, self.ref_chosen, self.ref_rejected)

    @classmethod
    def of_rows(cls, policy: torch.Tensor, reference: torch.Tensor) -> "PairLogps":
        """From per-row log-probs of a collated pair batch (chosen rows, then rejected rows)."""
        return cls(*split_chosen_rejected(policy), *split_chosen_rejected(reference))

    def __len__(self) -> int:
        return self.policy_chosen.shape[0]


def preference_metrics(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float | torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Per-pair TRL metrics (detached): rewards/*, logps/* and the log-ratio change of each side.

    ``rewards/accuracies`` uses a strict >, so tied rewards (policy == reference) count as 0.
    """
    beta = torch.as_tensor(beta, dtype=torch.float32, device=policy_chosen.device)
    chosen_ratio = (policy_chosen - ref_chosen).detach().float()
    rejected_ratio = (policy_rejected - ref_rejected).detach().float()
    reward_chosen, reward_rejected = beta * chosen_ratio, beta * rejected_ratio
    return {
        "rewards/chosen": reward_chosen,
        "rewards/rejected": reward_rejected,
        "rewards/margins": reward_chosen - reward_rejected,
        "rewards/accuracies": (reward_chosen > reward_rejected).float(),
        "logps/chosen": policy_chosen.detach().float(),
        "logps/rejected": policy_rejected.detach().float(),
        "logps/chosen_change": chosen_ratio,
        "logps/rejected_change": rejected_ratio,
    }
