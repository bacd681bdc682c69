"""ClassMem (localizing paper, Appendix D.2): a unit's selectivity for one class over the others.

    mu~_u(C_j)  = mean of mu_u(x) over the points of class j in D'     (Eq. 13)
    ClassMem(u) = (max_j mu~_u(C_j) - mean_{j != argmax} mu~_u(C_j))
                  / (max_j mu~_u(C_j) + mean_{j != argmax} mu~_u(C_j))  (Eq. 14-16)

mu_u(x) is the same augmentation-averaged response as UnitMem's, under the same rule for the
layer's kind (:mod:`memlens.audit.unitmem`), so UnitMem and ClassMem of a unit are directly
comparable (Fig. 2, 3); with ``shift`` the class means are shifted by their minimum. Classes
without points in D' are left out; units below UnitMem's activation floor get NaN.
"""

from __future__ import annotations

import torch

from memlens.audit.unitmem import EPS, Shift, selectivity


def classmem(mu: torch.Tensor, labels: torch.Tensor, *, shift: Shift = "none",
             min_activation: float = 0.0) -> torch.Tensor:
    """ClassMem of every unit. mu: (N, U) mean responses; labels: (N,) class ids. Returns (U,).

    Raises:
        ValueError: fewer than two classes present.
    """
    classes = torch.unique(labels)
    if len(classes) < 2:
        raise ValueError("ClassMem needs points of at least two classes in D'")
    m = mu.double()
    means = torch.stack([m[labels == c].mean(dim=0) for c in classes])
    return _classmem_from_means(means, shift=shift, silent=m.max(dim=0).values - (
        m.min(dim=0).values if shift == "shift" else 0.0) < max(min_activation, EPS))


def _classmem_from_means(means: torch.Tensor, *, shift: Shift, silent: torch.Tensor) -> torch.Tensor:
    if shift == "shift":
        means = means - means.min(dim=0).values
    top = means.max(dim=0).values
    rest = (means.sum(dim=0) - top) / (means.shape[0] - 1)
    cm = selectivity(top, rest)
    return torch.where(silent, torch.full_like(cm, float("nan")), cm).float()


class ClassMemAccumulator:
    """Streaming ClassMem: per-class running sums, O(classes x units) memory; mergeable."""

    def __init__(self, units: int, num_classes: int, *, shift: Shift = "none", min_activation: float = 0.0):
        self.shift, self.floor = shift, min_activation
        self.sums = torch.zeros(num_classes, units, dtype=torch.float64)
        self.counts = torch.zeros(num_classes, dtype=torch.float64)
        self.max = torch.full((units,), -torch.inf, dtype=torch.float64)
        self.min = torch.full((units,), torch.inf, dtype=torch.float64)

    def update(self, mu: torch.Tensor, labels: torch.Tensor) -> None:
        if mu.shape[0] == 0:
            return
        m = mu.detach().double().cpu()
        labels = torch.as_tensor(labels).cpu()
        self.sums.index_add_(0, labels, m)
        self.counts.index_add_(0, labels, torch.ones(len(labels), dtype=torch.float64))
        self.max = torch.maximum(self.max, m.max(dim=0).values)
        self.min = torch.minimum(self.min, m.min(dim=0).values)

    def merge(self, other: "ClassMemAccumulator") -> None:
        self.sums += other.sums
        self.counts += other.counts
        self.max = torch.maximum(self.max, other.max)
        self.min = torch.minimum(self.min, other.min)

    def result(self) -> torch.Tensor:
        present = self.counts > 0
        if int(present.sum()) < 2:
            raise ValueError("ClassMem needs points of at least two classes in D'")
        span = self.max - (self.min if self.shift == "shift" else 0.0)
        return _classmem_from_means(self.sums[present] / self.counts[present].unsqueeze(1), shift=self.shift,
                                    silent=span < max(self.floor, EPS))
