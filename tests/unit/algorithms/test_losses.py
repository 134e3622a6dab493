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


def naive_loss(loss_type: str, pc, pr, rc, rr, lc, lr, beta: float, eps: float) -> float:
    """TRL's per-example formulas (spec algorithms.md section 1.3), in float64 by hand."""
    if loss_type == "ipo":
        h = (pc / lc - rc / lc) - (pr / lr - rr / lr)
        return (h - 1 / (2 * beta)) ** 2
    h = (pc - rc) - (pr - rr)
    if loss_type == "sigmoid":
        return -(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h)
    if loss_type == "robust":
        return (-(1 - eps) * _log_sigmoid(beta * h) + eps * _log_sigmoid(-beta * h)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return max(0.0, 1 - beta * h)
    raise KeyError(loss_type)


@pytest.mark.parametrize("loss_type", list(LOSSES))
@pytest.mark.parametrize("seed", range(50))
def test_every_loss_matches_its_naive_formula(loss_type, seed):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-torch.rand(6, generator=g, dtype=torch.float64) * 40 for _ in range(4))
    lengths = torch.randint(1, 30, (12,), generator=g)
    beta = torch.rand(6, generator=g, dtype=torch.float64) + 0.05  # one beta per pair, as Beta-DPO gives
    eps = 0.2 if LOSSES[loss_type].label_smoothing else 0.0
    pairs = PairLogps(pc, pr, rc, rr, lengths[:6], lengths[6:])
    loss = resolve(LOSSES[loss_type].implementation)(label_smoothing=eps)
    got = loss(loss.margins(pairs), beta)
    for i in range(6):
        expected = naive_loss(loss_type, *(float(t[i]) for t in (pc, pr, rc, rr)), float(lengths[i]),
                              float(lengths[6 + i]), float(beta[i]), eps)
        assert float(got[i]) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_loss_hand_values_at_zero_margin():
    zero = PairLogps(*(torch.zeros(1) for _ in range(4)), torch.ones(1), torch.ones(1))
    assert Sigmoid(0.1)(zero.margins, 0.1).item() == pytest.approx(math.log(2))  # cDPO at M=0 is still ln 2
    assert Robust(0.1)(zero.margins, 0.1).item() == pytest.approx(math.log(2))  # (0.9 - 0.1) ln 2 / 0.8
    assert Hinge()(zero.margins, 0.1).item() == 1.0
    assert IPO()(IPO.margins(zero), 0.1).item() == pytest.approx(25.0)  # (0 - 1/(2 * 0.1))^2
    assert Sigmoid(0.0)(torch.tensor([2.0]), 0.5).item() == pytest.approx(math.log1p(math.exp(-1.0)))


def test_ipo_margin_is_length_averaged_and_needs_lengths():
    pairs = PairLogps(torch.tensor([-4.0]), torch.tensor([-9.0]), torch.tensor([-2.0]), torch.tensor([-3.0]),
                      torch.tensor([2]), torch.tensor([3]))
    assert pairs.mean_margins.item() == pytest.approx((-4 / 2 + 2 / 2) - (-9 / 3 + 3 / 3))
    assert pairs.chosen_nll.item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="completion lengths"):
        PairLogps(*(torch.zeros(1) for _ in range(4))).mean_margins
