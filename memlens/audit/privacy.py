"""Empirical privacy from membership scores: ROC, TPR at low FPR, and one-run epsilon lower bounds.

Pure functions of two score arrays: the scores of points that were in the training data
(canaries drawn in, or natural members) and of points that were not. Higher score = "member".

* **Membership inference** (Carlini et al. 2022's recommended reporting): the ROC curve and its
  area (scikit-learn's ``roc_curve`` / ``roc_auc_score``; the AUC equals the Mann-Whitney U
  statistic over n_in n_out) with a bootstrap confidence interval, and the TPR at FPR 1% and 0.1%
  read off the ROC curve with ties (tied scores are one threshold; between two thresholds the
  curve is the straight segment of a randomised threshold, as scikit-learn draws it) with a
  Clopper-Pearson interval.
  When there are fewer than 1 / FPR non-members the lowest reachable non-zero FPR is 1 / n_out,
  and the result says so instead of pretending.
* **One-run epsilon lower bound** (Steinke, Nasr and Jagielski, "Privacy Auditing with One (1)
  Training Run", NeurIPS 2023, arXiv 2305.08846, Theorem 3.1 with the delta term of its
  Proposition 5.3): m canaries were each included independently with probability 1/2; the auditor
  guesses "in" for the k highest scores and abstains on the rest (one-sided, k_- = 0). If the
  training were (epsilon, delta)-DP, the number of correct guesses among k would be stochastically
  dominated by Binomial(k, e^eps / (1 + e^eps)) up to a delta term; the bound is the largest
  epsilon this rejects at confidence 1 - beta.
* **Gaussian f-DP one-run bound** (Mahloujifar, Melis and Chaudhuri, "Auditing f-Differential
  Privacy in One Run", arXiv 2410.22235): the same guesses tested against the trade-off curve of
  the Gaussian mechanism that is exactly (epsilon, delta)-DP, usually tighter.

Choosing how many to guess: trying every threshold and keeping the best would overstate the
bound. The default (``grid``) fixes in advance a small grid of guess counts, k = 0.5%, 1%, 2%, 5%,
10%, 20% and 50% of the canaries, and applies a **Bonferroni correction** over the grid (beta / 7);
each k becomes the threshold "score at least the k-th highest", so scores tied with the k-th are
guessed together (a sorted order would otherwise break ties by membership, in the members'
favour, and overstate the bound); the counts then equal jax_privacy's ``CanaryScoreAuditor``
with that explicit threshold;
``bonferroni`` tries every threshold with beta divided by their number (valid, but the delta
term of the one-run bound, about 2 m delta / k, then swamps the corrected level);
``split`` chooses the threshold on a random half of the canaries and computes the bound on the
other half; ``top:<k>`` fixes k. Whichever is used is reported.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np
from scipy import optimize, special, stats

# ----------------------------------------------------------------------------- membership inference


@dataclass
class TprAtFpr:
    fpr: float
    tpr: float
    ci_low: float
    ci_high: float
    threshold: float | None
    resolvable: bool
    note: str = ""


@dataclass
class MembershipMetrics:
    """Membership-inference metrics of one score (see the module docstring)."""

    score: str
    n_in: int
    n_out: int
    auc: float
    auc_ci: tuple[float, float]
    tpr_at: list[TprAtFpr]
    roc_fpr: list[float] = field(default_factory=list)
    roc_tpr: list[float] = field(default_factory=list)
    mann_whitney_p: float = float("nan")

    def to_dict(self) -> dict:
        return asdict(self)


def _roc(in_scores: np.ndarray, out_scores: np.ndarray):
    # sklearn: loaded where this runs, so importing memlens.audit.privacy stays light
    from sklearn.metrics import roc_curve

    y = np.r_[np.ones(len(in_scores)), np.zeros(len(out_scores))]
    return roc_curve(y, np.r_[in_scores, out_scores], drop_intermediate=False)


def auc(in_scores, out_scores) -> float:
    # sklearn: loaded where this runs, so importing memlens.audit.privacy stays light
    from sklearn.metrics import roc_auc_score

    a, b = np.asarray(in_scores, float), np.asarray(out_scores, float)
    return float(roc_auc_score(np.r_[np.ones(len(a)), np.zeros(len(b))], np.r_[a, b]))


def _auc_ranks(a: np.ndarray, b: np.ndarray) -> float:
    """AUC as Mann-Whitney U / (n_a n_b), counting each b below an a and half of each tie, by binary
    search in the sorted b: the bootstrap's fast path, equal to ``auc``."""
    bs = np.sort(b)
    below = np.searchsorted(bs, a, side="left")
    ties = np.searchsorted(bs, a, side="right") - below
    return float((below.sum() + 0.5 * ties.sum()) / (len(a) * len(b)))


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def tpr_at_fpr(in_scores, out_scores, fpr: float, *, confidence: float = 0.95) -> TprAtFpr:
    """TPR at FPR ``fpr`` on the ROC curve with ties, with its Clopper-Pearson interval.

    Tied scores are one threshold: the ROC steps from one distinct score to the next along a
    straight segment (the randomised threshold that guesses a fraction of the tied scores, as
    ``sklearn.metrics.roc_curve`` draws it), and the TPR at ``fpr`` is read off that curve by
    linear interpolation. Taking only the vertices would report 0 whenever more than ``fpr`` of the
    non-members tie at the top score; breaking the ties by order would favour whichever side
    came first.
    """
    a, b = np.asarray(in_scores, float), np.asarray(out_scores, float)
    f, t, thr = _roc(a, b)
    tpr, seg = _interpolate_roc(f, t, fpr)
    tp = int(round(tpr * len(a)))
    lo, hi = clopper_pearson(tp, len(a), confidence)
    resolvable = len(b) * fpr >= 1
    note = "" if resolvable else (f"too few non-members for FPR {fpr:g}: with {len(b)} the lowest non-zero FPR is "
                                  f"{1 / len(b):.2g}; the TPR shown is interpolated towards FPR 0")
    return TprAtFpr(fpr=fpr, tpr=tpr, ci_low=lo, ci_high=hi,
                    threshold=float(thr[seg]) if np.isfinite(thr[seg]) else None, resolvable=resolvable, note=note)


