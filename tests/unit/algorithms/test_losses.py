"""Log-probs, margins, every pairwise loss and the metrics against naive float64 loops and hand values."""

from __future__ import annotations

import math

import pytest
import torch

from dpo_hpc.algorithms.logprobs import sequence_logps, token_logps
from dpo_hpc.algorithms.losses import IPO, Hinge, Robust, Sigmoid, dpo_sigmoid_loss
from dpo_hpc.algorithms.objectives import resolve
from dpo_hpc.algorithms.preference import PairLogps, margins, preference_metrics
from dpo_hpc.config.losses import LOSSES


def naive_sequence_logps(logits, input_ids, loss_mask):
    """Loop over rows and positions; log-softmax by hand in float64."""
    out = []
    for b in range(logits.shape[0]):
        total = 0.0
        for t in range(1, logits.shape[1]):
            if loss_mask[b, t]:
                row = [float(x) for x in logits[b, t - 1]]
                top = max(row)
                log_z = top + math.log(sum(math.exp(x - top) for x in row))
                total += row[int(input_ids[b, t])] - log_z
        out.append(total)
    return out


@pytest.mark.parametrize("seed", range(50))
def test_sequence_logps_matches_naive(seed):
    g = torch.Generator().manual_seed(seed)
    batch, length, vocab = 3, 7, 11
    logits = torch.randn(batch, length, vocab, generator=g, dtype=torch.float64) * 3
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = (torch.rand(batch, length, generator=g) > 0.4).long()
    mask[:, 0] = 0  # the first token has no prediction
    got = sequence_logps(logits, ids, mask)
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx(naive_sequence_logps(logits, ids, mask), abs=1e-5)


def test_logps_read_from_previous_position_and_masked_tokens_count_zero():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 10.0  # position 0 predicts token 1's value
    ids = torch.tensor([[0, 2, 3]])
    only_second = sequence_logps(logits, ids, torch.tensor([[0, 1, 0]]))
    expected = 10.0 - math.log(math.exp(10.0) + 3)
    assert only_second.item() == pytest.approx(expected, abs=1e-6)
    assert sequence_logps(logits, ids, torch.zeros(1, 3, dtype=torch.long)).item() == 0.0
    assert token_logps(logits, ids).shape == (1, 2)


