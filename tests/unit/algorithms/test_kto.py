"""KTO: its losses at hand values and against TRL's formula in float64, the reference point (a
clamped mean over the global micro-batch), the weight advice of the KTO paper, and the objective
on a toy model against a naive float64 computation, with an online reference and a table alike."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from dpo_hpc.algorithms.beta import LOCAL
from dpo_hpc.algorithms.kto import KTOObjective, kl_estimate, kto_losses, weight_advice
from dpo_hpc.algorithms.logprobs import CompletionScorer
from dpo_hpc.data.pipeline import ExampleSet, with_kl_completions
from dpo_hpc.data.sampler import rotated_within
from dpo_hpc.data.tokenize import TokenizedCompletion
from dpo_hpc.trainers.ref_cache import RefLogpsTable
from test_objectives import ToyLM, naive_logp


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kto_losses_at_hand_values():
    logratios, labels, kl = torch.tensor([2.0, -1.0]), torch.tensor([True, False]), torch.tensor(0.5)
    losses = kto_losses(logratios, labels, kl, beta=0.1, loss_type="kto", desirable_weight=2.0, undesirable_weight=3.0)
    assert losses.tolist() == pytest.approx([2 * (1 - sigmoid(0.15)), 3 * (1 - sigmoid(0.15))], abs=1e-6)
    apo = kto_losses(logratios, labels, kl, beta=0.1, loss_type="apo_zero_unpaired")
    assert apo.tolist() == pytest.approx([1 - sigmoid(0.2), sigmoid(-0.1)], abs=1e-6)
    at_start = kto_losses(torch.zeros(4), torch.tensor([True, False, True, False]), torch.tensor(0.0), 0.1, "kto")
    assert at_start.tolist() == [0.5] * 4  # policy = reference: every loss is 1 - sigmoid(0)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_losses_match_trls_formula_in_float64(loss_type):
    """TRL's ``_compute_loss``: chosen and rejected losses apart, weighted, concatenated."""
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        n = int(torch.randint(1, 9, (1,), generator=gen))
        logratios, labels = torch.randn(n, generator=gen, dtype=torch.float64) * 5, torch.rand(n, generator=gen) < 0.5
        kl, beta, wd, wu = torch.rand((), generator=gen, dtype=torch.float64), 0.3, 1.3, 0.7
        chosen, rejected = logratios[labels], logratios[~labels]
        if loss_type == "kto":
            trl = torch.cat([wd * (1 - torch.sigmoid(beta * (chosen - kl))),
                             wu * (1 - torch.sigmoid(beta * (kl - rejected)))])
        else:
            trl = torch.cat([wd * (1 - torch.sigmoid(beta * chosen)), wu * torch.sigmoid(beta * rejected)])
        ours = kto_losses(logratios, labels, kl, beta, loss_type, wd, wu)
        assert torch.allclose(torch.cat([ours[labels], ours[~labels]]), trl, atol=1e-12)
        assert math.isclose(ours.mean().item(), trl.mean().item(), abs_tol=1e-12)  # TRL's nanmean


@dataclass(frozen=True)
class TwoRanks:
    """A collective whose other rank holds ``other``."""

    other: torch.Tensor
    rank: int = 0
    world_size: int = 2

    def gather(self, tensor):  # the other rank's values, as its (sum, count)
        return torch.cat([tensor, torch.stack([self.other.sum(), torch.tensor(float(self.other.numel()))])])


def test_the_reference_point_is_the_clamped_mean_over_the_global_micro_batch_without_gradient():
    policy = torch.tensor([-3.0, -5.0], requires_grad=True)
    ref = torch.tensor([-4.0, -4.0])
    assert kl_estimate(policy, ref, LOCAL).item() == 0.0  # mean 0 -> 0
    across = kl_estimate(policy, ref, TwoRanks(torch.tensor([3.0, 1.0])))
    assert across.item() == pytest.approx(1.0) and not across.requires_grad  # (1 - 1 + 3 + 1) / 4
    assert kl_estimate(policy, ref, TwoRanks(torch.tensor([-3.0, -1.0]))).item() == 0.0  # clamped at 0
    uneven = kl_estimate(policy, ref, TwoRanks(torch.tensor([6.0])))  # an evaluation's short last batch
    assert uneven.item() == pytest.approx(2.0)  # (1 - 1 + 6) / 3


def test_weight_advice_follows_the_kto_papers_range():
    assert weight_advice(50, 50, 1.0, 1.0) is None
    assert weight_advice(100, 90, 1.0, 1.0) is None  # 100 / 90 lies in [1, 4/3]
    advice = weight_advice(100, 50, 1.0, 1.0)  # TRL's bounds for these counts: [0.5, 0.67] and [1.5, 2.0]
    assert "desirable_weight in [0.50, 0.67] or undesirable_weight in [1.50, 2.00]" in advice
    assert weight_advice(100, 50, 0.6, 1.0) is None
    assert "no undesirable examples: only the desirable completions' loss trains" in weight_advice(40, 0, 1.0, 1.0)


