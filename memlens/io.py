"""Small file helpers: atomic writes, hashing, canonical JSON, run-directory guards.

Everything memlens writes goes through :func:`atomic_write_bytes` (write to a temporary
file in the same directory, fsync, then ``os.replace``), so an interrupted command never
leaves a half-written artefact behind.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from memlens.errors import MemlensError


def _umask() -> int:
    # The process umask can only be read by setting it; put it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of the files memlens writes: 0666 minus the umask (0644 under the usual 022)."""
    return 0o666 & ~_umask()


def directory_mode() -> int:
    """Mode of the directories memlens creates itself: 0777 minus the umask (0755 under 022)."""
    return 0o777 & ~_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, mode: int | None = None) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync, then rename over ``path``.

    The file gets the mode an ordinary ``open(path, "w")`` would give it (the umask applies);
    ``mkstemp`` alone would leave it 0600. ``mode``: this mode instead (0600 for files holding a secret).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode() if mode is None else mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _clean_floats(obj: Any) -> Any:
    # JSON has no inf/nan; memlens writes them as strings so the files stay standard JSON.
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {k: _clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_floats(v) for v in obj]
    return obj


def dumps(obj: Any, *, indent: int | None = 2) -> str:
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    return json.dumps(_clean_floats(json.loads(json.dumps(obj, default=_json_default))), indent=indent,
                      sort_keys=False, ensure_ascii=False)


def canonical_json(obj: Any) -> str:
    """Key-sorted, whitespace-free JSON: the input of every hash memlens records."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default, ensure_ascii=False)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, dumps(obj) + "\n")


def read_json(path: str | os.PathLike, *, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise MemlensError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MemlensError(f"{what} {path} is not valid JSON: {exc}") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return sha256_bytes(canonical_json(obj).encode("utf-8"))


def prepare_output_dir(path: str | os.PathLike, *, force: bool, resume: bool = False, marker: str) -> Path:
    """Create an output directory, refusing to clobber an existing run.

    Args:
        path: the directory.
        force: delete whatever is there and start afresh.
        resume: keep what is there (the caller continues it).
        marker: the file whose presence means "a memlens output lives here"
            (``run.json``, ``audit.json``...).

    Raises:
        MemlensError: the directory holds a previous output and neither flag was given.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MemlensError(f"output path {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if resume:
            return path
        if not force:
            what = "a previous output" if (path / marker).exists() else "other files"
            raise MemlensError(f"{path} already holds {what}; pass --force to overwrite it"
                               + (" or --resume to continue it" if marker == "run.json" else ""))
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_writable(path: str | os.PathLike, *, what: str = "output") -> None:
    """Refuse, before any work, an output path memlens could not write: the nearest existing
    ancestor must be a directory this process may write into (and the path itself, if it exists).

    Raises:
        MemlensError: naming the path and why.
    """
    path = Path(path)
    probe = path if path.is_dir() else path.parent
    while not probe.exists():
        probe = probe.parent
    if path.exists() and not os.access(path, os.W_OK):
        raise MemlensError(f"cannot write the {what} {path}: permission denied")
    if not probe.is_dir():
        raise MemlensError(f"cannot write the {what} {path}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise MemlensError(f"cannot write the {what} {path}: {probe} is not writable")


class output_lock:  # noqa: N801 - a context manager used as a function
    """One writer per output: an exclusive lock beside ``path`` for the duration of the block.

    A second memlens writing the same output is refused at once (naming the holder's pid) instead of
    silently replacing the first one's result.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path).resolve()
        self.path = path
        self.lock = path.parent / f".{path.name}.memlens-lock"
        self.fd: int | None = None

    def __enter__(self) -> "output_lock":

        self.lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "ignore").strip() or "?"
            os.close(fd)
            raise MemlensError(f"{self.path} is being written by another memlens (pid {holder}); wait for it to finish "
                               f"or choose another output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            self.lock.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None
