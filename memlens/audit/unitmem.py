"""UnitMem (localizing paper, Eq. 5-8): how much a single unit responds to one training point.

    mu_u(x)      = E_{x' ~ Aug(x)} activation_u(x')                     (Eq. 5)
    mu_max,u     = max_i mu_u(x_i)          k = argmax                   (Eq. 6)
    mu_-max,u    = mean_{i != k} mu_u(x_i)  (or the median, Appendix C.1) (Eq. 7)
    UnitMem(u)   = (mu_max,u - mu_-max,u) / (mu_max,u + mu_-max,u)       (Eq. 8)

Units are what the paper calls units: conv channels after the ReLU and MLP hidden neurons after
the activation, averaged over positions or tokens (Appendix B); see
:mod:`memlens.models.layers` for the layer kinds. Eq. 8 is a selectivity index of non-negative
responses, so:

* post-ReLU units are used as they are; post-GELU units have each activation clamped at 0
  before averaging (GELU's bounded negative lobe means "inactive");
* signed layers are excluded by default. On request (``signed``) they are measured either on
  the magnitude |activation| (``abs``), or as the response above the least-responding point of
  D' (``shift``: mu - min_i mu_i), never by silently clamping negative means;
* the **activation floor**: a unit whose largest response mu_max is below ``min_activation`` is
  silent on D'. Its UnitMem would be the ratio of two numbers near zero, so it is not ranked:
  UnitMem is NaN and no image is named responsible for it (``argmax`` -1).

Ties for the maximum go to the point that comes first in D' order (the order of the audit's
point list, whatever order the points were processed in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Rest = Literal["mean", "median"]
Shift = Literal["none", "shift"]
EPS = 1e-12
NONE = -1


def selectivity(top: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """(top - rest) / (top + rest), 0 where the denominator is (near) zero."""
    denom = top + rest
    return torch.where(denom > EPS, (top - rest) / denom.clamp_min(EPS), torch.zeros_like(denom))


@dataclass
class UnitMemResult:
    """Per-unit results for one layer, each of shape (U,).

    ``unitmem`` is NaN for units below the activation floor; ``argmax`` indexes D' (-1 for
    those units); ``active`` counts the points whose response exceeds the floor.
    """

    unitmem: torch.Tensor
    mu_max: torch.Tensor
    mu_rest: torch.Tensor
    argmax: torch.Tensor
    active: torch.Tensor

    @property
    def ranked(self) -> torch.Tensor:
        return ~torch.isnan(self.unitmem)


def _finish(top: torch.Tensor, rest: torch.Tensor, arg: torch.Tensor, active: torch.Tensor,
            min_activation: float) -> UnitMemResult:
    um = selectivity(top, rest)
    silent = top < max(min_activation, EPS)
    um = torch.where(silent, torch.full_like(um, float("nan")), um)
    arg = torch.where(silent, torch.full_like(arg, NONE), arg)
    return UnitMemResult(unitmem=um.float(), mu_max=top.float(), mu_rest=rest.float(), argmax=arg,
                         active=active)


def unitmem(mu: torch.Tensor, *, rest: Rest = "mean", shift: Shift = "none",
            min_activation: float = 0.0) -> UnitMemResult:
    """UnitMem of every unit from the (N, U) matrix of mean responses mu_u(x_i) over D'.

    ``mu`` must already follow the layer's rule (non-negative for units; raw values for signed
    layers measured with ``shift="shift"``).

    Raises:
        ValueError: fewer than two points (Eq. 7 compares the top point with the others).
    """
    if mu.dim() != 2:
        raise ValueError(f"mu must be (N, U); got shape {tuple(mu.shape)}")
    n = mu.shape[0]
    if n < 2:
        raise ValueError("UnitMem compares a point with the other points of D': it needs at least 2 points")
    m = mu.double()
    if shift == "shift":
        m = m - m.min(dim=0).values
    top, arg = _first_max(m)
    if rest == "mean":
        others = (m.sum(dim=0) - top) / (n - 1)
    else:
        keep = torch.ones_like(m, dtype=torch.bool)
        keep[arg, torch.arange(m.shape[1])] = False
        others = torch.quantile(m.T[keep.T].reshape(m.shape[1], n - 1), 0.5, dim=1)
    active = (m > min_activation).sum(dim=0)
    return _finish(top, others, arg, active, min_activation)


def _first_max(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    top = m.max(dim=0).values
    arg = (m == top).int().argmax(dim=0)  # first occurrence of the maximum
    return top, arg


class UnitMemAccumulator:
    """Streaming UnitMem in O(units) memory: running sum, max with argmax, min, active count.

    Points may arrive in any order and on several processes: ``update`` takes each point's
    position in D', ties go to the lowest position, and :meth:`merge` combines accumulators
    (``torch.distributed`` all-reduces them the same way). ``rest="median"`` keeps every row.
    """

    def __init__(self, units: int, *, rest: Rest = "mean", shift: Shift = "none", min_activation: float = 0.0):
        self.rest, self.shift, self.floor = rest, shift, min_activation
        self.n = 0
        self.sum = torch.zeros(units, dtype=torch.float64)
        self.max = torch.full((units,), -torch.inf, dtype=torch.float64)
        self.min = torch.full((units,), torch.inf, dtype=torch.float64)
        self.argmax = torch.full((units,), torch.iinfo(torch.long).max, dtype=torch.long)
        self.active = torch.zeros(units, dtype=torch.long)
        self.rows: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, mu: torch.Tensor, positions: torch.Tensor) -> None:
        """Add points (B, U) with their positions (B,) in D'."""
        if mu.shape[0] == 0:
            return
        m = mu.detach().double().cpu()
        pos = torch.as_tensor(positions, dtype=torch.long).cpu()
        top = m.max(dim=0).values
        # lowest position among the rows reaching the batch maximum
        cand = torch.where(m == top, pos.view(-1, 1), torch.full_like(m, torch.iinfo(torch.long).max,
                                                                       dtype=torch.long))
        arg = cand.min(dim=0).values
        better = (top > self.max) | ((top == self.max) & (arg < self.argmax))
        self.max = torch.where(better, top, self.max)
        self.argmax = torch.where(better, arg, self.argmax)
        self.min = torch.minimum(self.min, m.min(dim=0).values)
        self.sum += m.sum(dim=0)
        if self.shift == "none":
            self.active += (m > self.floor).sum(dim=0)
        self.n += m.shape[0]
        if self.rest == "median" or self.shift == "shift":
            self.rows.append((m, pos))

    def merge(self, other: "UnitMemAccumulator") -> None:
        better = (other.max > self.max) | ((other.max == self.max) & (other.argmax < self.argmax))
        self.max = torch.where(better, other.max, self.max)
        self.argmax = torch.where(better, other.argmax, self.argmax)
        self.min = torch.minimum(self.min, other.min)
        self.sum += other.sum
        self.active += other.active
        self.n += other.n
        self.rows += other.rows

    def result(self) -> UnitMemResult:
        """Eq. 6-8; ``argmax`` is a position in D'."""
        if self.n < 2:
            raise ValueError("UnitMem compares a point with the other points of D': it needs at least 2 points")
        if self.rest == "median" or self.shift == "shift":
            m = torch.cat([r for r, _ in self.rows])
            pos = torch.cat([p for _, p in self.rows])
            order = torch.argsort(pos)
            res = unitmem(m[order], rest=self.rest, shift=self.shift, min_activation=self.floor)
            res.argmax = torch.where(res.argmax >= 0, pos[order][res.argmax.clamp_min(0)], res.argmax)
            return res
        others = (self.sum - self.max) / (self.n - 1)
        return _finish(self.max, others, self.argmax.clone(), self.active.clone(), self.floor)


