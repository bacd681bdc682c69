"""Reading batches of images for training, audits and evaluation passes, in DataLoader workers.

Every job knows in advance which rows it reads in which order (an epoch's batches, an audit's
points), so it hands the loader a list of *units* (rows, plus the random-stream key of each row
where views are cut) and receives the units back, in order, decoded, while the next ones are read
by ``workers`` processes (pinned memory and non-blocking copies on CUDA).

Three ways a unit is delivered:

* ``dense``: (B, S, S, C) uint8, when every image has one square size S (data in memory, the
  decoded cache, or lazy images that happen to share a size): the augmentation then runs batched
  on the device, exactly as for data held in memory;
* ``cut``: images of their own sizes: each worker decodes an image and cuts its views' geometry
  (:class:`~memlens.data.augment.Geometry`: the set's RandomResizedCrop on the original, or the eval
  transform) at the encoder's input size, delivering a :class:`~memlens.data.augment.Cut`;
* ``eval``: the un-augmented input of an encoder (B, C, S, S) uint8 (the eval transform for images
  of their own sizes, the image itself or a bilinear resize for dense data).

An image that cannot be decoded is reported with the unit (``bad``); the caller applies
``on_bad_image`` (fail naming it, or skip the example and record it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Literal

import numpy as np
import torch

from memlens.data.augment import Cut, EvalTransform, Geometry
from memlens.data.dataset import Pixels
from memlens.data.decode import BadImage
from memlens.resources import worker_init

Mode = Literal["dense", "cut", "eval"]


@dataclass
class Unit:
    """Rows to read together, and for ``cut`` the stream key of each row."""

    rows: np.ndarray
    keys: np.ndarray | None = None


@dataclass
class Fetched:
    rows: np.ndarray
    images: torch.Tensor | Cut
    bad: dict[int, str] = field(default_factory=dict)  # position in rows -> message

    def drop_bad(self) -> "Fetched":
        """The unit without its unreadable images (``on_bad_image: skip``)."""
        if not self.bad:
            return self
        keep = np.array([i for i in range(len(self.rows)) if i not in self.bad], dtype=np.int64)
        idx = torch.from_numpy(keep)
        images = Cut(self.images.crops[idx], finished=self.images.finished) if isinstance(self.images, Cut) \
            else self.images[idx]
        return Fetched(self.rows[keep], images, {})


def mode_for(pixels: Pixels, *, augmented: bool) -> Mode:
    if pixels.square_size is not None:
        return "dense"
    return "cut" if augmented else "eval"


class _Units(torch.utils.data.Dataset):
    def __init__(self, pixels: Pixels, units: list[Unit], mode: Mode, geometry: Geometry | None,
                 evaluation: EvalTransform | None, finish=None):
        self.pixels, self.units, self.mode = pixels, units, mode
        self.geometry, self.evaluation, self.finish = geometry, evaluation, finish

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, k: int) -> tuple[int, torch.Tensor, dict[int, str]]:
        unit = self.units[k]
        if self.mode == "dense":
            return k, *self._dense(unit.rows)
        out, bad = [], {}
        for j, r in enumerate(unit.rows):
            try:
                img = self.pixels.read_chw(int(r))
                if self.mode == "cut":
                    out.append(self.geometry.cut(img, None if unit.keys is None else int(unit.keys[j])))
                else:
                    out.append(self.evaluation(img))
            except BadImage as exc:
                bad[j] = str(exc)
                out.append(None)
        template = next((o for o in out if o is not None), None)
        if template is None:
            c = self.pixels.channels
            s = self.geometry.size if self.mode == "cut" else self.evaluation.size
            calls = self.geometry.calls if self.mode == "cut" else None
            template = torch.zeros((calls, c, s, s) if calls else (c, s, s), dtype=torch.uint8)
        batch = torch.stack([o if o is not None else torch.zeros_like(template) for o in out]) if out else \
            template.unsqueeze(0)[:0]
        if self.finish is not None and len(batch):
            batch = self.finish.finish_cut(batch, unit.keys)
        return k, batch, bad

    def _dense(self, rows: np.ndarray) -> tuple[torch.Tensor, dict[int, str]]:
        try:
            return torch.from_numpy(np.ascontiguousarray(self.pixels.take(rows))), {}
        except BadImage:
            pass  # find which ones, one at a time
        s, c = self.pixels.square_size, self.pixels.channels
        out = np.zeros((len(rows), s, s, c), dtype=np.uint8)
        bad = {}
        for j, r in enumerate(rows):
            try:
                out[j] = self.pixels.read(int(r))
            except BadImage as exc:
                bad[j] = str(exc)
        return torch.from_numpy(out), bad


def fetch(pixels: Pixels, units: list[Unit], *, mode: Mode, device: torch.device, workers: int = 0,
          geometry: Geometry | None = None, evaluation: EvalTransform | None = None, augmenter=None,
          prefetch: int = 2) -> Iterator[Fetched]:
    """Deliver ``units`` in order, decoded (see the module docstring).

    Args:
        pixels: where the images are read.
        units: what to read, in order.
        mode: ``dense``, ``cut`` (needs ``geometry``) or ``eval`` (needs ``evaluation``).
        device: where the delivered tensors go.
        workers: DataLoader worker processes (0: read in this process).
        geometry: the augmentation's geometry (``cut``).
        evaluation: the eval transform (``eval``).
        augmenter: for ``cut`` on the CPU with workers, the augmentation the workers finish too
            (the views arrive finished; on an accelerator the device applies it to the batch).
        prefetch: units each worker reads ahead.
    """
    if mode == "cut" and geometry is None:
        raise ValueError("cut mode needs the augmentation's geometry")
    if mode == "eval" and evaluation is None:
        raise ValueError("eval mode needs the eval transform")
    finish = augmenter if mode == "cut" and device.type == "cpu" and workers > 0 and len(units) > 1 else None
    data = _Units(pixels, units, mode, geometry, evaluation, finish)
    pin = device.type == "cuda"
    if workers > 0 and len(units) > 1:

        source = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=workers,
                                             pin_memory=pin, prefetch_factor=prefetch, worker_init_fn=worker_init,
                                             persistent_workers=False)
    else:
        source = (data[k] for k in range(len(data)))
    for k, images, bad in source:
        unit = units[k]
        if pin and workers == 0:
            images = images.pin_memory()
        images = images.to(device, non_blocking=pin)
        yield Fetched(unit.rows, Cut(images, finished=finish is not None) if mode == "cut" else images, bad)


def eval_batches(pixels: Pixels, units: list[Unit], *, size: int, evaluation: EvalTransform, device: torch.device,
                 workers: int = 0) -> Iterator[Fetched]:
    """Un-augmented inputs in [0, 1], float32 (B, C, size, size), unit by unit: dense data resized as a
    whole (bilinear, antialiased) when its size differs; images of their own sizes through
    ``evaluation`` (resize the shorter side, centre crop)."""
    mode = mode_for(pixels, augmented=False)
    for got in fetch(pixels, units, mode=mode, device=device, workers=workers, evaluation=evaluation):
        if mode == "dense":
            x = got.images.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)
            if x.shape[-1] != size:
                x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                                    antialias=True)
        else:
            x = got.images.to(torch.float32).div_(255.0)
        yield Fetched(got.rows, x.contiguous(), got.bad)
