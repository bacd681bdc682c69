"""Image sources: digits, synthetic, image folders and tar archives, and npz arrays.

Each source returns a :class:`~memlens.data.dataset.Dataset` of uint8 (N, H, W, C) images with
stable ids. Decoded folders and archives are cached under the memlens cache directory, keyed by
the content of the files, so only the first load pays for decoding.
"""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

import numpy as np

from memlens.config import DataConfig, SyntheticConfig
from memlens.data.dataset import Dataset
from memlens.errors import MemlensError
from memlens.io import atomic_write_bytes, sha256_bytes, sha256_file

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
CACHE_VERSION = "1"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "memlens"


def load(config: DataConfig | None = None, *, cache_dir: str | Path | None = None, **kwargs) -> Dataset:
    """Load the images a :class:`~memlens.config.DataConfig` describes.

    Args:
        config: the data settings; keyword arguments build one when omitted
            (``memlens.data.load(source="folder", path="imgs/")``).
        cache_dir: where decoded folders/archives are cached (default ``~/.cache/memlens``).

    Returns:
        The dataset, with its fingerprint available as ``dataset.fingerprint``.
    """
    if config is None:
        from memlens.config import validate

        config = validate(DataConfig, kwargs, source="data settings")
    elif kwargs:
        raise TypeError("pass either a DataConfig or keyword arguments, not both")
    if config.source == "manifest":
        return manifest(config.path, resize=config.resize, cache_dir=cache_dir)
    if config.source == "digits":
        ds = digits()
    elif config.source == "synthetic":
        ds = synthetic(config.synthetic)
    elif config.source == "npz":
        ds = npz(config.path)
    else:
        ds = folder(config.path, resize=config.resize, cache_dir=cache_dir)
        return ds
    if config.resize is not None and config.resize != ds.image_size:
        ds = _resize_dataset(ds, config.resize)
    return ds


# ----------------------------------------------------------------------------- digits


