"""Forward hooks that reduce every exposed layer's output as the batch flows through.

Nothing is stored per layer but what the metrics need: for each point, the alignment loss of
the layer's outputs over its view pairs (for LayerMem) and, when asked, its mean activation per
unit (for UnitMem/ClassMem). The handles live in a context manager that always removes them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

from memlens.audit.sslmem import Distance, alignment_loss
from memlens.models.layers import LayerSpec


class LayerTap:
    """Results of one forward pass: ``align[name]`` (B,) and ``units[name]`` (B, U)."""

    def __init__(self, specs: list[LayerSpec], *, views_per_point: int, pairs: int | None, distance: Distance,
                 units: bool, align_layers: set[str] | None = None):
        self.specs = specs
        self.views = views_per_point
        self.pairs = pairs
        self.distance = distance
        self.want_units = units
        self.align_layers = align_layers
        self.align: dict[str, torch.Tensor] = {}
        self.units: dict[str, torch.Tensor] = {}

    def _hook(self, spec: LayerSpec):
        def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
            out = output.detach()
            if self.pairs and (self.align_layers is None or spec.name in self.align_layers):
                self.align[spec.name] = alignment_loss(out, pairs=self.pairs, metric=self.distance)
            if self.want_units:
                act = spec.unit_activations(out)  # (B * V, U)
                self.units[spec.name] = act.reshape(-1, self.views, act.shape[1]).mean(dim=1)

        return hook


@contextmanager
def tap(encoder: nn.Module, specs: list[LayerSpec], *, views_per_point: int, pairs: int | None,
        distance: Distance = "l2", units: bool = False, align_layers: set[str] | None = None,
        modules: dict[str, nn.Module] | None = None) -> Iterator[LayerTap]:
    """Hook ``specs`` of ``encoder`` for the duration of the block; handles are always removed.

    Args:
        views_per_point: V consecutive rows of the batch belong to one point.
        pairs: K; rows pair as (v1, v2), (v3, v4)... (None: no alignment, units only).
        units: also compute per-point mean unit activations (Eq. 5).
        align_layers: layers whose alignment is needed (None: all).
        modules: ``dict(encoder.named_modules())`` when the caller already has it.
    """
    modules = modules if modules is not None else dict(encoder.named_modules())
    state = LayerTap(specs, views_per_point=views_per_point, pairs=pairs, distance=distance, units=units,
                     align_layers=align_layers)
    handles = []
    try:
        for spec in specs:
            handles.append(modules[spec.name].register_forward_hook(state._hook(spec)))
        yield state
    finally:
        for h in handles:
            h.remove()
