"""How reliable a per-point SSLMem ranking is, measured from the views the audit drew.

A point's SSLMem is estimated from V augmented views, so it carries augmentation noise; the at-risk
list is only as trustworthy as the ranking is stable. Two measures, both from the distance
matrices of the views the audit already computed (no extra forward pass):

* **Split-half reliability.** The views are split into two halves, each point scored from each
  half alone, and the Spearman correlation r_half of the two score vectors is stepped up to the
  full number of views with the Spearman-Brown formula, r = 2 r_half / (1 + r_half). The same
  formula predicts how many views a target reliability R needs:
  V_R = V * R (1 - r) / (r (1 - R)). (The all-pairs estimator averages pairs, not independent
  items, so the prophecy is an approximation; it is what the classical test-theory reading gives.)
* **Top-k stability.** Each point's views are resampled with replacement (the same indices for f
  and g, which saw the same views), the score recomputed from the distinct pairs, and the top-k
  set compared with the audit's: the mean overlap over replicates, and for each point of the
  audit's top k how often it stays there.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import stats

from memlens.audit.sslmem import in_out_means, sslmem


def spearman_brown(r: float, factor: float = 2.0) -> float:
    """Reliability of a test ``factor`` times as long as one with reliability ``r``."""
    if not np.isfinite(r):
        return float("nan")
    return float(factor * r / (1.0 + (factor - 1.0) * r)) if r > -1.0 / (factor - 1.0 + 1e-300) else float("nan")


def views_needed(r: float, views: int, target: float) -> float:
    """Views a target reliability needs by the Spearman-Brown prophecy (inf when r <= 0)."""
    if not np.isfinite(r) or r <= 0:
        return math.inf
    if r >= target:
        return float(views)
    return float(math.ceil(views * target * (1 - r) / (r * (1 - target)) - 1e-9))


def _pair_mean(dist: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
    """Mean distance over the pairs of distinct views among ``idx`` (all views when None), summed in
    float64 (float32 sums tie images whose scores differ in the last digits).

    dist: (..., n, V, V); idx: (n, m) view indices per point. Returns (..., n)."""
    if idx is None:
        v = dist.shape[-1]
        iu = np.triu_indices(v, 1)
        return dist[..., iu[0], iu[1]].astype(np.float64).mean(axis=-1)
    n, m = idx.shape
    a, b = np.triu_indices(m, 1)
    ia, ib = idx[:, a], idx[:, b]  # (n, P)
    rows = np.arange(n)[:, None]
    d = dist[..., rows, ia, ib].astype(np.float64)  # (..., n, P)
    valid = ia != ib  # a view paired with itself is not a pair
    count = valid.sum(axis=1)
    return np.where(count > 0, (d * valid).sum(axis=-1) / np.maximum(count, 1), np.nan)


def _score(dist: np.ndarray, member: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
    """Mean alignment over out-encoders minus over in-encoders. dist (E, n, V, V), member (E, n)."""
    m_in, m_out = in_out_means(_pair_mean(dist, idx), member)
    return sslmem(m_in, m_out)


def _half_indices(n: int, views: int, pairing: str) -> tuple[np.ndarray, np.ndarray]:
    if pairing == "disjoint":
        k = views // 2
        first = np.concatenate([[2 * j, 2 * j + 1] for j in range(k // 2)]) if k >= 2 else np.arange(0)
        second = np.concatenate([[2 * j, 2 * j + 1] for j in range(k // 2, k)])
    else:
        first, second = np.arange(views // 2), np.arange(views // 2, views)
    return np.tile(first, (n, 1)), np.tile(second, (n, 1))


def _disjoint_mean(dist: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Mean of the (2j, 2j+1) distances over the pair indices ``pairs`` (n, m)."""
    rows = np.arange(pairs.shape[0])[:, None]
    return dist[..., rows, 2 * pairs, 2 * pairs + 1].astype(np.float64).mean(axis=-1)


def _disjoint_score(dist: np.ndarray, member: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    m_in, m_out = in_out_means(_disjoint_mean(dist, pairs), member)
    return sslmem(m_in, m_out)


@dataclass
class Reliability:
    """Ranking reliability of one audit's candidate scores (see the module docstring)."""

    views: int
    pairing: str
    n_points: int
    split_half_r: float
    reliability: float
    target: float
    views_for_target: float
    top_k: int
    topk_overlap_mean: float | None = None
    topk_overlap_ci: tuple[float, float] | None = None
    bootstrap: int = 0
    stable_fraction: float | None = None
    history: list[dict] = field(default_factory=list)

    @property
    def meets_target(self) -> bool:
        return bool(np.isfinite(self.reliability) and self.reliability >= self.target)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["meets_target"] = self.meets_target
        return d


def ranking_reliability(dist: np.ndarray, member: np.ndarray, *, pairing: str = "all", target: float = 0.9,
                        top_k: int = 50, bootstrap: int = 200, seed: int = 0) -> tuple[Reliability, np.ndarray]:
    """Split-half reliability over views and top-k stability of SSLMem scores (out - in).

    Args:
        dist: (encoders, n, V, V) view distance matrices of every encoder on the same views of the
            same n points.
        member: (encoders, n) bool: encoder e trained on point i (each point needs an in- and an
            out-encoder; for f and g: f in, g out).
        pairing: the audit's estimator (``all`` or ``disjoint``).
        target: reliability the caller wants.
        top_k: size of the at-risk set whose stability is bootstrapped.
        bootstrap: replicates (0: skip).

    Returns:
        The summary, and per point the fraction of replicates in which it was in the top k
        (NaN when bootstrap is 0).
    """
    n, views = dist.shape[1], dist.shape[-1]
    if views < 4 or n < 3:
        rel = Reliability(views, pairing, n, float("nan"), float("nan"), target, math.inf, top_k)
        return rel, np.full(n, np.nan)
    a, b = _half_indices(n, views, pairing)
    if pairing == "disjoint":
        sa = _disjoint_score(dist, member, a[:, ::2] // 2)
        sb = _disjoint_score(dist, member, b[:, ::2] // 2)
    else:
        sa, sb = _score(dist, member, a), _score(dist, member, b)
    r_half = float(stats.spearmanr(sa, sb).statistic) if np.std(sa) > 0 and np.std(sb) > 0 else float("nan")
    r = spearman_brown(r_half)
    rel = Reliability(views, pairing, n, r_half, r, target, views_needed(r, views, target), min(top_k, n))
    freq = np.full(n, np.nan)
    if bootstrap:
        rng = np.random.default_rng(seed)
        full = _score(dist, member) if pairing == "all" else _disjoint_score(
            dist, member, np.tile(np.arange(views // 2), (n, 1)))
        k = rel.top_k
        top = np.argsort(-full, kind="stable")[:k]
        counts = np.zeros(n)
        overlaps = []
        for _ in range(bootstrap):
            if pairing == "disjoint":
                s = _disjoint_score(dist, member, rng.integers(0, views // 2, size=(n, views // 2)))
            else:
                s = _score(dist, member, rng.integers(0, views, size=(n, views)))
            s = np.nan_to_num(s, nan=-np.inf)
            bt = np.argsort(-s, kind="stable")[:k]
            counts[bt] += 1
            overlaps.append(len(np.intersect1d(bt, top)) / k)
        freq = counts / bootstrap
        rel.bootstrap = bootstrap
        rel.topk_overlap_mean = float(np.mean(overlaps))
        rel.topk_overlap_ci = (float(np.quantile(overlaps, 0.025)), float(np.quantile(overlaps, 0.975)))
        rel.stable_fraction = float(np.mean(freq[top] >= 0.9))
    return rel, freq
