"""Calibration on controls: offset-free scores and a null built from the audit's own control images.

**Control images** are the natural images with the same membership in every scored encoder: in
all of them (S_S, and the shared part of a references design) or in none (S_E, unused images).
They carry everything that moves an image's in/out difference except its membership: each
encoder's own offset (one encoder aligns every image a little better than its partner), the
training noise of the pairs, the views. Whatever a finding shows on them is not memorization.

* **Offset-free estimates** (:func:`centre_on_controls`). The SSLMem paper defines
  m(x) = E_out L_align(g, x) - E_in L_align(f, x) (Eq. 2) and reads "m(S_C) above 0" as
  memorization (Table 16). An encoder that aligns every image better shifts m of every image it
  holds by the same amount; with the encoders in pairs whose halves are the subsets (f/g, or pair 0
  of a references design), that shift is indistinguishable from memorization of the whole subset.
  memlens subtracts from every encoder its mean score over the control images before the in/out
  difference: a constant added to one encoder's scores then changes nothing. The paper's own
  two-sample comparisons (S_C vs S_S, S_C vs S_E) are offset-free already and are kept as they
  are; its one-sample reading ("above 0") becomes "above the controls".
* **The null of an image's statistic** (:func:`relabelled`). An image x was in some encoders and
  out of the others (its membership column). Each control image c is scored *as if* it had x's
  membership (the same encoders in, the same out): the same statistic, the same encoders, the same
  views, but no membership contrast. The controls' statistics under x's labelling are draws from
  the null of x's statistic (Efron, "Large-Scale Simultaneous Hypothesis Testing: The Choice of a
  Null Hypothesis", JASA 2004: the null is read from the data, not assumed), and they include
  the training noise of the pairs even with a single pair (K = 2, the f/g design).
* **Conformal p-values** (:func:`conformal_p`): p(x) = (1 + #{c: T_c >= T(x)}) / (1 + n_c). When
  the candidates and the controls were assigned to their subsets at random (memlens's splits
  are), a candidate that is not memorized is exchangeable with the controls and p(x) is a valid
  p-value; ties count against x (>=), so ties never favour "memorized". Benjamini-Hochberg on such
  p-values, which share one set of controls, still controls the FDR: they are positively
  dependent (PRDS; Bates, Candès, Lei, Romano and Sesia, "Testing for outliers with conformal
  p-values", Annals of Statistics 2023). The price is resolution: no p-value is below
  1 / (n_c + 1), so the list needs enough controls (the audit says how many it had).
* **Self-check** (:func:`uniformity`, :func:`cross_kind_p`): the controls in every encoder and
  those in none are two independent samples of the null; each kind's p-values against the
  other kind's null must look uniform (fraction below 0.05, Kolmogorov-Smirnov). When they do not,
  the null depends on more than membership and the at-risk list is withheld.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

MIN_KIND = 20  # controls of each kind the self-check needs


def control_images(member: np.ndarray, natural: np.ndarray) -> np.ndarray:
    """(n,) bool: natural images with the same membership in every encoder.

    Args:
        member: (E, n) bool, encoder e trained on image i.
        natural: (n,) bool, natural images (not canaries).
    """
    if member.shape[0] == 0:
        return np.zeros(member.shape[1], dtype=bool)
    same = member.all(axis=0) | (~member).all(axis=0)
    return same & natural


def centre_on_controls(values: np.ndarray, controls: np.ndarray) -> np.ndarray:
    """(E, n) scores minus each encoder's mean over the control images (unchanged without controls).

    The in/out differences of centred scores do not move when a constant is added to one encoder.
    """
    if not controls.any():
        return values.astype(np.float64)
    v = values.astype(np.float64)
    return v - np.nanmean(v[:, controls], axis=1, keepdims=True)


def labellings(member: np.ndarray, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct membership columns of ``images`` and, per image, which one it has.

    Returns:
        columns: (E, L) bool, the distinct labellings; which: (n,) int, the labelling of each of
        ``images`` (-1 elsewhere).
    """
    idx = np.flatnonzero(images)
    which = np.full(member.shape[1], -1)
    if not len(idx):
        return np.zeros((member.shape[0], 0), dtype=bool), which
    cols, inverse = np.unique(member[:, idx].T, axis=0, return_inverse=True)
    which[idx] = np.asarray(inverse).reshape(-1)
    return cols.T.astype(bool), which


