"""Dynamic-beta and Beta-DPO math and controllers against naive float64 loops, the spec's
hand-computed vectors (algorithms.md Part B 2.8 and 3.5), properties, and state round trips."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpo_hpc.algorithms.beta import beta_dpo, dynamic_beta
from dpo_hpc.algorithms.beta.beta_dpo import batch_beta, gap_std, gaussian_weights, keep_count, masked_mean, sample_keep_mask
from dpo_hpc.algorithms.beta.quantile import linear_quantile
from dpo_hpc.trainers.api import BetaDPOConfig, DynamicBetaDPOConfig


def DynamicBetaController(cfg: DynamicBetaDPOConfig):
    """The controller of the original API's config object (the controller takes the config sections)."""
    return dynamic_beta.DynamicBetaController(cfg.risk_test, cfg.beta_update)


def BetaDPOController(cfg: BetaDPOConfig):
    return beta_dpo.BetaDPOController(cfg.beta_dpo, seed=cfg.seed, eps=cfg.eps)


# ---------- naive references (plain Python floats, loops) -------------------------------------
def naive_quantile(xs, q):
    xs = sorted(xs)
    h = q * (len(xs) - 1)
    lo, hi = math.floor(h), math.ceil(h)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


class NaiveDynamicBeta:
    def __init__(self, beta_0, delta, lam, warmup, alpha, gamma, bmin, bmax, stat="z", eps0=0.05):
        self.__dict__.update(beta=beta_0, delta=delta, lam=lam, warmup=warmup, alpha=alpha, gamma=gamma,
                             bmin=bmin, bmax=bmax, stat=stat, eps0=eps0, tau=0.0, c=0, done=False, buf=[])

    def update(self, ms):
        self.c += 1
        if not self.done and self.c <= self.warmup:
            self.buf += ms
            if self.c == self.warmup:
                self.tau, self.done = naive_quantile(self.buf, 1 - self.delta), True
            return
        self.tau = (1 - self.lam) * self.tau + self.lam * naive_quantile(ms, 1 - self.delta)
        n = len(ms)
        p = sum(1 for m in ms if m >= self.tau) / n
        if self.stat == "z":
            u = (p - self.delta) / math.sqrt(self.delta * (1 - self.delta) / n)
        else:
            eps = math.sqrt(math.log(1 / self.eps0) / (2 * n))
            u = (p - self.delta - eps) / eps
        self.beta = min(self.bmax, max(self.bmin, self.beta * math.exp(self.alpha * math.tanh(self.gamma * u))))


def through_disk(state):
    """Checkpoints store controller state with torch.save and read it with weights_only=True."""
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ---------- quantile ----------------------------------------------------------------------------
def test_quantile_hand_vector():
    margins = torch.tensor([-1, -0.5, 0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.5, 2.0], dtype=torch.float64)
    assert linear_quantile(margins, 0.9) == pytest.approx(1.55)


@pytest.mark.parametrize("seed", range(50))
def test_quantile_matches_naive(seed):
    rng = random.Random(seed)
    xs = [rng.gauss(0, 2) for _ in range(rng.randint(1, 40))]
    q = rng.random()
    assert linear_quantile(torch.tensor(xs, dtype=torch.float64), q) == pytest.approx(naive_quantile(xs, q), abs=1e-12)


# ---------- dynamic beta ------------------------------------------------------------------------
HAND_BATCH = [0, .1, .3, .5, .7, .9, 1.2, 1.6, 2.0, 3.0, .2, .4, .6, .8, 1.0, 1.1]


def test_one_dynamic_step_hand_vector():
    ctrl = DynamicBetaController(DynamicBetaDPOConfig(beta_0=0.1, delta=0.1, momentum=0.1, warmup_steps=1))
    ctrl.tau, ctrl.warmup_done, ctrl.updates = 0.5, True, 1
    stats = ctrl.update(torch.tensor(HAND_BATCH, dtype=torch.float64))
    assert linear_quantile(torch.tensor(HAND_BATCH, dtype=torch.float64), 0.9) == pytest.approx(1.8)
    assert stats["risk/tau"] == pytest.approx(0.63)
    assert stats["risk/p_hat"] == pytest.approx(9 / 16)
    assert stats["risk/u_k"] == pytest.approx(6.1667, abs=1e-4)
    assert stats["risk/s_k"] == pytest.approx(1.0, abs=1e-9)
    assert stats["dpo/beta"] == pytest.approx(0.1005013, abs=1e-7)
    assert stats["risk/fail"] == 1.0


def test_no_beta_change_during_warmup_including_the_last_warmup_call():
    ctrl = DynamicBetaController(DynamicBetaDPOConfig(warmup_steps=3, alpha=0.5))
    for call in range(3):
        stats = ctrl.update(torch.randn(16) + 5)
        assert ctrl.beta == 0.1 and stats["risk/warmup"] == 1.0
    assert ctrl.warmup_done
    ctrl.update(torch.randn(16) + 5)
    assert ctrl.beta != 0.1


