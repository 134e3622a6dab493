"""The DPO sigmoid loss and the TRL-named preference metrics."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def split_chosen_rejected(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [0, B) are chosen and [B, 2B) rejected (the collator's layout)."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


def margins(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor
) -> torch.Tensor:
    """M = (logp_w - ref_w) - (logp_l - ref_l), per pair, with gradient through the policy terms."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def dpo_sigmoid_loss(margin: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """Per-pair loss -log sigmoid(beta * M); beta is a scalar or one value per pair, never trained."""
    beta = torch.as_tensor(beta, dtype=margin.dtype, device=margin.device).detach()
    return -F.logsigmoid(beta * margin)


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
