"""The dataset every part of memlens works on: ids, labels, parts and sizes in memory, pixels on demand.

A :class:`Dataset` holds what identifies and describes each image (its id, label, part and size)
and a :class:`Pixels` object that produces the pixels of any row when asked. Two kinds of pixels
implement the same interface:

* :class:`ArrayPixels`: one uint8 (N, H, W, C) array in memory or memory-mapped from the decoded
  cache (digits, synthetic data, npz files, small image collections decoded once);
* :class:`LazyPixels`: images decoded from their encoded bytes when read (image folders, tar
  archives and shards, Hugging Face datasets, parquet tables, manifests), each at its own size.

Training, audits, canaries and reports read through :meth:`Pixels.take` (a batch of rows) or
:meth:`Pixels.read` (one image); :mod:`memlens.data.loader` runs those reads in DataLoader workers.
"""

from __future__ import annotations

import hashlib
from functools import cached_property

import numpy as np
import torch

from memlens.data.decode import BadImage, decode
from memlens.errors import MemlensError

# ----------------------------------------------------------------------------- pixels


class Pixels:
    """Pixels of rows 0..N-1: ``read(i)`` -> uint8 (H, W, C); ``take(rows)`` -> a dense
    (B, H, W, C) array when the rows share one size, else a list of arrays."""

    channels: int

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def read_chw(self, i: int) -> torch.Tensor:
        """Row ``i`` as a CHW uint8 tensor (what torchvision's kernels take)."""
        return torch.from_numpy(np.ascontiguousarray(self.read(i))).permute(2, 0, 1)

    def take(self, rows: np.ndarray) -> np.ndarray | list[np.ndarray]:
        imgs = [self.read(int(r)) for r in rows]
        shapes = {im.shape for im in imgs}
        return np.stack(imgs) if len(shapes) == 1 and imgs else imgs

    @property
    def square_size(self) -> int | None:
        """Side of every image when all are square and of one size (the dense fast path), else None."""
        return None

    @property
    def in_memory(self) -> bool:
        """Whether reading costs no decoding (an array held in memory or memory-mapped)."""
        return False

    def id_of(self, i: int) -> str:
        return str(i)


class ArrayPixels(Pixels):
    def __init__(self, array: np.ndarray):
        if array.ndim != 4 or array.dtype != np.uint8:
            raise MemlensError(f"images must be uint8 (N, H, W, C); got {array.dtype} {array.shape}")
        if array.shape[-1] not in (1, 3):
            raise MemlensError(f"images must have 1 or 3 channels; got {array.shape[-1]}")
        self.array = array
        self.channels = int(array.shape[-1])

    def __len__(self) -> int:
        return len(self.array)

    def read(self, i: int) -> np.ndarray:
        return self.array[i]

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self.array[np.asarray(rows, dtype=np.int64)]

    @property
    def square_size(self) -> int | None:
        h, w = self.array.shape[1:3]
        return int(h) if h == w else None

    @property
    def in_memory(self) -> bool:
        return True


class ListPixels(Pixels):
    """Images of their own sizes held in memory (canaries made from data of mixed sizes)."""

    def __init__(self, images: list[np.ndarray]):
        self.images = list(images)
        chans = {im.shape[-1] for im in self.images}
        if len(chans) > 1:
            raise MemlensError("images with different numbers of channels")
        self.channels = int(chans.pop()) if chans else 3

    def __len__(self) -> int:
        return len(self.images)

    def read(self, i: int) -> np.ndarray:
        return self.images[i]

    @property
    def square_size(self) -> int | None:
        shapes = {im.shape for im in self.images}
        if len(shapes) != 1:
            return None
        h, w = next(iter(shapes))[:2]
        return int(h) if h == w else None

    @property
    def in_memory(self) -> bool:
        return True


class LazyPixels(Pixels):
    """Images decoded from a :class:`~memlens.data.readers.ByteReader` when read.

    Args:
        reader: bytes of image i.
        ids: for error messages (a bad image is named by its id).
        sizes: (N, 2) heights and widths from the index (after ``resize``).
        channels: 1 or 3 for the whole dataset (grey images become three channels in colour data).
        resize: squash every image to resize x resize (an explicit choice), or None.
    """

    def __init__(self, reader, ids: tuple[str, ...], sizes: np.ndarray, channels: int, resize: int | None):
        self.reader, self.ids, self.channels, self.resize = reader, ids, int(channels), resize
        self.sizes = np.asarray(sizes, dtype=np.int32).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.ids)

    def read_chw(self, i: int) -> torch.Tensor:

        try:
            data = self.reader.read(int(i))
            return decode(data, channels=self.channels, resize=self.resize)
        except (BadImage, OSError) as exc:
            raise BadImage(f"image '{self.ids[i]}' could not be read: {exc}") from None

    def read(self, i: int) -> np.ndarray:
        return self.read_chw(i).permute(1, 2, 0).numpy()

    @property
    def square_size(self) -> int | None:
        if not len(self.sizes):
            return None
        h, w = self.sizes[0]
        return int(h) if h == w and (self.sizes == self.sizes[0]).all() else None

    def id_of(self, i: int) -> str:
        return self.ids[i]


