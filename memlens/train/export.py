"""``memlens export``: a run's encoder as plain safetensors that the audit reads as ``timm:`` or ``py:``.

memlens's ViT is timm's ``VisionTransformer`` with the class token and position embedding held
in leaf modules (for per-sample gradients) and the position embedding covering the patches only.
timm builds the same network with ``class_token=True, no_embed_class=True``; the export renames
``cls_token.weight`` -> ``cls_token`` and ``pos_embed.weight`` -> ``pos_embed`` and records the
timm name and kwargs that rebuild it. ResNets have no timm twin and are exported for
``py:memlens.models:build_encoder``. The spec printed (and stored in the file's metadata) also
carries the run's input size, mean and std, so an audit of the export sees exactly what an audit
of the run sees.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save

from memlens.errors import MemlensError
from memlens.io import atomic_write_bytes
from memlens.models.vit import ViTEncoder
from memlens.train.run import load_encoder


def export_run(run_dir: str | Path, to: str | Path) -> dict[str, Any]:
    """Write the run's encoder weights to ``to``; return the encoder spec that loads them."""
    enc = load_encoder(run_dir)
    rec = enc.record
    state = {k: v.detach().contiguous().clone() for k, v in enc.state_dict().items()}
    common = {"input_size": rec.data["image_size"], "mean": rec.data["normalize"]["mean"],
              "std": rec.data["normalize"]["std"], "representation": "features"}
    if isinstance(enc, ViTEncoder):
        state["cls_token"] = state.pop("cls_token.weight")
        state["pos_embed"] = state.pop("pos_embed.weight")
        blk = enc.blocks[0]
        kwargs = {"img_size": rec.data["image_size"], "patch_size": enc.patch_size, "in_chans": rec.data["channels"],
                  "embed_dim": enc.embed_dim, "depth": len(enc.blocks), "num_heads": blk.attn.num_heads,
                  "mlp_ratio": blk.mlp.fc1.out_features / enc.embed_dim, "qkv_bias": True, "class_token": True,
                  "no_embed_class": True, "num_classes": 0, "global_pool": ""}
        spec = {"model": "timm:vit_tiny_patch16_224", "weights": str(to), "kwargs": kwargs, **common}
    elif hasattr(enc, "layer_specs") and rec.config.model.arch in ("resnet9", "resnet18"):
        spec = {"model": "py:memlens.models:build_encoder", "weights": str(to),
                "kwargs": {"arch": rec.config.model.arch, "image_size": rec.data["image_size"],
                           "in_chans": rec.data["channels"]}, **common}
    else:  # pragma: no cover - every memlens architecture is handled above
        raise MemlensError(f"cannot export architecture {rec.config.model.arch}")
    atomic_write_bytes(to, save(state, metadata={"memlens_spec": json.dumps(spec), "source_run": str(run_dir)}))
    return spec