@pytest.mark.parametrize("stat", ["z", "hoeffding"])
@pytest.mark.parametrize("seed", range(25))
def test_dynamic_controller_matches_naive(seed, stat):
    rng = random.Random(seed)
    params = dict(beta_0=rng.uniform(0.05, 0.5), delta=rng.uniform(0.05, 0.3), lam=rng.uniform(0.05, 0.5),
                  warmup=rng.randint(1, 5), alpha=rng.uniform(0.001, 0.2), gamma=rng.uniform(0.5, 3),
                  bmin=0.0, bmax=1.0)
    naive = NaiveDynamicBeta(**params, stat=stat)
    ctrl = DynamicBetaController(DynamicBetaDPOConfig(
        beta_0=params["beta_0"], delta=params["delta"], momentum=params["lam"], warmup_steps=params["warmup"],
        alpha=params["alpha"], gamma=params["gamma"], beta_min=0.0, beta_max=1.0, risk_stat=stat))
    for _ in range(15):
        ms = [rng.gauss(0.3, 1) for _ in range(rng.randint(1, 24))]
        naive.update(ms)
        ctrl.update(torch.tensor(ms, dtype=torch.float64))
        assert ctrl.beta == pytest.approx(naive.beta, rel=1e-12) and ctrl.tau == pytest.approx(naive.tau, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.floats(-50, 50), min_size=1, max_size=20), min_size=1, max_size=30),
       st.floats(0.01, 1.0), st.floats(0.1, 5))
def test_beta_stays_within_bounds(batches, alpha, gamma):
    ctrl = DynamicBetaController(DynamicBetaDPOConfig(beta_0=0.5, beta_min=0.2, beta_max=0.8, alpha=alpha,
                                                      gamma=gamma, warmup_steps=2))
    for batch in batches:
        ctrl.update(torch.tensor(batch, dtype=torch.float64))
        assert 0.2 <= ctrl.beta <= 0.8 and math.isfinite(ctrl.tau)


@pytest.mark.parametrize("split_at", [1, 2, 3, 6])
def test_dynamic_state_round_trip_continues_identically(split_at):
    cfg = DynamicBetaDPOConfig(warmup_steps=3, alpha=0.05)
    batches = [torch.randn(8, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(10)]
    straight = DynamicBetaController(cfg)
    for b in batches:
        straight.update(b)
    first = DynamicBetaController(cfg)
    for b in batches[:split_at]:
        first.update(b)
    state = first.state_dict()
    assert all(isinstance(v, (int, float, bool, torch.Tensor)) for v in state.values())
    resumed = DynamicBetaController(cfg)
    resumed.load_state_dict(through_disk(state))
    for b in batches[split_at:]:
        resumed.update(b)
    assert (resumed.beta, resumed.tau, resumed.updates) == (straight.beta, straight.tau, straight.updates)


def test_dynamic_config_rejects_bad_values():
    with pytest.raises(ValueError, match="warmup_steps .* greater than or equal to 1"):
        DynamicBetaDPOConfig(warmup_steps=0)
    with pytest.raises(ValueError, match="delta"):
        DynamicBetaDPOConfig(delta=1.0)
    with pytest.raises(ValueError, match="beta_min <= beta_0 <= beta_max"):
        DynamicBetaDPOConfig(beta_0=3.0)


# ---------- beta-DPO ----------------------------------------------------------------------------
def test_beta_dpo_hand_vectors():
    gaps = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0], dtype=torch.float64)
    weights = gaussian_weights(gaps, mu=1.5, sigma=1.0)
    assert weights.tolist() == pytest.approx([0.3247, 0.8825, 0.8825, 0.3247, 2.0e-16], rel=1e-3)
    assert keep_count(5, 0.8) == 4
    assert gap_std(gaps, "population") == pytest.approx(3.544, abs=1e-3)
    assert gap_std(gaps, "unbiased") == pytest.approx(3.962, abs=1e-3)
    ctrl = BetaDPOController(BetaDPOConfig(alpha=0.6))
    ctrl.load_state_dict({**ctrl.state_dict(), "mu": 1.0, "sigma": 1.0, "initialised": True})
    mask, beta, stats = ctrl.select(gaps)
    assert ctrl.mu == pytest.approx(1.22) and ctrl.sigma == pytest.approx(1.2544, abs=1e-4)
    first_four = torch.tensor([True, True, True, True, False])
    assert batch_beta(0.1, 0.6, gaps, first_four, 1.22, 1e-3) == pytest.approx(0.1168, abs=1e-4)
    assert batch_beta(0.1, 0.5, gaps, first_four, 1.22, 1e-3) == pytest.approx(0.1140, abs=1e-4)
    assert mask.sum() == 4 and stats["beta_dpo/kept"] == 4
    official = BetaDPOController(BetaDPOConfig(ema_init="zeros", std="unbiased"))
    official.select(gaps)
    assert official.mu == pytest.approx(0.32) and official.sigma == pytest.approx(0.396, abs=1e-3)