class ConcatPixels(Pixels):
    """Rows of several pixel sources one after the other (a dataset followed by its canaries)."""

    def __init__(self, parts: list[Pixels]):
        self.parts = [p for p in parts if len(p)]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        chans = {p.channels for p in self.parts}
        if len(chans) != 1:
            raise MemlensError("the images and the canaries have different numbers of channels")
        self.channels = chans.pop()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, i: int) -> tuple[Pixels, int]:
        k = int(np.searchsorted(self.starts, i, side="right") - 1)
        return self.parts[k], int(i - self.starts[k])

    def read(self, i: int) -> np.ndarray:
        part, j = self._locate(i)
        return part.read(j)

    def read_chw(self, i: int) -> torch.Tensor:
        part, j = self._locate(i)
        return part.read_chw(j)

    def take(self, rows: np.ndarray) -> np.ndarray | list[np.ndarray]:
        rows = np.asarray(rows, dtype=np.int64)
        if self.square_size is None:
            return super().take(rows)
        s, c = self.square_size, self.channels
        out = np.empty((len(rows), s, s, c), dtype=np.uint8)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        for k, part in enumerate(self.parts):
            sel = np.flatnonzero(which == k)
            if len(sel):
                out[sel] = part.take(rows[sel] - self.starts[k])
        return out

    @property
    def square_size(self) -> int | None:
        sizes = {p.square_size for p in self.parts}
        return sizes.pop() if len(sizes) == 1 else None

    @property
    def in_memory(self) -> bool:
        return all(p.in_memory for p in self.parts)

    def id_of(self, i: int) -> str:
        part, j = self._locate(i)
        return part.id_of(j)


# ----------------------------------------------------------------------------- the dataset