def _interpolate_roc(f: np.ndarray, t: np.ndarray, fpr: float) -> tuple[float, int]:
    """TPR of the ROC curve (f, t nondecreasing, vertices at distinct thresholds) at ``fpr``, and the
    index of the threshold that reaches it (the one guessed in part when between two vertices)."""
    i = int(np.flatnonzero(f <= fpr + 1e-12)[-1])  # the best vertex within the FPR (t is nondecreasing)
    if i == len(f) - 1 or f[i] >= fpr - 1e-12:
        return float(t[i]), i
    frac = (fpr - f[i]) / (f[i + 1] - f[i])  # the share of the next tied group guessed at random
    return float(t[i] + frac * (t[i + 1] - t[i])), i + 1


def membership_metrics(in_scores, out_scores, *, score: str, fprs: tuple[float, ...] = (0.01, 0.001),
                       bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0,
                       roc_points: int = 200) -> MembershipMetrics:
    """ROC AUC with a bootstrap interval, TPR at low FPRs, and a thinned ROC curve for plots.

    Raises:
        ValueError: an empty side.
    """
    a, b = np.asarray(in_scores, float), np.asarray(out_scores, float)
    if len(a) == 0 or len(b) == 0:
        raise ValueError("membership metrics need scores of members and of non-members")
    value = auc(a, b)
    rng = np.random.default_rng(seed)
    boots = [_auc_ranks(rng.choice(a, len(a)), rng.choice(b, len(b))) for _ in range(bootstrap)]
    alpha = (1 - confidence) / 2
    ci = (float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha))) if boots else (value, value)
    f, t, _ = _roc(a, b)
    keep = np.unique(np.linspace(0, len(f) - 1, min(roc_points, len(f))).round().astype(int))
    p = stats.mannwhitneyu(a, b, alternative="greater").pvalue
    return MembershipMetrics(score=score, n_in=len(a), n_out=len(b), auc=value, auc_ci=ci,
                             tpr_at=[tpr_at_fpr(a, b, x, confidence=confidence) for x in fprs],
                             roc_fpr=[float(x) for x in f[keep]], roc_tpr=[float(x) for x in t[keep]],
                             mann_whitney_p=float(p))


# ----------------------------------------------------------------------------- one-run epsilon


def one_run_p_value(m: int, n_guess: int, n_correct: int, eps: float, delta: float) -> float:
    """P-value of observing ``n_correct`` of ``n_guess`` guesses right under (eps, delta)-DP with m
    canaries (Steinke et al. 2023, Theorem 3.1 and Proposition 5.3)."""
    q = special.expit(eps)
    beta = stats.binom.sf(n_correct - 1, n_guess, q)
    if delta == 0 or n_correct == 0:
        return float(beta)
    i = np.arange(1, n_correct + 1)
    alpha = np.max((stats.binom.sf(n_correct - i - 1, n_guess, q) - beta) / i, initial=0.0)
    return float(min(beta + alpha * delta * 2 * m, 1.0))


