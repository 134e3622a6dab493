"""How a batch becomes a loss, per trainer. The loop in ``loop.py`` drives these.

An objective returns the SUM of its per-unit losses (tokens for SFT, pairs for DPO) and
per-metric (sum, count) pairs; the loop normalises by the global unit count of the optimizer
step, so the gradient is the same however the global batch is split over ranks and
accumulation steps.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..controllers import BetaDPOController, DynamicBetaController
from ..data.collate import collate_conversations, collate_pairs
from ..losses import dpo_sigmoid_loss, margins, preference_metrics, sequence_logps, split_chosen_rejected, token_logps
from ..losses.beta_dpo import keep_count
from .distributed import DistEnv, all_gather_cat

Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]  # metric -> (sum, count)


class Objective(Protocol):
    data_kind: str  # "sft" or "preference": what load_splits produces for it

    def collate(self, examples: list) -> dict[str, torch.Tensor]: ...

    def units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """How many loss units (tokens or pairs) the batch holds."""

    def loss_and_stats(self, engine, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]: ...

    def eval_stats(self, engine, batch: dict[str, torch.Tensor]) -> Stats: ...

    def after_step(self) -> dict[str, float]:
        """Called once per optimizer step on every rank after its micro-batches; returns values to
        log that are already global (identical on every rank)."""

    def histograms(self) -> dict[str, torch.Tensor]:
        """Called once per optimizer step on every rank after ``after_step``; tensors to log as histograms."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class _Stateless:
    def after_step(self) -> dict[str, float]:
        return {}

    def histograms(self) -> dict[str, torch.Tensor]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _forward_logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


class SFTObjective(_Stateless):
    """Next-token NLL on assistant tokens, averaged over the loss tokens of the global batch."""

    data_kind = "sft"

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def collate(self, examples):
        return collate_conversations(examples, self.pad_id)

    def units(self, batch):
        return batch["loss_mask"][:, 1:].sum().float()

    def _stats(self, engine, batch):
        logps = token_logps(_forward_logits(engine, batch), batch["input_ids"])
        mask = batch["loss_mask"][:, 1:].float()
        nll_sum = -(logps * mask).sum()
        tokens = mask.sum()
        return nll_sum, {"loss": (nll_sum.detach(), tokens)}

    def loss_and_stats(self, engine, batch):
        return self._stats(engine, batch)

    def eval_stats(self, engine, batch):
        with torch.no_grad():
            return self._stats(engine, batch)[1]