class Dataset:
    """Images with stable ids, optional labels and the part ("train"/"test") they come from.

    Args:
        images: uint8 array of shape (N, H, W, C) for data held in memory; omit it and give
            ``pixels`` for data read lazily.
        ids: N unique, stable identifiers (for folders: the relative file path).
        labels: int64 array of shape (N,), or None for unlabelled data.
        class_names: names of the label values, or None.
        parts: array of shape (N,) holding "train" or "test".
        source: a human-readable description of where the data came from.
        meta: extra facts recorded by the source (``outlier_ids`` of synthetic data, ``skipped``
            images, the index of lazy sources).
        pixels: where the pixels come from (built from ``images`` when omitted).
        content_fingerprint: the source's own fingerprint (lazy sources: over the encoded
            bytes); None: computed from ids, pixels and labels.
    """

    def __init__(self, images: np.ndarray | None = None, ids: tuple[str, ...] = (), labels: np.ndarray | None = None,
                 class_names: tuple[str, ...] | None = None, parts: np.ndarray | None = None, source: str = "",
                 meta: dict | None = None, pixels: Pixels | None = None, content_fingerprint: str | None = None):
        if pixels is None:
            if images is None:
                raise MemlensError("a dataset needs images or pixels")
            pixels = ArrayPixels(images)
        self.pixels = pixels
        self.ids = tuple(ids)
        self.labels = labels
        self.class_names = class_names
        self.parts = np.asarray(parts if parts is not None else [], dtype=str)
        self.source = source
        self.meta = dict(meta or {})
        self.content_fingerprint = content_fingerprint
        n = len(self.pixels)
        if n == 0:
            raise MemlensError(f"{self.source}: no images")
        if len(self.ids) != n or len(self.parts) != n:
            raise MemlensError("ids and parts must have one entry per image")
        if len(set(self.ids)) != n:
            raise MemlensError(f"{self.source}: image ids are not unique")
        if self.labels is not None and len(self.labels) != n:
            raise MemlensError("labels must have one entry per image")

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def lazy(self) -> bool:
        return not isinstance(self.pixels, ArrayPixels)

    def dense(self) -> np.ndarray:
        """All images as one (N, H, W, C) array (data held in memory or memory-mapped only)."""
        if isinstance(self.pixels, ArrayPixels):
            return self.pixels.array
        raise MemlensError(f"{self.source} is read lazily (images of their own sizes); read rows with "
                           f"dataset.pixels.read / take")

    @property
    def images(self) -> np.ndarray:
        """All images as one array: data held in memory (or memory-mapped) only, see :meth:`dense`."""
        return self.dense()

    @property
    def square_size(self) -> int | None:
        return self.pixels.square_size

    @property
    def image_size(self) -> int:
        """Side of the images when all are square and of one size."""
        s = self.square_size
        if s is None:
            raise MemlensError(f"{self.source}: images differ in size or are not square ({self.size_summary()}); "
                               f"set model.input_size for training, or data.resize to squash them to one size")
        return s

    @property
    def channels(self) -> int:
        return int(self.pixels.channels)

    @property
    def has_test_part(self) -> bool:
        return bool((self.parts == "test").any())

    def sizes(self) -> np.ndarray:
        """(N, 2) heights and widths."""
        p = self.pixels
        if isinstance(p, LazyPixels):
            return p.sizes
        h, w = self.dense().shape[1:3]
        return np.tile(np.array([[h, w]], dtype=np.int32), (len(self), 1))

    def size_summary(self) -> str:
        s = self.sizes()
        if not len(s):
            return "no images"
        if (s == s[0]).all():
            return f"{s[0][0]}x{s[0][1]}"
        return (f"{s[:, 0].min()}-{s[:, 0].max()} px high, {s[:, 1].min()}-{s[:, 1].max()} px wide, "
                f"{len(np.unique(s, axis=0))} sizes")

    @cached_property
    def fingerprint(self) -> str:
        """sha256 that changes if any image, id or label changes.

        Data held in memory: over shape, ids, pixels and labels. Lazy sources: the source's own
        fingerprint over ids, parts, labels and the sha256 of each image's encoded bytes (and the
        decode settings), so the same files give the same fingerprint in any source form.
        """
        if self.content_fingerprint is not None:
            return self.content_fingerprint
        x = self.dense()
        h = hashlib.sha256()
        h.update(repr(x.shape).encode())
        for i in self.ids:
            h.update(i.encode("utf-8"))
            h.update(b"\0")
        h.update(np.ascontiguousarray(x).tobytes())
        if self.labels is not None:
            h.update(np.ascontiguousarray(self.labels.astype(np.int64)).tobytes())
        return h.hexdigest()

    def digests(self) -> list[str]:
        """A content digest per image: the sha256 of its encoded bytes (lazy sources, from the index)
        or of its decoded pixels (data held in memory). Equal digests = the same image."""
        known = self.meta.get("digests")
        if known is not None and len(known) == len(self):
            return list(known)
        if "_digests" not in self.__dict__:
            self.__dict__["_digests"] = [hashlib.sha256(np.ascontiguousarray(self.pixels.read(i)).tobytes()).hexdigest()
                                         for i in range(len(self))]
        return self.__dict__["_digests"]

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

    @cached_property
    def _normalization(self) -> tuple[list[float], list[float]]:
        train = self.part_indices("train")
        if not self.lazy:
            x = self.dense()[train].astype(np.float64) / 255.0
            mean, std = x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2))
        else:
            mean, std = _sampled_moments(self.pixels, train, skip_bad=self.meta.get("on_bad_image") == "skip")
        std = np.where(std < 1e-3, 1.0, std)
        return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]

    def normalization(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training part, in [0, 1] units.

        Computed from the whole training part (not a subset) so that encoders f and g, trained on
        different subsets of the same data, normalise their inputs identically. Data read lazily:
        from a fixed, seeded sample of at most 1,000 training images (pixel-weighted), the same
        sample whoever asks.
        """
        return self._normalization

    def describe(self) -> dict:
        sq = self.square_size
        return {
            "source": self.source,
            "fingerprint": self.fingerprint,
            "n": len(self),
            "n_train": int((self.parts == "train").sum()),
            "n_test": int((self.parts == "test").sum()),
            "image_shape": [sq, sq, self.channels] if sq else None,
            "sizes": self.size_summary(),
            "read": "lazily (decoded on demand)" if self.lazy else "in memory",
            "labelled": self.labels is not None,
            "classes": list(self.class_names) if self.class_names else None,
            **({"skipped": self.meta["skipped"]} if self.meta.get("skipped") else {}),
        }


NORMALIZATION_SAMPLE = 1000


def _sampled_moments(pixels: Pixels, rows: np.ndarray, *, skip_bad: bool) -> tuple[np.ndarray, np.ndarray]:

    rng = np.random.default_rng(0x4E0)
    pick = np.sort(rng.choice(rows, min(NORMALIZATION_SAMPLE, len(rows)), replace=False))
    total = np.zeros(pixels.channels)
    sq = np.zeros(pixels.channels)
    count = 0
    for r in pick:
        try:
            x = pixels.read_chw(int(r)).double().div_(255.0).flatten(1)
        except BadImage as exc:
            if skip_bad:
                continue  # the training loop records it when it reads it
            raise MemlensError(f"{exc}; set data.on_bad_image: skip to leave such images out") from None
        total += x.sum(1).numpy()
        sq += x.square().sum(1).numpy()
        count += x.shape[1]
    mean = total / count
    return mean, np.sqrt(np.maximum(sq / count - mean**2, 0.0))
