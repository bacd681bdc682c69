"""Lazy sources of image files: folders, tar archives, WebDataset-style shards and manifests.

* **Folders** (``source: folder``, a directory): optional ``train/`` and ``test/`` parts, inside each
  one sub-folder per class (labelled) or the images directly (unlabelled); ids are the paths
  relative to the root. The layout of torchvision's ``ImageFolder`` and of Hugging Face's
  ``imagefolder`` builder.
* **Tar archives** (``source: folder``, a ``.tar``/``.tar.gz`` file): the same layout inside the
  archive, read without extracting (member offsets indexed once; a ``.tar.gz`` is decompressed once
  into the cache, since gzip allows no random access).
* **Shards** (``source: shards``, ``path: "data/train-{0000..0127}.tar"``, optional ``test_path``):
  WebDataset's convention, one sample per key (the member name up to the first dot of its file
  name) holding an image member (``jpg``, ``png``, ...) and optionally its label: a ``class`` member
  (the class name, as a folder's class sub-folder) or a ``cls`` member (an integer). Patterns are
  brace-expanded (the ``braceexpand`` package webdataset uses) or globbed. The id of a sample is
  its image member's name, so shards written from a folder keep the folder's ids and fingerprint.
* **Manifests** (``source: manifest``): a CSV ``path[,label][,subset]``, paths relative to it.
"""

from __future__ import annotations

import csv
import glob
import gzip
import os
import shutil
import tarfile
from collections import Counter
from pathlib import Path, PurePosixPath

import numpy as np

from memlens.config import DataConfig
from memlens.data.dataset import Dataset
from memlens.data.decode import IMAGE_EXTENSIONS
from memlens.data.index import Index, cached_index, digest_all, index_files, make_index, stat_key
from memlens.data.lazy import finish
from memlens.data.readers import Files, TarMembers
from memlens.errors import MemlensError
from memlens.io import sha256_bytes

# ----------------------------------------------------------------------------- layout


def layout(names: list[str], where: Path | str) -> tuple[list[str], list[str | None], list[str]]:
    """Split relative paths into (part, class, id) following the documented folder layout."""
    paths = [PurePosixPath(n).parts for n in names]
    # An archive often wraps everything in one top-level folder: look through it.
    while all(len(p) > 2 for p in paths) and len({p[0] for p in paths}) == 1 and paths[0][0] not in ("train", "test"):
        paths = [p[1:] for p in paths]
    has_parts = all(p[0] in ("train", "test") and len(p) > 1 for p in paths)
    parts = [p[0] if has_parts else "train" for p in paths]
    rest = [p[1:] if has_parts else p for p in paths]
    depths = {len(r) for r in rest}
    if depths == {1}:
        return parts, [None] * len(paths), list(names)
    if depths == {2}:
        return parts, [r[0] for r in rest], list(names)
    raise MemlensError(f"{where}: mixed layout: images must all sit in class folders or all directly in the "
                       f"folder (or its train/ and test/ parts)")


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


# ----------------------------------------------------------------------------- folders


