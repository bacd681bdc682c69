"""The statistical tests that say whether a memorization signal is real.

* SSLMem paper, Table 2 and Table 16: subset comparisons (one-sided Welch t-tests with Cohen's d;
  Mann-Whitney U / Wilcoxon signed-rank as the non-parametric check), Holm-corrected across the
  family, per method.
* Localizing paper, Table 3: consistency of rankings (top-k overlap and Kendall's tau) between
  layers, and between f encoders of different seeds.
* Localizing paper, Table 11: UnitMem on the most vs the least memorized points, per layer.
* Bootstrap confidence intervals of subset means.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from scipy import stats

Alternative = Literal["greater", "less", "two-sided"]


@dataclass
class TestResult:
    name: str
    hypothesis: str
    statistic: float
    p_value: float
    effect_size: float
    method: str
    n_a: int
    n_b: int | None = None
    p_holm: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _nan(x: float) -> float:
    return float(x) if x is not None and np.isfinite(x) else float("nan")


def cohens_d(a: np.ndarray, b: np.ndarray) -> float:
    """(mean_a - mean_b) / pooled standard deviation."""
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return float("nan")
    pooled = math.sqrt(((na - 1) * np.var(a, ddof=1) + (nb - 1) * np.var(b, ddof=1)) / (na + nb - 2))
    return float((np.mean(a) - np.mean(b)) / pooled) if pooled > 0 else float("nan")


def cohens_d_one(a: np.ndarray, mu0: float = 0.0) -> float:
    sd = np.std(a, ddof=1) if len(a) > 1 else 0.0
    return float((np.mean(a) - mu0) / sd) if sd > 0 else float("nan")


def welch(a, b, *, alternative: Alternative, name: str, hypothesis: str) -> TestResult:
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        return TestResult(name, hypothesis, float("nan"), float("nan"), float("nan"), "welch_t", len(a), len(b))
    r = stats.ttest_ind(a, b, equal_var=False, alternative=alternative)
    return TestResult(name, hypothesis, _nan(r.statistic), _nan(r.pvalue), cohens_d(a, b), "welch_t", len(a), len(b))


def mann_whitney(a, b, *, alternative: Alternative, name: str, hypothesis: str) -> TestResult:
    """Mann-Whitney U; effect size = rank-biserial correlation 2U / (n_a n_b) - 1."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 1 or len(b) < 1:
        return TestResult(name, hypothesis, float("nan"), float("nan"), float("nan"), "mann_whitney_u", len(a), len(b))
    r = stats.mannwhitneyu(a, b, alternative=alternative)
    rbc = 2 * r.statistic / (len(a) * len(b)) - 1
    return TestResult(name, hypothesis, _nan(r.statistic), _nan(r.pvalue), float(rbc), "mann_whitney_u", len(a), len(b))


def one_sample_t(a, *, alternative: Alternative, name: str, hypothesis: str, mu0: float = 0.0) -> TestResult:
    a = np.asarray(a, float)
    if len(a) < 2:
        return TestResult(name, hypothesis, float("nan"), float("nan"), float("nan"), "one_sample_t", len(a))
    r = stats.ttest_1samp(a, mu0, alternative=alternative)
    return TestResult(name, hypothesis, _nan(r.statistic), _nan(r.pvalue), cohens_d_one(a, mu0), "one_sample_t", len(a))


