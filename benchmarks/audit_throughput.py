"""Audit cost relative to the bare forward passes it needs, and its memory as points grow.

Usage: python benchmarks/audit_throughput.py [--quick]

For the demo encoders (MAE vit_micro on 8x8 digits) and for ViT-Tiny and ResNet9 on 32x32
images, it trains a pair f/g for one epoch (the cost of an audit does not depend on how well
the encoders are trained), then:

* times ``run_audit`` (everything: loading, augmentation, hooks, metrics, statistics);
* times the bare forward passes the audit needs: the same view batches (augmented beforehand,
  not timed), through every encoder, with no hooks, plus the Top/Least pass of f[0];
* prints audit time / bare forward time (target: at most 1.3), medians over alternating rounds
  (this machine's speed drifts by tens of percent between minutes; alternating cancels that).

Peak memory: the high-water mark of live tensor bytes during ``run_audit`` (PyTorch allocation
events), with D' = the scored S_S points, for N and 4N points: UnitMem's accumulators are
O(units), so only the per-point score arrays (a few floats per point) grow.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from memlens.audit import run_audit
from memlens.config import AuditConfig, DataConfig, SplitConfig, SplitSizes, TrainConfig
from memlens.data import Augmenter, load, make_splits
from memlens.train import load_encoder, train
from memlens.train.loop import derive_seed


def make_pair(root: Path, data: DataConfig, sizes: dict, recipe: dict) -> tuple[AuditConfig, object]:
    ds = load(data)
    make_splits(ds, SplitConfig(sizes=SplitSizes(**sizes))).save(root / "splits.json")
    for side in ("f", "g"):
        cfg = TrainConfig.model_validate({**recipe, "data": data.model_dump(), "splits": str(root / "splits.json"),
                                          "subsets": side, "epochs": 1})
        train(cfg, root / side, force=True, dataset=ds)
    return AuditConfig(f=[str(root / "f")], g=[str(root / "g")], splits=str(root / "splits.json")), ds


def bare_forward_seconds(cfg: AuditConfig, ds, result) -> float:
    """The forward passes the audit made, on the same batches, without hooks."""
    f, g = load_encoder(cfg.f[0]), load_encoder(cfg.g[0])
    aug = Augmenter(f.record.config.augmentation, mean=f.normalization[0], std=f.normalization[1])
    rows = ds.indices(result.points["id"].tolist())
    images = torch.from_numpy(ds.images)
    n_views, batch = 2 * cfg.pairs, cfg.batch_points
    batches = [aug.views(images[torch.from_numpy(rows[b * batch:(b + 1) * batch])], n_views,
                         torch.Generator().manual_seed(derive_seed(cfg.seed, "views", b)))
               for b in range(math.ceil(len(rows) / batch))]
    k = result.summary.units["top_least_k"]
    extra = [aug.views(images[torch.from_numpy(rows[:k])], cfg.unitmem.views, None) for _ in range(2)]
    with torch.inference_mode():
        f.representation(batches[0])  # warm-up, as the audit's first batch also pays it
        t0 = time.perf_counter()
        for v in batches:
            f.representation(v)
            g.representation(v)
        for v in extra:
            f.forward_features(v)
        return time.perf_counter() - t0


def peak_mb(fn) -> float:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the demo encoders")
    ap.add_argument("--rounds", type=int, default=3, help="alternating audit / bare-forward measurements")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    root = Path(tempfile.mkdtemp(prefix="memlens-audit-bench-"))
    mae_micro = {"framework": "mae", "model": {"arch": "vit_micro"}, "batch_size": 128,
                 "mae": {"mask_ratio": 0.5, "decoder_dim": 48}}
    setups = [("demo ViT (vit_micro, digits 8 px)", DataConfig(source="digits"),
               {"S_S": 1307, "S_C": 163, "S_I": 163, "S_E": 163}, mae_micro, {})]
    if not args.quick:
        cifarish = DataConfig(source="synthetic", synthetic={"n": 1600, "image_size": 32, "channels": 3})
        sizes = {"S_S": 1200, "S_C": 150, "S_I": 150, "S_E": 100}
        setups += [("vit_tiny (32 px)", cifarish, sizes, {"framework": "mae", "model": {"arch": "vit_tiny"},
                                                          "batch_size": 128}, {"max_per_subset": 100}),
                   ("resnet9 (32 px)", cifarish, sizes, {"framework": "simclr", "model": {"arch": "resnet9"},
                                                         "batch_size": 128}, {"max_per_subset": 150})]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; K = 5 pairs (10 views) per point")
    print(f"{'encoders':<36}{'points':>7}{'audit s':>9}{'bare fwd s':>11}{'ratio':>7}")
    for k, (name, data, sizes, recipe, extra) in enumerate(setups):
        cfg, ds = make_pair(root / str(k), data, sizes, recipe)
        cfg = cfg.model_copy(update=extra)
        result = run_audit(cfg, dataset=ds)  # warm caches (first-call costs are not the audit's)
        audits, bares = [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            result = run_audit(cfg, dataset=ds)
            audits.append(time.perf_counter() - t0)
            bares.append(bare_forward_seconds(cfg, ds, result))
        audit_s, bare = statistics.median(audits), statistics.median(bares)
        print(f"{name:<36}{len(result.points):>7}{audit_s:>9.2f}{bare:>11.2f}{audit_s / bare:>7.2f}")
        if k == 0:
            mems = []
            for n in (300, 1200):
                c = AuditConfig.model_validate({**cfg.model_dump(), "subsets": ["S_C", "S_S"], "max_per_subset": n,
                                                "unitmem": {"subsets": ["S_S"]}})
                mems.append(peak_mb(lambda c=c, ds=ds: run_audit(c, dataset=ds)))
            print(f"  peak memory, D' = 300 S_S points: {mems[0]:.1f} MB; 1,200 points (4x): {mems[1]:.1f} MB "
                  f"(ratio {mems[1] / mems[0]:.2f})")


if __name__ == "__main__":
    main()
