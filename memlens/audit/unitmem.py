"""UnitMem (localizing paper, Eq. 5-8): how much a single unit responds to one training point.

    mu_u(x)      = E_{x' ~ Aug(x)} activation_u(x')                     (Eq. 5)
    mu_max,u     = max_i mu_u(x_i)          k = argmax                   (Eq. 6)
    mu_-max,u    = mean_{i != k} mu_u(x_i)  (or the median, Appendix C.1) (Eq. 7)
    UnitMem(u)   = (mu_max,u - mu_-max,u) / (mu_max,u + mu_-max,u)       (Eq. 8)

The activation of a conv unit is its feature map averaged over positions; that of a token
layer's neuron is averaged over all tokens (Appendix B).

Negative activations. Eq. 8 is a selectivity index for non-negative responses (the paper's
conv units follow a ReLU). Attention outputs, residual streams and GELU can be negative, which
would let the denominator vanish or change sign. memlens's rule (``negative="clamp"``, the
default): a point whose mean response mu_u(x) is negative does not activate the unit, i.e.
mu is clamped at 0 before Eq. 6-8. ``negative="abs"`` measures the response magnitude |mu|
instead. With either rule 0 <= UnitMem <= 1, and a unit that no point activates (denominator
below 1e-12) gets UnitMem 0 rather than NaN. Ties for the maximum go to the first point in D'
order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Negative = Literal["clamp", "abs"]
Rest = Literal["mean", "median"]
EPS = 1e-12


def rectify(mu: torch.Tensor, negative: Negative = "clamp") -> torch.Tensor:
    return mu.clamp_min(0.0) if negative == "clamp" else mu.abs()


def selectivity(top: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """(top - rest) / (top + rest), 0 where the denominator is (near) zero."""
    denom = top + rest
    return torch.where(denom > EPS, (top - rest) / denom.clamp_min(EPS), torch.zeros_like(denom))


@dataclass
class UnitMemResult:
    """Per-unit results for one layer, each of shape (U,)."""

    unitmem: torch.Tensor
    mu_max: torch.Tensor
    mu_rest: torch.Tensor
    argmax: torch.Tensor  # index into D'


def unitmem(mu: torch.Tensor, *, rest: Rest = "mean", negative: Negative = "clamp") -> UnitMemResult:
    """UnitMem of every unit from the (N, U) matrix of mean activations mu_u(x_i) over D'.

    Raises:
        ValueError: fewer than two points (Eq. 7 compares the top point with the others).
    """
    if mu.dim() != 2:
        raise ValueError(f"mu must be (N, U); got shape {tuple(mu.shape)}")
    n = mu.shape[0]
    if n < 2:
        raise ValueError("UnitMem compares a point with the other points of D': it needs at least 2 points")
    m = rectify(mu.double(), negative)
    top, arg = _first_max(m)
    if rest == "mean":
        others = (m.sum(dim=0) - top) / (n - 1)
    else:
        keep = torch.ones_like(m, dtype=torch.bool)
        keep[arg, torch.arange(m.shape[1])] = False
        others = torch.quantile(m.T[keep.T].reshape(m.shape[1], n - 1), 0.5, dim=1)
    return UnitMemResult(unitmem=selectivity(top, others).float(), mu_max=top.float(), mu_rest=others.float(),
                         argmax=arg)


def _first_max(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    top = m.max(dim=0).values
    arg = (m == top).int().argmax(dim=0)  # first occurrence of the maximum
    return top, arg


class UnitMemAccumulator:
    """Streaming UnitMem for the mean variant in O(units) memory: running sum, max and argmax.

    ``rest="median"`` needs every mu and keeps the (N, U) matrix instead.
    """

    def __init__(self, units: int, *, rest: Rest = "mean", negative: Negative = "clamp"):
        self.rest, self.negative = rest, negative
        self.n = 0
        self.sum = torch.zeros(units, dtype=torch.float64)
        self.max = torch.full((units,), -torch.inf, dtype=torch.float64)
        self.argmax = torch.zeros(units, dtype=torch.long)
        self.rows: list[torch.Tensor] = []

    def update(self, mu: torch.Tensor) -> None:
        """Add a batch of points (B, U), in D' order."""
        if mu.shape[0] == 0:
            return
        m = rectify(mu.double(), self.negative)
        top, arg = _first_max(m)
        better = top > self.max  # strictly: earlier points win ties
        self.max = torch.where(better, top, self.max)
        self.argmax = torch.where(better, arg + self.n, self.argmax)
        self.sum += m.sum(dim=0)
        self.n += m.shape[0]
        if self.rest == "median":
            self.rows.append(mu.detach().clone())

    def result(self) -> UnitMemResult:
        if self.rest == "median":
            return unitmem(torch.cat(self.rows), rest="median", negative=self.negative)
        if self.n < 2:
            raise ValueError("UnitMem compares a point with the other points of D': it needs at least 2 points")
        others = (self.sum - self.max) / (self.n - 1)
        return UnitMemResult(unitmem=selectivity(self.max, others).float(), mu_max=self.max.float(),
                             mu_rest=others.float(), argmax=self.argmax.clone())
