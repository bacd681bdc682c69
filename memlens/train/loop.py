"""One training loop for every objective: cosine schedule with warm-up, AdamW or SGD,
per-epoch checkpoints and exact resume.

Every random draw of epoch ``e`` (shuffling, augmentation, masking, DP sampling and noise)
comes from generators seeded by ``(seed, e)``, so a run resumed from the checkpoint of epoch
``e`` continues with the same draws an uninterrupted run makes, and ends with the same weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from memlens.config import TrainConfig
from memlens.data import Augmenter, Dataset, Splits, load
from memlens.data.splits import side_subsets
from memlens.errors import MemlensError
from memlens.io import prepare_output_dir
from memlens.models import build_encoder, parameter_count
from memlens.rng import derive_seed, generator
from memlens.train.objectives import Objective, build_objective
from memlens.train.run import (
    CHECKPOINT_FILE,
    MODEL_FILE,
    RUN_FILE,
    RunRecord,
    load_checkpoint,
    now,
    read_run,
    save_checkpoint,
    save_weights,
    versions,
    write_run,
)


@dataclass
class Prepared:
    """The data a run trains on, resolved once."""

    dataset: Dataset
    splits: Splits | None
    splits_path: str | None
    subsets: tuple[str, ...]
    rows: np.ndarray
    images: torch.Tensor
    labels: torch.Tensor | None
    mean: list[float]
    std: list[float]


def prepare(config: TrainConfig, *, cache_dir: str | Path | None = None, dataset: Dataset | None = None) -> Prepared:
    dataset = dataset if dataset is not None else load(config.data, cache_dir=cache_dir)
    splits = None
    if config.splits:
        splits = Splits.load(config.splits, dataset)
        subsets = side_subsets(config.subsets)
        if not subsets:
            rows = dataset.part_indices("train")
        else:
            rows = np.sort(dataset.indices(splits.ids(*subsets)))
    else:
        if config.subsets != "all":
            raise MemlensError(f"subsets '{config.subsets}' needs a splits file (set splits: or use subsets: all)")
        subsets = ()
        rows = dataset.part_indices("train")
    if len(rows) < 2:
        raise MemlensError("fewer than two training images selected")
    mean, std = dataset.normalization()
    labels = torch.from_numpy(dataset.labels) if dataset.labels is not None else None
    return Prepared(dataset=dataset, splits=splits, splits_path=config.splits, subsets=subsets, rows=rows,
                    images=torch.from_numpy(dataset.images), labels=labels, mean=mean, std=std)


def lr_at(step: int, *, total: int, warmup: int, base: float, floor: float) -> float:
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(config: TrainConfig, objective: Objective) -> torch.optim.Optimizer:
    params = (objective.trainable_parameters() if hasattr(objective, "trainable_parameters")
              else [p for p in objective.parameters() if p.requires_grad])
    ids = {id(p) for p in params}
    # No weight decay on biases, norms and token embeddings (1-d or (1, T, D) parameters).
    decay, no_decay = [], []
    for name, p in objective.named_parameters():
        if id(p) not in ids:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(("cls_token.weight", "pos_embed.weight", "mask_token.weight"))
         else decay).append(p)
    o = config.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=(0.9, 0.95))
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)


@dataclass
class EpochInfo:
    epoch: int
    epochs: int
    loss: float
    lr: float
    seconds: float
    images_per_s: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    run_dir: Path
    record: RunRecord


class Stepper:
    """Runs the optimisation steps of one epoch (the non-private loop; DP-SGD has its own)."""

    def __init__(self, config: TrainConfig, objective: Objective, optimizer: torch.optim.Optimizer,
                 prepared: Prepared):
        self.config, self.objective, self.optimizer, self.prepared = config, objective, optimizer, prepared
        n = len(prepared.rows)
        self.batch = min(config.batch_size, n)
        self.steps_per_epoch = max(1, n // self.batch)

    @property
    def total_steps(self) -> int:
        return self.config.epochs * self.steps_per_epoch

    def set_lr(self, step: int) -> float:
        o = self.config.optim
        lr = lr_at(step, total=self.total_steps, warmup=int(round(o.warmup_epochs * self.steps_per_epoch)),
                   base=o.lr, floor=o.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def run_epoch(self, epoch: int, step: int) -> tuple[list[float], int, int, dict[str, Any]]:
        """Returns (losses, images seen, steps taken, extra facts for the record)."""
        p, obj = self.prepared, self.objective
        g = generator(self.config.seed, "epoch", epoch)
        perm = torch.randperm(len(p.rows), generator=g).numpy()
        losses, seen = [], 0
        for k in range(self.steps_per_epoch):
            rows = torch.from_numpy(p.rows[perm[k * self.batch:(k + 1) * self.batch]])
            self.set_lr(step)
            loss = obj.losses(p.images[rows], p.labels[rows] if p.labels is not None else None, g).mean()
            if not torch.isfinite(loss):
                raise MemlensError(f"training diverged at epoch {epoch + 1} (loss {loss.item()}); lower optim.lr")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            step += 1
            obj.after_step(step / self.total_steps)
            losses.append(loss.item())
            seen += len(rows)
        return losses, seen, self.steps_per_epoch, {}

    def loop_state(self) -> dict[str, Any]:
        return {}

    def restore_loop_state(self, state: dict[str, Any]) -> None:
        pass


def _representation_dim(encoder: nn.Module, channels: int, size: int) -> int:
    was_training = encoder.training
    with torch.no_grad():
        dim = encoder.eval().representation(torch.zeros(2, channels, size, size)).shape[1]
    encoder.train(was_training)
    return int(dim)


def _record(config: TrainConfig, prepared: Prepared, encoder: nn.Module) -> RunRecord:
    ds = prepared.dataset
    splits = None
    if prepared.splits is not None:
        splits = {"path": str(Path(prepared.splits_path).resolve()), "hash": prepared.splits.hash,
                  "side": config.subsets if isinstance(config.subsets, str) else None,
                  "subsets": list(prepared.subsets)}
    resolved = config.model_copy(update={"augment": config.augmentation})
    return RunRecord(
        status="running", config=resolved,
        data={**ds.describe(), "image_size": ds.image_size, "channels": ds.channels,
              "normalize": {"mean": prepared.mean, "std": prepared.std}},
        splits=splits, train_points=len(prepared.rows),
        model={"arch": config.model.arch, "family": encoder.family, "parameters": parameter_count(encoder),
               "representation_dim": _representation_dim(encoder, ds.channels, ds.image_size),
               "layers": len(encoder.layer_specs())},
        versions=versions(), created=now(), updated=now())


def train(config: TrainConfig | None, out_dir: str | Path, *, resume: bool = False, force: bool = False,
          cache_dir: str | Path | None = None, on_epoch: Callable[[EpochInfo], None] | None = None,
          dataset: Dataset | None = None) -> TrainResult:
    """Train an encoder and write a run directory.

    Args:
        config: the training settings (None with ``resume``: use the run's own).
        out_dir: the run directory.
        resume: continue an interrupted run from its last checkpoint.
        force: delete an existing run in ``out_dir`` first.
        cache_dir: data cache directory.
        on_epoch: called after every epoch (progress display).
        dataset: the already-loaded data (skips loading; must match ``config.data``).

    Raises:
        MemlensError: bad settings, a run already in ``out_dir``, or a checkpoint that does not
            match the config.
    """
    out = Path(out_dir)
    record: RunRecord | None = None
    if resume and (out / RUN_FILE).is_file():
        record = read_run(out)
        if config is not None and config.model_copy(update={"augment": config.augmentation}) != record.config:
            raise MemlensError(f"{out} was started with a different config; use --force to start it again")
        config = record.config
        if record.status in ("complete", "stopped_budget"):
            return TrainResult(out, record)
    if config is None:
        raise MemlensError(f"nothing to resume in {out} (no {RUN_FILE})")
    prepare_output_dir(out, force=force, resume=resume, marker=RUN_FILE)

    prepared = prepare(config, cache_dir=cache_dir, dataset=dataset)
    ds = prepared.dataset
    torch.manual_seed(derive_seed(config.seed, "init"))
    m = config.model
    encoder = build_encoder(m.arch, image_size=ds.image_size, in_chans=ds.channels, patch_size=m.patch_size,
                            embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio)
    augmenter = Augmenter(config.augmentation, mean=prepared.mean, std=prepared.std)
    num_classes = len(ds.class_names) if ds.class_names else None
    objective = build_objective(config, encoder, augmenter, in_chans=ds.channels, num_classes=num_classes)
    optimizer = make_optimizer(config, objective)

    if config.dp is not None:
        from memlens.dp.trainer import DPStepper

        stepper: Stepper = DPStepper(config, objective, optimizer, prepared)
    else:
        stepper = Stepper(config, objective, optimizer, prepared)

    start_epoch, step = 0, 0
    if record is None:
        record = _record(config, prepared, encoder)
        if config.dp is not None:
            record.dp = stepper.plan_record()
    elif (out / CHECKPOINT_FILE).is_file():
        state = load_checkpoint(out / CHECKPOINT_FILE, objective=objective, optimizer=optimizer)
        start_epoch, step = state["epoch"], state["step"]
        stepper.restore_loop_state(state.get("loop", {}))
        record.history = record.history[:start_epoch]
        record.epochs_done = start_epoch
    else:
        record.history, record.epochs_done = [], 0
    record.status = "running"
    write_run(out, record)

    objective.train()
    wall0 = time.perf_counter() - record.wall_seconds
    try:
        for epoch in range(start_epoch, config.epochs):
            t0 = time.perf_counter()
            losses, seen, steps, extra = stepper.run_epoch(epoch, step)
            step += steps
            seconds = time.perf_counter() - t0
            info = EpochInfo(epoch=epoch + 1, epochs=config.epochs,
                             loss=float(np.mean(losses)) if losses else float("nan"),
                             lr=optimizer.param_groups[0]["lr"], seconds=seconds,
                             images_per_s=seen / max(seconds, 1e-9), extra=extra)
            record.history.append({"epoch": info.epoch, "loss": round(info.loss, 6), "lr": info.lr,
                                   "seconds": round(seconds, 3), "images_per_s": round(info.images_per_s, 1),
                                   "steps": step, **extra})
            record.epochs_done = epoch + 1
            record.wall_seconds = round(time.perf_counter() - wall0, 3)
            if config.dp is not None:
                record.dp = stepper.plan_record()
            save_checkpoint(out / CHECKPOINT_FILE, objective=objective, optimizer=optimizer,
                            state={"epoch": epoch + 1, "step": step, "loop": stepper.loop_state()})
            write_run(out, record)
            if on_epoch:
                on_epoch(info)
            if getattr(stepper, "budget_exhausted", False):
                record.status = "stopped_budget"
                record.message = stepper.budget_message
                break
    except KeyboardInterrupt:
        record.status = "interrupted"
        write_run(out, record)
        raise
    rates = [h["images_per_s"] for h in record.history]
    record.images_per_s = round(float(np.mean(rates)), 1) if rates else None
    save_weights(out / MODEL_FILE, encoder, metadata={"arch": config.model.arch, "format": "memlens-encoder-1"})
    if record.status != "stopped_budget":
        record.status = "complete"
    record.wall_seconds = round(time.perf_counter() - wall0, 3)
    write_run(out, record)
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    return TrainResult(out, record)
