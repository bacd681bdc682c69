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

**Offset-free, calibrated on controls.** The scores are centred on the control images (the
images every encoder, or none, trained on) before the differences, so a constant shift of one
encoder changes no estimate; the p-value of an image is its statistic ranked among the control
images' statistics under the same labelling (:mod:`memlens.audit.nulls`): a null that holds the
training noise even with one pair. The moderated t above is that statistic from two pairs on
(its own t-distribution p-value, ``p_model``, is checked against the controls and reported, not
used for the list: with shared offsets and few pairs it is not calibrated); with one pair the
statistic is the difference itself. The intervals are the moderated t's, widened by the
uncertainty of the controls' mean.

**At-risk list.** Benjamini-Hochberg over the images with a contrast (``scipy.stats.
false_discovery_control``): the images whose adjusted p (q) is at most the FDR level (default
0.1) are "memorized at FDR q": on average at most a fraction q of such a list are false
discoveries (Benjamini and Hochberg, JRSS-B 1995). When the null's self-check fails the list is
withheld (empty, with the reason in the facts).

**Reliability over encoders.** The pairs are split into two halves, each scores every image,
and the Spearman correlation of the two score vectors is stepped up to all pairs with the
Spearman-Brown formula; the overlap of the two halves' at-risk lists (and top-10) says how much
of the list a retrain would keep. A variance-components reading (true, pair and view variance)
projects how many pairs and views a target reliability needs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
from scipy import special, stats