def digits() -> Dataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no download)."""
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


# ----------------------------------------------------------------------------- folders and archives


def folder(path: str | Path, *, resize: int | None = None, cache_dir: str | Path | None = None) -> Dataset:
    """An image folder or a .tar/.tar.gz of one, read without extracting to disk.

    Layout: optional ``train/`` and ``test/`` parts; inside each, either one sub-folder per
    class (labelled) or images directly (unlabelled). Ids are paths relative to the root.
    """
    path = Path(path)
    if not path.exists():
        raise MemlensError(f"image folder or archive not found: {path}")
    is_archive = path.is_file()
    if is_archive and not tarfile.is_tarfile(path):
        raise MemlensError(f"{path} is neither a folder nor a .tar/.tar.gz archive")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    content = sha256_file(path) if is_archive else _folder_digest(path)
    key = sha256_bytes(f"{CACHE_VERSION}|{content}|{resize}".encode())[:40]
    cached = cache_dir / f"images-{key}.npz"
    if cached.is_file():
        try:
            return _from_cache(cached, path)
        except (ValueError, OSError, KeyError):
            cached.unlink(missing_ok=True)  # a damaged cache entry is rebuilt, never trusted
    entries = _tar_entries(path) if is_archive else _folder_entries(path)
    ds = _decode(entries, resize=resize, where=path)
    _to_cache(cached, ds)
    return ds


def _folder_digest(root: Path) -> str:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    h = [f"{p.relative_to(root).as_posix()}:{sha256_file(p)}" for p in files]
    return sha256_bytes("\n".join(h).encode())


def _folder_entries(root: Path) -> list[tuple[str, Callable[[], bytes]]]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    return [(p.relative_to(root).as_posix(), p.read_bytes) for p in files]


def _tar_entries(path: Path) -> list[tuple[str, Callable[[], bytes]]]:
    out: list[tuple[str, bytes]] = []
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isfile() or PurePosixPath(member.name).suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                name = PurePosixPath(member.name).as_posix().lstrip("./")
                fh = tar.extractfile(member)
                out.append((name, fh.read() if fh else b""))
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise MemlensError(f"could not read archive {path}: {exc}") from None
    out.sort()
    # Bind each payload now: the archive is read once, sequentially (fast for .tar.gz).
    return [(name, (lambda b=data: b)) for name, data in out]


def _layout(names: list[str], where: Path) -> tuple[list[str], list[str | None]]:
    """Split relative paths into (part, class) following the documented layout."""
    paths = [PurePosixPath(n).parts for n in names]
    # An archive often wraps everything in one top-level folder: look through it.
    while all(len(p) > 2 for p in paths) and len({p[0] for p in paths}) == 1 and paths[0][0] not in ("train", "test"):
        paths = [p[1:] for p in paths]
    has_parts = all(p[0] in ("train", "test") and len(p) > 1 for p in paths)
    parts = [p[0] if has_parts else "train" for p in paths]
    rest = [p[1:] if has_parts else p for p in paths]
    depths = {len(r) for r in rest}
    if depths == {1}:
        return parts, [None] * len(paths)
    if depths == {2}:
        return parts, [r[0] for r in rest]
    raise MemlensError(f"{where}: mixed layout: images must all sit in class folders or all directly in the "
                       f"folder (or its train/ and test/ parts)")


def _decode(entries: list[tuple[str, Callable[[], bytes]]], *, resize: int | None, where: Path) -> Dataset:
    if not entries:
        raise MemlensError(f"{where}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    names = [n for n, _ in entries]
    parts, classes = _layout(names, where)
    stacked = _decode_images(entries, resize=resize, where=where)
    labels = class_names = None
    if classes[0] is not None:
        class_names = tuple(sorted(set(classes)))
        lookup = {c: k for k, c in enumerate(class_names)}
        labels = np.array([lookup[c] for c in classes], dtype=np.int64)
    return Dataset(images=stacked, ids=tuple(names), labels=labels, class_names=class_names,
                   parts=np.array(parts), source=f"{'archive' if where.is_file() else 'folder'} {where.name}")


def _decode_images(entries: list[tuple[str, Callable[[], bytes]]], *, resize: int | None, where: Path) -> np.ndarray:
    """Decode images to one uint8 (N, H, W, C) array; every unreadable image is named at once."""
    from PIL import Image, UnidentifiedImageError

    names = [n for n, _ in entries]
    imgs, bad = [], []
    for name, read in entries:
        try:
            with Image.open(io.BytesIO(read())) as im:
                im.load()
                im = im.convert("L") if im.mode in ("1", "L", "LA", "I", "I;16", "F") else im.convert("RGB")
                if resize is not None:
                    im = im.resize((resize, resize), Image.Resampling.BILINEAR)
                imgs.append(np.asarray(im, dtype=np.uint8))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            bad.append(f"{name} ({type(exc).__name__})")
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise MemlensError(f"{where}: {len(bad)} unreadable or corrupt image(s): {shown}")
    sizes = Counter(im.shape[:2] for im in imgs)
    if len(sizes) > 1:
        first_odd = next(n for n, im in zip(names, imgs, strict=True) if im.shape[:2] != sizes.most_common(1)[0][0])
        desc = ", ".join(f"{h}x{w}: {c}" for (h, w), c in sizes.most_common(3))
        raise MemlensError(f"{where}: images have mixed sizes ({desc}; e.g. {first_odd}); set data.resize "
                           f"(--resize N on the command line)")
    (h, w), = sizes
    if h != w:
        raise MemlensError(f"{where}: images are {h}x{w}, not square; set data.resize")
    rgb = any(im.ndim == 3 for im in imgs)
    return np.stack([np.repeat(im[..., None], 3, -1) if (rgb and im.ndim == 2) else
                     (im[..., None] if im.ndim == 2 else im) for im in imgs])


# ----------------------------------------------------------------------------- manifests

SUBSET_NAMES = {"s_s": "S_S", "shared": "S_S", "s_c": "S_C", "candidate": "S_C", "candidates": "S_C",
                "s_i": "S_I", "independent": "S_I", "s_e": "S_E", "extra": "S_E", "": None}


def read_manifest(path: str | Path) -> tuple[list[str], list[str | None], list[str | None]]:
    """A manifest CSV with a header naming ``path`` and optionally ``label`` and ``subset``.

    Returns:
        (paths as written, labels or None, subsets normalised to S_S/S_C/S_I/S_E or None).
    """
    import csv

    path = Path(path)
    if not path.is_file():
        raise MemlensError(f"manifest not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip().lower() for h in (reader.fieldnames or [])]
            if "path" not in header:
                raise MemlensError(f"{path}: the first line must name the columns, with a 'path' column "
                                   f"(optional: label, subset); found {', '.join(header) or 'nothing'}")
            rows = [{k.strip().lower(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise MemlensError(f"{path} is not a readable CSV file: {exc}") from None
    if not rows:
        raise MemlensError(f"{path} lists no images")
    paths = [r["path"] for r in rows]
    empty = [i + 2 for i, p in enumerate(paths) if not p]
    if empty:
        raise MemlensError(f"{path}: line {empty[0]} has an empty path")
    dup = next((p for p, c in Counter(paths).items() if c > 1), None)
    if dup:
        raise MemlensError(f"{path}: '{dup}' is listed twice")
    labels = [r.get("label") or None for r in rows] if "label" in header else [None] * len(rows)
    subsets: list[str | None] = []
    for i, r in enumerate(rows):
        raw = r.get("subset", "")
        if raw.lower() not in SUBSET_NAMES and raw not in ("S_S", "S_C", "S_I", "S_E"):
            raise MemlensError(f"{path}: line {i + 2}: unknown subset '{raw}'; valid: S_S, S_C, S_I, S_E (or shared, "
                               f"candidate, independent, extra)")
        subsets.append(raw if raw in ("S_S", "S_C", "S_I", "S_E") else SUBSET_NAMES[raw.lower()])
    return paths, labels, subsets


def manifest(path: str | Path, *, resize: int | None = None, cache_dir: str | Path | None = None) -> Dataset:
    """Images listed in a manifest CSV (paths relative to the manifest's folder, or absolute).

    Ids are the paths as written. Images of S_E ("extra": never trained on) form the test part.
    """
    path = Path(path)
    paths, labels, subsets = read_manifest(path)
    root = path.parent
    files = [Path(p) if Path(p).is_absolute() else root / p for p in paths]
    missing = [p for p, f in zip(paths, files, strict=True) if not f.is_file()]
    if missing:
        raise MemlensError(f"{path}: {len(missing)} listed image(s) not found, e.g. {missing[0]} (paths are relative "
                           f"to {root})")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    content = sha256_bytes("\n".join(f"{p}:{sha256_file(f)}" for p, f in zip(paths, files, strict=True)).encode())
    key = sha256_bytes(f"{CACHE_VERSION}|manifest|{content}|{resize}".encode())[:40]
    cached = cache_dir / f"images-{key}.npz"
    images = None
    if cached.is_file():
        try:
            with np.load(cached, allow_pickle=False) as z:
                images = z["x"]
        except (ValueError, OSError, KeyError):
            cached.unlink(missing_ok=True)
    if images is None:
        images = _decode_images([(p, f.read_bytes) for p, f in zip(paths, files, strict=True)], resize=resize,
                                where=path)
        buf = io.BytesIO()
        np.savez(buf, x=images)
        try:
            atomic_write_bytes(cached, buf.getvalue())
        except OSError:
            pass
    y = names = None
    if any(lab is not None for lab in labels):
        if any(lab is None for lab in labels):
            raise MemlensError(f"{path}: some rows have a label and others do not")
        names = tuple(sorted(set(labels)))
        lookup = {c: k for k, c in enumerate(names)}
        y = np.array([lookup[c] for c in labels], dtype=np.int64)
    parts = np.array(["test" if s == "S_E" else "train" for s in subsets])
    return Dataset(images=images, ids=tuple(paths), labels=y, class_names=names, parts=parts,
                   source=f"manifest {path.name}", meta={"subsets": subsets})


def _to_cache(path: Path, ds: Dataset) -> None:
    buf = io.BytesIO()
    arrays = {"x": ds.images, "ids": np.array(ds.ids), "parts": ds.parts.astype(str), "source": np.array(ds.source)}
    if ds.labels is not None:
        arrays["y"] = ds.labels
        arrays["class_names"] = np.array(ds.class_names)
    np.savez(buf, **arrays)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError:
        pass  # an unwritable cache only costs speed


def _from_cache(path: Path, where: Path) -> Dataset:
    with np.load(path, allow_pickle=False) as z:
        labels = z["y"] if "y" in z.files else None
        names = tuple(str(c) for c in z["class_names"].tolist()) if "class_names" in z.files else None
        return Dataset(images=z["x"], ids=tuple(z["ids"].tolist()), labels=labels, class_names=names,
                       parts=z["parts"].astype(str), source=str(z["source"]))


def _resize_dataset(ds: Dataset, size: int) -> Dataset:
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(ds.images).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    images = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    return Dataset(images=images, ids=ds.ids, labels=ds.labels, class_names=ds.class_names, parts=ds.parts,
                   source=f"{ds.source}, resized to {size}x{size}", meta=ds.meta)
