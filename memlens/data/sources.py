"""Image sources: which one a :class:`~memlens.config.DataConfig` names, and the ones held in memory.

In memory (a uint8 (N, H, W, C) array): ``digits`` (scikit-learn's bundled 8x8 digits),
``synthetic`` (generated, with planted atypical points) and ``npz`` arrays. Read lazily, each
image at its own size (:mod:`memlens.data.files`, :mod:`memlens.data.arrow`): ``folder`` (a
directory or a .tar/.tar.gz), ``shards`` (WebDataset-style tar shards), ``hf`` (a Hugging Face
``datasets`` dataset on disk), ``parquet`` and ``manifest``. Lazy sources are indexed once (ids,
sizes, sha256 of every image's bytes) and the index is cached under the memlens cache directory.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from memlens.config import DataConfig, SyntheticConfig, validate
from memlens.data import arrow, files
from memlens.data.dataset import Dataset
from memlens.errors import MemlensError

LAZY_SOURCES = ("folder", "shards", "hf", "parquet", "manifest")


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "memlens"


def load(config: DataConfig | None = None, *, cache_dir: str | Path | None = None, collective: bool = False,
         **kwargs) -> Dataset:
    """Load the images a :class:`~memlens.config.DataConfig` describes.

    Args:
        config: the data settings; keyword arguments build one when omitted
            (``memlens.data.load(source="folder", path="imgs/")``).
        cache_dir: where indexes and decoded images are cached (default ``~/.cache/memlens``).
        collective: every process of a ``torch.distributed`` group calls this together; the
            indexing of lazy sources is then split across them.

    Returns:
        The dataset, with its fingerprint available as ``dataset.fingerprint``.
    """
    if config is None:

        config = validate(DataConfig, kwargs, source="data settings")
    elif kwargs:
        raise TypeError("pass either a DataConfig or keyword arguments, not both")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if config.source in LAZY_SOURCES:

        build = {"folder": files.folder, "shards": files.shards, "manifest": files.manifest, "hf": arrow.hf,
                 "parquet": arrow.parquet}[config.source]
        return build(config, cache_dir=cache, collective=collective)
    if config.source == "digits":
        ds = digits()
    elif config.source == "synthetic":
        ds = synthetic(config.synthetic)
    else:
        ds = npz(config.path)
    if config.resize is not None and config.resize != ds.image_size:
        ds = _resize_dataset(ds, config.resize)
    return ds


# ----------------------------------------------------------------------------- digits


def digits() -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no download)."""
    # sklearn: optional or slow to import, loaded only on this path
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
    n = len(x)
    return Dataset(
        images=x,
        ids=tuple(f"digits/{i:04d}" for i in range(n)),
        labels=bunch.target.astype(np.int64),
        class_names=tuple(str(c) for c in range(10)),
        parts=np.full(n, "train"),
        source="digits (scikit-learn, 8x8)",
    )


# ----------------------------------------------------------------------------- synthetic


def synthetic(cfg: SyntheticConfig) -> Dataset:
    """Class prototypes with per-image jitter, plus optional planted atypical points.

    Typical images are a class prototype (a smooth random colour field) shifted by a few
    pixels, rescaled in brightness and perturbed with noise, so every image has many near
    neighbours. A planted outlier is a class of its own with a single member: a high-frequency
    colour field of its own with a bright blob somewhere, so its crops resemble no other image's
    and differ from one another (the SSLMem paper's picture of an atypical point, Appendix D.3:
    an augmentation set that overlaps no other). Self-similar textures such as stripes would
    not do: any two crops of them look alike to every encoder. Their ids are recorded in
    ``meta["outlier_ids"]``.
    """
    rng = np.random.default_rng(cfg.seed)
    s, c = cfg.image_size, cfg.channels
    yy, xx = np.meshgrid(np.linspace(0, 1, s, endpoint=False), np.linspace(0, 1, s, endpoint=False), indexing="ij")

    def smooth_field(amplitude: float, freqs: tuple[int, int] = (1, 4)) -> np.ndarray:
        field = np.zeros((s, s, c))
        for _ in range(3):
            fy, fx = rng.integers(*freqs, size=2)
            phase = rng.uniform(0, 2 * np.pi)
            colour = rng.uniform(-1, 1, size=c)
            field += np.sin(2 * np.pi * (fy * yy + fx * xx) + phase)[..., None] * colour
        return amplitude * field / 3.0

    prototypes = [0.5 + smooth_field(0.9) for _ in range(cfg.classes)]
    shift = max(1, s // 8)

    def typical(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, cfg.classes, size=n)
        out = np.empty((n, s, s, c))
        for i, k in enumerate(labels):
            dy, dx = rng.integers(-shift, shift + 1, size=2)
            img = np.roll(prototypes[k], (dy, dx), axis=(0, 1)) * rng.uniform(0.85, 1.15)
            out[i] = img + smooth_field(0.25) + rng.normal(0, 0.03, size=(s, s, c))
        return out, labels

    def outlier() -> np.ndarray:
        # A singleton: its own high-frequency colour field plus a bright blob somewhere. Different
        # crops of it look different (one holds the blob, another does not), so only an encoder
        # that has seen this very image maps them together.
        cy, cx = rng.uniform(0.15, 0.85, size=2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 0.12 ** 2))[..., None] * rng.uniform(-1, 1, size=c)
        return 0.5 + smooth_field(1.2, (2, 6)) + 0.8 * blob + rng.normal(0, 0.03, size=(s, s, c))

    x_train, y_train = typical(cfg.n)
    outlier_rows = np.sort(rng.choice(cfg.n, size=cfg.outliers, replace=False)) if cfg.outliers else np.array([], int)
    for row in outlier_rows:
        x_train[row] = outlier()
    ids = [f"synthetic/train/{i:05d}" for i in range(cfg.n)]
    parts = ["train"] * cfg.n
    xs, ys = [x_train], [y_train]
    if cfg.n_test:
        x_test, y_test = typical(cfg.n_test)
        xs.append(x_test)
        ys.append(y_test)
        ids += [f"synthetic/test/{i:05d}" for i in range(cfg.n_test)]
        parts += ["test"] * cfg.n_test
    images = np.rint(np.concatenate(xs).clip(0, 1) * 255).astype(np.uint8)
    return Dataset(
        images=images,
        ids=tuple(ids),
        labels=np.concatenate(ys).astype(np.int64),
        class_names=tuple(f"class{k}" for k in range(cfg.classes)),
        parts=np.array(parts),
        source=f"synthetic (seed {cfg.seed}, {s}x{s}x{c}, {cfg.classes} classes, {cfg.outliers} outliers)",
        meta={"outlier_ids": [ids[r] for r in outlier_rows]},
    )


