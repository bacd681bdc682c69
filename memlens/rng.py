"""Seeds and random streams.

Every random draw memlens makes (augmentation, MAE masking, data order, DP sampling and noise)
comes from a seed derived from the run or audit seed and a purpose, so a rerun with the same seed
makes the same draws.

Per-example streams (:class:`RowStreams`) give each example of a batch its own generator, keyed
by what the example *is* (its id, the view number, the epoch and step), not by where it sits in
the batch. That makes an example's augmented views and masks independent of batch size, batch
order, sharding across processes and the number of views drawn for other examples: a sharded
audit scores every point exactly as a single-process audit does, and data-parallel training sees
the same augmentations as single-process training on the same global batches.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch


def derive_seed(seed: int, *tags: Any) -> int:
    """A 63-bit seed for one purpose ("views", point id, view number...) derived from a base seed."""
    text = "/".join([str(seed), *map(str, tags)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def generator(seed: int, *tags: Any) -> torch.Generator:
    """A CPU generator seeded with :func:`derive_seed` (CPU: draws are the same on every device)."""
    return torch.Generator().manual_seed(derive_seed(seed, *tags))


class Draws:
    """Uniform random numbers in [0, 1) for the rows of a batch.

    ``rand()`` returns shape (n,), ``rand(k)`` shape (n, k); successive calls continue the
    stream. Tensors are float32 on ``device``.
    """

    n: int
    device: torch.device

    def rand(self, k: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def uniform(self, lo: float, hi: float, k: int | None = None) -> torch.Tensor:
        return self.rand(k) * (hi - lo) + lo


class BatchDraws(Draws):
    """All rows from one generator: the draws of a row depend on the batch it is in."""

    def __init__(self, n: int, generator: torch.Generator | None, device: torch.device | str = "cpu"):
        self.n, self.generator, self.device = n, generator, torch.device(device)

    def rand(self, k: int | None = None) -> torch.Tensor:
        shape = (self.n,) if k is None else (self.n, k)
        return torch.rand(shape, generator=self.generator).to(self.device)


class RowStreams(Draws):
    """One independent stream per row, seeded by the row's key (see the module docstring).

    Each row's generator draws a block of ``block`` numbers at a time; calls take columns from
    the block, so a batch costs one small draw per row rather than one per random number.

    Args:
        keys: one 63-bit seed per row (:func:`derive_seed` of what the row is).
        device: where the returned tensors live (the numbers are drawn on the CPU, so they are the
            same whatever the device).
        block: numbers drawn per row at a time.
    """

    def __init__(self, keys: Sequence[int], device: torch.device | str = "cpu", *, block: int = 64):
        self.device = torch.device(device)
        self.block = block
        self.gens = [torch.Generator().manual_seed(int(k)) for k in keys]
        self.buffer = torch.empty(len(self.gens), 0)
        self.pos = 0
        self.n = len(self.gens)

    @classmethod
    def for_keys(cls, seed: int, keys: Sequence[Any], *tags: Any, device: torch.device | str = "cpu",
                 block: int = 64) -> "RowStreams":
        """Streams for rows identified by ``keys`` (ids, (id, view) tuples...) under ``seed`` and ``tags``."""
        return cls([derive_seed(seed, *tags, *(k if isinstance(k, tuple) else (k,))) for k in keys], device,
                   block=block)

    def _fill(self, need: int) -> None:
        while self.buffer.shape[1] - self.pos < need:
            more = torch.stack([torch.rand(self.block, generator=g) for g in self.gens]) if self.gens \
                else torch.empty(0, self.block)
            self.buffer = torch.cat([self.buffer[:, self.pos:], more], dim=1)
            self.pos = 0

    def rand(self, k: int | None = None) -> torch.Tensor:
        width = 1 if k is None else k
        self._fill(width)
        out = self.buffer[:, self.pos:self.pos + width]
        self.pos += width
        out = out.to(self.device)
        return out[:, 0] if k is None else out


def as_draws(source: Draws | torch.Generator | None, n: int, device: torch.device | str = "cpu") -> Draws:
    """Accept a :class:`Draws` or a plain generator (batch-level draws)."""
    if isinstance(source, Draws):
        if source.n != n:
            raise ValueError(f"random streams for {source.n} rows given for a batch of {n}")
        return source
    return BatchDraws(n, source, device)