from memlens.audit import nulls
from memlens.audit.reliability import spearman_brown
from memlens.audit.sslmem import in_out_means

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
    m_in, m_out = in_out_means(np.moveaxis(loo, -1, 1), member)  # (count, n) each
    # an image without in- (or out-) encoders has no contrast: its empty mean counts as 0 here
    m_in, m_out = (np.where(member.any(0) if k == 0 else (~member).any(0), x, 0.0).T
                   for k, x in enumerate((m_in, m_out)))
    m = m_out - m_in  # (n, count)
    return (count - 1) / count * ((m - m.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)


# ----------------------------------------------------------------------------- per image


@dataclass
class PerImage:
    """Per-image memorization estimates (arrays over the scored images; NaN without a contrast).

    ``p`` is the p-value the at-risk list uses: the control images' null (:mod:`memlens.audit.nulls`)
    when the audit scored controls, else the moderated t's; ``p_model`` is always the moderated t's.
    ``control_mem``: each control image's in/out difference under a pool image's labelling (the
    null sample of the subset tests), NaN elsewhere.
    """

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
    p_model: np.ndarray | None = None
    control_mem: np.ndarray | None = None
    control_member: np.ndarray | None = None  # (E, n) membership with each control given its assigned labelling
    facts: dict = field(default_factory=dict)


@dataclass
class Statistic:
    """One image's memorization statistic under a membership (arrays over images)."""

    mem: np.ndarray  # mean out - in
    var: np.ndarray  # its variance (training randomness over pairs, moderated, plus the views)
    df: np.ndarray
    resid_df: float
    paired: bool
    prior: tuple[float, float] | None

    @property
    def t(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.mem / np.sqrt(self.var)

    @property
    def ranked(self) -> np.ndarray:
        """What the empirical null ranks: the moderated t with two pairs or more (an image's own
        spread over training seeds), else the difference itself (one pair measures no spread; the
        views' jackknife is not the noise that matters)."""
        return self.t if self.resid_df > 0 else self.mem


def statistic(values: np.ndarray, member: np.ndarray, pairs: list[tuple[int, int]], *, view_var: np.ndarray,
              images: np.ndarray, moderated: bool = True, prior: tuple[float, float] | None = None,
              paired: bool | None = None) -> Statistic:
    """Mean out - in difference of ``images`` and its variance (see the module docstring).

    Args:
        values: (E, n) per-encoder scores (alignment or loss).
        member: (E, n) bool membership.
        pairs: encoder pairs; [] for a two-sample comparison.
        view_var: (n,) jackknife variance over views (NaN: not measured).
        images: (n,) bool, the images to compute (each with an in- and an out-encoder).
        prior: a fitted (d0, s0^2) to reuse (the null uses the candidates' prior), else fitted on
            ``images``.
        paired: force the paired (True) or two-sample (False) form, else decided by the data.
    """
    n = values.shape[1]
    d = pair_differences(values, member, pairs) if pairs else None
    if paired is None:
        paired = d is not None and bool(np.all(np.isfinite(d[:, images])))
    if paired:
        p_count = d.shape[0]
        mem, s2 = np.full(n, np.nan), np.full(n, np.nan)
        mem[images] = d[:, images].mean(axis=0)
        if p_count >= 2:
            s2[images] = d[:, images].var(axis=0, ddof=1)
        resid_df, scale = float(p_count - 1), 1.0 / p_count
    else:
        m_in, m_out = in_out_means(values, member)
        mem = np.where(images, m_out - m_in, np.nan)
        s2, resid_df, scale = _two_sample_var(values, member)
    if resid_df <= 0:  # one pair: the views are all that can be measured
        return Statistic(mem, np.asarray(view_var, float).copy(), np.full(n, np.inf), resid_df, paired, None)
    if prior is None:
        prior = squeeze_var(s2[images], resid_df) if moderated else (0.0, float("nan"))
    post, df = moderated_variance(s2, resid_df, prior)
    return Statistic(mem, post * scale + np.nan_to_num(view_var), df, resid_df, paired, prior)


def moderated_variance(s2: np.ndarray, resid_df: float, prior: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Smyth's posterior variance s~^2 = (d0 s0^2 + d s^2) / (d0 + d) and its d + d0 degrees of freedom."""
    d0, s0 = prior
    n = len(s2)
    if math.isinf(d0):
        return np.full(n, s0), np.full(n, np.inf)
    if d0 > 0:
        return (d0 * s0 + resid_df * s2) / (d0 + resid_df), np.full(n, resid_df + d0)
    return s2, np.full(n, resid_df)


def bh_list(p: np.ndarray, family: np.ndarray, fdr: float) -> tuple[np.ndarray, np.ndarray]:
    """Benjamini-Hochberg q-values over ``family`` and the list at ``fdr`` (q <= fdr)."""
    q = np.full(len(p), np.nan)
    fam = family & np.isfinite(p)
    if fam.any():
        q[fam] = stats.false_discovery_control(p[fam], method="bh")
    return q, fam & (q <= fdr)


@dataclass
class ControlNull:
    """What the empirical null needs: the control images and, optionally, how to measure the views'
    variance of a relabelled membership (the alignment has views; the loss has none)."""

    controls: np.ndarray  # (n,) bool
    view_var_of: Callable[[np.ndarray], np.ndarray] | None = None


def per_image(values: np.ndarray, member: np.ndarray, pairs: list[tuple[int, int]], *, view_var: np.ndarray,
              fdr: float, confidence: float, moderated: bool = True, eligible: np.ndarray | None = None,
              null: ControlNull | None = None) -> PerImage:
    """Per-image memorization, its standard error, one-sided p-value, BH q-value and interval.

    Args:
        values: (E, n) score (mean view distance, or loss) of every encoder on every image; lower
            is better fitted, so out - in > 0 reads "memorized".
        member: (E, n) bool membership.
        pairs: encoder pairs (see the module docstring); [] for a two-sample comparison.
        view_var: (n,) jackknife variance over views (:func:`view_jackknife`).
        fdr: the false discovery rate of the at-risk list.
        confidence: two-sided level of the intervals.
        moderated: shrink the per-image variances (Smyth's moderated t).
        eligible: (n,) bool, the images the FDR family holds (default: every image with a
            contrast); canaries are scored but kept out of the natural images' family.
        null: the control images; with them the p-values (and the list) come from the controls'
            null (:mod:`memlens.audit.nulls`) and the estimates are offset-free only if ``values``
            were centred on them (:func:`memlens.audit.nulls.centre_on_controls`).
    """
    n = values.shape[1]
    m_in, m_out = in_out_means(values, member)
    has = contrast(member)
    eligible = has if eligible is None else (eligible & has)
    st = statistic(values, member, pairs, view_var=view_var, images=has, moderated=moderated,
                   prior=_prior_on(values, member, pairs, view_var, eligible, moderated))
    facts = {"pairs": len(pairs) if st.paired else 0, "encoders": int(values.shape[0]), "paired": st.paired,
             "residual_df": st.resid_df, "fdr": fdr, "confidence": confidence,
             "interval_counts_training": bool(st.resid_df > 0)}
    if st.prior is not None:
        facts.update(prior_df=float(st.prior[0]), prior_var=float(st.prior[1]))
    var = st.var
    p_model = np.where(np.isfinite(st.t), stats.t.sf(st.t, st.df), np.nan)
    control_mem = control_member = None
    if null is not None and null.controls.any():
        p, control_mem, control_member, extra_var, null_facts = _control_null(values, member, pairs, st, eligible,
                                                                              null, fdr)
        var = var + extra_var  # the controls' mean is estimated too
        facts["null"] = null_facts
    else:
        p = p_model
        facts["null"] = {"method": "model", "controls": 0}
    se = np.sqrt(var)
    q, at_risk = bh_list(p, eligible, fdr)
    withheld = facts["null"].get("withheld")
    if withheld:
        at_risk = np.zeros(n, dtype=bool)
    crit = stats.t.ppf(0.5 + confidence / 2, st.df)
    facts["training_randomness_counted"] = bool(st.resid_df > 0 or facts["null"]["method"] == "controls")
    facts["family"] = int((eligible & np.isfinite(p)).sum())
    facts["at_risk"] = int(at_risk.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        t = st.mem / se
    return PerImage(mem=st.mem, align_in=m_in, align_out=m_out, se=se,
                    se_views=np.sqrt(np.asarray(view_var, float)), df=st.df, t=t, p=p, q=q,
                    ci_low=st.mem - crit * se, ci_high=st.mem + crit * se, at_risk=at_risk, n_in=member.sum(0),
                    n_out=(~member).sum(0), p_model=p_model, control_mem=control_mem, control_member=control_member,
                    facts=facts)


def _prior_on(values, member, pairs, view_var, eligible, moderated) -> tuple[float, float] | None:
    """The moderated t's prior, fitted on the family's images (the null reuses it)."""
    if not eligible.any():
        return None
    return statistic(values, member, pairs, view_var=view_var, images=eligible, moderated=moderated).prior


def _control_null(values, member, pairs, st: Statistic, eligible, null: ControlNull, fdr: float):
    """Conformal p-values of the family against the controls scored under each image's labelling,
    the controls' differences (for the subset tests), the variance the centring adds, and the facts
    of the null and its self-check (see :mod:`memlens.audit.nulls`)."""
    ctrl = null.controls
    n_c = int(ctrl.sum())
    columns, which = nulls.labellings(member, eligible)
    p = np.full(values.shape[1], np.nan)
    extra = np.zeros(values.shape[1])
    control_mem = np.full(values.shape[1], np.nan)
    control_member = member.copy()
    slot = np.flatnonzero(ctrl)
    # each control image shows the subset tests its difference under one pool image's labelling
    # (round robin over the family), so their null sample has the pool's mix of labellings
    assigned = which[np.flatnonzero(eligible)][np.arange(n_c) % max(int(eligible.sum()), 1)] \
        if eligible.any() else np.zeros(n_c, int)
    checks, models = [], []
    kind_all, kind_none = ctrl & member.all(axis=0), ctrl & (~member).all(axis=0)
    for k in range(columns.shape[1]):
        relabel = nulls.relabelled(member, ctrl, columns[:, k])
        vv = null.view_var_of(relabel) if null.view_var_of is not None else np.full(values.shape[1], np.nan)
        nst = statistic(values, relabel, pairs, view_var=vv, images=ctrl, prior=st.prior, paired=st.paired)
        mine = which == k
        p[mine] = nulls.conformal_p(st.ranked[mine], nst.ranked[ctrl])
        extra[mine] = float(np.nanvar(nst.mem[ctrl], ddof=1)) / n_c if n_c > 1 else 0.0
        here = slot[assigned == k]
        control_mem[here] = nst.mem[here]
        control_member[:, here] = columns[:, k][:, None]
        if not checks:  # the self-check needs one labelling (the checks of one audit share their controls)
            checks.append(nulls.cross_kind_p(nst.ranked, kind_all, kind_none))
        t_null = nst.t[here]
        models.append(np.where(np.isfinite(t_null), stats.t.sf(t_null, nst.df[here]), np.nan))
    facts = {"method": "controls", "controls": n_c, "in_every_encoder": int(kind_all.sum()),
             "in_no_encoder": int(kind_none.sum()), "labellings": int(columns.shape[1]),
             "statistic": "moderated t" if st.resid_df > 0 else "difference out - in",
             **nulls.resolution(n_c, int(eligible.sum()), fdr)}
    facts.update(_self_check(checks, models, fdr))
    return p, control_mem, control_member, extra, facts


def _self_check(checks: list, models: list, fdr: float) -> dict:
    """The null's self-check (cross-kind p-values) and the moderated t's check on the controls."""
    out: dict = {}
    model = nulls.uniformity(np.concatenate(models)) if models else None
    out["model_check"] = model.to_dict() if model is not None else None
    cross = [c for c in checks if c is not None]
    if not cross:
        out["self_check"] = None
        out["self_check_note"] = (f"not checkable: it needs at least {nulls.MIN_KIND} control images in every "
                                  f"encoder and {nulls.MIN_KIND} in none")
        return out
    # one labelling's cross-kind p-values per check (the checks of one audit share their controls)
    p = cross[0]
    u = nulls.uniformity(p)
    _, listed = bh_list(p, np.ones(len(p), bool), fdr)
    out["self_check"] = {**u.to_dict(), "null_at_risk": int(listed.sum()),
                         "passed": bool(u.excess_p >= SELF_CHECK_ALPHA)}
    if not out["self_check"]["passed"]:
        out["withheld"] = (f"the control images in every encoder and those in none disagree (fraction of null "
                           f"p-values below 0.05: {u.below_05:.3f}, expected {u.interval_05[0]:.3f}-"
                           f"{u.interval_05[1]:.3f}; excess p = {u.excess_p:.2g}): the null depends on more than "
                           f"membership, so no image is listed")
    return out


SELF_CHECK_ALPHA = 0.01  # the self-check fails when its excess of small null p-values has p below this


def _two_sample_var(align: np.ndarray, member: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Pooled within-group variance of the two groups (in, out), its df, and the 1/n_in + 1/n_out
    factor, per image (the groups have the same sizes for every image of one subset)."""
    n_in, n_out = member.sum(0), (~member).sum(0)
    m_in, m_out = in_out_means(align, member)
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
                        confidence: float, null: ControlNull | None = None) -> EncoderReliability | None:
    """Split-half reliability over pairs (None with fewer than two pairs); see the module docstring.

    The halves are the first and second half of the pairs (pairs are exchangeable: their seeds and
    halves are drawn independently). Each half holds an in- and an out-encoder for every image.
    """
    p_count = len(pairs)
    if p_count < 2 or eligible.sum() < 3:
        return None
    a, b = pairs[:p_count // 2], pairs[p_count // 2:]
    ia = per_image(align, member, a, view_var=view_var, fdr=fdr, confidence=confidence, eligible=eligible, null=null)
    ib = per_image(align, member, b, view_var=view_var, fdr=fdr, confidence=confidence, eligible=eligible, null=null)
    x, y = ia.mem[eligible], ib.mem[eligible]
    r_half = float(stats.spearmanr(x, y).statistic) if np.std(x) > 0 and np.std(y) > 0 else float("nan")

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
