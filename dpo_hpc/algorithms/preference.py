"""Preference-pair log-probabilities, their margin, and the TRL-named metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Optional

import torch
import torch.nn.functional as F


def split_chosen_rejected(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [0, B) are chosen and [B, 2B) rejected (the collator's layout)."""
    half = values.shape[0] // 2
    return values[:half], values[half:]


def desensitized_token_weights(sequences: torch.Tensor, loss_tokens: torch.Tensor, alpha: float) -> torch.Tensor:
    """LD-DPO's weight of each loss token of a pair batch (Liu et al., 2024; TRL's ``ld_alpha``): 1
    on the first min(chosen, rejected) completion tokens of each reply of a pair, ``alpha`` on the
    longer reply's tail, so that length alone drives the margin less. ``sequences``: each token's
    sequence, a sequence's tokens contiguous and in order (the collator's nonzero order);
    ``loss_tokens``: loss tokens per sequence, chosen sequences then rejected."""
    count = sequences.shape[0]
    order = torch.arange(count, device=sequences.device)
    first = torch.full((loss_tokens.shape[0],), count, dtype=torch.long, device=sequences.device).scatter_reduce(
        0, sequences, order, "amin")
    chosen, rejected = split_chosen_rejected(loss_tokens.to(sequences.device))
    shared = torch.minimum(chosen, rejected).repeat(2)
    return torch.full((count,), alpha, dtype=torch.float32, device=sequences.device).masked_fill(
        order - first[sequences] < shared[sequences], 1.0)


def wpo_pair_weights(aligned_sums: torch.Tensor, loss_tokens: torch.Tensor) -> torch.Tensor:
    """WPO's weight of each pair (Zhou et al., 2024, eq. 2; TRL's ``use_weighting``): the product
    over its two replies of exp(mean over the reply's tokens of log p - log sum_v p_v^2), how
    likely the reply is under the policy's own sampling now. ``aligned_sums``: those per-token
    terms summed per sequence (chosen, then rejected), without gradient."""
    weights = torch.exp(aligned_sums / loss_tokens.to(aligned_sums.device, aligned_sums.dtype).clamp(min=1))
    chosen, rejected = split_chosen_rejected(weights)
    return chosen * rejected


def margins(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor
) -> torch.Tensor:
    """M = (logp_w - ref_w) - (logp_l - ref_l), per pair, with gradient through the policy terms."""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


Scores = Callable[[torch.Tensor], torch.Tensor]
"""f'(u) of an f-divergence on the log-ratio t = log(pi / ref): what a side scores in place of t."""


def f_divergence_scores(kind: str, alpha: float = 0.5) -> Optional[Scores]:
    """f-DPO's (Wang et al., 2024) scores of a log-ratio t, as TRL computes them; None for the
    reverse KL of DPO itself, whose score is t."""
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return None  # the alpha divergence's limit at 1 is the reverse KL
    if kind == "forward_kl":
        return lambda t: 1 - torch.exp(-t)
    if kind == "js_divergence":
        return lambda t: math.log(2) + F.logsigmoid(t)
    if kind == "alpha_divergence":
        def scores(t: torch.Tensor) -> torch.Tensor:
            # exp((alpha - 1) t) in fp32 at least, capped where the result's dtype could not hold it (TRL's caps)
            cap = {torch.float16: 11.0}.get(t.dtype, 80.0)
            wide = ((alpha - 1) * t).to(torch.promote_types(t.dtype, torch.float32))
            return (torch.exp(wide.clamp(max=cap)) - 1).to(t.dtype) / (alpha - 1)
        return scores
    raise ValueError(f"unknown f-divergence {kind!r}")


@dataclass(frozen=True)
class PairLogps:
    """Summed completion log-probs of a batch of pairs under the policy and the reference, the
    completion lengths, and their margins: what every pairwise loss and beta policy reads."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: Optional[torch.Tensor] = None
    """Completion tokens of each chosen response (for length-averaged margins and the chosen NLL)."""
    rejected_tokens: Optional[torch.Tensor] = None
    scores: Optional[Scores] = None
    """An f-divergence's scores of each side's log-ratio (``f_divergence_scores``), which the
    margins are made of; None: the log-ratios themselves (DPO's reverse KL)."""
    unweighted_chosen: Optional[torch.Tensor] = None
    """The chosen replies' log-probs summed without LD-DPO's token weights, for RPO's NLL; None:
    ``policy_chosen`` (no weights)."""

    @cached_property
    def margins(self) -> torch.Tensor:
        """Computed once per batch: the loss and the beta policy read the same tensor."""
        if self.scores is not None:
            return self.scores(self.chosen_logratios) - self.scores(self.rejected_logratios)
        return margins(self.policy_chosen, self.policy_rejected, self.ref_chosen, self.ref_rejected)

    @cached_property
    def chosen_logratios(self) -> torch.Tensor:
        """log pi(chosen) - log ref(chosen) per pair: the chosen side's implicit reward over beta."""
        return self.policy_chosen - self.ref_chosen

    @cached_property
    def rejected_logratios(self) -> torch.Tensor:
        return self.policy_rejected - self.ref_rejected

    @cached_property
    def mean_margins(self) -> torch.Tensor:
        """The margin over length-averaged log-probs (each sum divided by its completion tokens)."""
        chosen, rejected = self._lengths()
        if self.scores is not None:
            return self.scores(self.chosen_logratios) / chosen - self.scores(self.rejected_logratios) / rejected
        return margins(self.policy_chosen / chosen, self.policy_rejected / rejected,
                       self.ref_chosen / chosen, self.ref_rejected / rejected)

    @cached_property
    def policy_means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy's length-averaged log-probs of the chosen and the rejected replies."""
        chosen, rejected = self._lengths()
        return self.policy_chosen / chosen, self.policy_rejected / rejected

    @cached_property
    def chosen_nll(self) -> torch.Tensor:
        """Mean token NLL of each chosen response under the policy (with gradient)."""
        chosen = self.policy_chosen if self.unweighted_chosen is None else self.unweighted_chosen
        return -chosen / self._lengths()[0]

    def _lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.chosen_tokens is None or self.rejected_tokens is None:
            raise ValueError("length-averaged log-probs need the completion lengths (PairLogps.of_rows(..., lengths))")
        return (self.chosen_tokens.to(self.policy_chosen.dtype).clamp(min=1),
                self.rejected_tokens.to(self.policy_rejected.dtype).clamp(min=1))

    @classmethod
    def of_rows(cls, policy: torch.Tensor, reference: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                scores: Optional[Scores] = None, unweighted: Optional[torch.Tensor] = None) -> "PairLogps":
        """From per-row log-probs (and completion lengths) of a collated pair batch (chosen rows,
        then rejected rows); ``unweighted``: the policy's rows without LD-DPO's weights."""
        tokens = split_chosen_rejected(lengths) if lengths is not None else (None, None)
        chosen = split_chosen_rejected(unweighted)[0] if unweighted is not None else None
        return cls(*split_chosen_rejected(policy), *split_chosen_rejected(reference), *tokens, scores, chosen)

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
