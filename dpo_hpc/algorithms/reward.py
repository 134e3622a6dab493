"""A Bradley-Terry reward model (Ouyang et al., 2022), as TRL's RewardTrainer trains one.

A sequence-classification model with one output (transformers' ``AutoModelForSequenceClassification``,
``num_labels = 1``) scores each prompt and reply at the reply's last token, r. A pair's loss is

    -log sigmoid(r_chosen - r_rejected - m)  [+ c (r_chosen + r_rejected)^2, ``center_rewards_coefficient``]

so the chosen reply learns to score above the rejected one, by the row's margin m where the data
has a ``margin`` column (Llama 2's rating margins; 0 otherwise), and the optional term keeps
rewards centred on 0 (Eisenstein et al., 2023).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..data.collate import Layout, collate_pairs, layout_rows, sequence_ends, to_device
from .beta import Collective
from .logprobs import model_inputs
from .stats import StepStateless

SCORE_HEAD = "score"
"""transformers' name of a decoder's sequence-classification head (Llama, Qwen, Mistral, Gemma...)."""


def reward_losses(chosen: torch.Tensor, rejected: torch.Tensor, center_rewards_coefficient: Optional[float] = None,
                  margins: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-pair losses (B,) of the chosen and rejected replies' rewards (B,) each; ``margins`` (B,):
    how far above the rejected reply the chosen one must score (the data's ``margin`` column)."""
    losses = -F.logsigmoid(chosen - rejected - (0.0 if margins is None else margins))
    if center_rewards_coefficient is not None:
        losses = losses + center_rewards_coefficient * (chosen + rejected).square()
    return losses


def score_head(model) -> torch.nn.Module:
    """The score head of a reward model (a DeepSpeed engine, a peft model or the model itself): the
    outermost module called ``score``, so that peft's wrapper of a trained head is the one read."""
    module = getattr(model, "module", model)
    for name, child in module.named_modules():
        if name.rpartition(".")[2] == SCORE_HEAD:
            return child
    raise ConfigError([f"{type(module).__name__} has no '{SCORE_HEAD}' head: a reward model is a decoder's "
                       "sequence-classification model (AutoModelForSequenceClassification)"])


def position_scores(model, batch) -> torch.Tensor:
    """The score head's output at every position of the batch's rows, (rows, T), in the model's dtype.
    Read where the head is called: transformers' own pooling finds a row's last token by its
    padding id, which a packed row (several sequences, no padding) or an EOS used as padding defeats."""
    captured: list[torch.Tensor] = []
    handle = score_head(model).register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        model(**model_inputs(batch))
    finally:
        handle.remove()
    return captured[0].squeeze(-1)


def sequence_rewards(model, batch) -> torch.Tensor:
    """Each sequence's reward, the score at its last token (``end_rows``/``end_positions``), fp32."""
    return position_scores(model, batch)[batch["end_rows"], batch["end_positions"]].float()


@torch.no_grad()
def reward_scores(model, rows: list[list[int]], pad_id: int, batch_size: int = 16) -> list[float]:
    """A reward model's score of each token row (a prompt and its reply), in padded batches."""
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = layout_rows(chunk, [[1] * len(row) for row in chunk], pad_id, "padded")
        batch["end_rows"], batch["end_positions"] = sequence_ends(batch)
        scores += sequence_rewards(model, to_device(batch, device)).tolist()
    return scores


class RewardObjective(StepStateless):
    """The Bradley-Terry loss of each pair (its chosen then rejected sequences in one forward)."""

    kind = "preference"

    def __init__(self, pad_id: int, collective: Collective, layout: Layout = "padded",
                 center_rewards_coefficient: Optional[float] = None):
        self.pad_id = pad_id
        self.collective = collective
        self.layout = layout
        self.center_rewards_coefficient = center_rewards_coefficient
        self._step_rewards: list[torch.Tensor] = []
        self._step = torch.zeros(0)  # the rewards of the last finished optimizer step

    def collate(self, examples):
        batch = collate_pairs(examples, self.pad_id, self.layout)
        batch["end_rows"], batch["end_positions"] = sequence_ends(batch)
        return batch

    def units(self, batch):
        return torch.tensor(batch["sequence_lengths"].shape[0] // 2, dtype=torch.float32)

    def _losses_and_stats(self, model, batch):
        """The pairs' losses, their rewards (chosen then rejected, detached) and the metrics."""
        rewards = sequence_rewards(model, batch)
        chosen, rejected = rewards.chunk(2)
        losses = reward_losses(chosen, rejected, self.center_rewards_coefficient, batch.get("margins"))
        pairs = torch.tensor(float(len(losses)))
        per_pair = {"loss": losses, "rewards/chosen": chosen, "rewards/rejected": rejected,
                    "rewards/margins": chosen - rejected, "rewards/accuracies": (chosen > rejected).float()}
        return losses, rewards.detach(), {name: (values.detach().sum(), pairs) for name, values in per_pair.items()}

    def loss_and_stats(self, model, batch):
        losses, rewards, stats = self._losses_and_stats(model, batch)
        self._step_rewards.append(rewards)
        return losses.sum(), stats

    def eval_stats(self, model, batch):
        with torch.no_grad():
            return self._losses_and_stats(model, batch)[2]

    def end_step(self):
        self._step = torch.cat(self._step_rewards) if self._step_rewards else torch.zeros(0)
        self._step_rewards = []
        return {}

    def histograms(self):
        """The rewards of the last optimizer step from every rank (collective: every rank calls);
        TRL's RewardTrainer logs their min, mean and max."""
        return {"rewards": self.collective.gather(self._step)}
