"""Where the encoded bytes of image number i live: files, tar members, Arrow tables.

Readers are small picklable objects (DataLoader workers receive them) that open their files
lazily in each process and read one image's bytes by random access:

* :class:`Files`: one file per image (image folders, manifests);
* :class:`TarMembers`: members of uncompressed tar files, read with ``os.pread`` at the offsets
  indexed once (tar archives and WebDataset-style shards; a ``.tar.gz`` is decompressed once into
  the cache, since gzip has no random access);
* :class:`HFImages`: a Hugging Face ``datasets`` dataset saved with ``save_to_disk`` (Arrow files,
  memory-mapped by ``datasets``; the image column read undecoded);
* :class:`ArrowImages`: an Arrow IPC file (what a parquet table is converted to once), memory-mapped
  with pyarrow.

Random access is deliberate, also for shards: DP-SGD's accountant assumes every example is drawn
independently (Poisson sampling) and memlens seeds each example's views by its id, neither of
which a shard-streaming pipeline with shuffle buffers provides.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np


class ByteReader:
    """Encoded bytes of image ``i`` (0-based, in the dataset's order)."""

    def read(self, i: int) -> bytes:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError


class Files(ByteReader):
    def __init__(self, paths: list[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> bytes:
        with open(self.paths[i], "rb") as fh:
            return fh.read()


class TarMembers(ByteReader):
    """Members of plain tar files at known data offsets (opened once per process)."""

    def __init__(self, archives: list[str], archive_of: np.ndarray, offsets: np.ndarray, sizes: np.ndarray):
        self.archives = list(archives)
        self.archive_of = np.asarray(archive_of, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self._fds: dict[int, int] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fds"], state["_pid"] = {}, -1  # descriptors do not cross processes
        return state

    def _fd(self, k: int) -> int:
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(k)
        if fd is None:  # indexing reads from threads: keep the first descriptor opened
            new = os.open(self.archives[k], os.O_RDONLY)
            fd = self._fds.setdefault(k, new)
            if fd != new:
                os.close(new)
        return fd

    def read(self, i: int) -> bytes:
        size = int(self.sizes[i])
        data = os.pread(self._fd(int(self.archive_of[i])), size, int(self.offsets[i]))
        if len(data) != size:
            raise OSError(f"short read ({len(data)} of {size} bytes): the archive changed since it was indexed")
        return data

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


class HFImages(ByteReader):
    """The image column of a ``datasets`` dataset on disk (one split or several, concatenated)."""

    def __init__(self, path: str, splits: list[str | None], column: str, rows: list[tuple[int, int]]):
        self.path, self.splits, self.column = path, list(splits), column
        self.rows = np.asarray(rows, dtype=np.int64).reshape(-1, 2)  # (split number, row in split)
        self._data: list | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_data"], state["_pid"] = None, -1
        return state

    def _tables(self) -> list:
        if self._data is None or self._pid != os.getpid():
            self._data, self._pid = open_hf_splits(self.path, self.splits, self.column), os.getpid()
        return self._data

    def read(self, i: int) -> bytes:
        split, row = self.rows[i]
        return image_bytes(self._tables()[int(split)][int(row)][self.column])


def open_hf_splits(path: str, splits: list[str | None], column: str) -> list:
    """The splits of a saved ``datasets`` dataset with ``column`` left undecoded (bytes and path)."""
    # datasets: loaded where this runs, so importing memlens.data.readers stays light
    import datasets

    loaded = datasets.load_from_disk(path)
    out = []
    for name in splits:
        ds = loaded if name is None else loaded[name]
        if isinstance(ds.features.get(column), datasets.Image):
            ds = ds.cast_column(column, datasets.Image(decode=False))
        out.append(ds)
    return out


def image_bytes(value: Any) -> bytes:
    """Bytes of an image cell: raw bytes, or Hugging Face's {"bytes": ..., "path": ...} struct."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        if value.get("path"):
            with open(value["path"], "rb") as fh:
                return fh.read()
    raise OSError("the image cell holds neither bytes nor a readable path")


class ArrowImages(ByteReader):
    """The image column of an Arrow IPC file, memory-mapped (random access without loading it)."""

    def __init__(self, path: str, column: str):
        self.path, self.column = path, column
        self._col = None
        self._starts: np.ndarray | None = None
        self._pid = -1
        self._n = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_col"], state["_starts"], state["_pid"] = None, None, -1
        return state

    def _column(self):
        if self._col is None or self._pid != os.getpid():
            # pyarrow: loaded where this runs, so importing memlens.data.readers stays light
            import pyarrow as pa

            table = pa.ipc.open_file(pa.memory_map(self.path, "r")).read_all()
            self._col = table.column(self.column)
            self._starts = np.cumsum([0] + [len(c) for c in self._col.chunks])
            self._pid = os.getpid()
        return self._col

    def __len__(self) -> int:
        if self._n is None:
            self._n = len(self._column())
        return self._n

    def read(self, i: int) -> bytes:
        col = self._column()
        k = int(np.searchsorted(self._starts, i, side="right") - 1)
        return image_bytes(col.chunks[k][i - int(self._starts[k])].as_py())
