"""The alignment loss of augmented views (SSLMem paper, Eq. 1), what SSLMem compares between encoders
(:mod:`memlens.audit.sslmem`):

    L_align(f, x) = E_{x', x'' ~ Aug(x)} d(f(x'), f(x''))

Representations are L2-normalised before the distance (SSLMem paper, Appendix A). The expectation
over pairs of augmentations is estimated from V views per point: by default over all V (V - 1) / 2
pairs of distinct views (a U-statistic: unbiased for the same expectation as one pair, with less
variance, from the same forward passes); optionally over V / 2 disjoint pairs, the papers' estimator.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch

Distance = Literal["l2", "l1", "cosine", "angular"]
DISTANCES = ("l2", "l1", "cosine", "angular")


@functools.lru_cache(maxsize=32)
def _off_diagonal(v: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(V, V) ones with a zero diagonal (cached: the hooks ask for it once per layer and batch; made outside
    inference mode, so a cached copy serves code that records gradients too)."""
    with torch.inference_mode(False):
        return 1.0 - torch.eye(v, dtype=dtype, device=device)


@functools.lru_cache(maxsize=32)
def _upper_pairs(v: int, device: torch.device) -> torch.Tensor:
    """(2, V (V - 1) / 2) indices of the pairs i < j (cached, as :func:`_off_diagonal`)."""
    with torch.inference_mode(False):
        return torch.triu_indices(v, v, offset=1, device=device)


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


def pairwise_distances(views: torch.Tensor, *, views_per_point: int, metric: Distance = "l2") -> torch.Tensor:
    """Distances between all pairs of each point's views, on L2-normalised outputs.

    Args:
        views: (B * V, ...) outputs for V views per point, the views of one point contiguous.
        views_per_point: V.
        metric: see :func:`pair_distance`.

    Returns:
        (B, V, V) float64 distance matrices (zero diagonal).

    The Gram matrix of the views, centred on their mean (distances are unchanged; identical views
    become exact zeros), is formed in float32, the layer's own precision: it costs V^2 D per point
    and one float32 copy of the output, small next to the encoder's forward passes. Pairs whose
    squared distance comes out below 1e-3 (where 2 - 2 cos would lose digits to cancellation) are
    recomputed from their explicit difference in float64.
    """
    v = views_per_point
    u = _unit_rows(views, v)
    if metric == "l1":
        return torch.cdist(u, u, p=1).double()
    d = _from_squared(_squared_distances(u), metric)
    return d * _off_diagonal(v, d.dtype, d.device)


def _unit_rows(views: torch.Tensor, v: int) -> torch.Tensor:
    """(B, V, F) float32 views, each L2-normalised (as ``F.normalize``, its ops written out: the hooks call
    this once per layer and batch)."""
    if views.shape[0] % v:
        raise ValueError(f"{views.shape[0]} rows are not a whole number of points with {v} views")
    x = views.reshape(views.shape[0] // v, v, -1).float()
    return x / x.norm(2, -1, keepdim=True).clamp_min(1e-12).expand_as(x)


def _squared_distances(u: torch.Tensor) -> torch.Tensor:
    """(B, V, V) float64 squared distances of unit rows ``u`` (B, V, F) (see :func:`pairwise_distances`)."""
    c = u - u.mean(dim=1, keepdim=True)
    gram = torch.bmm(c, c.transpose(1, 2)).double()
    sq = gram.diagonal(dim1=1, dim2=2)
    d2 = (sq.unsqueeze(2) + sq.unsqueeze(1) - 2.0 * gram).clamp_min(0.0)
    close = (d2 < 1e-3).triu(diagonal=1).nonzero()
    if len(close):
        b, i, j = close.unbind(1)
        exact = (u[b, i].double() - u[b, j].double()).square().sum(dim=-1)
        d2[b, i, j] = exact
        d2[b, j, i] = exact
    return d2


def _from_squared(d2: torch.Tensor, metric: Distance) -> torch.Tensor:
    """The distance from squared distances of unit vectors (elementwise)."""
    if metric == "l2":
        return d2.sqrt()
    if metric == "cosine":
        return d2 / 2.0
    if metric == "angular":
        return torch.arccos((1.0 - d2 / 2.0).clamp(-1.0, 1.0)) / math.pi
    raise ValueError(f"unknown distance '{metric}'; valid: {', '.join(DISTANCES)}")


def alignment_from_distances(dist: torch.Tensor, pairing: str = "all") -> torch.Tensor:
    """Per-point alignment loss from (B, V, V) view distances.

    ``all``: the mean over the V (V - 1) / 2 pairs of distinct views, a U-statistic with the same
    expectation as one pair (SSLMem paper, Eq. 1) and lower variance, from the same forward passes.
    ``disjoint``: the mean over the K = V / 2 pairs (v1, v2), (v3, v4)... (the papers' estimator).
    """
    v = dist.shape[-1]
    if pairing == "disjoint":
        idx = torch.arange(0, v - 1, 2, device=dist.device)
        return dist[:, idx, idx + 1].mean(dim=1)
    iu = _upper_pairs(v, dist.device)
    return dist[:, iu[0], iu[1]].mean(dim=1)


def alignment_loss(views: torch.Tensor, *, views_per_point: int, pairing: str = "all",
                   metric: Distance = "l2") -> torch.Tensor:
    """Alignment loss of each point over its views (SSLMem paper, Eq. 1), float64.

    Args:
        views: (B * V, ...) outputs for V views per point, the views of one point contiguous.
        views_per_point: V.
        pairing: ``all`` pairs of views (default) or ``disjoint`` pairs (v1, v2), (v3, v4)...
        metric: see :func:`pair_distance`.

    Returns:
        (B,) mean distance over the pairs.
    """
    if pairing == "disjoint":
        flat = views.reshape(views.shape[0], -1)
        if flat.shape[0] % views_per_point or views_per_point % 2:
            raise ValueError(f"{flat.shape[0]} rows are not a whole number of points with {views_per_point} views "
                             f"in pairs")
        p = flat.reshape(-1, views_per_point // 2, 2, flat.shape[1])
        return pair_distance(p[:, :, 0].float(), p[:, :, 1].float(), metric).double().mean(dim=1)
    if metric == "l1":
        return alignment_from_distances(pairwise_distances(views, views_per_point=views_per_point, metric=metric))
    # all pairs: the distances of the pairs i < j only, the same values pairwise_distances holds there
    d2 = _squared_distances(_unit_rows(views, views_per_point))
    iu = _upper_pairs(views_per_point, d2.device)
    return _from_squared(d2[:, iu[0], iu[1]], metric).mean(dim=1)
