"""Membership-inference metrics and one-run epsilon lower bounds, against hand-computed values and
simulations of a mechanism with a known epsilon."""

import math

import numpy as np
import pytest
from scipy import optimize, stats

from memlens.audit.privacy import (
    auc,
    clopper_pearson,
    epsilon_lower_bound,
    epsilon_one_run_counts,
    membership_metrics,
    one_run_p_value,
    tpr_at_fpr,
)


def _true_eps(mu, delta):
    """Epsilon of the mu-GDP Gaussian mechanism at delta (Dong, Roth, Su 2019, Corollary 2.13)."""
    f = lambda e: stats.norm.cdf(-e / mu + mu / 2) - math.exp(e) * stats.norm.cdf(-e / mu - mu / 2) - delta  # noqa
    return optimize.brentq(f, 0, 200)


def test_auc_is_the_mann_whitney_statistic():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.3, 1, 57), rng.normal(0, 1, 43)
    a[:5] = b[:5]  # ties count one half
    u = stats.mannwhitneyu(a, b).statistic
    assert auc(a, b) == pytest.approx(u / (57 * 43))
    m = membership_metrics(a, b, score="s", bootstrap=200)
    assert m.auc == pytest.approx(u / (57 * 43)) and m.auc_ci[0] <= m.auc <= m.auc_ci[1]
    assert m.roc_fpr[0] == 0 and m.roc_tpr[-1] == 1


def test_tpr_at_fpr_by_hand():
    members = [0.9, 0.8, 0.7, 0.2]
    others = [0.85, 0.5, 0.4, 0.3, 0.1, 0.05, 0.04, 0.03, 0.02, 0.01]
    # FPR <= 10% allows one false positive (0.85): threshold 0.7 catches 3 of 4 members
    r = tpr_at_fpr(members, others, 0.1)
    assert r.tpr == 0.75 and r.threshold == 0.7 and r.resolvable
    assert (r.ci_low, r.ci_high) == pytest.approx(clopper_pearson(3, 4))
    # FPR 0: only 0.9 is above every non-member
    assert tpr_at_fpr(members, others, 0.0).tpr == 0.25
    small = tpr_at_fpr(members, others, 0.01)
    assert not small.resolvable and "too few non-members" in small.note
    lo, hi = clopper_pearson(3, 4, 0.95)
    assert lo == pytest.approx(stats.beta.ppf(0.025, 3, 2)) and hi == pytest.approx(stats.beta.ppf(0.975, 4, 1))


def test_one_run_p_value_without_delta_is_a_binomial_tail():
    # 9 of 10 guesses right under eps = 1: P[Binomial(10, e/(1+e)) >= 9]
    q = math.e / (1 + math.e)
    assert one_run_p_value(100, 10, 9, 1.0, 0.0) == pytest.approx(stats.binom.sf(8, 10, q))
    assert one_run_p_value(100, 10, 9, 1.0, 1e-3) > one_run_p_value(100, 10, 9, 1.0, 0.0)
    # all 20 right: the bound is the eps where q^20 = beta
    eps = epsilon_one_run_counts(40, 20, 20, significance=0.05, delta=0.0)
    assert (1 / (1 + math.exp(-eps))) ** 20 == pytest.approx(0.05, rel=1e-4)


@pytest.mark.parametrize("method", ["one-run", "fdp"])
def test_bounds_are_valid_for_a_mechanism_of_known_epsilon(method):
    mu, delta, m = 1.0, 1e-5, 1000
    true = _true_eps(mu, delta)
    rng = np.random.default_rng(1)
    above, bounds = 0, []
    for _ in range(40):
        inc = rng.random(m) < 0.5
        s = rng.normal(0, 1, m) + mu * inc
        b = epsilon_lower_bound(s[inc], s[~inc], delta=delta, method=method).epsilon
        bounds.append(b)
        above += b > true
    assert above <= 4  # at 95% confidence at most ~5% of runs may exceed the truth; none is expected
    assert np.mean(bounds) > 0.5  # and the audit sees the leak