@pytest.mark.parametrize("seed", range(50))
def test_beta_dpo_functions_match_naive(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 20)
    gaps = [rng.gauss(0, 2) for _ in range(n)]
    mu, sigma = rng.gauss(0, 1), rng.uniform(0.1, 3)
    got = gaussian_weights(torch.tensor(gaps, dtype=torch.float64), mu, sigma).tolist()
    assert got == pytest.approx([math.exp(-((g - mu) ** 2) / (2 * sigma ** 2)) for g in gaps], rel=1e-12, abs=1e-300)
    mask = [rng.random() < 0.6 for _ in range(n)]
    mask_t = torch.tensor(mask)
    sel = [g for g, m in zip(gaps, mask) if m] or gaps
    expected_beta = max(0.1 * (1 + 0.6 * (sum(sel) / len(sel) - mu)), 1e-3)
    assert batch_beta(0.1, 0.6, torch.tensor(gaps, dtype=torch.float64), mask_t, mu, 1e-3) == pytest.approx(expected_beta)
    losses = [rng.random() for _ in range(n)]
    expected = sum(l for l, m in zip(losses, mask) if m) / max(1, sum(mask))
    assert masked_mean(torch.tensor(losses, dtype=torch.float64), mask_t).item() == pytest.approx(expected)
    pop = math.sqrt(sum((g - sum(gaps) / n) ** 2 for g in gaps) / n) if n > 1 else 0.0
    assert gap_std(torch.tensor(gaps, dtype=torch.float64), "population") == pytest.approx(pop, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 200), st.floats(0.01, 1.0))
def test_keep_count_formula(n, rho):
    assert keep_count(n, rho) == max(1, min(n, math.floor(round(rho * n, 9))))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=40), st.floats(0.05, 1.0), st.integers(0, 10**6))
def test_sampling_never_repeats_a_row_and_keeps_k(gaps, rho, seed):
    ctrl = BetaDPOController(BetaDPOConfig(rho=rho, seed=seed))
    mask, beta, _ = ctrl.select(torch.tensor(gaps, dtype=torch.float64))
    assert mask.dtype == torch.bool and int(mask.sum()) == keep_count(len(gaps), rho)
    assert math.isfinite(beta) and beta >= 1e-3 and math.isfinite(ctrl.mu) and math.isfinite(ctrl.sigma)


def test_degenerate_gaps_give_no_nan():
    zeros = torch.zeros(8, dtype=torch.float64)  # step 0: policy == reference
    ctrl = BetaDPOController(BetaDPOConfig())
    mask, beta, stats = ctrl.select(zeros)
    assert int(mask.sum()) == 6 and beta == pytest.approx(0.1) and all(math.isfinite(v) for v in stats.values())
    assert torch.equal(gaussian_weights(torch.tensor([1e6, -1e6]), 0.0, 0.0), torch.ones(2, dtype=torch.float64))
    w = gaussian_weights(torch.tensor([float("nan"), 0.0]), 0.0, 1.0)
    assert w.tolist() == [0.0, 1.0]
    assert sample_keep_mask(torch.tensor([0.0, 1.0]), 1, torch.Generator().manual_seed(0)).tolist() == [False, True]


def test_eval_selection_keeps_everything_and_changes_nothing():
    ctrl = BetaDPOController(BetaDPOConfig())
    ctrl.select(torch.randn(8, dtype=torch.float64))
    before = ctrl.state_dict()
    mask, beta, _ = ctrl.select(torch.randn(8, dtype=torch.float64), train=False)
    assert mask.all() and beta == 0.1
    after = ctrl.state_dict()
    assert (after["mu"], after["sigma"]) == (before["mu"], before["sigma"])
    assert torch.equal(after["generator"], before["generator"])


def test_beta_dpo_state_round_trip_gives_the_same_draws():
    batches = [torch.randn(16, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(8)]
    straight = BetaDPOController(BetaDPOConfig(seed=3))
    masks = [straight.select(b)[0] for b in batches]
    first = BetaDPOController(BetaDPOConfig(seed=3))
    for b in batches[:4]:
        first.select(b)
    resumed = BetaDPOController(BetaDPOConfig(seed=3))
    resumed.load_state_dict(through_disk(first.state_dict()))
    for b, expected in zip(batches[4:], masks[4:]):
        mask, _, _ = resumed.select(b)
        assert torch.equal(mask, expected)
    assert (resumed.mu, resumed.sigma) == (straight.mu, straight.sigma)
