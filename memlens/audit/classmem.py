"""ClassMem (localizing paper, Appendix D.2): a unit's selectivity for one class over the others.

    mu~_u(C_j)  = mean of mu_u(x) over the points of class j in D'     (Eq. 13)
    ClassMem(u) = (max_j mu~_u(C_j) - mean_{j != argmax} mu~_u(C_j))
                  / (max_j mu~_u(C_j) + mean_{j != argmax} mu~_u(C_j))  (Eq. 14-16)

mu_u(x) is the same augmentation-averaged response as UnitMem's and follows the same rule for
negative activations, so UnitMem and ClassMem of a unit are directly comparable (Fig. 2, 3).
Classes without points in D' are left out.
"""

from __future__ import annotations

import torch

from memlens.audit.unitmem import Negative, rectify, selectivity


def classmem(mu: torch.Tensor, labels: torch.Tensor, *, negative: Negative = "clamp") -> torch.Tensor:
    """ClassMem of every unit. mu: (N, U) mean activations; labels: (N,) class ids. Returns (U,).

    Raises:
        ValueError: fewer than two classes present.
    """
    classes = torch.unique(labels)
    if len(classes) < 2:
        raise ValueError("ClassMem needs points of at least two classes in D'")
    m = rectify(mu.double(), negative)
    means = torch.stack([m[labels == c].mean(dim=0) for c in classes])
    return _classmem_from_means(means)


def _classmem_from_means(means: torch.Tensor) -> torch.Tensor:
    top = means.max(dim=0).values
    rest = (means.sum(dim=0) - top) / (means.shape[0] - 1)
    return selectivity(top, rest).float()


class ClassMemAccumulator:
    """Streaming ClassMem: per-class running sums, O(classes x units) memory."""

    def __init__(self, units: int, num_classes: int, *, negative: Negative = "clamp"):
        self.negative = negative
        self.sums = torch.zeros(num_classes, units, dtype=torch.float64)
        self.counts = torch.zeros(num_classes, dtype=torch.float64)

    def update(self, mu: torch.Tensor, labels: torch.Tensor) -> None:
        m = rectify(mu.double(), self.negative)
        self.sums.index_add_(0, labels, m)
        self.counts.index_add_(0, labels, torch.ones(len(labels), dtype=torch.float64))

    def result(self) -> torch.Tensor:
        present = self.counts > 0
        if int(present.sum()) < 2:
            raise ValueError("ClassMem needs points of at least two classes in D'")
        return _classmem_from_means(self.sums[present] / self.counts[present].unsqueeze(1))