def _search(objective, eps_lo: float) -> float:
    """Largest eps >= eps_lo with objective(eps) > 0 (objective decreasing), eps_lo if none."""
    if objective(eps_lo) <= 0:
        return eps_lo
    hi = max(1.0, 2 * eps_lo)
    while objective(hi) > 0:
        eps_lo, hi = hi, hi * 2
        if hi > 1e4:
            return hi
    return float(optimize.brentq(objective, eps_lo, hi, xtol=1e-6))


def epsilon_one_run_counts(m: int, n_guess: int, n_correct: int, *, significance: float, delta: float,
                           eps_lo: float = 0.0) -> float:
    """Steinke et al.'s lower bound from counts: the largest epsilon rejected at ``significance``."""
    if n_guess == 0:
        return eps_lo
    if one_run_p_value(m, n_guess, n_correct, eps_lo, 0.0) > significance:
        return eps_lo  # not even rejected without delta
    return _search(lambda e: significance - one_run_p_value(m, n_guess, n_correct, e, delta), eps_lo)


@lru_cache(maxsize=4096)
def _gaussian_mu(eps: float, delta: float) -> float:
    """mu of the Gaussian mechanism (mu-GDP) that is exactly (eps, delta)-DP (Dong, Roth, Su 2019,
    Corollary 2.13): delta = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    def gap(mu: float) -> float:
        return special.ndtr(-eps / mu + mu / 2) - math.exp(eps) * special.ndtr(-eps / mu - mu / 2) - delta
    if gap(1e-6) >= 0:
        return 1e-6
    hi = 1.0
    while gap(hi) < 0:
        hi *= 2
        if hi > 1e3:
            return hi
    return float(optimize.brentq(gap, 1e-6, hi, xtol=1e-10))


def epsilon_one_run_fdp_counts(m: int, n_guess: int, n_correct: int, *, significance: float, delta: float,
                               eps_lo: float = 0.0) -> float:
    """Mahloujifar et al.'s Gaussian f-DP lower bound from counts ("audit_rh_with_cap")."""
    if n_guess == 0 or n_correct == 0:
        return eps_lo

    def objective(eps: float) -> float:
        mu = _gaussian_mu(eps, delta)

        def blow_up_inverse(x: float) -> float:  # the Gaussian trade-off bound, inverted
            return float(special.ndtr(special.ndtri(x) - mu))

        r = significance * n_correct / m
        h = significance * (n_guess - n_correct) / m
        for i in range(n_correct - 1, -1, -1):
            h_new = max(h, blow_up_inverse(r))
            if h_new == h:
                break
            r = min(r + (i / (n_guess - i)) * (h_new - h), 1.0)
            h = h_new
        return r + h - n_guess / m

    return _search(objective, eps_lo)


@dataclass
class EpsilonBound:
    """An empirical epsilon lower bound and how it was chosen."""

    method: str
    epsilon: float
    confidence: float
    delta: float
    strategy: str
    m: int
    guesses: int
    correct: int
    thresholds_tried: int

    def to_dict(self) -> dict:
        return asdict(self)


def _candidates(in_scores: np.ndarray, out_scores: np.ndarray) -> list[tuple[float, int, int]]:
    """(threshold, guesses, correct) for guessing "in" at or above every distinct score."""
    scores = np.r_[in_scores, out_scores]
    is_in = np.r_[np.ones(len(in_scores), bool), np.zeros(len(out_scores), bool)]
    order = np.argsort(-scores, kind="stable")
    s, w = scores[order], is_in[order]
    correct = np.cumsum(w)
    last = np.r_[s[1:] != s[:-1], True]  # ties guessed together
    k = np.flatnonzero(last)
    return [(float(s[i]), int(i + 1), int(correct[i])) for i in k]


def guesses_at_threshold(in_scores: np.ndarray, out_scores: np.ndarray, threshold: float) -> tuple[int, int]:
    """(guesses, correct) of guessing "in" for every score at or above ``threshold``: the explicit
    threshold of jax_privacy's ``CanaryScoreAuditor``; tied scores are guessed together."""
    return int((in_scores >= threshold).sum() + (out_scores >= threshold).sum()), int((in_scores >= threshold).sum())