# ----------------------------------------------------------------------------- npz


def npz(path: str | Path) -> Dataset:
    """Arrays ``x`` (uint8 NHWC or NHW), optional ``y``, ``x_test``/``y_test``, ``class_names``, ``ids``."""
    path = Path(path)
    if not path.is_file():
        raise MemlensError(f"npz file not found: {path}")
    try:
        arrays = np.load(path, allow_pickle=False)
        data = {k: arrays[k] for k in arrays.files}
    except (ValueError, OSError) as exc:
        raise MemlensError(f"{path} is not a readable .npz of plain arrays: {exc}") from None
    if "x" not in data:
        raise MemlensError(f"{path} has no array named 'x' (found: {', '.join(data) or 'none'})")

    def images(key: str) -> np.ndarray:
        x = data[key]
        if x.dtype != np.uint8:
            raise MemlensError(f"{path}: '{key}' must be uint8 pixels in 0..255, got {x.dtype}")
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise MemlensError(f"{path}: '{key}' must have shape (N, H, W[, 1|3]), got {x.shape}")
        return x

    xs = [images("x")]
    parts = ["train"] * len(xs[0])
    if "x_test" in data:
        xs.append(images("x_test"))
        parts += ["test"] * len(xs[1])
    if len({x.shape[1:] for x in xs}) != 1:
        raise MemlensError(f"{path}: 'x' and 'x_test' have different image shapes")
    labels = None
    if "y" in data:
        ys = [data["y"].astype(np.int64).reshape(-1)]
        if "x_test" in data:
            if "y_test" not in data:
                raise MemlensError(f"{path}: 'y' is given but 'y_test' is missing")
            ys.append(data["y_test"].astype(np.int64).reshape(-1))
        labels = np.concatenate(ys)
        if len(labels) != len(parts):
            raise MemlensError(f"{path}: labels and images differ in number")
    class_names = None
    if labels is not None:
        if "class_names" in data:
            class_names = tuple(str(c) for c in data["class_names"].tolist())
        else:
            class_names = tuple(str(c) for c in range(int(labels.max()) + 1))
        if labels.min() < 0 or labels.max() >= len(class_names):
            raise MemlensError(f"{path}: labels must lie in 0..{len(class_names) - 1}")
    if "ids" in data:
        ids = tuple(str(i) for i in data["ids"].tolist())
    else:
        ids = tuple(f"{p}/{i:06d}" for p, i in _numbered(parts))
    return Dataset(images=np.concatenate(xs), ids=ids, labels=labels, class_names=class_names,
                   parts=np.array(parts), source=f"npz {path.name}")


def _numbered(parts: list[str]) -> Iterator[tuple[str, int]]:
    counts: Counter[str] = Counter()
    for p in parts:
        yield p, counts[p]
        counts[p] += 1


def _resize_dataset(ds: Dataset, size: int) -> Dataset:

    x = torch.from_numpy(ds.images).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    images = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return Dataset(images=images, ids=ds.ids, labels=ds.labels, class_names=ds.class_names, parts=ds.parts,
                   source=f"{ds.source}, resized to {size}x{size}", meta=ds.meta)
