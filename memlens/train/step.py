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
from torch.nn.parallel import DistributedDataParallel

from memlens import distributed as D
from memlens.config import TrainConfig
from memlens.data.loader import Fetched, Unit, fetch
from memlens.device import autocast
from memlens.errors import MemlensError
from memlens.rng import RowStreams, generator, stream_keys


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


@dataclass
class Reading:
    """How a run reads its images (see :mod:`memlens.data.loader`): where, in which mode, with the
    augmentation's geometry for images of their own sizes, by how many workers."""

    pixels: Any
    mode: str
    geometry: Any = None
    workers: int = 0
    on_bad_image: str = "fail"
    augmenter: Any = None  # finished by the workers on the CPU (see memlens.data.loader.fetch)


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
        # a step used on its own (tests, tools) reads data held in memory directly
        self.reading: Reading = getattr(prepared, "reading", None) or Reading(prepared.pixels, "dense")
        self._feed: Iterator[Fetched] | None = None
        self.skipped: dict[str, str] = {}  # images left out under on_bad_image: skip (id -> why)

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
        """The epoch's logical batches; their images are read ahead by the loader."""
        plan = list(self.plan_batches(epoch))
        self.open_epoch(epoch, plan)
        yield from plan

    def plan_batches(self, epoch: int) -> Iterator[Batch]:
        """Shuffled logical batches of the global batch size (the last partial batch is dropped)."""
        p = self.prepared
        perm = torch.randperm(len(p.rows), generator=generator(self.config.seed, "epoch", epoch)).numpy()
        for k in range(self.steps_per_epoch):
            yield Batch(p.rows[perm[k * self.batch:(k + 1) * self.batch]], k)

    def local_rows(self, batch: Batch) -> np.ndarray:
        return batch.rows[self.rank::self.world]

    def units(self, batch: Batch) -> list[np.ndarray]:
        """The rows this process reads for ``batch``, in the order :meth:`apply` asks for them."""
        return [self.local_rows(batch)]

    def open_epoch(self, epoch: int, plan: list[Batch]) -> None:
        """Start reading every unit of the epoch's batches, in order, ahead of the steps."""
        units = [self._unit(rows, epoch, b.index) for b in plan for rows in self.units(b) if len(rows)]
        r = self.reading
        self._feed = fetch(r.pixels, units, mode=r.mode, device=self.device, workers=r.workers, geometry=r.geometry,
                           augmenter=r.augmenter)

    def _unit(self, rows: np.ndarray, epoch: int, index: int) -> Unit:
        cut = self.reading.mode == "cut"
        return Unit(rows, stream_keys(self.config.seed, rows.tolist(), "aug", epoch, index) if cut else None)

    def inputs(self, rows: np.ndarray, epoch: int, index: int):
        """Images, labels and per-example random streams of some dataset rows, on the device.

        Images come from the loader (read ahead); an unreadable image fails the run naming it, or
        under ``on_bad_image: skip`` leaves the batch (as if not sampled) and is recorded.
        """
        if self._feed is None:  # a step applied outside batches(): read this unit now
            r = self.reading
            got = next(fetch(r.pixels, [self._unit(rows, epoch, index)], mode=r.mode, device=self.device,
                             geometry=r.geometry))
        else:
            got = next(self._feed, None)
        if got is None or not np.array_equal(got.rows, rows):
            raise RuntimeError("the loader delivered other rows than the step asked for")
        if got.bad:
            if self.reading.on_bad_image == "fail":
                raise MemlensError(next(iter(got.bad.values())) + "; set data.on_bad_image: skip to leave such "
                                   "images out (recorded in run.json)")
            for j, why in got.bad.items():
                self.skipped[self.reading.pixels.id_of(int(rows[j]))] = why
            got = got.drop_bad()
            rows = got.rows
        p = self.prepared
        idx = torch.from_numpy(rows)
        labels = p.labels[idx].to(self.device, non_blocking=True) if p.labels is not None else None
        draws = RowStreams.for_keys(self.config.seed, rows.tolist(), "aug", epoch, index, device=self.device)
        return got.images, labels, draws

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

            self.model = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda"
                                                 else None, broadcast_buffers=False)
        self.scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None

    def apply(self, batch: Batch, epoch: int, step: int) -> StepStats:
        images, labels, draws = self.inputs(self.local_rows(batch), epoch, batch.index)
        n = len(images)  # fewer than the rows when an unreadable image was skipped
        with autocast(self.device, self.config.precision):
            out = self.model(images, labels, draws)
        if self.objective.per_sample:
            local_sum = out.float().sum()
            loss = local_sum * (self.world / len(batch.rows))
            stats = self.global_stats(float(local_sum.detach()), n)
        else:
            loss = out.float()
            stats = self.global_stats(float(loss.detach()) * n, n)
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
