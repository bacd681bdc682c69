"""Per-image inference (memlens.audit.inference): the moderated variance, the views' jackknife and the
BH list, on simulated designs with known truth and against brute-force references."""

import numpy as np
import pytest
from scipy import stats


def _simulate(rng, n=400, pairs=4, memorized=40, effect=1.5, pair_sd=0.8, view_sd=0.1):
    """Paired alignments: out - in = effect for the memorized images, 0 otherwise, plus noise per pair."""
    e = 2 * pairs
    truth = np.zeros(n)
    truth[:memorized] = effect
    base = rng.normal(1.0, 0.2, n)
    align = np.zeros((e, n))
    member = np.zeros((e, n), dtype=bool)
    for j in range(pairs):
        coin = rng.random(n) < 0.5  # which encoder of the pair holds the image
        noise = rng.normal(0, pair_sd, n)
        a_in, a_out = base, base + truth + noise
        align[2 * j] = np.where(coin, a_in, a_out)
        align[2 * j + 1] = np.where(coin, a_out, a_in)
        member[2 * j], member[2 * j + 1] = coin, ~coin
    return align, member, [(2 * j, 2 * j + 1) for j in range(pairs)], truth, np.full(n, view_sd ** 2)


def test_bh_list_keeps_the_false_discovery_proportion_below_q():
    from memlens.audit.inference import per_image

    rng = np.random.default_rng(0)
    fdps, powers = [], []
    for _ in range(40):
        align, member, pairs, truth, view_var = _simulate(rng)
        r = per_image(align, member, pairs, view_var=view_var, fdr=0.1, confidence=0.95)
        found = r.at_risk
        fdps.append((found & (truth == 0)).sum() / max(found.sum(), 1))
        powers.append((found & (truth > 0)).sum() / (truth > 0).sum())
        # the interval covers the truth about as often as it says (95%)
    assert np.mean(fdps) <= 0.1 + 0.02, np.mean(fdps)  # BH: E[FDP] <= q (m0/m q = 0.09 here)
    assert np.mean(powers) > 0.5
    align, member, pairs, truth, view_var = _simulate(np.random.default_rng(1), n=4000, memorized=0)
    r = per_image(align, member, pairs, view_var=view_var, fdr=0.1, confidence=0.95)
    covered = (r.ci_low <= truth) & (truth <= r.ci_high)
    assert covered.mean() == pytest.approx(0.95, abs=0.015)
    # null p-values are uniform: the moderated t is calibrated with 3 residual df per image
    assert stats.kstest(r.p, "uniform").pvalue > 0.01


def test_moderated_prior_recovers_known_d0_and_s0():
    from memlens.audit.inference import squeeze_var

    rng = np.random.default_rng(2)
    d, d0, s0 = 3, 6.0, 2.0
    sigma2 = d0 * s0 / rng.chisquare(d0, 20000)  # scaled inverse chi-square prior
    s2 = sigma2 * rng.chisquare(d, 20000) / d
    est_d0, est_s0 = squeeze_var(s2, d)
    assert est_d0 == pytest.approx(d0, rel=0.15) and est_s0 == pytest.approx(s0, rel=0.05)
    est_d0, _ = squeeze_var(rng.chisquare(d, 20000) / d, d)  # one common variance: infinite prior df
    assert est_d0 > 100


def test_view_jackknife_is_the_brute_force_leave_one_view_out():
    from memlens.audit.inference import view_jackknife

    rng = np.random.default_rng(3)
    e, n, v = 4, 5, 6
    x = rng.random((e, n, v, v))
    dist = np.triu(x, 1) + np.triu(x, 1).transpose(0, 1, 3, 2)
    member = rng.random((e, n)) < 0.5
    member[0], member[1] = True, False

    def m(keep):
        sub = dist[:, :, keep][:, :, :, keep]
        iu = np.triu_indices(len(keep), 1)
        a = sub[..., iu[0], iu[1]].mean(-1)
        return (a * ~member).sum(0) / (~member).sum(0) - (a * member).sum(0) / member.sum(0)

    loo = np.stack([m([k for k in range(v) if k != drop]) for drop in range(v)], axis=1)
    brute = (v - 1) / v * ((loo - loo.mean(1, keepdims=True)) ** 2).sum(1)
    assert np.allclose(view_jackknife(dist, member), brute)
