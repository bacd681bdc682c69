"""Encoders (timm ViTs, ResNet9, ResNet18) and the layers/units they expose to audits."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from memlens.errors import MemlensError
from memlens.models.layers import LayerSpec
from memlens.models.resnet import ResNet9, ResNet18
from memlens.models.vit import ViTEncoder, check_patch, default_patch, timm_encoder

VIT_PRESETS: dict[str, dict[str, Any]] = {
    # The papers' ViT-Tiny (patch 4 at 32x32 px).
    "vit_tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3, "mlp_ratio": 4.0},
    # CPU-sized: the demo and the CIFAR fidelity benchmark.
    "vit_mini": {"embed_dim": 96, "depth": 6, "num_heads": 3, "mlp_ratio": 4.0},
    # Tests.
    "vit_micro": {"embed_dim": 48, "depth": 3, "num_heads": 2, "mlp_ratio": 2.0},
}
CONV_ARCHS = {"resnet9": ResNet9, "resnet18": ResNet18}
ARCHS = tuple(VIT_PRESETS) + tuple(CONV_ARCHS)


def build_encoder(arch: str, *, image_size: int, in_chans: int, patch_size: int | None = None,
                  embed_dim: int | None = None, depth: int | None = None, num_heads: int | None = None,
                  mlp_ratio: float | None = None) -> nn.Module:
    """Build an encoder by architecture name (see :data:`ARCHS`).

    ViT overrides (patch_size, embed_dim, depth, num_heads, mlp_ratio) replace the preset's values;
    they are refused for ResNets.
    """
    if arch.startswith("timm:"):

        model = timm_encoder(arch[5:], image_size=image_size, in_chans=in_chans, patch_size=patch_size,
                             embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio)
        if getattr(model, "family", "") == "vit":
            check_patch(image_size, model.patch_size)
        return model
    if arch in VIT_PRESETS:
        p = dict(VIT_PRESETS[arch])
        for key, value in (("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads),
                           ("mlp_ratio", mlp_ratio)):
            if value is not None:
                p[key] = value
        if p["embed_dim"] % p["num_heads"]:
            raise MemlensError(f"embed_dim {p['embed_dim']} is not divisible by num_heads {p['num_heads']}")
        patch = patch_size or default_patch(image_size)
        check_patch(image_size, patch)
        return ViTEncoder(img_size=image_size, patch_size=patch, in_chans=in_chans, **p)
    if arch in CONV_ARCHS:
        if any(v is not None for v in (patch_size, embed_dim, depth, num_heads, mlp_ratio)):
            raise MemlensError(f"{arch} takes no patch_size/embed_dim/depth/num_heads/mlp_ratio settings")
        return CONV_ARCHS[arch](in_chans=in_chans, img_size=image_size)
    raise MemlensError(f"unknown architecture '{arch}'; valid: {', '.join(ARCHS)}, or timm:<vit name>")


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["ARCHS", "LayerSpec", "ResNet9", "ResNet18", "ViTEncoder", "build_encoder", "parameter_count"]