def relabelled(member: np.ndarray, controls: np.ndarray, column: np.ndarray) -> np.ndarray:
    """(E, n) membership with every control image given the membership ``column`` (E,)."""
    out = member.copy()
    out[:, controls] = column[:, None]
    return out


def conformal_p(stat: np.ndarray, null: np.ndarray) -> np.ndarray:
    """(1 + #{null >= stat}) / (1 + len(null)) for each statistic (NaN stays NaN).

    Larger statistics are more "memorized"; a null value equal to the statistic counts against it.
    """
    null = np.sort(np.asarray(null, float)[np.isfinite(null)])
    stat = np.asarray(stat, float)
    out = np.full(stat.shape, np.nan)
    ok = np.isfinite(stat)
    if not len(null):
        return out
    at_least = len(null) - np.searchsorted(null, stat[ok], side="left")
    out[ok] = (1 + at_least) / (1 + len(null))
    return out


@dataclass
class Uniformity:
    """How a set of null p-values compares with the uniform distribution."""

    n: int
    below_05: float
    below_01: float
    ks_p: float  # two-sided Kolmogorov-Smirnov against U(0, 1)
    excess_p: float  # one-sided: too many p-values below 0.05 (binomial), or the CDF above uniform (KS)
    interval_05: tuple[float, float]  # the binomial 95% range of the fraction below 0.05 under the null

    def to_dict(self) -> dict:
        return asdict(self)


def uniformity(p: np.ndarray) -> Uniformity | None:
    """Fraction of p-values below 0.05 and 0.01, KS p against uniform, and whether there are too
    many small ones (the smaller of a one-sided binomial and a one-sided KS p-value, x2)."""
    p = np.asarray(p, float)
    p = p[np.isfinite(p)]
    n = len(p)
    if n < 5:
        return None
    below = int((p < 0.05).sum())
    binom = stats.binomtest(below, n, 0.05, alternative="greater").pvalue
    ks_greater = stats.kstest(p, "uniform", alternative="greater").pvalue
    lo, hi = stats.binom.ppf([0.025, 0.975], n, 0.05) / n
    return Uniformity(n=n, below_05=below / n, below_01=float((p < 0.01).mean()),
                      ks_p=float(stats.kstest(p, "uniform").pvalue),
                      excess_p=float(min(1.0, 2 * min(binom, ks_greater))), interval_05=(float(lo), float(hi)))


def cross_kind_p(stat_ctrl: np.ndarray, kind_all: np.ndarray, kind_none: np.ndarray) -> np.ndarray | None:
    """Each control's conformal p against the null of the other kind (controls in every encoder vs
    in none); None when either kind has fewer than :data:`MIN_KIND` images.

    Args:
        stat_ctrl: (n,) the controls' statistics under one labelling (NaN elsewhere).
        kind_all, kind_none: (n,) bool, the two kinds of controls.
    """
    if kind_all.sum() < MIN_KIND or kind_none.sum() < MIN_KIND:
        return None
    p_all = conformal_p(stat_ctrl[kind_all], stat_ctrl[kind_none])
    p_none = conformal_p(stat_ctrl[kind_none], stat_ctrl[kind_all])
    return np.r_[p_all, p_none]


def resolution(n_controls: int, family: int, fdr: float) -> dict:
    """What the control count allows: the smallest p-value, and whether BH can list anything."""
    smallest = 1.0 / (n_controls + 1) if n_controls else math.nan
    return {"controls": int(n_controls), "smallest_p": smallest,
            "can_list": bool(n_controls and family and smallest <= fdr),
            "listable_from": int(math.ceil(smallest * family / fdr)) if n_controls and family else None}