class DPOObjective(_Stateless):
    """Sigmoid DPO with a fixed beta; one policy and one reference forward over chosen+rejected."""

    data_kind = "preference"

    def __init__(self, reference, beta: float, pad_id: int):
        self.reference = reference
        self.beta = beta
        self.pad_id = pad_id
        self._step_margins: list[torch.Tensor] = []

    def histograms(self):
        """The margins of the last optimizer step from every rank (collective: every rank calls)."""
        local = torch.cat(self._step_margins) if self._step_margins else torch.zeros(0)
        self._step_margins = []
        return {"margins": all_gather_cat(local)}

    def collate(self, examples):
        return collate_pairs(examples, self.pad_id)

    def units(self, batch):
        return torch.tensor(batch["input_ids"].shape[0] // 2, dtype=torch.float32)

    def _logps(self, engine, batch):
        policy = sequence_logps(_forward_logits(engine, batch), batch["input_ids"], batch["loss_mask"])
        with torch.no_grad():
            ref = sequence_logps(_forward_logits(self.reference, batch), batch["input_ids"], batch["loss_mask"])
        return (*split_chosen_rejected(policy), *split_chosen_rejected(ref))

    def _train_forward(self, engine, batch):
        """Log-probs and margins of a training micro-batch; the detached margins are kept for the step."""
        logps = self._logps(engine, batch)
        margin = margins(*logps)
        self._step_margins.append(margin.detach().float())
        return logps, margin

    def _stats(self, logps, losses, beta=None, loss_count=None) -> Stats:
        pairs = torch.tensor(float(losses.shape[0]))
        per_pair = preference_metrics(*logps, beta=self.beta if beta is None else beta)
        stats = {"loss": (losses.detach().sum(), pairs if loss_count is None else loss_count)}
        stats.update({name: (values.sum(), pairs) for name, values in per_pair.items()})
        return stats

    def loss_and_stats(self, engine, batch):
        logps, margin = self._train_forward(engine, batch)
        losses = dpo_sigmoid_loss(margin, self.beta)
        return losses.sum(), self._stats(logps, losses)

    def eval_stats(self, engine, batch):
        with torch.no_grad():
            logps = self._logps(engine, batch)
            return self._stats(logps, dpo_sigmoid_loss(margins(*logps), self.beta))


class DynamicBetaDPOObjective(DPOObjective):
    """DPO whose beta the risk-test controller steers. The loss of a step uses the beta in force
    at its start; the controller then updates once on the margins of every micro-batch of the
    step from every rank (or per micro-batch / per rank in the original framework's mode)."""

    def __init__(self, reference, controller: DynamicBetaController, pad_id: int):
        super().__init__(reference, controller.beta, pad_id)
        self.controller = controller
        self._last: dict[str, float] = {}

    def _update(self, local_margins: torch.Tensor) -> None:
        gathered = all_gather_cat(local_margins) if self.controller.cfg.scope == "global" else local_margins
        self._last = self.controller.update(gathered)
        self.beta = self.controller.beta

    def loss_and_stats(self, engine, batch):
        logps, margin = self._train_forward(engine, batch)
        losses = dpo_sigmoid_loss(margin, self.beta)
        stats = self._stats(logps, losses)
        if self.controller.cfg.update_granularity == "micro_batch":
            self._update(self._step_margins[-1])
        return losses.sum(), stats

    def after_step(self):
        # The step's margins stay recorded until histograms() takes them.
        if self.controller.cfg.update_granularity == "optimizer_step" and self._step_margins:
            self._update(torch.cat(self._step_margins))
        return dict(self._last)

    def state_dict(self):
        return {"dynamic_beta": self.controller.state_dict()}

    def load_state_dict(self, state):
        self.controller.load_state_dict(state["dynamic_beta"])
        self.beta = self.controller.beta


class BetaDPOObjective(DPOObjective):
    """Beta-DPO: per micro-batch, the gaps of the global micro-batch (all ranks) update mu/sigma,
    a Gaussian-weighted sample of k = floor(rho N) rows is kept (the same draw on every rank), and
    the loss over the kept rows uses the batch beta. Evaluation keeps every row and uses beta_0."""

    def __init__(self, reference, controller: BetaDPOController, pad_id: int, dist_env: DistEnv):
        super().__init__(reference, controller.cfg.beta_0, pad_id)
        self.controller = controller
        self.dist = dist_env
        self._records: list[dict[str, float]] = []

    def units(self, batch):
        # k rows are kept per global micro-batch; each rank counts its share so the sum over ranks is k.
        pairs = batch["input_ids"].shape[0] // 2
        return torch.tensor(keep_count(pairs * self.dist.world_size, self.controller.cfg.rho) / self.dist.world_size)

    def loss_and_stats(self, engine, batch):
        logps, margin = self._train_forward(engine, batch)
        mask, beta, record = self.controller.select(all_gather_cat(self._step_margins[-1]), train=True)
        pairs = margin.shape[0]
        local = mask[self.dist.rank * pairs:(self.dist.rank + 1) * pairs].to(margin.device, margin.dtype)
        losses = dpo_sigmoid_loss(margin, beta) * local
        self._records.append(record)
        return losses.sum(), self._stats(logps, losses, beta=beta, loss_count=local.sum())

    def after_step(self):
        records, self._records = self._records, []
        return {name: sum(r[name] for r in records) / len(records) for name in records[0]} if records else {}

    def state_dict(self):
        return {"beta_dpo": self.controller.state_dict()}

    def load_state_dict(self, state):
        self.controller.load_state_dict(state["beta_dpo"])
