"""SSLMem: per-point memorization from the alignment of augmented views.

SSLMem paper, Eq. 1-2:

    L_align(f, x) = E_{x', x'' ~ Aug(x)} d(f(x'), f(x''))
    m(x) = E_g L_align(g, x) - E_f L_align(f, x)

with f trained on data that contains x and g on data that does not. Representations are
L2-normalised before the distance (SSLMem paper, Appendix A). The expectation over
augmentations is estimated with K pairs of views per point.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Distance = Literal["l2", "l1", "cosine", "angular"]
DISTANCES = ("l2", "l1", "cosine", "angular")


def pair_distance(u: torch.Tensor, v: torch.Tensor, metric: Distance = "l2") -> torch.Tensor:
    """Distance between L2-normalised rows of ``u`` and ``v``.

    Args:
        u, v: (..., D) representations (normalised here, so the scale of the layer is irrelevant).
        metric: ``l2`` (Euclidean, the papers' choice), ``l1``, ``cosine`` (1 - cos) or
            ``angular`` (arccos(cos) / pi, in [0, 1]).

    Returns:
        (...,) distances.
    """
    u = torch.nn.functional.normalize(u, dim=-1)
    v = torch.nn.functional.normalize(v, dim=-1)
    if metric == "l2":
        return (u - v).norm(dim=-1)
    if metric == "l1":
        return (u - v).abs().sum(dim=-1)
    cos = (u * v).sum(dim=-1).clamp(-1.0, 1.0)
    if metric == "cosine":
        return 1.0 - cos
    if metric == "angular":
        return torch.arccos(cos) / math.pi
    raise ValueError(f"unknown distance '{metric}'; valid: {', '.join(DISTANCES)}")


def alignment_loss(views: torch.Tensor, *, pairs: int, metric: Distance = "l2") -> torch.Tensor:
    """Alignment loss of each point over K pairs of its views (SSLMem paper, Eq. 1).

    Args:
        views: (B * 2K, ...) outputs for 2K views per point, the views of one point contiguous
            and paired in order: (v1, v2), (v3, v4), ...
        pairs: K.
        metric: see :func:`pair_distance`.

    Returns:
        (B,) mean distance over the K pairs.
    """
    flat = views.reshape(views.shape[0], -1)
    if flat.shape[0] % (2 * pairs):
        raise ValueError(f"{flat.shape[0]} rows are not a whole number of points with {2 * pairs} views")
    p = flat.reshape(-1, pairs, 2, flat.shape[1])
    if metric == "l1":
        return pair_distance(p[:, :, 0], p[:, :, 1], metric).mean(dim=1)
    # l2, cosine and angular of normalised vectors depend only on cos(u, v): the 2x2 Gram matrix
    # of each pair, one batched product over the (large) layer output, instead of normalised
    # copies of it. These hooks run on every layer of every encoder: this is most of the audit's
    # own cost.
    gram = torch.bmm(p.reshape(-1, 2, p.shape[-1]), p.reshape(-1, 2, p.shape[-1]).transpose(1, 2)).double()
    gram = gram.reshape(p.shape[0], pairs, 2, 2)
    uu, vv, uv = gram[..., 0, 0], gram[..., 1, 1], gram[..., 0, 1]
    cos = (uv / (uu * vv).sqrt().clamp_min(1e-24)).clamp(-1.0, 1.0)
    if metric == "l2":
        d = (2.0 - 2.0 * cos).clamp_min(0.0).sqrt()
    elif metric == "cosine":
        d = 1.0 - cos
    elif metric == "angular":
        d = torch.arccos(cos) / math.pi
    else:
        raise ValueError(f"unknown distance '{metric}'; valid: {', '.join(DISTANCES)}")
    return d.mean(dim=1).to(views.dtype)


def sslmem(align_f: torch.Tensor, align_g: torch.Tensor) -> torch.Tensor:
    """Raw SSLMem, Eq. 2: align_g - align_f (both averaged over views and over encoders)."""
    return align_g - align_f


def range_normalize(scores: torch.Tensor) -> torch.Tensor:
    """SSLMem paper, Appendix A: divide the differences by their range (largest minus smallest),
    which maps them into [-1, 1]. memlens takes the range over all points of the audit, so scores
    of different subsets stay comparable. A zero range gives zeros."""
    span = (scores.max() - scores.min()) if scores.numel() else torch.tensor(0.0)
    return torch.zeros_like(scores) if span <= 0 else scores / span


def symmetric_normalize(align_f: torch.Tensor, align_g: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """SSLMem' (localizing paper, Eq. 2): (align_g - align_f) / (align_f + align_g), in [-1, 1];
    0 where both alignments are 0."""
    denom = align_f + align_g
    return torch.where(denom > eps, (align_g - align_f) / denom.clamp_min(eps), torch.zeros_like(denom))