def completions(n: int, seed: int = 0) -> ExampleSet:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt, completion = (torch.randint(1, 11, (int(k),), generator=gen).tolist()
                              for k in torch.randint(1, 5, (2,), generator=gen))
        out.append(TokenizedCompletion(prompt, completion, bool(i % 3), f"e{i}"))
    return with_kl_completions(ExampleSet(out, "fp"), rotated_within(torch.arange(n).numpy(), n), 64)


def naive_kto(policy, reference, batch, beta, loss_type) -> float:
    """The batch's mean loss in float64, from per-token log-softmax of the toy models."""
    kl = sum(naive_logp(policy, e.prompt_ids, list(e.kl_completion_ids))
             - naive_logp(reference, e.prompt_ids, list(e.kl_completion_ids)) for e in batch) / len(batch)
    kl = max(kl, 0.0) if loss_type == "kto" else 0.0
    total = 0.0
    for e in batch:
        r = naive_logp(policy, e.prompt_ids, e.completion_ids) - naive_logp(reference, e.prompt_ids, e.completion_ids)
        if loss_type == "kto":
            total += 1 - sigmoid(beta * (r - kl)) if e.label else 1 - sigmoid(beta * (kl - r))
        else:
            total += 1 - sigmoid(beta * r) if e.label else sigmoid(beta * r)
    return total / len(batch)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_the_objective_matches_a_naive_float64_computation(loss_type):
    batch = completions(6)
    policy, reference = ToyLM(1), ToyLM(2)
    objective = KTOObjective(reference, pad_id=0, collective=LOCAL, scorer=CompletionScorer(), loss_type=loss_type,
                             beta=0.5)
    loss_sum, stats = objective.loss_and_stats(policy, objective.collate(batch))
    assert loss_sum.item() / len(batch) == pytest.approx(naive_kto(policy, reference, batch, 0.5, loss_type), abs=1e-6)
    assert objective.reference_forwards == 1
    assert stats["desirable_fraction"][0].item() == 4 and stats["rewards/chosen"][1].item() == 4
    metrics = {name: (total / count).item() for name, (total, count) in stats.items()}
    assert objective.derived(metrics)["rewards/margins"] == pytest.approx(
        metrics["rewards/chosen"] - metrics["rewards/rejected"])


def test_a_reference_table_gives_the_online_references_loss_and_gradient_without_a_forward():
    batch = completions(5, seed=1)
    policy, reference, scorer = ToyLM(3), ToyLM(4), CompletionScorer()
    online = KTOObjective(reference, 0, LOCAL, scorer, loss_type="kto", beta=0.2)
    from dpo_hpc.data.collate import collate_completions

    values = scorer.sequence_logps(reference, collate_completions(batch, 0))
    table = RefLogpsTable([e.example_id for e in batch], torch.stack([values[:5], values[5:]], dim=1))
    cached = KTOObjective(None, 0, LOCAL, scorer, loss_type="kto", beta=0.2, ref_table=table)
    grads = []
    for objective in (online, cached):
        policy.zero_grad()
        loss, _ = objective.loss_and_stats(policy, objective.collate(batch))
        loss.backward()
        grads.append((loss.item(), policy.table.weight.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)
    assert cached.reference_forwards == 0


def torch_logp(weight, prompt, completion) -> torch.Tensor:
    """log p(completion | prompt) of a toy model with logits table ``weight`` (float64, differentiable)."""
    ids = prompt + list(completion)
    return sum(torch.log_softmax(weight[ids[t - 1]], -1)[ids[t]] for t in range(len(prompt), len(ids)))


@pytest.mark.parametrize("z_has_gradient", [False, True])
def test_the_reference_point_carries_no_gradient(z_has_gradient):
    """The objective's gradient is the float64 loss's with z held constant, and not the one where
    z is differentiated too (so the comparison can tell them apart)."""
    batch, beta = completions(6, seed=2), 2.0
    policy, reference = ToyLM(5), ToyLM(6)
    objective = KTOObjective(reference, 0, LOCAL, CompletionScorer(), loss_type="kto", beta=beta)
    loss, _ = objective.loss_and_stats(policy, objective.collate(batch))
    (loss / len(batch)).backward()
    weight, ref = policy.table.weight.detach().double().requires_grad_(), reference.table.weight.detach().double()
    with torch.enable_grad() if z_has_gradient else torch.no_grad():
        z = sum(torch_logp(weight, e.prompt_ids, e.kl_completion_ids)
                - torch_logp(ref, e.prompt_ids, e.kl_completion_ids) for e in batch) / len(batch)
    z = z.clamp(min=0)
    assert z.item() > 0  # the clamp is not what keeps z's gradient out
    naive = sum(1 - torch.sigmoid(beta * (r - z)) if e.label else 1 - torch.sigmoid(beta * (z - r))
                for e in batch for r in [torch_logp(weight, e.prompt_ids, e.completion_ids)
                                         - torch_logp(ref, e.prompt_ids, e.completion_ids)]) / len(batch)
    naive.backward()
    close = torch.allclose(policy.table.weight.grad.double(), weight.grad, atol=1e-6)
    assert close != z_has_gradient
