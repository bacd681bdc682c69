"""Cost of DP-SGD relative to non-private training of the same model and batch.

Usage: python benchmarks/dp_overhead.py [--rounds 15] [--batch 64]

For the demo ViT (vit_micro MAE on 8x8 images, the demo's recipe) and the papers' ViT-Tiny MAE
(32x32), one optimisation step (forward, backward, per-sample clipping and noise, AdamW update)
is timed on pre-augmented batches, for three copies of the same model in one process:
non-private, DP-SGD with memlens's ghost-bk engine, and DP-SGD with Opacus's own per-sample
gradients (hook mode, for reference). Steps of the three alternate round by round, so machine
load affects all alike; the median per mode is reported. Peak memory of one step is the
high-water mark of live tensor bytes from PyTorch's allocation events (``torch.profiler`` with
``profile_memory``): the step's own tensors, independent of the process's resident size.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

SETUPS = {
    "demo ViT (vit_micro, 8 px)": {"arch": "vit_micro", "size": 8, "chans": 1,
                                   "mae": {"mask_ratio": 0.5, "decoder_dim": 48, "decoder_depth": 1,
                                           "decoder_heads": 2}},
    "vit_tiny (32 px)": {"arch": "vit_tiny", "size": 32, "chans": 3, "mae": {}},
}
MODES = ("non-private", "ghost-bk", "opacus-hooks")


def make_step(setup: dict, mode: str, batch: int):
    from opacus.grad_sample import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from memlens.config import TrainConfig
    from memlens.data import Augmenter
    from memlens.dp.engine import GhostClipper
    from memlens.dp.optimizer import FusedDPOptimizer
    from memlens.dp.trainer import _register_opacus_samplers
    from memlens.models import build_encoder
    from memlens.train.loop import make_optimizer
    from memlens.train.objectives import build_objective

    torch.manual_seed(0)
    cfg = TrainConfig.model_validate({"framework": "mae", "model": {"arch": setup["arch"]}, "mae": setup["mae"],
                                      "batch_size": batch})
    enc = build_encoder(setup["arch"], image_size=setup["size"], in_chans=setup["chans"])
    aug = Augmenter("mae", mean=[0.5] * setup["chans"], std=[0.25] * setup["chans"])
    obj = build_objective(cfg, enc, aug, in_chans=setup["chans"], num_classes=None).train()
    opt = make_optimizer(cfg, obj)
    g = torch.Generator().manual_seed(0)
    kw = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch, loss_reduction="mean",
              generator=torch.Generator().manual_seed(1))
    if mode == "non-private":
        def step(x):
            loss = obj.losses_on_views(x, g).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    elif mode == "ghost-bk":
        clipper = GhostClipper(obj)
        dpo = FusedDPOptimizer(opt, **kw)

        def step(x):
            dpo.zero_grad(set_to_none=True)
            with clipper.capture():
                obj.losses_on_views(x, g).sum().backward()
            clipper.accumulate_clipped(max_grad_norm=1.0)
            dpo.step()
    else:
        _register_opacus_samplers()
        GradSampleModule(obj, batch_first=True, loss_reduction="sum", strict=False)
        dpo = DPOptimizer(opt, **kw)

        def step(x):
            dpo.zero_grad(set_to_none=True)
            obj.losses_on_views(x, g).sum().backward()
            dpo.step()
    return step, aug


def peak_bytes(step, x) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(x)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    print(f"batch {args.batch}; median over {args.rounds} alternating rounds after 3 warm-up steps; "
          f"{torch.get_num_threads()} threads")
    print(f"{'model':<30}{'mode':<14}{'ms/step':>10}{'peak MB':>10}{'time x':>9}{'memory x':>10}")
    for name, setup in SETUPS.items():
        steps = {m: make_step(setup, m, args.batch) for m in MODES}
        aug = steps["non-private"][1]
        imgs = torch.randint(0, 255, (args.batch, setup["size"], setup["size"], setup["chans"]), dtype=torch.uint8)
        views = [aug(imgs, torch.Generator().manual_seed(k)) for k in range(4)]
        times: dict[str, list[float]] = {m: [] for m in MODES}
        for m in MODES:
            for k in range(3):
                steps[m][0](views[k])
        for r in range(args.rounds):
            for m in MODES:
                t0 = time.perf_counter()
                steps[m][0](views[r % 4])
                times[m].append(time.perf_counter() - t0)
        mem = {m: peak_bytes(steps[m][0], views[0]) for m in MODES}
        base_t, base_m = statistics.median(times["non-private"]), mem["non-private"]
        for m in MODES:
            t = statistics.median(times[m])
            print(f"{name:<30}{m:<14}{1000 * t:>10.1f}{mem[m] / 2**20:>10.1f}{t / base_t:>9.2f}"
                  f"{mem[m] / base_m:>10.2f}")


if __name__ == "__main__":
    main()
