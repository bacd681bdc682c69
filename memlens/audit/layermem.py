"""LayerMem and ΔLayerMem (localizing paper, Eq. 3-4, Tables 1, 2 and 10).

    LayerMem_D'(l) = 1/|D'| sum_i SSLMem'_{f^l, g^l}(x_i)
    ΔLayerMem_D'(l) = LayerMem_D'(l) - LayerMem_D'(prev(l))

where f^l, g^l are the encoders' outputs after layer l and SSLMem' the symmetric normalised
score. ``prev(l)`` is the previous layer in forward order for conv nets and, for ViTs, the
residual stream the sub-block reads (see :class:`memlens.models.layers.LayerSpec`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memlens.audit.sslmem import symmetric_normalize


def layermem(align_in: np.ndarray, align_out: np.ndarray) -> float:
    """Eq. 3 for one layer: the mean SSLMem' over D'.

    Args:
        align_in, align_out: (N,) mean alignment loss of the layer's outputs on the images of D', over
            the encoders that trained on each image and over those that did not
            (:func:`memlens.audit.sslmem.in_out_means`).
    """
    if len(align_in) == 0:
        return float("nan")
    return float(np.nanmean(symmetric_normalize(align_in, align_out)))


def delta_layermem(values: dict[str, float], prev: dict[str, str | None]) -> dict[str, float | None]:
    """Eq. 4: each layer's LayerMem minus that of its ``prev`` layer (None for the first layer)."""
    return {name: (None if prev.get(name) is None else value - values[prev[name]]) for name, value in values.items()}


@dataclass(frozen=True)
class ViTBlockRow:
    """One row of the localizing paper's Table 10."""

    block: int
    attention: float
    delta_attention: float | None
    resblock_attention: float
    mlp: float
    delta_mlp: float
    resblock_mlp: float
    delta_block: float | None
    layer: str = ""  # the block's module path (the paper numbers blocks from 1, modules from 0)


def vit_block_table(values: dict[str, float], specs: list) -> list[ViTBlockRow]:
    """Attention vs fully-connected memorization per block (Table 10):

    ΔLM^ATT_N = LM^ATT_N - ResBlock^FC_{N-1}, ΔLM^FC_N = LM^FC_N - ResBlock^ATT_N,
    ΔBlockMem_N = ResBlock^FC_N - ResBlock^FC_{N-1}.

    ``specs`` are the layers' :class:`~memlens.models.layers.LayerSpec`; a block's four layers are
    found by kind (attention, resblock_attn, mlp, block), so memlens's own ViTs and timm's (whose
    residual stream after attention is the input of ``norm2``) give the same table.
    """
    by_block: dict[int, dict[str, str]] = {}
    for s in specs:
        if s.kind in ("attention", "resblock_attn", "mlp", "block"):
            by_block.setdefault(s.block, {})[s.kind] = s.name
    rows = []
    prev_block = None
    for i in sorted(by_block):
        names = by_block[i]
        if len(names) < 4:
            continue
        att, res_att = values[names["attention"]], values[names["resblock_attn"]]
        fc, res_fc = values[names["mlp"]], values[names["block"]]
        rows.append(ViTBlockRow(block=i + 1, attention=att,
                                delta_attention=None if prev_block is None else att - prev_block,
                                resblock_attention=res_att, mlp=fc, delta_mlp=fc - res_att, resblock_mlp=res_fc,
                                delta_block=None if prev_block is None else res_fc - prev_block,
                                layer=names["block"]))
        prev_block = res_fc
    return rows
