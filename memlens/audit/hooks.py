"""Forward hooks that reduce every exposed layer's output as the batch flows through.

Nothing is stored per layer but what the metrics need: for each point, the alignment loss of
the layer's outputs over its views (for LayerMem) and, when asked, its mean activation per unit
(for UnitMem/ClassMem). The handles live in a context manager that always removes them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

from memlens.audit.alignment import Distance, alignment_loss
from memlens.errors import MemlensError
from memlens.models.layers import LayerSpec


class LayerTap:
    """Results of one forward pass: ``align[name]`` (B,) float64 and ``units[name]`` (B, U) float32."""

    def __init__(self, specs: list[LayerSpec], *, views_per_point: int, pairing: str | None, distance: Distance,
                 unit_layers: set[str] | None, align_layers: set[str] | None = None, signed: str = "exclude",
                 align_points: torch.Tensor | None = None):
        self.specs = specs
        self.align_points = align_points
        self.views = views_per_point
        self.pairing = pairing
        self.distance = distance
        self.unit_layers = unit_layers or set()
        self.align_layers = align_layers
        self.signed = signed
        self.align: dict[str, torch.Tensor] = {}
        self.units: dict[str, torch.Tensor] = {}

    def _hook(self, spec: LayerSpec):
        def reduce(out) -> None:
            if isinstance(out, (tuple, list)):
                out = out[0]
            out = out.detach()
            if self.pairing and (self.align_layers is None or spec.name in self.align_layers):
                mine = out
                if self.align_points is not None:  # the views of these points only (each point's own rows)
                    mine = out.reshape(-1, self.views, *out.shape[1:]).index_select(0, self.align_points)
                    mine = mine.reshape(-1, *out.shape[1:])
                self.align[spec.name] = alignment_loss(mine, views_per_point=self.views, pairing=self.pairing,
                                                       metric=self.distance)
            if spec.name in self.unit_layers:
                act = spec.unit_activations(out, signed="abs" if self.signed == "abs" else "raw")  # (B * V, U)
                self.units[spec.name] = act.reshape(-1, self.views, act.shape[1]).mean(dim=1)

        if spec.tap == "input":
            return lambda module, inputs: reduce(inputs[0])
        return lambda module, inputs, output: reduce(output)

    def check_finite(self, where: str) -> None:
        """Raise naming the first layer whose outputs held NaN or inf (they poison every score)."""
        for spec in self.specs:
            for table in (self.align, self.units):
                t = table.get(spec.name)
                if t is not None and not bool(torch.isfinite(t).all()):
                    raise MemlensError(f"{where}: layer '{spec.name}' produced NaN or inf activations; the encoder "
                                       f"cannot be audited (check its weights and input normalisation)")


@contextmanager
def tap(encoder: nn.Module, specs: list[LayerSpec], *, views_per_point: int, pairing: str | None,
        distance: Distance = "l2", unit_layers: set[str] | None = None, align_layers: set[str] | None = None,
        signed: str = "exclude", modules: dict[str, nn.Module] | None = None,
        align_points: torch.Tensor | None = None) -> Iterator[LayerTap]:
    """Hook ``specs`` of ``encoder`` for the duration of the block; handles are always removed.

    Args:
        views_per_point: V consecutive rows of the batch belong to one point.
        pairing: ``all`` or ``disjoint`` pairs of views for the alignment (None: no alignment).
        unit_layers: layers whose per-point mean unit activations (Eq. 5) are needed.
        align_layers: layers whose alignment is needed (None: all).
        align_points: indices of the batch's points whose alignment is needed (None: all); ``align``
            then holds theirs, in this order.
        signed: how ``other`` layers' units are measured when asked for (``abs`` or raw).
        modules: ``dict(encoder.named_modules())`` when the caller already has it.
    """
    modules = modules if modules is not None else dict(encoder.named_modules())
    state = LayerTap(specs, views_per_point=views_per_point, pairing=pairing, distance=distance,
                     unit_layers=unit_layers, align_layers=align_layers, signed=signed, align_points=align_points)
    handles = []
    try:
        for spec in specs:
            if spec.tap == "input":
                handles.append(modules[spec.name].register_forward_pre_hook(state._hook(spec)))
            else:
                handles.append(modules[spec.name].register_forward_hook(state._hook(spec)))
        yield state
    finally:
        for h in handles:
            h.remove()
