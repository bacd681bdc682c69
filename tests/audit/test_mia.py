"""Membership inference (memlens.audit.mia, memlens.audit.membership): LiRA and RMIA against their
definitions, and the primary score the design fixes."""

import math

import numpy as np
import pytest
from scipy import stats


def test_lira_matches_the_gaussian_likelihood_ratio():
    from memlens.audit.mia import lira

    rng = np.random.default_rng(4)
    r, n = 8, 5
    member = np.tile(np.array([True, False] * 4)[:, None], (1, n))
    ref = np.where(member, rng.normal(1.0, 0.5, (r, n)), rng.normal(0.0, 0.5, (r, n)))
    target = rng.normal(0.5, 0.5, n)
    got = lira(target, ref, member, variance="per_example")
    mu_in, mu_out = ref[member[:, 0]].mean(0), ref[~member[:, 0]].mean(0)
    s_in, s_out = ref[member[:, 0]].std(0, ddof=1), ref[~member[:, 0]].std(0, ddof=1)
    want = stats.norm.logpdf(target, mu_in, s_in) - stats.norm.logpdf(target, mu_out, s_out)
    assert np.allclose(got, want)
    # global widths: one per side, pooled over images
    got = lira(target, ref, member, variance="global")
    pool_in = math.sqrt(((ref - mu_in) ** 2 * member).sum() / ((4 - 1) * n))
    pool_out = math.sqrt(((ref - mu_out) ** 2 * ~member).sum() / ((4 - 1) * n))
    assert np.allclose(got, stats.norm.logpdf(target, mu_in, pool_in) - stats.norm.logpdf(target, mu_out, pool_out))
    # offline (no in-references): the one-sided z against the out-references
    off = lira(target, ref[~member[:, 0]], np.zeros((4, n), dtype=bool), variance="per_example")
    assert np.allclose(off, (target - mu_out) / s_out)


def test_rmia_matches_its_definition():
    from memlens.audit.mia import rmia

    rng = np.random.default_rng(5)
    r, n = 6, 30
    member = rng.random((r, n)) < 0.5
    member[0], member[1] = True, False  # every image has in- and out-references: online
    ref = rng.normal(-1.0, 0.3, (r, n))
    target = rng.normal(-1.0, 0.3, n)
    population = np.arange(20, 30)
    got = rmia(target, ref, member, population, gamma=1.5)
    px = np.exp(ref).mean(0)  # Pr(x) = mean over references of Pr(x | theta), Pr = exp(statistic)
    lr = np.exp(target) / px
    want = np.array([np.mean([lr[x] / lr[z] >= 1.5 for z in population]) for x in range(n)])
    assert np.allclose(got, want)


def test_auto_primary_score_follows_the_number_of_references():
    """``privacy.primary: auto`` is fixed by the design before any score is seen: RMIA below 16
    references per target, LiRA from 16, the mean-reference difference with one reference."""
    from types import SimpleNamespace

    from memlens.audit.membership import LIRA_MIN_REFERENCES, primary_score
    from memlens.errors import MemlensError

    refs, auto = SimpleNamespace(kind="references"), SimpleNamespace(primary="auto")

    def attacks(n, names=()):
        return [SimpleNamespace(refs=list(range(n)), scores=dict.fromkeys(names, 0))] * 3

    assert primary_score(refs, auto, True, attacks(1)) == "loss_ref"
    assert primary_score(refs, auto, True, attacks(6)) == "rmia_loss"
    assert primary_score(refs, auto, False, attacks(LIRA_MIN_REFERENCES - 1)) == "rmia_align"
    assert primary_score(refs, auto, True, attacks(LIRA_MIN_REFERENCES)) == "lira_loss"
    assert primary_score(SimpleNamespace(kind="fg"), auto, False, attacks(1)) == "sslmem"
    named = SimpleNamespace(primary="lira_loss")
    assert primary_score(refs, named, True, attacks(2, ["lira_loss"])) == "lira_loss"
    with pytest.raises(MemlensError, match="not a score of this audit"):
        primary_score(refs, named, True, attacks(2, ["rmia_loss"]))