def signed_rank(a, *, alternative: Alternative, name: str, hypothesis: str) -> TestResult:
    """Wilcoxon signed-rank against 0; effect size = matched-pairs rank-biserial correlation."""
    a = np.asarray(a, float)
    a = a[a != 0]
    if len(a) < 1:
        return TestResult(name, hypothesis, float("nan"), float("nan"), float("nan"), "wilcoxon_signed_rank", len(a))
    r = stats.wilcoxon(a, alternative=alternative)
    ranks = stats.rankdata(np.abs(a))
    total = ranks.sum()
    rbc = (ranks[a > 0].sum() - ranks[a < 0].sum()) / total if total else float("nan")
    return TestResult(name, hypothesis, _nan(r.statistic), _nan(r.pvalue), float(rbc), "wilcoxon_signed_rank", len(a))


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone); NaNs stay NaN and do not count."""
    idx = [i for i, p in enumerate(pvalues) if np.isfinite(p)]
    m = len(idx)
    out = [float("nan")] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


# The hypotheses of the SSLMem paper's Tables 2 and 16, as (name, H1 in words, a, b, alternative).
# Table 2's comparisons of two subsets are offset-free as they stand (a constant shift of f or g
# moves both subsets alike). Table 16 tests S_C "above 0" and S_I "below 0" one-sample: a shift of
# one encoder moves 0 relative to every image, so memlens tests them against the control images
# (S_S and S_E, the same membership in f and g) instead, and leaves out Table 16's "S_S = 0": S_S
# is a control (its SSLMem measures the encoders' offset, not memorization).
SSLMEM_HYPOTHESES = [
    ("C>S", "mean SSLMem of S_C exceeds that of S_S", "S_C", "S_S", "greater"),
    ("C>E", "mean SSLMem of S_C exceeds that of S_E", "S_C", "S_E", "greater"),
    ("S>I", "mean SSLMem of S_S exceeds that of S_I", "S_S", "S_I", "greater"),
    ("E>I", "mean SSLMem of S_E exceeds that of S_I", "S_E", "S_I", "greater"),
    ("C>ctrl", "mean SSLMem of S_C exceeds the control images' (S_S and S_E): Table 16's 'above 0', offset-free",
     "S_C", "controls", "greater"),
    ("I<ctrl", "mean SSLMem of S_I is below the control images' (S_S and S_E): Table 16's 'below 0', offset-free",
     "S_I", "controls", "less"),
]


def sslmem_tests(scores: dict[str, np.ndarray]) -> list[TestResult]:
    """Both methods (Welch t, Mann-Whitney U) for every hypothesis whose subsets were scored; Holm
    across each method's family. ``scores`` maps subset names (and ``controls``) to SSLMem values."""
    out: list[TestResult] = []
    for method in ("parametric", "nonparametric"):
        family = []
        fn = welch if method == "parametric" else mann_whitney
        for name, hyp, a, b, alt in SSLMEM_HYPOTHESES:
            if a in scores and b in scores:
                family.append(fn(scores[a], scores[b], alternative=alt, name=name, hypothesis=hyp))
        for t, p in zip(family, holm([t.p_value for t in family]), strict=True):
            t.p_holm = p
        out += family
    return out


def bootstrap_ci(x, *, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap (BCa) confidence interval of the mean; (nan, nan) below 3 points."""
    x = np.asarray(x, float)
    if len(x) < 3 or np.all(x == x[0]):
        m = float(np.mean(x)) if len(x) else float("nan")
        return (m, m) if len(x) and np.all(x == x[0]) else (float("nan"), float("nan"))
    r = stats.bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="BCa",
                        random_state=np.random.default_rng(seed), vectorized=True)
    return float(r.confidence_interval.low), float(r.confidence_interval.high)


@dataclass
class Consistency:
    a: str
    b: str
    k: int
    overlap: float
    tau: float
    p_value: float

    def to_dict(self) -> dict:
        return asdict(self)


def ranking_consistency(a: np.ndarray, b: np.ndarray, *, k: int, name_a: str, name_b: str) -> Consistency:
    """Top-k overlap (fraction of shared points among each ranking's k most memorized) and Kendall's
    tau between the two score vectors on the union of the two top-k sets (localizing paper, Table 3)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    k = min(k, len(a))
    top_a = set(np.argsort(-a, kind="stable")[:k].tolist())
    top_b = set(np.argsort(-b, kind="stable")[:k].tolist())
    union = sorted(top_a | top_b)
    if len(union) >= 3:
        r = stats.kendalltau(a[union], b[union])
        tau, p = _nan(r.statistic), _nan(r.pvalue)
    else:
        tau, p = float("nan"), float("nan")
    return Consistency(name_a, name_b, k, len(top_a & top_b) / k if k else float("nan"), tau, p)
