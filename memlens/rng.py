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

import numpy as np
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

    def skip(self, k: int) -> None:
        """Advance every row's stream by ``k`` numbers (the draws of an operation applied elsewhere)."""
        if k:
            self.rand(k)


class BatchDraws(Draws):
    """All rows from one generator: the draws of a row depend on the batch it is in."""

    def __init__(self, n: int, generator: torch.Generator | None, device: torch.device | str = "cpu"):
        self.n, self.generator, self.device = n, generator, torch.device(device)

    def rand(self, k: int | None = None) -> torch.Tensor:
        shape = (self.n,) if k is None else (self.n, k)
        return torch.rand(shape, generator=self.generator).to(self.device)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """The SplitMix64 output function (Steele, Lea and Flood 2014), vectorised over uint64 arrays."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


class RowStreams(Draws):
    """One independent stream per row, seeded by the row's key (see the module docstring).

    The stream of a row is the counter-based SplitMix64 sequence of its key: number c of row r is
    mix(key_r + (c + 1) * golden), computed for all rows at once, so a batch costs a few
    vectorised operations however many rows it has (a torch.Generator per row would cost
    thousands of object creations per batch). 24 bits per number give uniforms on a 2^-24 grid,
    float32's resolution in [0, 1).

    Args:
        keys: one 63-bit seed per row (:func:`derive_seed` of what the row is).
        device: where the returned tensors live (the numbers are drawn on the CPU, so they are the
            same whatever the device).
    """

    def __init__(self, keys: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        # spread the keys first, so nearby keys do not start nearby streams
        self.keys = _splitmix64(np.asarray([int(k) for k in keys], dtype=np.uint64).reshape(-1))
        self.pos = 0
        self.n = len(self.keys)

    @classmethod
    def for_keys(cls, seed: int, keys: Sequence[Any], *tags: Any, device: torch.device | str = "cpu") -> "RowStreams":
        """Streams for rows identified by ``keys`` (ids, (id, view) tuples...) under ``seed`` and ``tags``."""
        return cls(stream_keys(seed, keys, *tags), device)

    def skip(self, k: int) -> None:
        self.pos += k

    def rand(self, k: int | None = None) -> torch.Tensor:
        width = 1 if k is None else k
        counters = np.arange(self.pos + 1, self.pos + width + 1, dtype=np.uint64)
        self.pos += width
        with np.errstate(over="ignore"):
            bits = _splitmix64(self.keys[:, None] + counters[None, :] * _GOLDEN)
        out = torch.from_numpy((bits >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24))
        out = out.to(self.device)
        return out[:, 0] if k is None else out


def stream_keys(seed: int, keys: Sequence[Any], *tags: Any) -> np.ndarray:
    """The 63-bit stream seeds :meth:`RowStreams.for_keys` gives rows identified by ``keys`` (a loader
    worker cutting views receives these)."""
    return np.array([derive_seed(seed, *tags, *(k if isinstance(k, tuple) else (k,))) for k in keys], dtype=np.uint64)


def as_draws(source: Draws | torch.Generator | None, n: int, device: torch.device | str = "cpu") -> Draws:
    """Accept a :class:`Draws` or a plain generator (batch-level draws)."""
    if isinstance(source, Draws):
        if source.n != n:
            raise ValueError(f"random streams for {source.n} rows given for a batch of {n}")
        return source
    return BatchDraws(n, source, device)
