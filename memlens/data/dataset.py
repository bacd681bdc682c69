"""The in-memory image dataset every other part of memlens works on."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from memlens.errors import MemlensError


@dataclass(frozen=True, eq=False)
class Dataset:
    """Images with stable ids, optional labels and the part ("train"/"test") they come from.

    Attributes:
        images: uint8 array of shape (N, H, W, C).
        ids: N unique, stable identifiers (for folders: the relative file path).
        labels: int64 array of shape (N,), or None for unlabelled data.
        class_names: names of the label values, or None.
        parts: array of shape (N,) holding "train" or "test".
        source: a human-readable description of where the data came from.
        meta: extra facts recorded by the source (e.g. ``outlier_ids`` of synthetic data).
    """

    images: np.ndarray
    ids: tuple[str, ...]
    labels: np.ndarray | None
    class_names: tuple[str, ...] | None
    parts: np.ndarray
    source: str
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        x = self.images
        if x.ndim != 4 or x.dtype != np.uint8:
            raise MemlensError(f"images must be uint8 (N, H, W, C); got {x.dtype} {x.shape}")
        if x.shape[-1] not in (1, 3):
            raise MemlensError(f"images must have 1 or 3 channels; got {x.shape[-1]}")
        n = len(x)
        if n == 0:
            raise MemlensError(f"{self.source}: no images")
        if len(self.ids) != n or len(self.parts) != n:
            raise MemlensError("ids and parts must have one entry per image")
        if len(set(self.ids)) != n:
            raise MemlensError(f"{self.source}: image ids are not unique")
        if self.labels is not None and len(self.labels) != n:
            raise MemlensError("labels must have one entry per image")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    @property
    def channels(self) -> int:
        return int(self.images.shape[-1])

    @property
    def has_test_part(self) -> bool:
        return bool((self.parts == "test").any())

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over shape, ids, pixels and labels: changes if any image or id changes."""
        h = hashlib.sha256()
        h.update(repr(self.images.shape).encode())
        for i in self.ids:
            h.update(i.encode("utf-8"))
            h.update(b"\0")
        h.update(np.ascontiguousarray(self.images).tobytes())
        if self.labels is not None:
            h.update(np.ascontiguousarray(self.labels.astype(np.int64)).tobytes())
        return h.hexdigest()

    @cached_property
    def _index(self) -> dict[str, int]:
        return {i: k for k, i in enumerate(self.ids)}

    def indices(self, ids: list[str] | tuple[str, ...]) -> np.ndarray:
        """Row indices of ``ids``; raises naming the first id the data does not hold."""
        index = self._index
        out = np.empty(len(ids), dtype=np.int64)
        for k, i in enumerate(ids):
            j = index.get(i)
            if j is None:
                raise MemlensError(f"id '{i}' is not in {self.source}")
            out[k] = j
        return out

    def part_indices(self, part: str) -> np.ndarray:
        return np.flatnonzero(self.parts == part)

    def normalization(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training part, in [0, 1] units.

        Computed from the whole training part (not a subset) so that encoders f and g,
        trained on different subsets of the same data, normalise their inputs identically.
        """
        x = self.images[self.part_indices("train")].astype(np.float64) / 255.0
        mean = x.mean(axis=(0, 1, 2))
        std = x.std(axis=(0, 1, 2))
        std = np.where(std < 1e-3, 1.0, std)
        return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]

    def describe(self) -> dict:
        return {
            "source": self.source,
            "fingerprint": self.fingerprint,
            "n": len(self),
            "n_train": int((self.parts == "train").sum()),
            "n_test": int((self.parts == "test").sum()),
            "image_shape": list(self.images.shape[1:]),
            "labelled": self.labels is not None,
            "classes": list(self.class_names) if self.class_names else None,
        }
