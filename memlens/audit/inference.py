"""Per-image memorization with uncertainty: which images an encoder memorized, at a stated error rate.

For an image x with encoders trained on it ("in") and without it ("out"), SSLMem paper, Eq. 2:

    m(x) = E_out L_align(g, x) - E_in L_align(f, x)

estimated by the mean alignment over out-encoders minus the mean over in-encoders, each
alignment averaged over the same V views of x (common random numbers).

**Pairs.** In memlens's designs the encoders come in pairs sharing a seed (f and g of one seed;
references 2j and 2j+1), and each pair holds x in exactly one of its two encoders. The per-pair
difference d_j(x) = align(out_j, x) - align(in_j, x) then carries the training randomness of pair
j only, and m(x) is their mean over the P pairs (P = K/2). Without pairs (unequal numbers of f
and g) the two groups are compared as two samples.

**Uncertainty.** Two sources, both measured:

* training randomness, the spread of d_j(x) over pairs. With few pairs each image's variance has
  few degrees of freedom, so it is shrunk towards the typical variance of all images, as in
  Smyth's moderated t (Smyth 2004, "Linear models and empirical Bayes methods for assessing
  differential expression", Stat. Appl. Genet. Mol. Biol. 3(1)): the prior (d0, s0^2) is fitted
  to the images' log-variances by moments, s~^2 = (d0 s0^2 + d s^2) / (d0 + d), and t has d + d0
  degrees of freedom. With one pair (P = 1) this term cannot be measured and is left out (said
  so wherever the result is shown);
* the views, shared by every encoder so not averaged away by more encoders: the jackknife over
  the V views of m(x) (leaving one view out of every pair of views it is in), added to the
  variance.

se^2 = s~^2 / P + var_jackknife; t = m / se; the one-sided p-value tests m(x) > 0; the interval
is m +/- t_{df, (1 + c)/2} se.

**At-risk list.** Benjamini-Hochberg over the images with a contrast (``scipy.stats.
false_discovery_control``): the images whose adjusted p (q) is at most the FDR level (default
0.1) are "memorized at FDR q": on average at most a fraction q of such a list are false
discoveries (Benjamini and Hochberg, JRSS-B 1995).

**Reliability over encoders.** The pairs are split into two halves, each scores every image,
and the Spearman correlation of the two score vectors is stepped up to all pairs with the
Spearman-Brown formula; the overlap of the two halves' at-risk lists (and top-10) says how much
of the list a retrain would keep. A variance-components reading (true, pair and view variance)
projects how many pairs and views a target reliability needs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import special, stats

# ----------------------------------------------------------------------------- differences


def pair_differences(align: np.ndarray, member: np.ndarray, pairs: list[tuple[int, int]]) -> np.ndarray:
    """(P, n) per-pair differences out - in; NaN where a pair does not split the image.

    Args:
        align: (E, n) alignment of every encoder on every image.
        member: (E, n) bool, encoder e trained on image i.
        pairs: P pairs of encoder indices.
    """
    out = np.full((len(pairs), align.shape[1]), np.nan)
    for j, (a, b) in enumerate(pairs):
        split = member[a] != member[b]
        a_in = member[a]
        out[j] = np.where(split, np.where(a_in, align[b] - align[a], align[a] - align[b]), np.nan)
    return out


def contrast(member: np.ndarray) -> np.ndarray:
    """(n,) bool: images with at least one in- and one out-encoder."""
    return member.any(axis=0) & (~member).any(axis=0)


def group_means(align: np.ndarray, member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean alignment over in-encoders, over out-encoders), NaN where a group is empty."""
    with np.errstate(invalid="ignore", divide="ignore"):
        m_in = (align * member).sum(0) / member.sum(0)
        m_out = (align * ~member).sum(0) / (~member).sum(0)
    return m_in, m_out


# ----------------------------------------------------------------------------- moderated variance


