"""Make an "encoder of your own" to try memlens on: images, membership lists and two timm ViTs.

    python examples/own_encoder.py --out example/

Writes, from scikit-learn's digits (no download): ``images/*.png`` (32x32 RGB), ``f_images.txt``
and ``g_images.txt`` (what each encoder trained on: shared images plus 100 of its own),
``heldout.txt`` (100 images neither saw), and ``f.safetensors`` / ``g.safetensors``: a small timm
ViT trained on each list with a plain PyTorch loop (supervised, a few epochs) - the kind of
encoder memlens did not train. The README's "Audit your own encoder" section runs on them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_digits

VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=8)
    args = ap.parse_args()
    out = args.out
    (out / "images").mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    digits = load_digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(digits.images))[:700]
    paths, pixels = [], []
    for k in order:
        img = Image.fromarray(np.rint(digits.images[k] * 255 / 16).astype(np.uint8)).resize((32, 32)).convert("RGB")
        p = f"images/{k:04d}.png"
        img.save(out / p)
        paths.append(p)
        pixels.append(np.asarray(img))
    shared, own_f, own_g, held = paths[:400], paths[400:500], paths[500:600], paths[600:700]
    (out / "f_images.txt").write_text("\n".join(shared + own_f) + "\n")
    (out / "g_images.txt").write_text("\n".join(shared + own_g) + "\n")
    (out / "heldout.txt").write_text("\n".join(held) + "\n")
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)
    y = torch.from_numpy(digits.target[order]).long()
    index = {p: i for i, p in enumerate(paths)}
    for side, members in (("f", shared + own_f), ("g", shared + own_g)):
        torch.manual_seed(0)
        model = timm.create_model("vit_tiny_patch16_224", **VIT)
        head = torch.nn.Linear(model.num_features, 10)
        opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=2e-3)
        rows = torch.tensor([index[p] for p in members])
        for _ in range(args.epochs):
            for batch in rows[torch.randperm(len(rows))].split(64):
                loss = F.cross_entropy(head(model.forward_head(model.forward_features(x[batch]), pre_logits=True)),
                                       y[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"{side}.safetensors"))
    print(f"wrote {out}: 700 images, f/g membership lists, f.safetensors and g.safetensors")


if __name__ == "__main__":
    main()