def folder(config: DataConfig, *, cache_dir: Path, collective: bool = False) -> Dataset:
    """An image folder or a .tar/.tar.gz of one (see the module docstring)."""
    path = Path(config.path)
    if not path.exists():
        raise MemlensError(f"image folder or archive not found: {path}")
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise MemlensError(f"{path} is neither a folder nor a .tar/.tar.gz archive")
        return archive(config, cache_dir=cache_dir, collective=collective)
    files = sorted(p for p in path.rglob("*") if p.is_file() and _is_image(p.name))
    if not files:
        raise MemlensError(f"{path}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    names = [p.relative_to(path).as_posix() for p in files]
    parts, classes, ids = layout(names, path)
    abs_paths = [str(p) for p in files]
    digests, headers = index_files(abs_paths, cache_dir, key=str(path.resolve()), collective=collective)
    index = make_index(ids, parts, classes, digests, headers, {"files": len(files)})
    return finish(index, Files(abs_paths), config, source=f"folder {path.name}", cache_dir=cache_dir, where=str(path))


# ----------------------------------------------------------------------------- tar archives


def plain_tar(path: Path, cache_dir: Path) -> Path:
    """``path`` itself for a plain tar; a decompressed copy in the cache for a compressed one."""
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic != b"\x1f\x8b":
        return path
    out = cache_dir / f"untar-{sha256_bytes(stat_key(path).encode())[:32]}.tar"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            with gzip.open(path, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 22)
            os.replace(tmp, out)
        except (OSError, EOFError) as exc:
            Path(tmp).unlink(missing_ok=True)
            raise MemlensError(f"could not read archive {path}: {exc}") from None
    return out


def tar_members(path: Path) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of the regular-file members of a plain tar."""
    out = []
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if m.isfile():
                    out.append((PurePosixPath(m.name).as_posix().lstrip("./"), m.offset_data, m.size))
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise MemlensError(f"could not read archive {path}: {exc}") from None
    return out


def archive(config: DataConfig, *, cache_dir: Path, collective: bool = False) -> Dataset:
    path = Path(config.path)
    plain = plain_tar(path, cache_dir)
    members = sorted(m for m in tar_members(plain) if _is_image(m[0]))
    if not members:
        raise MemlensError(f"{path}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    reader = TarMembers([str(plain)], np.zeros(len(members)), [m[1] for m in members], [m[2] for m in members])

    def build() -> Index:
        names = [m[0] for m in members]
        parts, classes, ids = layout(names, path)
        digests, headers = digest_all(len(members), reader.read, collective=collective)
        return make_index(ids, parts, classes, digests, headers, {"archive": path.name})

    index = cached_index(cache_dir, "tar", stat_key(path), build, collective=collective)
    return finish(index, reader, config, source=f"archive {path.name}", cache_dir=cache_dir, where=str(path))


# ----------------------------------------------------------------------------- shards


def expand(pattern: str) -> list[str]:
    """Shard files of a brace pattern (``train-{0000..0127}.tar``) or a glob, in order."""
    # braceexpand: optional or slow to import, loaded only on this path
    from braceexpand import braceexpand

    out: list[str] = []
    for p in braceexpand(pattern):
        matches = sorted(glob.glob(p)) if any(ch in p for ch in "*?[") else [p]
        out += matches
    missing = [p for p in out if not Path(p).is_file()]
    if missing:
        raise MemlensError(f"shard {missing[0]} of '{pattern}' not found ({len(missing)} of {len(out)} missing)")
    if not out:
        raise MemlensError(f"'{pattern}' matches no shard files")
    return out


def _sample_key(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name into (key, extension) at the first dot of the file name."""
    p = PurePosixPath(name)
    stem, _, ext = p.name.partition(".")
    return (str(p.parent / stem) if str(p.parent) != "." else stem), ext.lower()


def shards(config: DataConfig, *, cache_dir: Path, collective: bool = False) -> Dataset:
    """WebDataset-style tar shards (see the module docstring)."""
    files = [(f, "train") for f in expand(config.path)]
    if config.test_path:
        files += [(f, "test") for f in expand(config.test_path)]
    plains = [str(plain_tar(Path(f), cache_dir)) for f, _ in files]
    key = "\n".join(stat_key(f) for f, _ in files) + f"\nimage={config.image_column}"

    def build() -> Index:
        return _index_shards(files, plains, config.image_column, collective=collective)

    index = cached_index(cache_dir, "shards", key, build, collective=collective)
    reader = TarMembers(plains, index.facts.pop("archive_of"), index.facts.pop("offsets"),
                        index.facts.pop("sizes"))
    name = Path(files[0][0]).name + (f" (+{len(files) - 1} shards)" if len(files) > 1 else "")
    return finish(index, reader, config, source=f"shards {name}", cache_dir=cache_dir, where=config.path)


def _index_shards(files: list[tuple[str, str]], plains: list[str], image_ext: str | None, *,
                  collective: bool) -> Index:
    samples: list[tuple[str, str]] = []  # (id, part)
    archive_of, offsets, sizes, label_members = [], [], [], []
    for k, ((_, part), plain) in enumerate(zip(files, plains, strict=True)):
        groups: dict[str, dict[str, tuple[int, int, str]]] = {}  # insertion order = shard order
        for name, off, size in tar_members(Path(plain)):
            key, ext = _sample_key(name)
            groups.setdefault(key, {})[ext] = (off, size, name)
        for members in groups.values():
            img = _pick_image(members, image_ext)
            if img is None:
                continue
            off, size, name = members[img]
            label = members.get("class") or members.get("cls") or members.get("label") or members.get("cls.txt")
            samples.append((name, part))
            archive_of.append(k)
            offsets.append(off)
            sizes.append(size)
            label_members.append((k, label[0], label[1]) if label else None)
    if not samples:
        raise MemlensError(f"{files[0][0]}: the shards hold no image samples")
    dup = next((i for i, c in Counter(s[0] for s in samples).items() if c > 1), None)
    if dup:
        raise MemlensError(f"sample '{dup}' appears in two shards")
    reader = TarMembers(plains, archive_of, offsets, sizes)
    labels: list[str | None] = [None] * len(samples)
    if any(label_members):
        fds = TarMembers(plains, [m[0] if m else 0 for m in label_members], [m[1] if m else 0 for m in label_members],
                         [m[2] if m else 0 for m in label_members])
        for i, m in enumerate(label_members):
            if m is not None:
                text = fds.read(i).decode("utf-8", "replace").strip()
                labels[i] = str(int(text)) if text.lstrip("-").isdigit() else text
        fds.close()
    digests, headers = digest_all(len(samples), reader.read, collective=collective)
    reader.close()
    facts = {"shards": len(files), "archive_of": archive_of, "offsets": offsets, "sizes": sizes}
    return make_index([s[0] for s in samples], [s[1] for s in samples], labels, digests, headers, facts)


IMAGE_EXT_PREFERENCE = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")


def _pick_image(members: dict, wanted: str | None) -> str | None:
    if wanted:
        return wanted if wanted in members else None
    for ext in IMAGE_EXT_PREFERENCE:
        if ext in members:
            return ext
    return None


# ----------------------------------------------------------------------------- manifests

SUBSET_NAMES = {"s_s": "S_S", "shared": "S_S", "s_c": "S_C", "candidate": "S_C", "candidates": "S_C",
                "s_i": "S_I", "independent": "S_I", "s_e": "S_E", "extra": "S_E", "": None}


def read_manifest(path: str | Path) -> tuple[list[str], list[str | None], list[str | None]]:
    """A manifest CSV with a header naming ``path`` and optionally ``label`` and ``subset``.

    Returns:
        (paths as written, labels or None, subsets normalised to S_S/S_C/S_I/S_E or None).
    """
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


def manifest(config: DataConfig, *, cache_dir: Path, collective: bool = False) -> Dataset:
    """Images listed in a manifest CSV (paths relative to the manifest's folder, or absolute).

    Ids are the paths as written. Images of S_E ("extra": never trained on) form the test part.
    """
    path = Path(config.path)
    paths, labels, subsets = read_manifest(path)
    root = path.parent
    files = [Path(p) if Path(p).is_absolute() else root / p for p in paths]
    missing = [p for p, f in zip(paths, files, strict=True) if not f.is_file()]
    if missing:
        raise MemlensError(f"{path}: {len(missing)} listed image(s) not found, e.g. {missing[0]} (paths are relative "
                           f"to {root})")
    abs_paths = [str(f.resolve()) for f in files]
    digests, headers = index_files(abs_paths, cache_dir, key=str(path.resolve()), collective=collective)
    parts = ["test" if s == "S_E" else "train" for s in subsets]
    index = make_index(paths, parts, labels, digests, headers)
    ds = finish(index, Files(abs_paths), config, source=f"manifest {path.name}", cache_dir=cache_dir, where=str(path))
    keep = set(ds.ids)
    ds.meta["subsets"] = [s for p, s in zip(paths, subsets, strict=True) if p in keep]
    return ds
