"""Audit cost relative to the bare forward passes it needs, throughput and peak memory.

Usage:
    python benchmarks/audit_throughput.py [--quick]
    python benchmarks/audit_throughput.py --model timm:vit_small_patch16_224 --image-size 224 \\
        [--points 200] [--views 10] [--device cuda]

Default: memlens's demo encoders (MAE vit_micro on 8x8 digits) and, at 32 px, ViT-Tiny and
ResNet9 (f/g pairs trained for one epoch: an audit's cost does not depend on how well the
encoders are trained). With ``--model``: two random-initialised copies of any timm model,
saved to safetensors and audited as ``timm:`` specs (nothing is downloaded), on synthetic images
of ``--image-size``.

For each setup, rounds alternate (the machine's speed drifts; alternating cancels that):

* ``run_audit`` end to end (loading, augmentation, hooks, all-pairs alignment, units,
  reliability, statistics);
* the bare forward passes the audit needs: the same views (drawn beforehand, not timed) through
  every encoder's representation with no hooks, plus the Top/Least pass of f ("bare s");
* and with the calibration's passes added ("all s"): the units encoder on the images of the units'
  permutation null, and every encoder's training loss under the audit's MAE mask draws.

It prints audit time / bare forward time (target: at most 1.15 on large models), the same over all
the forward passes, the audit's images/s, and peak memory (CPU: the high-water mark of live tensor bytes from PyTorch's
allocation events; CUDA: ``max_memory_allocated``). Runs unchanged on CUDA.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from memlens.audit import run_audit
from memlens.audit.encoders import resolve
from memlens.config import AuditConfig, DataConfig, SplitConfig, SplitSizes, TrainConfig
from memlens.data import Augmenter, load, make_splits
from memlens.dp.training import train_encoder
from memlens.rng import RowStreams, derive_seed
from memlens.train.run import load_objective


def run_pair(root: Path, data: DataConfig, sizes: dict, recipe: dict) -> tuple[dict, object]:
    ds = load(data)
    make_splits(ds, SplitConfig(sizes=SplitSizes(**sizes))).save(root / "splits.json")
    for side in ("f", "g"):
        cfg = TrainConfig.model_validate({**recipe, "data": data.model_dump(), "splits": str(root / "splits.json"),
                                          "subsets": side, "epochs": 1})
        train_encoder(cfg, root / side, force=True, dataset=ds)
    return {"f": [str(root / "f")], "g": [str(root / "g")], "splits": str(root / "splits.json")}, ds


def timm_pair(root: Path, model: str, size: int, points: int) -> tuple[dict, object]:
    from safetensors.torch import save_file

    from memlens.models.external import timm_model

    quarter = max(8, points // 4)
    data = DataConfig(source="synthetic", synthetic={"n": 3 * quarter + 16, "n_test": quarter, "image_size": size,
                                                      "channels": 3})
    ds = load(data)
    make_splits(ds, SplitConfig(sizes=SplitSizes(S_S=quarter, S_C=quarter, S_I=quarter, S_E=quarter))).save(
        root / "splits.json")
    specs = {}
    for k, side in enumerate(("f", "g")):
        torch.manual_seed(k)
        m = timm_model(model[5:], {"num_classes": 0})
        save_file({n: t.contiguous() for n, t in m.state_dict().items()}, str(root / f"{side}.safetensors"))
        specs[side] = [{"model": model, "weights": str(root / f"{side}.safetensors"), "kwargs": {"num_classes": 0},
                        "input_size": size}]
    return {**specs, "splits": str(root / "splits.json"), "data": data.model_dump()}, ds


def bare_forward_seconds(cfg: AuditConfig, ds, result, device: torch.device) -> float:
    """The forward passes the audit made, on the same views, without hooks."""
    f, g = (resolve(s, default_rep=cfg.representation, device=device) for s in (cfg.f[0], cfg.g[0]))
    aug_name = cfg.augment or (f.record.config.augmentation if f.record is not None else "mae")
    aug = Augmenter(aug_name, size=f.input_size)
    ids = result.points["id"].tolist()
    v = int(result.summary.views["count"])
    images = torch.from_numpy(ds.images[ds.indices(ids)]).to(device)

    def views_of(sel: list[int], n_views: int):
        keys = [derive_seed(cfg.seed, "view", aug_name, ids[p], j) for p in sel for j in range(n_views)]
        return aug.views(images[sel], n_views, RowStreams(keys, device))

    b = cfg.batch_points
    batches = [views_of(list(range(k, min(len(ids), k + b))), v) for k in range(0, len(ids), b)]
    k_top = int(result.summary.units["top_least_k"])
    cand = [i for i, s in enumerate(result.points["subset"]) if s == "S_C"]
    extra = [views_of(cand[k:k + b], v) for k in range(0, 2 * k_top, b)] if k_top >= 2 else []
    # the calibration's passes: the units encoder on the units null's images, each encoder's training
    # loss under the audit's mask draws (MAE) on the un-augmented images
    null = result.summary.units.null
    null_batches = [views_of(list(range(k, min(null.members + null.non_members, k + b))), v)
                    for k in range(0, null.members + null.non_members, b)] if null is not None else []
    losses = []
    if result.summary.loss_memorization is not None and f.record is not None:
        objectives = [load_objective(e.info["path"]).to(device) for e in (f, g)]
        draws = cfg.privacy.mae_masks
        for k in range(0, len(ids), b):  # each batch's un-augmented-sized inputs, the audit's mask draws
            sel = list(range(k, min(len(ids), k + b)))
            x = views_of(sel, 1)
            for r in range(draws):
                keys = [derive_seed(cfg.seed, "mae-mask", ids[p], r) for p in sel]
                losses += [(obj, enc, x, RowStreams(keys, device).rand(obj.encoder.num_patches))
                           for obj, enc in zip(objectives, (f, g), strict=True)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        f.represent(f.prepare(batches[0]))  # warm-up, as the audit's first batch also pays it
        sync()
        t0 = time.perf_counter()
        for x in batches:
            f.represent(f.prepare(x))
            g.represent(g.prepare(x))
        for x in extra:
            f.represent(f.prepare(x))
        sync()
        representation = time.perf_counter() - t0
        t0 = time.perf_counter()
        for x in null_batches:
            f.represent(f.prepare(x))
        for obj, enc, x, noise in losses:
            obj.losses_on_views(enc.prepare(x), None, noise)
        sync()
        return representation, time.perf_counter() - t0


def peak_mb(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        return torch.cuda.max_memory_allocated(device) / 2**20
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
    ap.add_argument("--model", help="a timm model name, e.g. timm:vit_small_patch16_224 (random init)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--points", type=int, default=200, help="scored points with --model (4 equal subsets)")
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--batch-points", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rounds", type=int, default=3, help="alternating audit / bare-forward measurements")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    from memlens.device import resolve_device

    device = resolve_device(args.device)
    root = Path(tempfile.mkdtemp(prefix="memlens-audit-bench-"))
    common = {"views": args.views, "batch_points": args.batch_points, "device": str(device),
              "reliability": {"bootstrap": 50}}
    setups = []
    if args.model:
        setups.append((f"{args.model} ({args.image_size} px, random init)",
                       lambda r: timm_pair(r, args.model, args.image_size, args.points), {}))
    else:
        mae_micro = {"framework": "mae", "model": {"arch": "vit_micro"}, "batch_size": 128,
                     "mae": {"mask_ratio": 0.5, "decoder_dim": 48}}
        setups.append(("demo ViT (vit_micro, digits 8 px)",
                       lambda r: run_pair(r, DataConfig(source="digits"),
                                          {"S_S": 1307, "S_C": 163, "S_I": 163, "S_E": 163}, mae_micro), {}))
        if not args.quick:
            cifarish = DataConfig(source="synthetic", synthetic={"n": 1600, "image_size": 32, "channels": 3})
            sizes = {"S_S": 1200, "S_C": 150, "S_I": 150, "S_E": 100}
            setups += [("vit_tiny (32 px)", lambda r: run_pair(r, cifarish, sizes, {
                "framework": "mae", "model": {"arch": "vit_tiny"}, "batch_size": 128}), {"max_per_subset": 100}),
                ("resnet9 (32 px)", lambda r: run_pair(r, cifarish, sizes, {
                    "framework": "simclr", "model": {"arch": "resnet9"}, "batch_size": 128}),
                 {"max_per_subset": 150})]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}; {args.views} views per point, "
          f"all pairs")
    print(f"{'encoders':<48}{'points':>7}{'audit s':>9}{'bare s':>8}{'ratio':>7}{'all s':>7}{'ratio':>7}{'img/s':>8}"
          f"{'peak MB':>9}")
    for k, (name, make, extra) in enumerate(setups):
        (root / str(k)).mkdir()
        base, ds = make(root / str(k))
        cfg = AuditConfig.model_validate({**base, **common, **extra})
        result = run_audit(cfg, dataset=ds)  # warm caches (first-call costs are not the audit's)
        audits, bares = [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            result = run_audit(cfg, dataset=ds)
            if device.type == "cuda":
                torch.cuda.synchronize()
            audits.append(time.perf_counter() - t0)
            bares.append(bare_forward_seconds(cfg, ds, result, device))
        audit_s = statistics.median(audits)
        bare = statistics.median(r for r, _ in bares)
        every = statistics.median(r + c for r, c in bares)
        rate = result.summary.timings["images_forwarded"] / audit_s
        mem = peak_mb(lambda cfg=cfg, ds=ds: run_audit(cfg, dataset=ds), device)
        print(f"{name:<48}{len(result.points):>7}{audit_s:>9.2f}{bare:>8.2f}{audit_s / bare:>7.2f}{every:>7.2f}"
              f"{audit_s / every:>7.2f}{rate:>8.0f}{mem:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
