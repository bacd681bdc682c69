"""What an encoder exposes to hooks: its layers, their kind and their units."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch

Layout = Literal["channels_first", "tokens"]


@dataclass(frozen=True)
class LayerSpec:
    """A hookable layer.

    Attributes:
        name: module path from ``named_modules()``; used verbatim in every output file.
        kind: what the layer is (conv, residual, block, attention, resblock_attn, mlp_hidden,
            mlp, output).
        units: number of units (channels of a conv map, neurons of a token layer).
        layout: ``channels_first`` for (B, C, H, W) maps, ``tokens`` for (B, T, D) sequences.
        depth: position of the layer in the forward order (0 = first).
        block: the ViT block or ResNet stage the layer belongs to (for per-block tables).
        prev: the layer whose LayerMem this layer's ΔLayerMem subtracts (None for the first).
            For conv nets the previous layer in forward order (localizing paper, Eq. 4 and
            Table 1); for ViTs the residual stream the sub-block reads (Table 10:
            ΔLM^ATT_N = LM^ATT_N - ResBlock^FC_{N-1}, ΔLM^FC_N = LM^FC_N - ResBlock^ATT_N,
            ΔBlockMem_N = ResBlock^FC_N - ResBlock^FC_{N-1}).
    """

    name: str
    kind: str
    units: int
    layout: Layout
    depth: int
    block: int
    prev: str | None = None

    def unit_activations(self, out: torch.Tensor) -> torch.Tensor:
        """Per-unit activation of each input, shape (B, units).

        Conv maps are averaged over the spatial positions and token layers over all tokens,
        CLS included (localizing paper, Appendix B, "Details on Computing UnitMem").
        """
        if self.layout == "channels_first":
            return out.flatten(2).mean(dim=2)
        return out.mean(dim=1)

    def to_dict(self) -> dict:
        return asdict(self)