def _trigamma_inverse(y: float) -> float:
    """x with trigamma(x) = y (Newton's method, as limma's trigammaInverse)."""
    if y > 1e7:
        return 1.0 / math.sqrt(y)
    if y < 1e-6:
        return 1.0 / y
    x = 0.5 + 1.0 / y
    for _ in range(50):
        tri = float(special.polygamma(1, x))
        dif = tri * (1 - tri / y) / float(special.polygamma(2, x))
        x += dif
        if -dif / x < 1e-8:
            break
    return x


def squeeze_var(s2: np.ndarray, df: float) -> tuple[float, float]:
    """Prior (d0, s0^2) of the variances ``s2`` (each with ``df`` degrees of freedom), fitted by
    moments of their logs (Smyth 2004, Section 6.2). d0 = inf: the variances agree with one value.
    """
    s2 = np.asarray(s2, float)
    s2 = s2[np.isfinite(s2) & (s2 > 0)]
    if len(s2) < 3 or df <= 0:
        return 0.0, float(np.mean(s2)) if len(s2) else float("nan")
    z = np.log(s2)
    e = z - special.digamma(df / 2) + math.log(df / 2)
    e_mean = float(e.mean())
    excess = float(e.var(ddof=1)) - float(special.polygamma(1, df / 2))
    if excess <= 0:
        return math.inf, float(math.exp(e_mean))
    d0 = 2 * _trigamma_inverse(excess)
    s0 = math.exp(e_mean + float(special.digamma(d0 / 2)) - math.log(d0 / 2))
    return d0, s0


# ----------------------------------------------------------------------------- views