def test_bf16_logits_are_scored_in_fp32():
    logits = torch.randn(2, 5, 9).to(torch.bfloat16)
    ids = torch.randint(0, 9, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    assert sequence_logps(logits, ids, mask).dtype == torch.float32


@pytest.mark.parametrize("seed", range(50))
def test_dpo_loss_and_metrics_match_naive(seed):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (torch.randn(6, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    beta = float(torch.rand(1, generator=g)) + 0.01
    m = margins(pc, pr, rc, rr)
    loss = dpo_sigmoid_loss(m, beta)
    metrics = preference_metrics(pc, pr, rc, rr, beta)
    for i in range(6):
        margin = (float(pc[i]) - float(rc[i])) - (float(pr[i]) - float(rr[i]))
        assert float(m[i]) == pytest.approx(margin, abs=1e-9)
        assert float(loss[i]) == pytest.approx(math.log1p(math.exp(-beta * margin)), rel=1e-9, abs=1e-12)
        chosen, rejected = beta * (float(pc[i]) - float(rc[i])), beta * (float(pr[i]) - float(rr[i]))
        assert float(metrics["rewards/chosen"][i]) == pytest.approx(chosen, rel=1e-5, abs=1e-6)
        assert float(metrics["rewards/rejected"][i]) == pytest.approx(rejected, rel=1e-5, abs=1e-6)
        assert float(metrics["rewards/margins"][i]) == pytest.approx(chosen - rejected, rel=1e-5, abs=1e-5)
        assert float(metrics["rewards/accuracies"][i]) == float(chosen > rejected)
        assert float(metrics["logps/chosen"][i]) == pytest.approx(float(pc[i]), rel=1e-6)


def test_hand_values():
    assert dpo_sigmoid_loss(torch.tensor([0.0]), 0.1).item() == pytest.approx(math.log(2))
    assert dpo_sigmoid_loss(torch.tensor([2.0]), 0.5).item() == pytest.approx(math.log1p(math.exp(-1.0)))
    # per-pair beta
    got = dpo_sigmoid_loss(torch.tensor([1.0, 1.0]), torch.tensor([0.1, 1.0]))
    assert got.tolist() == pytest.approx([math.log1p(math.exp(-0.1)), math.log1p(math.exp(-1.0))])


def test_ties_are_not_accurate_and_beta_gets_no_gradient():
    x = torch.zeros(3)
    assert preference_metrics(x, x, x, x, 0.1)["rewards/accuracies"].sum() == 0  # strict >, spec P14
    beta = torch.tensor(0.5, requires_grad=True)
    m = torch.tensor([1.0, -1.0], requires_grad=True)
    dpo_sigmoid_loss(m, beta).sum().backward()
    assert beta.grad is None and m.grad is not None


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > -30 else x - math.log1p(math.exp(x))


def _sigmoid(x: float) -> float:
    return math.exp(_log_sigmoid(x))


def naive_loss(loss_type: str, pc, pr, rc, rr, lc, lr, beta: float, eps: float, tau: float, gamma: float) -> float:
    """TRL 1.16's per-example formulas (spec algorithms.md section 1.3 for the first four), in
    float64 by hand."""
    if loss_type in ("ipo", "sigmoid_norm"):
        h = (pc / lc - rc / lc) - (pr / lr - rr / lr)
        return (h - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else -_log_sigmoid(beta * h)
    h, chosen, rejected = (pc - rc) - (pr - rr), beta * (pc - rc), beta * (pr - rr)
    z = beta * h
    if loss_type == "sigmoid":
        return -(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z)
    if loss_type == "robust":
        return (-(1 - eps) * _log_sigmoid(z) + eps * _log_sigmoid(-z)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return max(0.0, 1 - z)
    if loss_type == "exo_pair":
        return (_sigmoid(z) * (_log_sigmoid(z) - math.log(1 - eps))
                + _sigmoid(-z) * (_log_sigmoid(-z) - math.log(eps)))
    if loss_type == "discopop":
        blend = _sigmoid(z / tau)
        return -_log_sigmoid(z) * (1 - blend) + math.exp(-z) * blend
    if loss_type == "nca_pair":
        return -_log_sigmoid(chosen) - 0.5 * _log_sigmoid(-chosen) - 0.5 * _log_sigmoid(-rejected)
    if loss_type == "bco_pair":
        return -_log_sigmoid(chosen) - _log_sigmoid(-rejected)
    if loss_type == "sppo_hard":
        return ((pc - rc) - 0.5 / beta) ** 2 + ((pr - rr) + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - _sigmoid(chosen) + _sigmoid(rejected)
    if loss_type == "apo_down":
        return _sigmoid(chosen) + 1 - _sigmoid(z)
    if loss_type == "simpo":  # TRL's CPO: -(1-eps) log s(b M_avg - gamma) - eps log s(-(b M_avg - gamma))
        h = (pc / lc - rc / lc) - (pr / lr - rr / lr)
        return -(1 - eps) * _log_sigmoid(beta * h - gamma) - eps * _log_sigmoid(gamma - beta * h)
    if loss_type == "sft":  # the chosen reply's mean token NLL
        return -pc / lc
    if loss_type == "orpo":  # TRL's ORPOTrainer: NLL - beta * log s(log odds), on length-averaged log-probs
        chosen, rejected = pc / lc, pr / lr
        log_odds = (chosen - math.log(1 - math.exp(chosen))) - (rejected - math.log(1 - math.exp(rejected)))
        return -chosen - beta * _log_sigmoid(log_odds)
    raise KeyError(loss_type)


OPTION_VALUES = {"label_smoothing": 0.2, "discopop_tau": 0.3, "simpo_gamma": 0.7}
"""Values the tests give the losses' options (not their defaults, so that each is seen to act)."""


def make_loss(loss_type: str):
    spec = LOSSES[loss_type]
    return resolve(spec.implementation)(**{option: OPTION_VALUES[option] for option in spec.options})


@pytest.mark.parametrize("loss_type", list(LOSSES))
@pytest.mark.parametrize("seed", range(50))
def test_every_loss_matches_its_naive_formula(loss_type, seed):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-torch.rand(6, generator=g, dtype=torch.float64) * 40 for _ in range(4))
    lengths = torch.randint(1, 30, (12,), generator=g)
    beta = torch.rand(6, generator=g, dtype=torch.float64) + 0.05  # one beta per pair, as Beta-DPO gives
    options = LOSSES[loss_type].options
    eps = OPTION_VALUES["label_smoothing"] if "label_smoothing" in options else 0.0
    pairs = PairLogps(pc, pr, rc, rr, lengths[:6], lengths[6:])
    loss = make_loss(loss_type)
    got = loss(loss.margins(pairs), beta, pairs)
    for i in range(6):
        expected = naive_loss(loss_type, *(float(t[i]) for t in (pc, pr, rc, rr)), float(lengths[i]),
                              float(lengths[6 + i]), float(beta[i]), eps, OPTION_VALUES["discopop_tau"],
                              OPTION_VALUES["simpo_gamma"])
        assert float(got[i]) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_losses_of_each_side_push_the_chosen_likelihood_as_their_papers_say():
    """The gradient of the chosen log-prob: up (negative loss gradient) for NCA, BCO, SPPO and
    APO-zero even where the margin is already large; down for APO-down."""
    chosen = torch.tensor([5.0], dtype=torch.float64, requires_grad=True)
    for loss_type, sign in (("nca_pair", -1), ("bco_pair", -1), ("sppo_hard", -1), ("apo_zero", -1),
                            ("apo_down", 1)):
        pairs = PairLogps(chosen, torch.tensor([-30.0], dtype=torch.float64), torch.tensor([5.0], dtype=torch.float64),
                          torch.tensor([0.0], dtype=torch.float64))
        loss = make_loss(loss_type)
        (grad,) = torch.autograd.grad(loss(loss.margins(pairs), 0.1, pairs).sum(), chosen)
        assert math.copysign(1, grad.item()) == sign and grad.item() != 0, loss_type


def test_loss_hand_values_at_zero_margin():
    zero = PairLogps(*(torch.zeros(1) for _ in range(4)), torch.ones(1), torch.ones(1))
    assert Sigmoid(0.1)(zero.margins, 0.1).item() == pytest.approx(math.log(2))  # cDPO at M=0 is still ln 2
    assert Robust(0.1)(zero.margins, 0.1).item() == pytest.approx(math.log(2))  # (0.9 - 0.1) ln 2 / 0.8
    assert Hinge()(zero.margins, 0.1).item() == 1.0
    assert IPO()(IPO.margins(zero), 0.1).item() == pytest.approx(25.0)  # (0 - 1/(2 * 0.1))^2
    assert Sigmoid(0.0)(torch.tensor([2.0]), 0.5).item() == pytest.approx(math.log1p(math.exp(-1.0)))
    at_zero = {"sigmoid_norm": math.log(2), "nca_pair": 2 * math.log(2), "bco_pair": 2 * math.log(2),
               "sppo_hard": 2 * 25.0, "apo_zero": 1.0, "apo_down": 1.0, "discopop": 0.5 * math.log(2) + 0.5,
               "exo_pair": 0.5 * (math.log(0.5) - math.log(0.8)) + 0.5 * (math.log(0.5) - math.log(0.2)),
               "simpo": -0.8 * _log_sigmoid(-0.7) - 0.2 * _log_sigmoid(0.7), "sft": 0.0}
    for loss_type, value in at_zero.items():  # policy = reference, beta 0.1, the test options
        loss = make_loss(loss_type)
        assert loss(loss.margins(zero), 0.1, zero).item() == pytest.approx(value), loss_type
    # ORPO at p = 1/2 (odds 1) against p = 1/4 (odds 1/3): log odds ln 3, NLL ln 2 per chosen token
    halves = PairLogps(torch.tensor([2 * math.log(0.5)]), torch.tensor([3 * math.log(0.25)]), torch.zeros(1),
                       torch.zeros(1), torch.tensor([2]), torch.tensor([3]))
    orpo = make_loss("orpo")
    assert orpo.margins(halves).item() == pytest.approx(math.log(3))
    assert orpo(orpo.margins(halves), 0.1, halves).item() == pytest.approx(math.log(2) - 0.1 * math.log(0.75))


def test_ipo_margin_is_length_averaged_and_needs_lengths():
    pairs = PairLogps(torch.tensor([-4.0]), torch.tensor([-9.0]), torch.tensor([-2.0]), torch.tensor([-3.0]),
                      torch.tensor([2]), torch.tensor([3]))
    assert pairs.mean_margins.item() == pytest.approx((-4 / 2 + 2 / 2) - (-9 / 3 + 3 / 3))
    assert pairs.chosen_nll.item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="completion lengths"):
        PairLogps(*(torch.zeros(1) for _ in range(4))).mean_margins


def naive_scores(kind: str, t: float, alpha: float) -> float:
    """TRL 1.16's f'(u) per side, from the log-ratio t, in float64."""
    if kind == "forward_kl":
        return 1 - math.exp(-t)
    if kind == "js_divergence":
        return math.log(2) + _log_sigmoid(t)
    if kind == "alpha_divergence":
        return (math.exp(min((alpha - 1) * t, 80.0)) - 1) / (alpha - 1)
    return t


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
@pytest.mark.parametrize("seed", range(10))
def test_f_divergences_make_the_margin_of_each_sides_scores(kind, seed):
    """f-DPO: a margin loss (sigmoid) on score_w - score_l, a length-averaged one (ipo) on
    score_w / len_w - score_l / len_l; reverse KL is DPO exactly (bit for bit)."""
    from dpo_hpc.algorithms.preference import f_divergence_scores

    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-torch.rand(6, generator=g, dtype=torch.float64) * 8 for _ in range(4))
    lengths = torch.randint(1, 30, (12,), generator=g)
    alpha, beta = 0.3, 0.2
    pairs = PairLogps(pc, pr, rc, rr, lengths[:6], lengths[6:], f_divergence_scores(kind, alpha))
    sigmoid, ipo = Sigmoid()(pairs.margins, beta), IPO()(IPO.margins(pairs), beta)
    for i in range(6):
        chosen = naive_scores(kind, float(pc[i] - rc[i]), alpha)
        rejected = naive_scores(kind, float(pr[i] - rr[i]), alpha)
        assert float(sigmoid[i]) == pytest.approx(-_log_sigmoid(beta * (chosen - rejected)), rel=1e-9)
        averaged = chosen / float(lengths[i]) - rejected / float(lengths[6 + i])
        assert float(ipo[i]) == pytest.approx((averaged - 1 / (2 * beta)) ** 2, rel=1e-9)
    if kind == "reverse_kl":
        plain = PairLogps(pc, pr, rc, rr, lengths[:6], lengths[6:])
        assert torch.equal(pairs.margins, plain.margins) and torch.equal(pairs.mean_margins, plain.mean_margins)
    assert f_divergence_scores("alpha_divergence", 1.0) is None  # its limit at alpha = 1 is the reverse KL


@pytest.mark.parametrize("seed", range(10))
def test_a_mixture_is_the_weighted_sum_of_its_losses_and_the_policy_reads_the_first_margin(seed):
    """MPO's mixture (TRL's list of loss types with loss_weights), against the naive formulas."""
    from dpo_hpc.algorithms.losses import Mixture

    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-torch.rand(5, generator=g, dtype=torch.float64) * 40 for _ in range(4))
    lengths = torch.randint(1, 30, (10,), generator=g)
    pairs = PairLogps(pc, pr, rc, rr, lengths[:5], lengths[5:])
    names, weights = ("ipo", "bco_pair", "sft"), [0.8, 0.2, 1.0]
    mixture = Mixture([make_loss(name) for name in names], weights)
    assert torch.equal(mixture.margins(pairs), pairs.mean_margins)  # IPO's length-averaged margin
    got = mixture(mixture.margins(pairs), 0.3, pairs)
    for i in range(5):
        values = (float(t[i]) for t in (pc, pr, rc, rr))
        args = (*values, float(lengths[i]), float(lengths[5 + i]), 0.3, 0.0, 0.05, 0.5)
        expected = sum(w * naive_loss(name, *args) for name, w in zip(names, weights))
        assert float(got[i]) == pytest.approx(expected, rel=1e-9, abs=1e-12)
