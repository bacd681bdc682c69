"""From an index to a dataset: bad images, labels, lazy pixels and the optional decoded cache.

The decoded cache (``data.cache``) is for small images read many times (CIFAR-10 for 600 epochs):
one uint8 (N, S, S, C) ``.npy`` file in the memlens cache directory, written in chunks through
``np.lib.format.open_memmap`` (never a full in-memory copy), then memory-mapped read-only. It holds
exactly the pixels the lazy path decodes, so a run scores the same with or without it. ``auto``
builds it when every image has one square size (after ``resize``) and the file stays below
:data:`AUTO_CACHE_BYTES`; ``decoded`` asks for it (and refuses mixed sizes); ``none`` never.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from memlens import distributed as D
from memlens.config import DataConfig
from memlens.data.dataset import ArrayPixels, Dataset, LazyPixels
from memlens.data.decode import BadImage
from memlens.data.index import Index, check_problems
from memlens.errors import MemlensError
from memlens.io import sha256_bytes
from memlens.resources import available_cores

AUTO_CACHE_BYTES = 4 << 30
DECODED_VERSION = "1"


def finish(index: Index, reader, config: DataConfig, *, source: str, cache_dir: Path, where: str,
           meta: dict | None = None) -> Dataset:
    """The dataset of an index (see the module docstring).

    Raises:
        MemlensError: broken images under ``on_bad_image: fail``, no images, mixed labelling.
    """
    keep_rows = np.arange(len(index))
    bad = [i for i, p in enumerate(index.problems) if p]
    index, skipped = check_problems(index, policy=config.on_bad_image, where=where)
    if skipped:
        keep_rows = np.setdiff1d(keep_rows, bad)
        reader = Subset(reader, keep_rows)
    if not len(index):
        raise MemlensError(f"{where}: no readable images")
    labels = class_names = None
    named = [lab is not None for lab in index.labels]
    if any(named):
        if not all(named):
            missing = index.ids[named.index(False)]
            raise MemlensError(f"{where}: some images have a label and others do not (e.g. '{missing}')")
        class_names = tuple(_sorted_names(set(index.labels)))
        lookup = {c: k for k, c in enumerate(class_names)}
        labels = np.array([lookup[c] for c in index.labels], dtype=np.int64)
    channels = 3 if (index.channels == 3).any() else 1
    resize = config.resize
    sizes = np.stack([index.heights, index.widths], axis=1)
    if resize is not None:
        sizes = np.full_like(sizes, resize)
    ids = tuple(index.ids)
    fingerprint = index.fingerprint(f"channels={channels};resize={resize}")
    pixels = LazyPixels(reader, ids, sizes, channels, resize)
    meta = {**(meta or {}), **index.facts, "on_bad_image": config.on_bad_image, "digests": list(index.digests),
            **({"skipped": [{**x, "when": "index"} for x in skipped]} if skipped else {})}
    ds = Dataset(pixels=pixels, ids=ids, labels=labels, class_names=class_names, parts=np.array(index.parts),
                 source=source, meta=meta, content_fingerprint=fingerprint)
    out = _maybe_decoded(ds, config, cache_dir)
    verify_sample(out, seed=len(out))  # a few rows read again: ids paired with their own pixels
    return out


def _sorted_names(names: set[str]) -> list[str]:
    # integer class names (WebDataset .cls members, parquet int labels) in numeric order
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


class Subset:
    """A reader restricted to some of its rows (the images left after skipping broken ones)."""

    def __init__(self, reader, rows: np.ndarray):
        self.reader, self.rows = reader, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, i: int) -> bytes:
        return self.reader.read(int(self.rows[i]))


# ----------------------------------------------------------------------------- decoded cache


def _maybe_decoded(ds: Dataset, config: DataConfig, cache_dir: Path) -> Dataset:
    if config.cache == "none":
        return ds
    side = ds.square_size
    if side is None:
        if config.cache == "decoded":
            raise MemlensError(f"{ds.source}: data.cache: decoded needs images of one square size "
                               f"({ds.size_summary()}); set data.resize to squash them, or data.cache: none")
        return ds
    nbytes = len(ds) * side * side * ds.channels
    if config.cache == "auto" and nbytes > AUTO_CACHE_BYTES:
        return ds
    array = decoded_array(ds, cache_dir)
    out = Dataset(pixels=ArrayPixels(array), ids=ds.ids, labels=ds.labels, class_names=ds.class_names,
                  parts=ds.parts, source=ds.source, meta={**ds.meta, "decoded_cache": True},
                  content_fingerprint=ds.fingerprint)
    out.encoded = ds.pixels  # the images as encoded, for the integrity check (memlens.data.integrity)
    return out


def decoded_array(ds: Dataset, cache_dir: Path) -> np.ndarray:
    """The decoded pixels of a uniform lazy dataset, memory-mapped from the cache (built if missing)."""
    # The cache holds the pixels in row order, and the fingerprint does not depend on the order (the same files
    # in a folder and in a datasets dataset stored in another order have one fingerprint): the key must also
    # name the row order, here the content digest of every row in turn, or one source's rows are read with
    # another's pixels.
    rows = sha256_bytes("\n".join(ds.meta.get("digests") or ds.ids).encode())
    key = sha256_bytes(f"{DECODED_VERSION}|{ds.fingerprint}|{rows}".encode())[:32]
    path = cache_dir / f"decoded-{key}.npy"
    if D.is_main() and not path.is_file():
        _write_decoded(ds, path)
    D.barrier()
    if not path.is_file():  # another node's process 0 built it: build here too
        _write_decoded(ds, path)
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise MemlensError(f"decoded cache {path} is unreadable ({exc}); delete it") from None
    side = ds.square_size
    if array.shape != (len(ds), side, side, ds.channels) or array.dtype != np.uint8:
        path.unlink(missing_ok=True)
        return decoded_array(ds, cache_dir)
    return array


def _write_decoded(ds: Dataset, path: Path, chunk: int = 1024) -> None:

    side, c, n = ds.square_size, ds.channels, len(ds)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, side, side, c))
    pixels = ds.pixels

    def one(i: int) -> None:
        try:
            out[i] = pixels.read_chw(i).permute(1, 2, 0).numpy()
        except BadImage as exc:
            raise MemlensError(str(exc)) from None

    try:
        with ThreadPoolExecutor(max(1, available_cores())) as pool:
            for start in range(0, n, chunk):
                list(pool.map(one, range(start, min(n, start + chunk))))
        out.flush()
        out = None  # drop the mapping before the rename
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def verify_sample(ds: Dataset, *, k: int = 16, seed: int = 0) -> int:
    """Read ``k`` rows again from their source and check them against the index (their sha256) and, for a
    decoded cache, against the cache's pixels: an image read under another id's name, a file changed since
    it was indexed, or a stale cache is caught before any number is computed from it. Returns the number of
    rows checked (0 for data held in memory).

    Raises:
        MemlensError: naming the first id whose bytes or pixels do not match.
    """

    digests = ds.meta.get("digests")
    encoded = getattr(ds, "encoded", None) or (ds.pixels if isinstance(ds.pixels, LazyPixels) else None)
    if not digests or encoded is None or len(digests) != len(ds):
        return 0
    rows = np.random.default_rng(seed).choice(len(ds), min(k, len(ds)), replace=False)
    for i in sorted(int(r) for r in rows):
        try:
            data = encoded.reader.read(i)
        except OSError as exc:
            raise MemlensError(f"{ds.source}: image '{ds.ids[i]}' cannot be read again ({exc})") from None
        if hashlib.sha256(data).hexdigest() != digests[i]:
            raise MemlensError(f"{ds.source}: image '{ds.ids[i]}' does not hold the bytes indexed under its id "
                               f"(sha256 differs): the data changed since it was indexed, or ids and images are "
                               f"paired wrongly; delete the memlens cache to re-index")
        if encoded is not ds.pixels and not np.array_equal(encoded.read(i), ds.pixels.read(i)):
            raise MemlensError(f"{ds.source}: the decoded cache holds other pixels for '{ds.ids[i]}' than its image "
                               f"file; delete the memlens cache to rebuild it")
    return len(rows)
