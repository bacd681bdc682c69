"""Indexes of lazy image sources: which images there are, their size, and a digest of their bytes.

Indexing reads every image's encoded bytes once: a streaming sha256 (the dataset fingerprint is
built from these digests, never from decoded pixels) and a header probe (size, colour, truncation:
:func:`memlens.data.decode.probe`), in a thread pool (file reads and hashing release the GIL). The
result is cached in the memlens cache directory:

* image folders and manifests: per file, keyed by (path, size, mtime); a later load re-hashes only
  the files whose size or mtime changed;
* tar archives and shards: per archive, keyed by (path, size, mtime), member offsets included;
* Arrow data (Hugging Face datasets on disk, parquet converted once to Arrow IPC): keyed by the
  (path, size, mtime) of their files.

Under ``torchrun`` (``collective=True``) every process hashes a share of the items and the shares
are gathered, so no process reads the whole dataset.

Fingerprint: sha256 over one line per image, sorted by id: ``id, sha256(bytes)``, then the decode
settings. The same bytes with the same ids give the same fingerprint whether they sit in a folder,
a tar archive, shards, a ``datasets`` dataset or a parquet table, in any row order (ids must
agree: a folder's id is the file's relative path, a shard's the image member's name, an Arrow
table's its id column).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from memlens import distributed as D
from memlens.data.decode import Header, probe
from memlens.errors import MemlensError
from memlens.io import atomic_write_bytes, sha256_bytes
from memlens.resources import available_cores

INDEX_VERSION = "2"


@dataclass
class Index:
    """One row per image, in the dataset's order."""

    ids: list[str]
    parts: list[str]
    labels: list[str | None]
    digests: list[str]
    heights: np.ndarray
    widths: np.ndarray
    channels: np.ndarray
    problems: list[str | None]
    facts: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, keep: np.ndarray) -> "Index":
        k = np.flatnonzero(keep)
        return Index([self.ids[i] for i in k], [self.parts[i] for i in k], [self.labels[i] for i in k],
                     [self.digests[i] for i in k], self.heights[k], self.widths[k], self.channels[k],
                     [self.problems[i] for i in k], dict(self.facts))

    def fingerprint(self, settings: str) -> str:
        """sha256 over (id, content digest) pairs sorted by id, then the decode settings: the same image files
        have one fingerprint in a folder, an archive, shards, parquet or a datasets dataset, whatever the row
        order and however each format spells its parts and labels."""
        order = sorted(range(len(self.ids)), key=lambda i: self.ids[i])
        h = hashlib.sha256()
        for i in order:
            h.update(f"{self.ids[i]}\t{self.digests[i]}\n".encode())
        h.update(f"decode:{settings}\n".encode())
        return h.hexdigest()


def _worker_count() -> int:

    return max(2, min(16, 2 * available_cores()))


def digest_all(n: int, read: Callable[[int], bytes], *, collective: bool = False,
               rows: np.ndarray | None = None) -> tuple[list[str], list[Header]]:
    """sha256 and header probe of ``read(i)`` for every i (or ``rows``), in a thread pool;
    split across processes when ``collective``."""
    todo = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
    mine = todo[D.rank()::D.world_size()] if collective and D.active() else todo

    def one(i: int) -> tuple[int, str, Header]:
        try:
            data = read(int(i))
        except OSError as exc:
            return int(i), "", Header(0, 0, 0, f"unreadable ({exc})")
        return int(i), hashlib.sha256(data).hexdigest(), probe(data)

    if len(mine) > 64:
        with ThreadPoolExecutor(_worker_count()) as pool:
            done = list(pool.map(one, mine, chunksize=64))
    else:
        done = [one(i) for i in mine]
    if collective and D.active():
        done = [x for part in D.all_gather_object(done) for x in part]
    digests: list[str] = [""] * n
    headers: list[Header] = [Header(0, 0, 0, "not indexed")] * n
    for i, d, h in done:
        digests[i], headers[i] = d, h
    return digests, headers


def make_index(ids: list[str], parts: list[str], labels: list[str | None], digests: list[str],
               headers: list[Header], facts: dict | None = None) -> Index:
    return Index(list(ids), list(parts), list(labels), list(digests),
                 np.array([h.height for h in headers], dtype=np.int32),
                 np.array([h.width for h in headers], dtype=np.int32),
                 np.array([h.channels for h in headers], dtype=np.int8), [h.problem for h in headers],
                 dict(facts or {}))


