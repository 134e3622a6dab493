"""How a batch becomes a loss: SFT, one preference objective composed of a pairwise loss and a
beta policy, KTO's on unpaired completions (``kto``) and a reward model's (``reward``). The
trainer drives these.

An objective returns the SUM of its per-unit losses (tokens for SFT, pairs for DPO) and
per-metric (sum, count) pairs; the trainer normalises by the global unit count of the optimizer
step, so the gradient is the same however the global batch is split over ranks and
accumulation steps.
"""

from __future__ import annotations

import importlib
from typing import Optional, Protocol

import torch

from ..config.losses import LOSSES, is_reference_free
from ..config.schema import SPARSE_ATTENTION
from ..data.collate import Layout, collate_conversations, collate_pairs
from .beta import BetaPolicy, Collective
from .kto import KTOObjective
from .logprobs import CompletionScorer
from .losses import Mixture, PairwiseLoss
from .preference import PairLogps, Scores, f_divergence_scores, preference_metrics, wpo_pair_weights
from .reward import RewardObjective
from .stats import Stats, StepStateless, with_router_loss



class Objective(Protocol):
    kind: str  # "sft", "preference" or "unpaired": what the data pipeline produces for it

    def collate(self, examples: list) -> dict[str, torch.Tensor]: ...

    def units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """How many loss units (tokens or pairs) the batch holds on this rank."""

    def loss_and_stats(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]: ...

    def eval_stats(self, model, batch: dict[str, torch.Tensor]) -> Stats: ...

    def derived(self, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics computed from a step's (or an evaluation's) reduced means."""

    def end_step(self) -> dict[str, float]:
        """Once per optimizer step on every rank after its micro-batches; values to log that are
        already global (identical on every rank)."""

    def histograms(self) -> dict[str, torch.Tensor]:
        """Once per optimizer step on every rank after ``end_step``; tensors to log as histograms."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class SFTObjective(StepStateless):
    """Next-token NLL on assistant tokens, averaged over the loss tokens of the global batch."""

    kind = "sft"

    def __init__(self, pad_id: int, scorer: CompletionScorer, layout: Layout = "padded",
                 router_aux_loss_coef: Optional[float] = None):
        self.pad_id = pad_id
        self.scorer = scorer
        self.layout = layout
        self.router_aux_loss_coef = router_aux_loss_coef

    def collate(self, examples):
        return collate_conversations(examples, self.pad_id, self.layout)

    def units(self, batch):
        return batch["loss_tokens"].sum().float()

    def _stats(self, model, batch):
        scored = self.scorer.score(model, batch)
        nll_sum = -scored.logps.sum()
        tokens = torch.tensor(float(scored.logps.numel()))
        return with_router_loss(nll_sum, {"loss": (nll_sum.detach(), tokens)}, scored.aux_loss,
                                self.router_aux_loss_coef, tokens)

    def loss_and_stats(self, model, batch):
        return self._stats(model, batch)

    def eval_stats(self, model, batch):
        with torch.no_grad():
            return self._stats(model, batch)[1]


class RefLogps(Protocol):
    def lookup(self, examples: list) -> torch.Tensor:
        """Reference log-probs of the examples' rows in the collator's layout (chosen, then rejected)."""