def test_bounds_grow_with_the_number_of_canaries_and_vanish_without_a_leak():
    mu, delta = 4.0, 1e-5
    true = _true_eps(mu, delta)
    rng = np.random.default_rng(2)
    means = []
    for m in (1000, 100000):
        bs = []
        for _ in range(3):
            inc = rng.random(m) < 0.5
            s = rng.normal(0, 1, m) + mu * inc
            bs.append(epsilon_lower_bound(s[inc], s[~inc], delta=delta).epsilon)
        means.append(np.mean(bs))
    assert means[0] < means[1] < true and means[1] > 0.35 * true
    nulls = []
    for _ in range(20):
        s = rng.normal(0, 1, 1000)
        inc = rng.random(1000) < 0.5
        nulls.append(epsilon_lower_bound(s[inc], s[~inc], delta=delta).epsilon)
    assert np.mean(nulls) < 0.1 and max(nulls) < 1.0


def test_threshold_strategies():
    rng = np.random.default_rng(3)
    inc = rng.random(2000) < 0.5
    s = rng.normal(0, 1, 2000) + 2.0 * inc
    grid = epsilon_lower_bound(s[inc], s[~inc], delta=1e-5)
    assert grid.strategy == "grid" and grid.thresholds_tried == 7 and grid.epsilon > 0
    split = epsilon_lower_bound(s[inc], s[~inc], delta=1e-5, strategy="split")
    assert split.m == 1000 and split.epsilon > 0
    top = epsilon_lower_bound(s[inc], s[~inc], delta=1e-5, strategy="top:100")
    assert top.guesses == 100 and top.thresholds_tried == 1
    with pytest.raises(ValueError, match="unknown threshold strategy"):
        epsilon_lower_bound(s[inc], s[~inc], delta=1e-5, strategy="best")
def test_bootstrap_auc_fast_path_equals_sklearn():
    from memlens.audit.privacy import _auc_ranks

    rng = np.random.default_rng(5)
    a, b = rng.normal(0.2, 1, 40).round(1), rng.normal(0, 1, 60).round(1)  # rounded: many ties
    assert _auc_ranks(a, b) == pytest.approx(auc(a, b))


# ----------------------------------------------------------------------------- DP-SGD self-check

SELFCHECK = {"framework": "mae", "subsets": "all", "epochs": 4, "batch_size": 512,
             "model": {"arch": "vit_micro", "depth": 1, "embed_dim": 16, "num_heads": 2}, "mae": {"decoder_dim": 16}}


def test_selfcheck_finds_a_leak_within_the_claim(digits):
    from memlens.audit.dp_selfcheck import selfcheck
    from memlens.config import TrainConfig

    r = selfcheck(TrainConfig.model_validate({**SELFCHECK, "dp": {"epsilon": 50.0}}), m=20000, dataset=digits)
    best = max(r.lower_bound["epsilon"], r.lower_bound_other["epsilon"])
    assert r.passed and 2.0 < best <= r.claimed_epsilon <= 50.0
    assert r.auc > 0.8 and r.n_in == pytest.approx(10000, abs=300)


def test_selfcheck_catches_a_trainer_that_adds_too_little_noise(digits, monkeypatch):
    from memlens.audit.dp_selfcheck import selfcheck
    from memlens.config import TrainConfig
    from memlens.dp.optimizer import FusedDPOptimizer

    honest = FusedDPOptimizer.noise_std
    # a bug behind the accountant's back: a tenth of the noise the accountant assumes
    monkeypatch.setattr(FusedDPOptimizer, "noise_std", lambda self: honest(self) / 10)
    r = selfcheck(TrainConfig.model_validate({**SELFCHECK, "dp": {"epsilon": 2.0}}), m=20000, dataset=digits)
    assert not r.passed and "ABOVE the accountant's epsilon" in r.message
    assert max(r.lower_bound["epsilon"], r.lower_bound_other["epsilon"]) > r.claimed_epsilon