# ----------------------------------------------------------------------------- per-file cache


def _cache_path(cache_dir: Path, kind: str, key: str) -> Path:
    return cache_dir / f"index-{kind}-{sha256_bytes(f'{INDEX_VERSION}|{kind}|{key}'.encode())[:32]}.npz"


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError:
        pass  # an unwritable cache only costs time


def _load(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError):
        path.unlink(missing_ok=True)  # a damaged cache entry is rebuilt, never trusted
        return None


def stat_key(path: str | Path) -> str:
    st = os.stat(path)
    return f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}"


def index_files(paths: list[str], cache_dir: Path, *, key: str,
                collective: bool = False) -> tuple[list[str], list[Header]]:
    """Digests and headers of files, reusing the cached ones whose (path, size, mtime) is unchanged."""
    stats = []
    for p in paths:
        st = os.stat(p)
        stats.append(f"{p}|{st.st_size}|{st.st_mtime_ns}")
    cache = _cache_path(cache_dir, "files", key)
    old = _load(cache)
    known: dict[str, tuple[str, int, int, int, str]] = {}
    if old is not None:
        for s, d, h, w, c, pr in zip(old["stat"].tolist(), old["digest"].tolist(), old["h"].tolist(),
                                     old["w"].tolist(), old["c"].tolist(), old["problem"].tolist(), strict=True):
            known[s] = (d, h, w, c, pr)
    todo = np.array([i for i, s in enumerate(stats) if s not in known], dtype=np.int64)
    if collective and D.active():  # every process hashes what any process lacks (caches may differ by node)
        todo = np.unique(np.concatenate(D.all_gather_object(todo))).astype(np.int64)
    digests, headers = digest_all(len(paths), lambda i: Path(paths[i]).read_bytes(), collective=collective,
                                  rows=todo)
    for i, s in enumerate(stats):
        if s in known:
            d, h, w, c, pr = known[s]
            digests[i], headers[i] = d, Header(int(h), int(w), int(c), pr or None)
    if len(todo) and D.is_main():
        _save(cache, {"stat": np.array(stats), "digest": np.array(digests),
                      "h": np.array([h.height for h in headers]), "w": np.array([h.width for h in headers]),
                      "c": np.array([h.channels for h in headers]),
                      "problem": np.array([h.problem or "" for h in headers])})
    return digests, headers


def cached_index(cache_dir: Path, kind: str, key: str, build: Callable[[], Index], *,
                 collective: bool = False) -> Index:
    """An index cached whole under ``key`` (archives, Arrow files: their (path, size, mtime))."""

    path = _cache_path(cache_dir, kind, key)
    old = _load(path)
    if collective and D.active() and not all(D.all_gather_object(old is not None)):
        old = None  # one process lacks it: all build it together (building is collective)
    if old is not None:
        labels = [x or None for x in old["labels"].tolist()]
        return Index(old["ids"].tolist(), old["parts"].tolist(), labels, old["digests"].tolist(), old["h"], old["w"],
                     old["c"], [x or None for x in old["problems"].tolist()], json.loads(str(old["facts"])))
    index = build()
    if D.is_main():
        _save(path, {"ids": np.array(index.ids), "parts": np.array(index.parts),
                     "labels": np.array([x or "" for x in index.labels]), "digests": np.array(index.digests),
                     "h": index.heights, "w": index.widths, "c": index.channels,
                     "problems": np.array([x or "" for x in index.problems]),
                     "facts": np.array(json.dumps(index.facts))})
    return index


def check_problems(index: Index, *, policy: str, where: str) -> tuple[Index, list[dict]]:
    """Apply ``on_bad_image`` to the images the index found broken.

    Returns:
        The index of the good images and the skipped ones ({id, problem}).

    Raises:
        MemlensError: ``fail`` and broken images, all named (the first five).
    """
    bad = [i for i, p in enumerate(index.problems) if p]
    if not bad:
        return index, []
    if policy == "fail":
        shown = ", ".join(f"{index.ids[i]} ({index.problems[i]})" for i in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise MemlensError(f"{where}: {len(bad)} unreadable or corrupt image(s): {shown}{more}; remove them, or set "
                           f"data.on_bad_image: skip to leave them out (recorded)")
    keep = np.ones(len(index), dtype=bool)
    keep[bad] = False
    skipped = [{"id": index.ids[i], "problem": index.problems[i]} for i in bad]
    return index.select(keep), skipped
