"""The preference objective composed of a pairwise loss and a beta policy, against a naive
float64 computation on a toy model, and each beta policy's contract."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from dpo_hpc.algorithms.beta import LOCAL
from dpo_hpc.algorithms.beta.beta_dpo import BetaDPOController, BetaDPOPolicy, keep_count
from dpo_hpc.algorithms.beta.dynamic_beta import DynamicBetaController, DynamicBetaPolicy
from dpo_hpc.algorithms.beta.fixed import FixedBeta
from dpo_hpc.algorithms.logprobs import CompletionScorer
from dpo_hpc.algorithms.losses import ORPO, LengthAveragedMargin, Sigmoid
from dpo_hpc.algorithms.objectives import PreferenceObjective
from dpo_hpc.config import BetaDPOSectionConfig, BetaUpdateConfig, RiskTestConfig
from dpo_hpc.config.losses import LOSSES
from dpo_hpc.data.tokenize import TokenizedPair
from test_losses import make_loss


class ToyLM(torch.nn.Module):
    def __init__(self, seed: int, vocab: int = 11):
        super().__init__()
        torch.manual_seed(seed)
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.table(input_ids))


def pairs(n: int, seed: int = 0) -> list[TokenizedPair]:
    rng = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt, chosen, rejected = (torch.randint(1, 11, (int(k),), generator=rng).tolist()
                                    for k in torch.randint(1, 5, (3,), generator=rng))
        out.append(TokenizedPair(prompt, chosen, rejected))
    return out


def naive_logp(model, prompt, completion) -> float:
    ids = prompt + completion
    logits = model.table.weight.double()[ids]
    return sum(torch.log_softmax(logits[t - 1], -1)[ids[t]].item() for t in range(len(prompt), len(ids)))


def naive_margins(policy, reference, batch):
    return [(naive_logp(policy, p.prompt_ids, p.chosen_ids) - naive_logp(reference, p.prompt_ids, p.chosen_ids))
            - (naive_logp(policy, p.prompt_ids, p.rejected_ids) - naive_logp(reference, p.prompt_ids, p.rejected_ids))
            for p in batch]


def objective(policy_of_beta):
    return PreferenceObjective(ToyLM(1), Sigmoid(), policy_of_beta, pad_id=0, collective=LOCAL,
                               scorer=CompletionScorer())


def test_fixed_beta_dpo_matches_naive_and_keeps_every_pair():
    policy, examples = ToyLM(0), pairs(6)
    obj = objective(FixedBeta(0.3))
    batch = obj.collate(examples)
    loss_sum, stats = obj.loss_and_stats(policy, batch)
    expected = [-math.log(1 / (1 + math.exp(-0.3 * m))) for m in naive_margins(policy, obj.reference, examples)]
    assert loss_sum.item() == pytest.approx(sum(expected), rel=1e-5)
    assert obj.units(batch).item() == 6 and stats["loss"][1].item() == 6
    loss_sum.backward()
    assert policy.table.weight.grad.abs().sum() > 0 and obj.reference.table.weight.grad is None
    assert obj.end_step() == {} and obj.histograms()["margins"].numel() == 6


def test_beta_dpo_policy_weights_k_pairs_and_counts_them():
    examples = pairs(10)
    obj = objective(BetaDPOPolicy(BetaDPOController(BetaDPOSectionConfig(rho=0.5), seed=3), LOCAL))
    batch = obj.collate(examples)
    loss_sum, stats = obj.loss_and_stats(ToyLM(0), batch)
    assert obj.units(batch).item() == keep_count(10, 0.5) == 5 and stats["loss"][1].item() == 5
    logged = obj.end_step()
    assert logged["beta_dpo/kept"] == 5.0 and logged["beta_dpo/beta_used"] > 0
    assert obj.policy.eval_beta() == 0.1


@pytest.mark.parametrize("granularity", ["optimizer_step", "micro_batch"])
def test_dynamic_beta_loss_uses_the_beta_in_force_before_its_update(granularity):
    risk = RiskTestConfig(beta_warmup=1, update_granularity=granularity)
    controller = DynamicBetaController(risk, BetaUpdateConfig(alpha=0.5))
    policy = DynamicBetaPolicy(controller, LOCAL)
    obj, model = objective(policy), ToyLM(0)
    for step in range(3):
        before = controller.beta
        _, stats = obj.loss_and_stats(model, obj.collate(pairs(8, seed=step)))
        margins = obj._step_margins[-1]
        expected_reward = (before * margins).sum().item()  # rewards/margins of the step use the old beta
        assert stats["rewards/margins"][0].item() == pytest.approx(expected_reward, rel=1e-5, abs=1e-6)
        updates_before_end = controller.updates
        obj.end_step()
        obj.histograms()
        assert controller.updates == step + 1
        assert updates_before_end == (step + 1 if granularity == "micro_batch" else step)
    state = obj.state_dict()
    again = objective(DynamicBetaPolicy(DynamicBetaController(risk, BetaUpdateConfig(alpha=0.5)), LOCAL))
    again.load_state_dict(state)
    assert again.policy.eval_beta() == controller.beta and again.policy.controller.tau == controller.tau


def test_rpo_adds_the_chosen_responses_mean_token_nll():
    policy, examples = ToyLM(0), pairs(5)
    plain = objective(FixedBeta(0.3))
    rpo = PreferenceObjective(ToyLM(1), Sigmoid(), FixedBeta(0.3), pad_id=0, collective=LOCAL,
                              scorer=CompletionScorer(), rpo_alpha=0.5)
    base, _ = plain.loss_and_stats(policy, plain.collate(examples))
    total, stats = rpo.loss_and_stats(policy, rpo.collate(examples))
    nll = [-naive_logp(policy, p.prompt_ids, p.chosen_ids) / len(p.chosen_ids) for p in examples]
    assert total.item() == pytest.approx(base.item() + 0.5 * sum(nll), rel=1e-5)
    assert stats["nll_loss"][0].item() == pytest.approx(sum(nll), rel=1e-5) and stats["nll_loss"][1].item() == 5


def naive_tokens(model, prompt, completion) -> tuple[torch.Tensor, torch.Tensor]:
    """Per completion token, float64: log p (with gradient to ``model``) and log sum_v p_v^2."""
    ids = prompt + completion
    logits = model.table.weight.double()[ids[len(prompt) - 1:-1]]
    logps = torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
    return logps, torch.softmax(logits.detach(), -1).square().sum(-1).log()


def test_ld_dpo_weighs_the_longer_replys_tail_on_both_models_and_rpo_counts_every_token():
    alpha, policy, examples = 0.25, ToyLM(0), pairs(8)
    assert any(len(p.chosen_ids) != len(p.rejected_ids) for p in examples)
    obj = PreferenceObjective(ToyLM(1), Sigmoid(), FixedBeta(0.3), pad_id=0, collective=LOCAL,
                              scorer=CompletionScorer(ld_alpha=alpha), rpo_alpha=0.5)
    loss_sum, stats = obj.loss_and_stats(policy, obj.collate(examples))

    def ld(model, p, completion):
        logps, _ = naive_tokens(model, p.prompt_ids, completion)
        shared = min(len(p.chosen_ids), len(p.rejected_ids))
        return (logps[:shared].sum() + alpha * logps[shared:].sum()).item()

    expected, chosen = 0.0, 0.0
    for p in examples:
        m = (ld(policy, p, p.chosen_ids) - ld(obj.reference, p, p.chosen_ids)) \
            - (ld(policy, p, p.rejected_ids) - ld(obj.reference, p, p.rejected_ids))
        nll = -naive_logp(policy, p.prompt_ids, p.chosen_ids) / len(p.chosen_ids)  # every token, unweighted
        expected += -math.log(1 / (1 + math.exp(-0.3 * m))) + 0.5 * nll
        chosen += ld(policy, p, p.chosen_ids)
    assert loss_sum.item() == pytest.approx(expected, rel=1e-5)
    assert stats["logps/chosen"][0].item() == pytest.approx(chosen, rel=1e-5)
    from dpo_hpc.algorithms.losses import ChosenNLL, Mixture

    mixed = PreferenceObjective(obj.reference, Mixture([Sigmoid(), ChosenNLL()], [1.0, 0.5]), FixedBeta(0.3),
                                pad_id=0, collective=LOCAL, scorer=CompletionScorer(ld_alpha=alpha))
    assert mixed.loss_and_stats(policy, mixed.collate(examples))[0].item() == pytest.approx(expected, rel=1e-5)


def test_wpo_weighs_each_pairs_loss_by_its_replies_probability_with_no_gradient_through_it():
    beta, policy, examples = 0.3, ToyLM(0), pairs(6)
    obj = PreferenceObjective(ToyLM(1), Sigmoid(), FixedBeta(beta), pad_id=0, collective=LOCAL,
                              scorer=CompletionScorer(), use_weighting=True)
    loss_sum, stats = obj.loss_and_stats(policy, obj.collate(examples))
    (grad,) = torch.autograd.grad(loss_sum, [policy.table.weight])

    table = policy.table.weight.detach().double().requires_grad_()
    naive_policy = SimpleNamespace(table=SimpleNamespace(weight=table))
    expected, weights = 0.0, []
    for p in examples:
        sides = []
        for completion in (p.chosen_ids, p.rejected_ids):
            logps, log_sum_sq = naive_tokens(naive_policy, p.prompt_ids, completion)
            ref = naive_logp(obj.reference, p.prompt_ids, completion)
            sides.append((logps.sum() - ref, torch.exp((logps.detach() - log_sum_sq).mean())))
        (chosen, w_chosen), (rejected, w_rejected) = sides
        weights.append((w_chosen * w_rejected).item())
        expected = expected - weights[-1] * torch.nn.functional.logsigmoid(beta * (chosen - rejected))
    (want,) = torch.autograd.grad(expected, [table])
    assert loss_sum.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(grad.double(), want, rtol=1e-4, atol=1e-6)
    assert stats["wpo_weights"][0].item() == pytest.approx(sum(weights), rel=1e-5)
    assert stats["wpo_weights"][1].item() == 6 and stats["loss"][1].item() == 6  # the mean stays over pairs


POLICIES = {
    "fixed": lambda: FixedBeta(0.2),
    "dynamic_beta": lambda: DynamicBetaPolicy(DynamicBetaController(RiskTestConfig(beta_warmup=1),
                                                                    BetaUpdateConfig(alpha=0.5)), LOCAL),
    "beta_dpo": lambda: BetaDPOPolicy(BetaDPOController(BetaDPOSectionConfig(rho=0.5), seed=3), LOCAL),
}


@pytest.mark.parametrize("loss_type", list(LOSSES))
@pytest.mark.parametrize("policy_name", list(POLICIES))
def test_every_loss_composes_with_every_beta_policy(loss_type, policy_name):
    """Three steps of each combination (with RPO's NLL and WPO's weights): finite loss and gradient,
    and the beta policy reads the margin the loss is a function of (IPO's is length-averaged)."""
    loss = make_loss(loss_type)
    obj = PreferenceObjective(ToyLM(1), loss, POLICIES[policy_name](), pad_id=0, collective=LOCAL,
                              scorer=CompletionScorer(), rpo_alpha=0.2, use_weighting=True)
    model = ToyLM(0)
    for step in range(3):
        examples = pairs(8, seed=step)
        loss_sum, stats = obj.loss_and_stats(model, obj.collate(examples))
        loss_sum.backward()
        assert torch.isfinite(loss_sum) and torch.isfinite(model.table.weight.grad).all()
        obj.end_step()
    naive = naive_margins(model, obj.reference, examples)
    if isinstance(loss, LengthAveragedMargin):
        naive = [((naive_logp(model, p.prompt_ids, p.chosen_ids) - naive_logp(obj.reference, p.prompt_ids, p.chosen_ids))
                  / len(p.chosen_ids))
                 - ((naive_logp(model, p.prompt_ids, p.rejected_ids)
                     - naive_logp(obj.reference, p.prompt_ids, p.rejected_ids)) / len(p.rejected_ids))
                 for p in examples]
    if isinstance(loss, ORPO):  # the policy's log odds ratio (a reference-free loss)
        def log_odds(ids, p):
            mean = naive_logp(model, p.prompt_ids, ids) / len(ids)
            return mean - math.log(-math.expm1(mean))
        naive = [log_odds(p.chosen_ids, p) - log_odds(p.rejected_ids, p) for p in examples]
    assert obj._step.tolist() == pytest.approx(naive, rel=1e-4, abs=1e-5)