class PreferenceObjective:
    """One policy forward over chosen+rejected and the reference's log-probs (a forward of the
    reference model, a precomputed table, or none for a reference-free loss), a pairwise loss, and
    a beta policy that chooses the loss's beta (and, for Beta-DPO, which pairs count); optionally
    RPO's NLL on the chosen side, and WPO's weight of each pair."""

    kind = "preference"

    def __init__(self, reference, loss: PairwiseLoss, policy: BetaPolicy, pad_id: int, collective: Collective,
                 scorer: CompletionScorer, ref_table: Optional[RefLogps] = None, rpo_alpha: Optional[float] = None,
                 layout: Layout = "padded", router_aux_loss_coef: Optional[float] = None,
                 reference_free: bool = False, scores: Optional[Scores] = None, use_weighting: bool = False):
        self.reference = reference
        self.use_weighting = use_weighting  # WPO
        self.reference_free = reference_free
        self.scores = scores  # an f-divergence's (f_divergence_type); None: DPO's log-ratios
        self.router_aux_loss_coef = router_aux_loss_coef
        self.layout = layout
        self.rpo_alpha = rpo_alpha
        self.ref_table = ref_table
        self.reference_forwards = 0  # proof that a precomputed table leaves the reference model unused
        self.scorer = scorer
        self._step = torch.zeros(0)  # the margins of the last finished optimizer step
        self.loss = loss
        self.policy = policy
        self.pad_id = pad_id
        self.collective = collective
        self._step_margins: list[torch.Tensor] = []

    def collate(self, examples):
        batch = collate_pairs(examples, self.pad_id, self.layout)
        if self.ref_table is not None:
            batch["ref_logps"] = self.ref_table.lookup(examples)
        return batch

    def units(self, batch):
        pairs = batch["loss_tokens"].shape[0] // 2
        return torch.tensor(self.policy.loss_units(pairs, self.collective.world_size), dtype=torch.float32)

    def _logps(self, model, batch) -> tuple[PairLogps, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The pairs' log-probs, the policy forward's router loss (None for a dense model), and
        WPO's pair weights (None unless ``use_weighting``)."""
        policy = self.scorer.score(model, batch, sum_sq=self.use_weighting)
        if self.reference_free:
            ref = torch.zeros(policy.sequences, dtype=torch.float32, device=policy.logps.device)
        elif "ref_logps" in batch:
            ref = batch["ref_logps"]
        else:
            with torch.no_grad():
                ref = self.scorer.sequence_logps(self.reference, batch)
            self.reference_forwards += 1
        unweighted = None  # an NLL term (RPO's, the sft loss) counts every chosen token, LD-DPO or not
        if policy.token_weights is not None:
            unweighted = policy.sequence_sums(weighted=False)
        logps = PairLogps.of_rows(policy.sequence_sums(), ref, batch["loss_tokens"], self.scores, unweighted)
        wpo = None
        if self.use_weighting:
            wpo = wpo_pair_weights(policy.per_sequence(policy.logps.detach() - policy.log_sum_sq), batch["loss_tokens"])
        return logps, policy.aux_loss, wpo

    def _pair_losses(self, logps: PairLogps, margins: torch.Tensor, beta,
                     wpo: Optional[torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        """The loss of every pair (with RPO's chosen NLL when set; all of it times WPO's weight, as
        TRL weighs each of its loss terms) and the extra per-pair metrics."""
        losses, extra = self.loss(margins, beta, logps), {}
        if self.rpo_alpha is not None:
            losses = losses + self.rpo_alpha * logps.chosen_nll
            extra["nll_loss"] = logps.chosen_nll.detach().float()
        if wpo is not None:
            losses = losses * wpo
            extra["wpo_weights"] = wpo.float()
        return losses, extra

    def _stats(self, logps: PairLogps, losses, beta, extra, loss_count=None) -> Stats:
        pairs = torch.tensor(float(len(logps)))
        per_pair = preference_metrics(logps.policy_chosen, logps.policy_rejected, logps.ref_chosen,
                                      logps.ref_rejected, beta=beta)
        stats = {"loss": (losses.detach().sum(), pairs if loss_count is None else loss_count)}
        stats.update({name: (values.sum(), pairs) for name, values in {**per_pair, **extra}.items()})
        return stats

    def loss_and_stats(self, model, batch):
        logps, aux_loss, wpo = self._logps(model, batch)
        margins = self.loss.margins(logps)
        detached = margins.detach().float()
        self._step_margins.append(detached)  # for the policy's end of step and the histogram
        beta, weights = self.policy.train_beta(detached)
        losses, extra = self._pair_losses(logps, margins, beta, wpo)
        if weights is None:
            stats = self._stats(logps, losses, beta, extra)
        else:
            weights = weights.to(losses.device, losses.dtype)
            losses = losses * weights
            stats = self._stats(logps, losses, beta, extra, loss_count=weights.sum())
        return with_router_loss(losses.sum(), stats, aux_loss, self.router_aux_loss_coef, self.units(batch))

    def eval_stats(self, model, batch):
        with torch.no_grad():
            logps, aux_loss, wpo = self._logps(model, batch)
            beta = self.policy.eval_beta()
            losses, extra = self._pair_losses(logps, self.loss.margins(logps), beta, wpo)
            stats = self._stats(logps, losses, beta, extra)
            return with_router_loss(losses.sum(), stats, aux_loss, self.router_aux_loss_coef, self.units(batch))[1]

    def derived(self, metrics):
        return {}

    def end_step(self):
        self._step = torch.cat(self._step_margins) if self._step_margins else torch.zeros(0)
        self._step_margins = []
        return self.policy.end_step(self._step)

    def histograms(self):
        """The margins of the last optimizer step from every rank (collective: every rank calls)."""
        return {"margins": self.collective.gather(self._step)}

    def state_dict(self):
        return self.policy.state_dict()

    def load_state_dict(self, state):
        self.policy.load_state_dict(state)


def resolve(reference: str):
    """``"package.module:Name"`` -> the object (how the registry names torch-side pieces)."""
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


def build_loss(training) -> PairwiseLoss:
    """The pairwise loss a DPO training section names (``dpo_hpc.config.losses``), or the mixture
    of its list of losses with ``loss_weights``."""
    def one(name: str) -> PairwiseLoss:
        spec = LOSSES[name]
        return resolve(spec.implementation)(**{option: getattr(training, option) for option in spec.options})

    if isinstance(training.loss_type, str):
        return one(training.loss_type)
    return Mixture([one(name) for name in training.loss_type], training.loss_weights or [1.0] * len(training.loss_type))


def batch_layout(cfg) -> Layout:
    """How a run's batches are laid out (``dpo_hpc.data.collate``): one flat row where the attention
    skips other sequences' tokens, else packed rows whose dense-mask attention costs no more than
    padded rows would."""
    if not cfg.training.padding_free:
        return "padded"
    return "flat" if cfg.attn_implementation in SPARSE_ATTENTION else "packed"


def build_scorer(cfg) -> CompletionScorer:
    """How a run scores completions, its training steps and its reference pass alike (LD-DPO's
    token weights where ``ld_alpha`` is set; an SFT section has no such key)."""
    return CompletionScorer(compiled=cfg.training.torch_compile, ld_alpha=getattr(cfg.training, "ld_alpha", None))


def build_objective(algorithm, cfg, pad_id: int, collective: Collective, reference=None,
                    ref_table: Optional[RefLogps] = None, router_aux_loss_coef: Optional[float] = None) -> Objective:
    """The objective of a registered algorithm (``dpo_hpc.config.registry``); ``router_aux_loss_coef``:
    the weight of the policy's router loss, where it has one (``engine.router_loss_weight``)."""
    scorer, layout, router = build_scorer(cfg), batch_layout(cfg), router_aux_loss_coef
    if algorithm.model == "reward_model":
        return RewardObjective(pad_id, collective, layout, cfg.training.center_rewards_coefficient)
    if algorithm.kind == "sft":
        return SFTObjective(pad_id, scorer, layout, router_aux_loss_coef=router)
    if algorithm.kind == "unpaired":
        training = cfg.training
        return KTOObjective(reference, pad_id, collective, scorer, loss_type=training.loss_type, beta=training.beta,
                            desirable_weight=training.desirable_weight, undesirable_weight=training.undesirable_weight,
                            ref_table=ref_table, layout=layout, router_aux_loss_coef=router)
    policy = resolve(algorithm.beta_policy).from_config(cfg, collective)
    return PreferenceObjective(reference, build_loss(cfg.training), policy, pad_id, collective, scorer, ref_table,
                               rpo_alpha=cfg.training.rpo_alpha, layout=layout, router_aux_loss_coef=router,
                               reference_free=is_reference_free(cfg.training.loss_type),
                               scores=f_divergence_scores(cfg.training.f_divergence_type,
                                                          cfg.training.f_alpha_divergence_coef),
                               use_weighting=cfg.training.use_weighting)