def unitmem_null_p(mu: torch.Tensor, members: torch.Tensor, *, permutations: int, generator: torch.Generator,
                   rest: Rest = "mean", shift: Shift = "none", min_activation: float = 0.0) -> tuple[torch.Tensor,
                                                                                                       torch.Tensor]:
    """Permutation p-value of every unit's UnitMem on the members against the same unit on non-members.

    The localizing paper ranks units by UnitMem over D' (Eq. 8), but a random network's units are
    peaky too: a high UnitMem says a unit is selective, not that it memorized a training image.
    The null: the unit's UnitMem over sets of the same size drawn from the members and the
    non-members together. When the unit does not respond to membership, the members' set is one such
    draw, and p = (1 + #{draws with UnitMem >= observed}) / (1 + permutations) is a valid p-value
    (ties count against the unit; a draw whose unit is silent counts as not reaching it).

    Args:
        mu: (N, U) mean responses mu_u(x) of the pooled images (following the layer's unit rule).
        members: (N,) bool, the images the encoder trained on (D'); the rest are non-members.
        permutations: number of random draws.
        generator: the draws' randomness (seeded by the audit).

    Returns:
        (observed UnitMem over the members (U,), p-values (U,); NaN where the unit is silent on them).
    """
    kw = dict(rest=rest, shift=shift, min_activation=min_activation)
    m = int(members.sum())
    observed = unitmem(mu[members], **kw).unitmem.double()
    reached = torch.ones_like(observed)
    for _ in range(permutations):
        draw = torch.randperm(mu.shape[0], generator=generator)[:m]
        null = unitmem(mu[draw], **kw).unitmem.double()
        reached += (torch.nan_to_num(null, nan=-torch.inf) >= observed).double()
    p = reached / (permutations + 1)
    return observed, torch.where(torch.isnan(observed), torch.full_like(p, float("nan")), p)
