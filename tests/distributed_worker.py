"""Worker for the multi-process tests, run by torchrun (Gloo on the CPU):

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py CASE[,CASE] OUT_DIR

Every case also runs in a single process (plain ``python tests/distributed_worker.py ...``) so the
test can compare the two. Process 0 writes its results to OUT_DIR as safetensors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

torch.set_num_threads(1)


def _objective(seed: int = 0):
    from memlens.config import TrainConfig
    from memlens.data import Augmenter
    from memlens.models import build_encoder
    from memlens.train.objectives import build_objective

    torch.manual_seed(seed)
    enc = build_encoder("vit_micro", image_size=8, in_chans=1, depth=2, embed_dim=32)
    # a fixed noise multiplier: no calibration to wait for (the noise is switched off below anyway)
    cfg = TrainConfig.model_validate({"framework": "mae", "mae": {"decoder_dim": 32, "mask_ratio": 0.5},
                                      "batch_size": 24, "epochs": 1,
                                      "dp": {"epsilon": 50.0, "delta": 1e-4, "noise_multiplier": 1.0}})
    return cfg, build_objective(cfg, enc, Augmenter("mae", mean=[0.3], std=[0.3]), in_chans=1, num_classes=None)


def clipped_sum(out: Path) -> None:
    """One DP step with the noise switched off: the released gradient is the clipped sum / (qN)."""
    from memlens.data import load
    from memlens.dp.step import DPStep
    from memlens.train.loop import make_optimizer, prepare
    from memlens.train.step import Batch

    cfg, obj = _objective()
    prepared = prepare(cfg.model_copy(update={"subsets": "all"}), dataset=load())
    step = DPStep(cfg, obj.train(), make_optimizer(cfg, obj), prepared, torch.device("cpu"))
    step.dp_optimizer.noise_multiplier = 0.0
    step.physical = 5  # several physical batches per process
    rows = prepared.rows[np.arange(0, 23 * 7, 7)]  # 23 examples: the two shares differ in size
    step.apply(Batch(rows, 0), epoch=0, step=0)
    if dist.get_rank() == 0 if dist.is_initialized() else True:
        save_file({name: p.grad.contiguous() for name, p in obj.named_parameters() if p.grad is not None},
                  str(out / "grads.safetensors"))


def noise(out: Path) -> None:
    """The noise of many DP steps on a gradient that is zero on every process."""
    from memlens.dp.optimizer import FusedDPOptimizer

    p = torch.nn.Parameter(torch.zeros(4000))
    opt = FusedDPOptimizer(torch.optim.SGD([p], lr=0.0), noise_multiplier=1.5, max_grad_norm=2.0,
                           expected_batch_size=1, loss_reduction="mean", generator=torch.Generator().manual_seed(3))
    draws = []
    for _ in range(10):
        opt.zero_grad(set_to_none=True)
        p.grad = torch.zeros_like(p)
        opt.step()
        draws.append(p.grad.clone())
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_file({"noise": torch.stack(draws)}, str(out / "noise.safetensors"))


def secret(out: Path) -> None:
    """Secret DP randomness under torchrun: process 0's key reaches every process, so all draw the
    same Poisson batches (a process with its own key would train on other batches)."""
    from memlens.data import load
    from memlens.dp.step import DPStep
    from memlens.train.loop import make_optimizer, prepare

    cfg, obj = _objective()
    cfg = cfg.model_copy(update={"dp": cfg.dp.model_copy(update={"reproducible": False})})
    prepared = prepare(cfg.model_copy(update={"subsets": "all"}), dataset=load())
    step = DPStep(cfg, obj.train(), make_optimizer(cfg, obj), prepared, torch.device("cpu"))
    rows = [b.rows.tolist() for b in list(step.plan_batches(0))[:3]]
    everyone = [None] * dist.get_world_size() if dist.is_initialized() else [rows]
    if dist.is_initialized():
        dist.all_gather_object(everyone, rows)
    if not dist.is_initialized() or dist.get_rank() == 0:
        (out / "secret.txt").write_text("same" if all(r == everyone[0] for r in everyone) else "differ")


CASES = {"clipped_sum": clipped_sum, "noise": noise, "secret": secret}

if __name__ == "__main__":
    case, out_dir = sys.argv[1], Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    if "WORLD_SIZE" in __import__("os").environ and int(__import__("os").environ["WORLD_SIZE"]) > 1:
        dist.init_process_group("gloo")
    try:
        for name in case.split(","):
            CASES[name](out_dir)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