def guesses_at_rank(in_scores: np.ndarray, out_scores: np.ndarray, k: int) -> tuple[int, int]:
    """(guesses, correct) for "guess the k highest" made tie-correct: the threshold is the k-th
    highest score and every score tied with it is guessed too. Taking the first k of a sorted
    order instead would break ties by position, i.e. by membership when the members come first."""
    scores = np.r_[in_scores, out_scores]
    k = int(min(max(k, 1), len(scores)))
    threshold = float(np.sort(scores)[::-1][k - 1])
    return guesses_at_threshold(in_scores, out_scores, threshold)


GRID = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)


def epsilon_lower_bound(in_scores, out_scores, *, delta: float, confidence: float = 0.95, method: str = "fdp",
                        strategy: str = "grid", seed: int = 0) -> EpsilonBound:
    """One-run epsilon lower bound from canary scores (see the module docstring).

    Args:
        in_scores, out_scores: scores of canaries drawn in and left out.
        delta: the delta of the guarantee being tested.
        confidence: 1 - beta.
        method: ``one-run`` (Steinke et al.) or ``fdp`` (Gaussian f-DP, Mahloujifar et al.).
        strategy: ``grid`` (the default: k on a fixed grid of fractions of m, Bonferroni over
            the grid), ``bonferroni`` (all thresholds, beta divided by their number), ``split``
            (threshold chosen on half the canaries, bound computed on the other half) or
            ``top:<k>`` (guess the k highest).
    """
    a, b = np.asarray(in_scores, float), np.asarray(out_scores, float)
    m = len(a) + len(b)
    beta = 1 - confidence
    counts_fn = epsilon_one_run_counts if method == "one-run" else epsilon_one_run_fdp_counts
    if strategy.startswith("top:"):
        k = int(strategy[4:])
        guesses, correct = guesses_at_rank(a, b, k)
        eps = counts_fn(m, guesses, correct, significance=beta, delta=delta)
        return EpsilonBound(method, eps, confidence, delta, strategy, m, guesses, correct, 1)
    if strategy == "split":
        rng = np.random.default_rng(seed)
        pa, pb = rng.permutation(len(a)), rng.permutation(len(b))
        a1, a2 = a[pa[: len(a) // 2]], a[pa[len(a) // 2:]]
        b1, b2 = b[pb[: len(b) // 2]], b[pb[len(b) // 2:]]
        chosen = _best(_candidates(a1, b1), len(a1) + len(b1), beta, delta, counts_fn)
        if chosen is None:
            return EpsilonBound(method, 0.0, confidence, delta, strategy, m // 2, 0, 0, 1)
        thr = chosen[0]
        guesses = int((a2 >= thr).sum() + (b2 >= thr).sum())
        correct = int((a2 >= thr).sum())
        eps = counts_fn(len(a2) + len(b2), guesses, correct, significance=beta, delta=delta)
        return EpsilonBound(method, eps, confidence, delta, strategy, len(a2) + len(b2), guesses, correct, 1)
    if strategy == "grid":
        ks = sorted({max(1, int(round(f * m))) for f in GRID})
        cands = [(float("nan"), *guesses_at_rank(a, b, k)) for k in ks]
    elif strategy == "bonferroni":
        cands = _candidates(a, b)
    else:
        raise ValueError(f"unknown threshold strategy '{strategy}'; valid: grid, bonferroni, split, top:<k>")
    best = _best(cands, m, beta / len(cands), delta, counts_fn)
    if best is None:
        return EpsilonBound(method, 0.0, confidence, delta, strategy, m, 0, 0, len(cands))
    _, guesses, correct, eps = best
    return EpsilonBound(method, eps, confidence, delta, strategy, m, guesses, correct, len(cands))


def _best(cands, m: int, significance: float, delta: float, counts_fn):
    """The threshold with the largest bound; precision-ordered search that skips hopeless ones."""
    best = None
    best_eps = 0.0
    # highest Clopper-Pearson lower bound of the precision first: later ones rarely beat it
    order = sorted(cands, key=lambda c: -(stats.beta.ppf(significance, c[2], c[1] - c[2] + 1) if c[2] else 0.0))
    for thr, guesses, correct in order:
        if correct == 0 or correct / guesses <= special.expit(best_eps):
            continue
        eps = counts_fn(m, guesses, correct, significance=significance, delta=delta, eps_lo=best_eps)
        if eps > best_eps:
            best_eps, best = eps, (thr, guesses, correct, eps)
    return best
