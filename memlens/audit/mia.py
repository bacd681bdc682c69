"""Membership scores calibrated by reference encoders: LiRA and RMIA.

Pure functions of a target encoder's per-image statistic and the same statistic under reference
encoders whose membership is known. Convention: higher statistic = more member-like (memlens
passes minus an alignment distance, or minus a per-example loss).

* **LiRA** (Carlini et al., "Membership Inference Attacks From First Principles", IEEE S&P 2022,
  Section IV). Per image x, the references' statistics are fitted by Gaussians: N(mu_in(x),
  sigma_in^2) over the references trained on x, N(mu_out(x), sigma_out^2) over the others.
  *Online*: the score is the log-likelihood ratio log N(s; mu_in, sigma_in) - log N(s; mu_out,
  sigma_out). *Offline* (no in-references for x): the one-sided z = (s - mu_out) / sigma_out. With
  few references the per-image widths are too noisy, so the paper uses one global width per side
  (pooled over images); memlens does the same below 16 references per side (``auto``).
* **RMIA** (Zarifzadeh, Liu, Bhatt, Sekhari and Shokri, "Low-Cost High-Power Membership Inference
  Attacks", ICML 2024, Eq. 3-5). With Pr(x | theta) read as exp(statistic) (the likelihood of an
  image under a model whose loss is the statistic's negative), the ratio of x is
  Pr(x | theta_T) / Pr(x), Pr(x) the mean over the references; the score is the fraction of
  population images z (known non-members of the target) whose ratio x's exceeds by the factor
  gamma: Pr_z[ LR(x) / LR(z) >= gamma ]. Online (all references in the mean) when x has in- and
  out-references; offline (out-references only, with the paper's linear correction a: Pr(x) =
  ((1 + a) Pr_out(x) + (1 - a)) / 2) otherwise; x and z are always scored the same way, and a is
  fitted on the references (each attacked by the others), as the paper sets it.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special

from memlens.audit.sslmem import in_out_means

GLOBAL_BELOW = 16


def _widths(ref: np.ndarray, member: np.ndarray, mu_in: np.ndarray, mu_out: np.ndarray, *,
            variance: str) -> tuple[np.ndarray, np.ndarray]:
    """(sigma_in, sigma_out) per image: global (one per side) or per example."""
    n_in, n_out = member.sum(0), (~member).sum(0)
    dev_in = ((ref - mu_in) ** 2 * member)
    dev_out = ((ref - mu_out) ** 2 * ~member)
    use_global = variance == "global" or (variance == "auto" and (np.median(n_in) < GLOBAL_BELOW
                                                                  or np.median(n_out) < GLOBAL_BELOW))
    if use_global:
        df_in = float((np.maximum(n_in - 1, 0) * (n_in > 1)).sum())
        df_out = float((np.maximum(n_out - 1, 0) * (n_out > 1)).sum())
        s_in = math.sqrt(dev_in.sum() / df_in) if df_in > 0 else float("nan")
        s_out = math.sqrt(dev_out.sum() / df_out) if df_out > 0 else float("nan")
        if not np.isfinite(s_in):
            s_in = s_out
        return np.full(ref.shape[1], s_in), np.full(ref.shape[1], s_out)
    with np.errstate(invalid="ignore", divide="ignore"):
        s_in = np.sqrt(dev_in.sum(0) / np.maximum(n_in - 1, 1))
        s_out = np.sqrt(dev_out.sum(0) / np.maximum(n_out - 1, 1))
    floor = 1e-6 + 1e-3 * float(np.nanmedian(np.r_[s_in, s_out]))  # a degenerate width would divide by ~0
    return np.maximum(s_in, floor), np.maximum(s_out, floor)


def control_widths(target: np.ndarray, ref: np.ndarray, member: np.ndarray, target_member: np.ndarray,
                   controls: np.ndarray, *, min_count: int = 10) -> tuple[float, float, float] | None:
    """LiRA's (sigma_in, sigma_out) from the target itself, and its offset, on control images.

    The Gaussians of LiRA model the statistic of a *new* model given membership; with references
    that share seeds in pairs, their spread around their own means leaves out the variance between
    the target's seed and theirs, and the widths come out too narrow (overconfident scores). Control
    images (in the target and every reference, or in none) show that variance directly: the target's
    deviation from the references' mean there. The target's mean deviation over all controls is its
    offset (it aligns or fits every image a little better or worse), subtracted before scoring.

    Returns:
        (sigma_in, sigma_out, offset), or None with fewer than ``min_count`` controls of a kind.
    """
    all_in = controls & target_member & member.all(0)
    all_out = controls & ~target_member & (~member).all(0)
    if all_in.sum() < min_count or all_out.sum() < min_count:
        return None
    dev = target - ref.mean(0)
    offset = float(dev[all_in | all_out].mean())
    d_in, d_out = dev[all_in] - offset, dev[all_out] - offset
    return float(np.sqrt(np.mean(d_in ** 2))), float(np.sqrt(np.mean(d_out ** 2))), offset


def lira(target: np.ndarray, ref: np.ndarray, member: np.ndarray, *, variance: str = "auto",
         online: bool = True, widths: tuple[float, float, float] | None = None) -> np.ndarray:
    """LiRA scores (n,): online where x has in- and out-references (and ``online``), offline otherwise.

    Args:
        target: (n,) the target's statistic per image.
        ref: (R, n) the references' statistics.
        member: (R, n) bool, reference r trained on image x.
        variance: ``global``, ``per_example`` or ``auto`` (see the module docstring).
        online: False: the offline score for every image (comparable across images some of which
            have no in-references).
        widths: (sigma_in, sigma_out, offset) of :func:`control_widths`: the target's own widths,
            its offset removed first (``variance`` is then ignored).
    """
    member = member.astype(bool)
    mu_in, mu_out = in_out_means(ref, member)
    if widths is not None:
        floor = 1e-12
        s_in, s_out = (np.full(ref.shape[1], max(w, floor)) for w in widths[:2])
        target = target - widths[2]
    else:
        s_in, s_out = _widths(ref, member, np.nan_to_num(mu_in), np.nan_to_num(mu_out), variance=variance)
    online = member.any(0) & (~member).any(0) & online

    def logpdf(x, mu, s):
        return -0.5 * ((x - mu) / s) ** 2 - np.log(s)

    with np.errstate(invalid="ignore"):
        on = logpdf(target, mu_in, s_in) - logpdf(target, mu_out, s_out)
        off = (target - mu_out) / s_out
    return np.where(online, on, off)


def rmia(target: np.ndarray, ref: np.ndarray, member: np.ndarray, population: np.ndarray, *, gamma: float = 1.0,
         a: float = 0.3, online: bool = True) -> np.ndarray:
    """RMIA scores (n,) in [0, 1] (see the module docstring).

    x and its population z are scored the same way: an x scored online (its Pr(x) the mean over all
    references, some trained on it) is compared with the population images that also have in- and
    out-references, scored online; an x scored offline with the population scored offline. Mixing
    the two would compare a corrected ratio with uncorrected ones.

    Args:
        target: (n,) the target's statistic on the evaluated images.
        ref: (R, n) the references' statistic on them.
        member: (R, n) bool membership of the references.
        population: (m,) indices into the n images of known non-members of the target (the z).
        gamma: likelihood-ratio threshold.
        a: offline correction (used for images without in-references).
        online: False: the offline Pr(x) for every image.
    """
    member = member.astype(bool)
    both = member.any(0) & (~member).any(0)
    log_lr_on, log_lr_off = _log_ratios(target, ref, member, a)
    pop = np.asarray(population, dtype=np.int64)
    out = np.full(len(target), np.nan)
    z_off = np.sort(log_lr_off[pop])
    if not len(z_off):
        return out
    on = both & online
    z_on = np.sort(log_lr_on[pop[both[pop]]]) if online else np.zeros(0)
    if not len(z_on):  # no population image scored online: every x offline, like its z
        on = np.zeros(len(target), dtype=bool)
    # fraction of z with log LR(z) <= log LR(x) - log gamma
    if on.any():
        out[on] = np.searchsorted(z_on, log_lr_on[on] - math.log(gamma), side="right") / len(z_on)
    out[~on] = np.searchsorted(z_off, log_lr_off[~on] - math.log(gamma), side="right") / len(z_off)
    return out


def _log_ratios(target: np.ndarray, ref: np.ndarray, member: np.ndarray, a: float) -> tuple[np.ndarray, np.ndarray]:
    """log Pr(x | target) / Pr(x): online (Pr(x) over all references) and offline (out-references, a)."""
    log_all = special.logsumexp(ref, axis=0) - math.log(ref.shape[0])
    with np.errstate(divide="ignore"):
        n_out = (~member).sum(0)
        log_out = special.logsumexp(np.where(member, -np.inf, ref), axis=0) - np.log(np.maximum(n_out, 1))
    log_offline = np.log(np.maximum((1 + a) * np.exp(log_out) + (1 - a), 1e-300)) - math.log(2)
    return target - log_all, target - log_offline


A_GRID = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))


def tune_rmia_a(stat: np.ndarray, member: np.ndarray, images: np.ndarray, *, seed: int = 0,
                grid: tuple[float, ...] = A_GRID) -> float | None:
    """RMIA's offline a fitted on the references (Zarifzadeh et al., ICML 2024, Section 4 / Appendix:
    a is set by attacking reference models with the others): each reference in turn the target of all
    the others scored offline, its own members against its non-members among ``images`` (half of its
    non-members, drawn with ``seed``, are the population, the other half evaluated); the a with the
    best mean AUC. None when no reference has members and non-members to evaluate.

    Args:
        stat: (R, n) statistic, higher = more member-like.
        member: (R, n) bool membership.
        images: (n,) bool, the images to use (natural images, not the canaries being audited).
    """
    # sklearn: loaded where this runs, so importing memlens.audit.mia stays light
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    r_count = stat.shape[0]
    if r_count < 2:
        return None
    setups = []
    for r in range(r_count):
        others = [i for i in range(r_count) if i != r]
        ins = np.flatnonzero(images & member[r])
        outs = rng.permutation(np.flatnonzero(images & ~member[r]))
        pop, evald = outs[: len(outs) // 2], outs[len(outs) // 2:]
        if len(ins) and len(evald) and len(pop):
            setups.append((r, others, ins, evald, pop))
    if not setups:
        return None
    best, best_auc = None, -1.0
    for a in grid:
        aucs = []
        for r, others, ins, evald, pop in setups:
            sc = rmia(stat[r], stat[others], member[others], pop, a=float(a), online=False)
            x = np.r_[sc[ins], sc[evald]]
            aucs.append(roc_auc_score(np.r_[np.ones(len(ins)), np.zeros(len(evald))], x))
        if np.mean(aucs) > best_auc + 1e-12:  # ties: the smallest a (closest to no correction)
            best, best_auc = float(a), float(np.mean(aucs))
    return best
