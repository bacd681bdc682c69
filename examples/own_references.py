"""References trained by your own code: the K-reference design followed by a plain PyTorch loop.

    python examples/own_references.py images --out DIR       # digits as 32 px PNGs in class folders
    python examples/own_references.py train --design DIR/design --images DIR/images --out DIR/weights

``images`` writes ``images/<class>/<n>.png`` from scikit-learn's digits (no download): the kind of
image folder a team has. ``train`` is the team's own training code, nothing of memlens: for every
``ref-NN.txt`` that ``memlens design`` wrote it trains a small timm ViT on exactly the images
listed there (a supervised loop, a few epochs; references 2j and 2j+1 with one seed, as the design
asks), and a release candidate on every image of the design's training subsets; it saves each
encoder as ``ref-NN.safetensors`` and ``release.safetensors``. The README's "References from your
own trainer" section audits them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from sklearn.datasets import load_digits

VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 0}


def make_images(out: Path, n: int = 700) -> None:
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.images))[:n]
    for k in order:
        img = Image.fromarray(np.rint(digits.images[k] * 255 / 16).astype(np.uint8)).resize((32, 32)).convert("RGB")
        path = out / "images" / str(digits.target[k]) / f"{k:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
    print(f"wrote {n} images to {out / 'images'}")


def load_list(images: Path, ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The listed images (ids are paths relative to the image folder; the class is the folder name)."""
    x = np.stack([np.asarray(Image.open(images / i).convert("RGB")) for i in ids])
    y = torch.tensor([int(Path(i).parent.name) for i in ids])
    return torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5), y


def train_one(x: torch.Tensor, y: torch.Tensor, *, seed: int, epochs: int) -> dict[str, torch.Tensor]:
    """A plain supervised loop on the encoder's pooled features; returns the encoder's weights."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", **VIT)
    head = torch.nn.Linear(model.num_features, 10)
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=2e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(64):
            feats = model.forward_head(model.forward_features(x[batch]), pre_logits=True)
            loss = F.cross_entropy(head(feats), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def train_all(design_dir: Path, images: Path, out: Path, epochs: int) -> None:
    design = json.loads((design_dir / "design.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    every: set[str] = set()
    for ref in design["references"]:
        ids = (design_dir / ref["images"]).read_text().split()
        every |= set(ids)
        x, y = load_list(images, ids)
        seed = ref["index"] // 2  # the two references of a pair share a seed
        save_file(train_one(x, y, seed=seed, epochs=epochs), str(out / f"ref-{ref['index']:02d}.safetensors"))
        print(f"trained reference {ref['index']} on {len(ids)} images (seed {seed})")
    x, y = load_list(images, sorted(every))  # the release candidate: every training image of the design
    save_file(train_one(x, y, seed=100, epochs=epochs), str(out / "release.safetensors"))
    print(f"trained the release candidate on {len(every)} images; weights in {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("images")
    a.add_argument("--out", type=Path, required=True)
    b = sub.add_parser("train")
    b.add_argument("--design", type=Path, required=True)
    b.add_argument("--images", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--epochs", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.what == "images":
        make_images(args.out)
    else:
        train_all(args.design, args.images, args.out, args.epochs)


if __name__ == "__main__":
    main()
