"""SSLMem: per-image memorization, the gap between the alignment of encoders that did not train on an
image and of those that did (SSLMem paper, Eq. 2), and its normalisations.

    m(x) = E_g L_align(g, x) - E_f L_align(f, x)

with f trained on data that contains x and g on data that does not; L_align is Eq. 1
(:mod:`memlens.audit.alignment`). With several encoders per side (seeds, or K references each
trained on half of the pool), the expectations are means over the encoders that trained on the
image ("in") and over those that did not ("out"): :func:`in_out_means`, the one place memlens
computes them. NumPy only: readers of audits import it without torch.
"""

from __future__ import annotations

import numpy as np


def in_out_means(values: np.ndarray, member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The expectations of Eq. 2 over encoders: the mean score over the encoders that trained on each
    image, and over those that did not.

    Args:
        values: (E, ..., n) scores of E encoders (alignment loss, training loss, a layer's alignment
            (E, L, n)); lower means better fitted.
        member: (E, n) bool, encoder e trained on image i.

    Returns:
        (mean over in-encoders, mean over out-encoders), each (..., n); NaN where a group is empty.
    """
    member = np.asarray(member, dtype=bool).reshape(member.shape[:1] + (1,) * (values.ndim - 2) + member.shape[1:])
    with np.errstate(invalid="ignore", divide="ignore"):
        return (values * member).sum(0) / member.sum(0), (values * ~member).sum(0) / (~member).sum(0)


def sslmem(align_in: np.ndarray, align_out: np.ndarray) -> np.ndarray:
    """Raw SSLMem, Eq. 2: align_out - align_in (the means of :func:`in_out_means`)."""
    return align_out - align_in


def range_normalize(scores: np.ndarray) -> np.ndarray:
    """SSLMem paper, Appendix A: divide the differences by their range (largest minus smallest).

    The normalised scores span an interval of length exactly 1 (max - min = 1); they lie in
    [-1, 1] when the raw scores have both signs, and can exceed 1 when all are positive (e.g.
    raw scores in [0.25, 0.8] become [0.45, 1.45]). memlens takes the range over all points of the
    audit, so scores of different subsets stay comparable. A zero range gives zeros."""
    scores = np.asarray(scores, dtype=np.float64)
    span = (scores.max() - scores.min()) if scores.size else 0.0
    return np.zeros_like(scores) if span <= 0 else scores / span


def symmetric_normalize(align_in: np.ndarray, align_out: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """SSLMem' (localizing paper, Eq. 2): (align_out - align_in) / (align_in + align_out), in [-1, 1];
    0 where both alignments are 0 (and where either is undefined)."""
    denom = align_in + align_out
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > eps, (align_out - align_in) / np.maximum(denom, eps), 0.0)
