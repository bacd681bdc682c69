"""Cost of DP-SGD relative to non-private training of the same model and batch.

Usage: python benchmarks/dp_overhead.py [--rounds 12] [--quick] [--threads 1]

One MAE optimisation step (forward, backward, per-example clipping and noise, AdamW update) on
pre-augmented batches, for four copies of the same model in one process:

* ``non-private``: plain backward pass;
* ``ghost-bk``: memlens's one-pass book-keeping ghost engine (:mod:`memlens.dp.ghost_clipping`);
* ``opacus-ghost``: Opacus's ghost clipping (``grad_sample_mode="ghost"``: norms during a first
  backward pass, the clipped gradient from a second);
* ``opacus-hooks``: Opacus's per-sample gradients (hook mode).

Models: the demo ViT (vit_micro, 8 px) and timm's ``vit_tiny_patch16_224`` at 32 px (patch 4, as
the papers' ViT-Tiny) and at 224 px (patch 16). Opacus cannot compute per-sample gradients of
parameters a module holds directly (timm's ``cls_token`` and ``pos_embed``); for the timm rows
its two modes run on memlens's layout of the same network (token parameters in leaf modules,
same shapes and FLOPs).

The variants alternate step by step (round r runs one step of each, in rotating order), so the
machine's drifting load affects all alike; medians are reported. Run single-threaded (default)
for stable ratios on a shared machine. Peak memory of one step is the high-water mark of live
tensor bytes from PyTorch's allocation events (``torch.profiler`` with ``profile_memory``).
The same script runs unchanged on CUDA (``--device cuda``); memory is then CUDA's peak.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

SETUPS = {
    "demo ViT (vit_micro, 8 px)": {"arch": "vit_micro", "size": 8, "chans": 1, "batch": 64,
                                   "mae": {"mask_ratio": 0.5, "decoder_dim": 48, "decoder_depth": 1,
                                           "decoder_heads": 2}},
    "timm vit_tiny, 32 px, patch 4": {"arch": "timm:vit_tiny_patch16_224", "twin": "vit_tiny", "size": 32,
                                      "chans": 3, "batch": 64, "patch": 4, "mae": {}},
    "timm vit_tiny, 224 px, patch 16": {"arch": "timm:vit_tiny_patch16_224", "twin": "vit_tiny", "size": 224,
                                        "chans": 3, "batch": 16, "patch": 16, "mae": {}},
}
MODES = ("non-private", "ghost-bk", "opacus-ghost", "opacus-hooks")


def make_step(setup: dict, mode: str, device: torch.device):
    from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    from memlens.config import TrainConfig
    from memlens.data import Augmenter
    from memlens.dp.ghost_clipping import GhostClipper
    from memlens.dp.optimizer import FusedDPOptimizer
    from memlens.dp.step import register_opacus_samplers
    from memlens.models import build_encoder
    from memlens.train.loop import make_optimizer
    from memlens.train.objectives import build_objective

    torch.manual_seed(0)
    arch = setup.get("twin", setup["arch"]) if mode.startswith("opacus") else setup["arch"]
    batch = setup["batch"]
    cfg = TrainConfig.model_validate({"framework": "mae", "model": {"arch": arch}, "mae": setup["mae"],
                                      "batch_size": batch})
    enc = build_encoder(arch, image_size=setup["size"], in_chans=setup["chans"], patch_size=setup.get("patch"))
    aug = Augmenter("mae", mean=[0.5] * setup["chans"], std=[0.25] * setup["chans"])
    obj = build_objective(cfg, enc, aug, in_chans=setup["chans"], num_classes=None).train().to(device)
    opt = make_optimizer(cfg, obj)
    noise = torch.rand(batch, enc.num_patches, generator=torch.Generator().manual_seed(0)).to(device)
    kw = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch, loss_reduction="mean",
              generator=torch.Generator(device=device).manual_seed(1))
    if mode == "non-private":
        def step(x):
            loss = obj.losses_on_views(x, None, noise).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    elif mode == "ghost-bk":
        clipper = GhostClipper(obj)
        dpo = FusedDPOptimizer(opt, **kw)

        def step(x):
            dpo.zero_grad(set_to_none=True)
            with clipper.capture(batch_size=len(x)):
                obj.losses_on_views(x, None, noise).sum().backward()
            clipper.accumulate_clipped(max_grad_norm=1.0)
            dpo.step()
    elif mode == "opacus-ghost":
        register_opacus_samplers()
        gsm = GradSampleModuleFastGradientClipping(obj, batch_first=True, loss_reduction="mean", max_grad_norm=1.0,
                                                   use_ghost_clipping=True, strict=False)
        dpo = DPOptimizerFastGradientClipping(opt, **kw)

        def step(x):
            dpo.zero_grad(set_to_none=True)
            DPTensorFastGradientClipping(gsm, dpo, obj.losses_on_views(x, None, noise), "mean").backward()
            dpo.step()
    else:
        register_opacus_samplers()
        GradSampleModule(obj, batch_first=True, loss_reduction="sum", strict=False)
        dpo = DPOptimizer(opt, **kw)

        def step(x):
            dpo.zero_grad(set_to_none=True)
            obj.losses_on_views(x, None, noise).sum().backward()
            dpo.step()
    return step, aug


def peak_bytes(step, x, device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step(x)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
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
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (1: stable ratios on a shared machine)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="skip the 224 px row")
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    modes = args.modes.split(",")
    print(f"median over {args.rounds} rounds (modes alternated step by step) after 2 warm-up steps; "
          f"{torch.get_num_threads()} thread(s); {device}")
    print(f"{'model':<34}{'mode':<14}{'batch':>6}{'ms/step':>10}{'peak MB':>10}{'time x':>8}{'memory x':>10}")
    for name, setup in SETUPS.items():
        if args.quick and setup["size"] > 32:
            continue
        steps = {m: make_step(setup, m, device) for m in modes}
        aug = steps["non-private"][1]
        b, s, c = setup["batch"], setup["size"], setup["chans"]
        imgs = torch.randint(0, 255, (b, s, s, c), dtype=torch.uint8, device=device)
        views = [aug(imgs, torch.Generator().manual_seed(k)) for k in range(3)]
        times: dict[str, list[float]] = {m: [] for m in modes}
        for m in modes:
            for k in range(2):
                steps[m][0](views[k])
        for r in range(args.rounds):
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            for m in order:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                steps[m][0](views[r % 3])
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[m].append(time.perf_counter() - t0)
        mem = {m: peak_bytes(steps[m][0], views[0], device) for m in modes}
        base_t, base_m = statistics.median(times["non-private"]), mem["non-private"]
        for m in modes:
            t = statistics.median(times[m])
            print(f"{name:<34}{m:<14}{b:>6}{1000 * t:>10.1f}{mem[m] / 2**20:>10.1f}{t / base_t:>8.2f}"
                  f"{mem[m] / base_m:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
