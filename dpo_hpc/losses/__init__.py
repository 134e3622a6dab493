"""Pure tensor math: no state, no I/O, no distributed calls."""

from .dpo import dpo_sigmoid_loss, margins, preference_metrics, split_chosen_rejected
from .logprobs import sequence_logps, token_logps

__all__ = ["dpo_sigmoid_loss", "margins", "preference_metrics", "sequence_logps", "split_chosen_rejected", "token_logps"]
