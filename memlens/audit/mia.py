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
  ((1 + a) Pr_out(x) + (1 - a)) / 2) otherwise.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special

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


def lira(target: np.ndarray, ref: np.ndarray, member: np.ndarray, *, variance: str = "auto",
         online: bool = True) -> np.ndarray:
    """LiRA scores (n,): online where x has in- and out-references (and ``online``), offline otherwise.

    Args:
        target: (n,) the target's statistic per image.
        ref: (R, n) the references' statistics.
        member: (R, n) bool, reference r trained on image x.
        variance: ``global``, ``per_example`` or ``auto`` (see the module docstring).
        online: False: the offline score for every image (comparable across images some of which
            have no in-references).
    """
    member = member.astype(bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu_in = (ref * member).sum(0) / member.sum(0)
        mu_out = (ref * ~member).sum(0) / (~member).sum(0)
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
    online = member.any(0) & (~member).any(0) & online
    log_all = special.logsumexp(ref, axis=0) - math.log(ref.shape[0])
    with np.errstate(divide="ignore"):
        n_out = (~member).sum(0)
        log_out = special.logsumexp(np.where(member, -np.inf, ref), axis=0) - np.log(np.maximum(n_out, 1))
    log_offline = np.log(np.maximum((1 + a) * np.exp(log_out) + (1 - a), 1e-300)) - math.log(2)
    log_px = np.where(online, log_all, log_offline)
    log_lr = target - log_px
    z = np.sort(log_lr[np.asarray(population, dtype=np.int64)])
    if not len(z):
        return np.full(len(target), np.nan)
    # fraction of z with log LR(z) <= log LR(x) - log gamma
    return np.searchsorted(z, log_lr - math.log(gamma), side="right") / len(z)
