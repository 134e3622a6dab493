"""Log-probabilities of completion tokens under a causal LM."""

from __future__ import annotations

import torch


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token_t | tokens_<t) for t >= 1, shape (B, T - 1), computed in fp32.

    Uses gather - logsumexp rather than a full log_softmax so only one (B, T, V) fp32 copy of
    the logits exists at a time.
    """
    logits = logits[:, :-1].float()
    labels = input_ids[:, 1:].unsqueeze(-1)
    return torch.gather(logits, -1, labels).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of log-probs of the tokens where ``loss_mask`` is 1, per row: shape (B,)."""
    mask = loss_mask[:, 1:].to(torch.float32)
    return (token_logps(logits, input_ids) * mask).sum(-1)
