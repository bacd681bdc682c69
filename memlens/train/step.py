"""Gradient steps: what one optimisation step does, handed to the training loop.

The loop (:mod:`memlens.train.loop`) owns epochs, the learning-rate schedule, checkpoints and the
run record; a step owns how the examples of an epoch are grouped into logical batches and how one
batch becomes a parameter update. :class:`PlainStep` is ordinary minibatch training; DP-SGD
(:mod:`memlens.dp.step`) is another step built on this one, so ``train/`` never imports ``dp/``.

Distribution is part of the step, not of the loop. Every process computes the same *global*
logical batches (from the same seeded generators), takes its share of each (rows ``rank::world``)
and the step combines the processes' gradients (here DistributedDataParallel). Because each
example's augmentation and masking come from its own random stream (keyed by the run seed, the
epoch, the step and the example's row), a batch split across processes is trained exactly as
the whole batch in one process: the same weights up to float rounding, for any world size, and
a run resumed with another world size continues where it stopped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn

from memlens import distributed as D
from memlens.config import TrainConfig
from memlens.device import autocast
from memlens.errors import MemlensError
from memlens.rng import RowStreams, generator


class Diverged(MemlensError):
    """The training loss became NaN or inf."""


@dataclass
class Batch:
    """One logical batch: the dataset rows of the whole batch (all processes) and its step in the epoch."""

    rows: np.ndarray
    index: int


@dataclass
class StepStats:
    loss_sum: float
    examples: int


def lr_at(step: int, *, total: int, warmup: int, base: float, floor: float) -> float:
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Step:
    """Base of the gradient steps: batching, the local share, inputs and learning rate."""

    #: whether the loop may stop early because the step says so (DP budget)
    budget_exhausted: bool = False
    budget_message: str = ""

    def __init__(self, config: TrainConfig, objective: nn.Module, optimizer: torch.optim.Optimizer, prepared: Any,
                 device: torch.device):
        self.config, self.objective, self.optimizer, self.prepared = config, objective, optimizer, prepared
        self.device = device
        self.world, self.rank = D.world_size(), D.rank()
        n = len(prepared.rows)
        self.batch = min(config.batch_size, n)
        self.steps_per_epoch = max(1, n // self.batch)

    # ------------------------------------------------------------------ schedule

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

    # ------------------------------------------------------------------ batches

    def batches(self, epoch: int) -> Iterator[Batch]:
        """Shuffled logical batches of the global batch size (the last partial batch is dropped)."""
        p = self.prepared
        perm = torch.randperm(len(p.rows), generator=generator(self.config.seed, "epoch", epoch)).numpy()
        for k in range(self.steps_per_epoch):
            yield Batch(p.rows[perm[k * self.batch:(k + 1) * self.batch]], k)

    def local_rows(self, batch: Batch) -> np.ndarray:
        return batch.rows[self.rank::self.world]

    def inputs(self, rows: np.ndarray, epoch: int, index: int):
        """Images, labels and per-example random streams of some dataset rows, on the device."""
        p = self.prepared
        idx = torch.from_numpy(rows)
        images = p.images[idx].to(self.device, non_blocking=True)
        labels = p.labels[idx].to(self.device, non_blocking=True) if p.labels is not None else None
        draws = RowStreams.for_keys(self.config.seed, rows.tolist(), "aug", epoch, index, device=self.device)
        return images, labels, draws

    def global_stats(self, loss_sum: float, examples: int) -> StepStats:
        """Loss summed over every process's examples (the same on all processes)."""
        if not D.active():
            return StepStats(loss_sum, examples)
        t = torch.tensor([loss_sum, float(examples)], dtype=torch.float64, device=D.collective_device())
        D.all_reduce_(t)
        return StepStats(float(t[0]), int(t[1]))

    @staticmethod
    def check_finite(stats: StepStats, epoch: int) -> None:
        if not math.isfinite(stats.loss_sum):
            raise Diverged(f"training diverged at epoch {epoch + 1} (the loss became {stats.loss_sum})")

    # ------------------------------------------------------------------ interface

    def apply(self, batch: Batch, epoch: int, step: int) -> StepStats:
        raise NotImplementedError

    def loop_state(self) -> dict[str, Any]:
        return {}

    def restore_loop_state(self, state: dict[str, Any]) -> None:
        pass

    def record(self, *, exact: bool = False) -> dict[str, Any] | None:
        """What the run record says about this step (the DP guarantee), None for plain steps.

        Args:
            exact: bring every derived quantity up to date even where that is costly (the
                final record of a run, or one written on interruption).
        """
        return None

    def epoch_extra(self, *, epoch: int, last: bool) -> dict[str, Any]:
        """Extra figures for the history row of 1-based ``epoch`` (``last``: the run ends after it)."""
        return {}


class PlainStep(Step):
    """Non-private minibatch SGD; DistributedDataParallel across processes.

    Per-example objectives scale each process's summed loss so that DDP's average over processes
    is the mean over the global batch, whatever each process's share; the others (SimCLR, SimSiam,
    DINO) compute the whole batch's loss from gathered embeddings and need the batch to divide
    evenly.
    """

    def __init__(self, config: TrainConfig, objective: nn.Module, optimizer: torch.optim.Optimizer, prepared: Any,
                 device: torch.device):
        super().__init__(config, objective, optimizer, prepared, device)
        self.model: nn.Module = objective
        if D.active():
            if not objective.per_sample and self.batch % self.world:
                raise MemlensError(f"batch_size {self.batch} must be divisible by the {self.world} processes for "
                                   f"framework '{config.framework}' (its loss couples the examples of a batch)")
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda"
                                                 else None, broadcast_buffers=False)
        self.scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None

    def apply(self, batch: Batch, epoch: int, step: int) -> StepStats:
        rows = self.local_rows(batch)
        images, labels, draws = self.inputs(rows, epoch, batch.index)
        with autocast(self.device, self.config.precision):
            out = self.model(images, labels, draws)
        if self.objective.per_sample:
            local_sum = out.float().sum()
            loss = local_sum * (self.world / len(batch.rows))
            stats = self.global_stats(float(local_sum.detach()), len(rows))
        else:
            loss = out.float()
            stats = self.global_stats(float(loss.detach()) * len(rows), len(rows))
        self.check_finite(stats, epoch)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return stats