def view_jackknife(dist: np.ndarray, member: np.ndarray, pairing: str = "all") -> np.ndarray:
    """Jackknife variance (n,) of m(x) over the V views every encoder shares.

    Leaving view v out of the all-pairs U-statistic keeps the pairs of the other V - 1 views; the
    jackknife variance is (V - 1) / V * sum_v (m_(v) - mean)^2. ``dist``: (E, n, V, V).
    """
    e, n, v, _ = dist.shape
    if v < 3:
        return np.full(n, np.nan)
    d = dist.astype(np.float64)
    if pairing == "disjoint":
        # views in pairs (2j, 2j+1): leave one pair out of the K = V/2 pairs
        k = v // 2
        pairs = d[:, :, np.arange(k) * 2, np.arange(k) * 2 + 1]  # (E, n, K)
        loo = (pairs.sum(-1, keepdims=True) - pairs) / (k - 1)  # (E, n, K)
        count = k
    else:
        total = d.sum(axis=(-1, -2)) / 2  # sum over pairs i < j (zero diagonal)
        row = d.sum(axis=-1)  # (E, n, V): distances of view v to the others
        loo = (total[..., None] - row) / ((v - 1) * (v - 2) / 2)
        count = v
    m_in = (loo * member[..., None]).sum(0) / np.maximum(member.sum(0), 1)[:, None]
    m_out = (loo * ~member[..., None]).sum(0) / np.maximum((~member).sum(0), 1)[:, None]
    m = m_out - m_in  # (n, count)
    return (count - 1) / count * ((m - m.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)


# ----------------------------------------------------------------------------- per image


@dataclass
class PerImage:
    """Per-image memorization estimates (arrays over the scored images; NaN without a contrast)."""

    mem: np.ndarray
    align_in: np.ndarray
    align_out: np.ndarray
    se: np.ndarray
    se_views: np.ndarray
    df: np.ndarray
    t: np.ndarray
    p: np.ndarray
    q: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    at_risk: np.ndarray
    n_in: np.ndarray
    n_out: np.ndarray
    facts: dict = field(default_factory=dict)


def per_image(align: np.ndarray, member: np.ndarray, pairs: list[tuple[int, int]], *, view_var: np.ndarray,
              fdr: float, confidence: float, moderated: bool = True, eligible: np.ndarray | None = None) -> PerImage:
    """Per-image memorization, its standard error, one-sided p-value, BH q-value and interval.

    Args:
        align: (E, n) alignment (mean distance over view pairs) of every encoder on every image.
        member: (E, n) bool membership.
        pairs: encoder pairs (see the module docstring); [] for a two-sample comparison.
        view_var: (n,) jackknife variance over views (:func:`view_jackknife`).
        fdr: the false discovery rate of the at-risk list.
        confidence: two-sided level of the intervals.
        moderated: shrink the per-image variances (Smyth's moderated t).
        eligible: (n,) bool, the images the FDR family holds (default: every image with a
            contrast); canaries are scored but kept out of the natural images' family.
    """
    n = align.shape[1]
    m_in, m_out = group_means(align, member)
    has = contrast(member)
    eligible = has if eligible is None else (eligible & has)
    n_in, n_out = member.sum(0), (~member).sum(0)
    d = pair_differences(align, member, pairs) if pairs else None
    paired = d is not None and bool(np.all(np.isfinite(d[:, has]))) and len(pairs) >= 1
    if paired:
        # Images without a contrast (shared data) have all-NaN columns: reduce only the others.
        p_count = d.shape[0]
        mem, s2 = np.full(n, np.nan), np.full(n, np.nan)
        mem[has] = d[:, has].mean(axis=0)
        if p_count >= 2:
            s2[has] = d[:, has].var(axis=0, ddof=1)
        resid_df = float(p_count - 1)
        scale = 1.0 / p_count
    else:
        mem = m_out - m_in
        s2, resid_df, scale = _two_sample_var(align, member)
    facts = {"pairs": len(pairs) if paired else 0, "encoders": int(align.shape[0]), "paired": paired,
             "residual_df": resid_df, "fdr": fdr, "confidence": confidence,
             "training_randomness_counted": bool(resid_df > 0)}
    if resid_df > 0:
        d0, s0 = squeeze_var(s2[eligible], resid_df) if moderated else (0.0, float("nan"))
        if math.isinf(d0):
            post, df = np.full(n, s0), np.full(n, np.inf)
        elif d0 > 0:
            post, df = (d0 * s0 + resid_df * s2) / (d0 + resid_df), np.full(n, resid_df + d0)
        else:
            post, df = s2, np.full(n, resid_df)
        facts.update(prior_df=float(d0), prior_var=float(s0))
        var = post * scale + np.nan_to_num(view_var)
    else:  # one pair: the views are all that can be measured
        var, df = np.asarray(view_var, float), np.full(n, np.inf)
    se = np.sqrt(var)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = mem / se
    p = np.where(np.isfinite(t), stats.t.sf(t, df), np.nan)
    q = np.full(n, np.nan)
    fam = eligible & np.isfinite(p)
    if fam.any():
        q[fam] = stats.false_discovery_control(p[fam], method="bh")
    crit = stats.t.ppf(0.5 + confidence / 2, df)
    at_risk = fam & (q <= fdr)
    facts["family"] = int(fam.sum())
    facts["at_risk"] = int(at_risk.sum())
    return PerImage(mem=mem, align_in=m_in, align_out=m_out, se=se, se_views=np.sqrt(np.asarray(view_var, float)),
                    df=df, t=t, p=p, q=q, ci_low=mem - crit * se, ci_high=mem + crit * se, at_risk=at_risk,
                    n_in=n_in, n_out=n_out, facts=facts)


def _two_sample_var(align: np.ndarray, member: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Pooled within-group variance of the two groups (in, out), its df, and the 1/n_in + 1/n_out
    factor, per image (the groups have the same sizes for every image of one subset)."""
    n_in, n_out = member.sum(0), (~member).sum(0)
    m_in, m_out = group_means(align, member)
    ss = ((align - m_in) ** 2 * member).sum(0) + ((align - m_out) ** 2 * ~member).sum(0)
    df_each = n_in + n_out - 2
    with np.errstate(invalid="ignore", divide="ignore"):
        s2 = np.where(df_each > 0, ss / np.maximum(df_each, 1), np.nan)
        scale = 1.0 / np.maximum(n_in, 1) + 1.0 / np.maximum(n_out, 1)
    dfs = df_each[contrast(member)]
    resid = float(np.min(dfs)) if len(dfs) else 0.0
    return s2, resid, scale


# ----------------------------------------------------------------------------- reliability over encoders


@dataclass
class EncoderReliability:
    """Split-half reliability over encoder pairs, and what more pairs or views would give."""

    pairs: int
    split_half_r: float
    reliability: float
    target: float
    at_risk_overlap: float | None = None
    top10_overlap: float | None = None
    pairs_for_target: float | None = None
    views_for_target: float | None = None
    components: dict = field(default_factory=dict)

    @property
    def meets_target(self) -> bool:
        return bool(np.isfinite(self.reliability) and self.reliability >= self.target)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["meets_target"] = self.meets_target
        return d


def encoder_reliability(align: np.ndarray, member: np.ndarray, pairs: list[tuple[int, int]], *,
                        view_var: np.ndarray, views: int, eligible: np.ndarray, target: float, fdr: float,
                        confidence: float) -> EncoderReliability | None:
    """Split-half reliability over pairs (None with fewer than two pairs); see the module docstring.

    The halves are the first and second half of the pairs (pairs are exchangeable: their seeds and
    halves are drawn independently). Each half holds an in- and an out-encoder for every image.
    """
    p_count = len(pairs)
    if p_count < 2 or eligible.sum() < 3:
        return None
    a, b = pairs[:p_count // 2], pairs[p_count // 2:]
    ia = per_image(align, member, a, view_var=view_var, fdr=fdr, confidence=confidence, eligible=eligible)
    ib = per_image(align, member, b, view_var=view_var, fdr=fdr, confidence=confidence, eligible=eligible)
    x, y = ia.mem[eligible], ib.mem[eligible]
    r_half = float(stats.spearmanr(x, y).statistic) if np.std(x) > 0 and np.std(y) > 0 else float("nan")
    from memlens.audit.reliability import spearman_brown

    factor = p_count / max(len(a), len(b))
    rel = spearman_brown(r_half, factor)
    sa, sb = set(np.flatnonzero(ia.at_risk)), set(np.flatnonzero(ib.at_risk))
    union = sa | sb
    top = min(10, int(eligible.sum()))
    ta = set(np.flatnonzero(eligible)[np.argsort(-x, kind="stable")[:top]])
    tb = set(np.flatnonzero(eligible)[np.argsort(-y, kind="stable")[:top]])
    out = EncoderReliability(pairs=p_count, split_half_r=r_half, reliability=rel, target=target,
                             at_risk_overlap=len(sa & sb) / len(union) if union else None,
                             top10_overlap=len(ta & tb) / top if top else None)
    _project(out, align, member, pairs, view_var=view_var, views=views, eligible=eligible)
    return out


def _project(out: EncoderReliability, align: np.ndarray, member: np.ndarray, pairs: list[tuple[int, int]], *,
             view_var: np.ndarray, views: int, eligible: np.ndarray) -> None:
    """Variance components of the per-image score over images: true (between images), pair
    (training randomness, per pair) and view (per view: the jackknife variance times V); the
    reliability of a score from P pairs and V views is true / (true + pair / P + view / V)."""
    d = pair_differences(align, member, pairs)[:, eligible]
    pair_var = float(np.nanmean(np.nanvar(d, axis=0, ddof=1)))
    vv = view_var[eligible]
    view_unit = float(np.nanmean(vv)) * views if np.isfinite(vv).any() else 0.0
    mem = np.nanmean(d, axis=0)
    total = float(np.nanvar(mem, ddof=1))
    true = max(total - pair_var / len(pairs) - view_unit / views, 0.0)
    out.components = {"true": true, "pair": pair_var, "view": view_unit}
    if true <= 0:
        out.pairs_for_target = out.views_for_target = math.inf
        return
    t = out.target
    need = true * (1 - t) / t  # the error variance the target allows
    # more pairs at the same views (the view term does not shrink with pairs: views are shared)
    rest = need - view_unit / views
    out.pairs_for_target = float(math.ceil(pair_var / rest)) if rest > 0 else math.inf
    rest = need - pair_var / len(pairs)
    out.views_for_target = float(math.ceil(view_unit / rest)) if rest > 0 else math.inf
