"""Training throughput (images/s) of each framework on this machine.

Usage: python benchmarks/train_throughput.py [--epochs 2] [--out DIR]

Trains each objective for a couple of epochs with its default augmentation and reports the
mean images/s of the timed epochs (the first epoch is a warm-up and is not counted), on
scikit-learn digits (8x8, the demo's data) and on 32x32 synthetic images (CIFAR-sized).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from memlens.config import TrainConfig
from memlens.train import train_loop

SETUPS = [
    # (data, arch)
    ({"source": "digits"}, "vit_micro"),
    ({"source": "synthetic", "synthetic": {"n": 2048, "image_size": 32, "channels": 3}}, "vit_mini"),
    ({"source": "synthetic", "synthetic": {"n": 2048, "image_size": 32, "channels": 3}}, "resnet9"),
]
FRAMEWORKS = ["mae", "simclr", "simsiam", "dino", "supervised"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="memlens-bench-"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; epochs {args.epochs} "
          f"(first is warm-up), batch {args.batch_size}")
    print(f"{'data':<22}{'arch':<11}" + "".join(f"{fw:>12}" for fw in FRAMEWORKS) + "   (images/s)")
    for data, arch in SETUPS:
        row = []
        for fw in FRAMEWORKS:
            if fw == "mae" and not arch.startswith("vit"):
                row.append("-")
                continue
            cfg = TrainConfig.model_validate({"framework": fw, "data": data, "subsets": "all", "epochs": args.epochs,
                                              "batch_size": args.batch_size, "model": {"arch": arch}})
            t0 = time.perf_counter()
            rec = train_loop(cfg, out / f"{data['source']}-{arch}-{fw}", force=True).record
            rates = [h["images_per_s"] for h in rec.history[1:]] or [rec.history[0]["images_per_s"]]
            row.append(f"{sum(rates) / len(rates):,.0f}")
            del t0
        name = data["source"] + (f" {data['synthetic']['image_size']}px" if "synthetic" in data else " 8px")
        print(f"{name:<22}{arch:<11}" + "".join(f"{v:>12}" for v in row))


if __name__ == "__main__":
    main()
