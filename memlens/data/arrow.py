"""Lazy sources in Arrow: Hugging Face ``datasets`` saved to disk, and parquet tables of image bytes.

* ``source: hf``, ``path``: a directory written by ``Dataset.save_to_disk`` or
  ``DatasetDict.save_to_disk`` (what ``load_dataset("imagefolder", ...)`` gives once saved; a plain
  image folder is read directly with ``source: folder``). ``datasets.load_from_disk`` memory-maps
  the Arrow files; the image column is read undecoded (``Image(decode=False)``: the encoded bytes,
  or the path of a file). Splits: ``train`` is the training part, ``test`` (else ``validation``)
  the test part; a single ``Dataset`` is all training.
* ``source: parquet``, ``path`` (and ``test_path``): a file, a directory or a glob of parquet files
  with an image column (raw bytes, or Hugging Face's ``{bytes, path}`` struct). Parquet pages are
  compressed and grouped, so random access to one row is slow: the table is converted once, in
  batches, to an uncompressed Arrow IPC file in the cache and memory-mapped from there.

Columns: ``image_column`` (default: the ``Image`` feature, else a column named image, img, jpg or
png), ``label_column`` (default: the ``ClassLabel`` feature, else label, labels or cls) and
``id_column`` (default: a column named id or __key__, else ``<part>/<row>``).
"""

from __future__ import annotations

import glob
import importlib
import os
from collections import Counter
from pathlib import Path

from memlens.config import DataConfig
from memlens.data.dataset import Dataset
from memlens.data.index import Index, cached_index, digest_all, make_index, stat_key
from memlens.data.lazy import finish
from memlens.data.readers import ArrowImages, HFImages, image_bytes, open_hf_splits
from memlens.errors import MemlensError
from memlens.io import sha256_bytes

IMAGE_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp")
LABEL_NAMES = ("label", "labels", "cls", "class")
ID_NAMES = ("id", "__key__", "key")


def _need(module: str, extra: str):

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MemlensError(f"this data source needs the '{module}' package: pip install 'memlens[{extra}]'") from None


def _pick(names: list[str], wanted: str | None, defaults: tuple[str, ...], what: str, where: str) -> str | None:
    if wanted is not None:
        if wanted not in names:
            raise MemlensError(f"{where}: no column '{wanted}' ({what}); columns: {', '.join(names)}")
        return wanted
    return next((n for n in defaults if n in names), None)


# ----------------------------------------------------------------------------- Hugging Face datasets


def hf(config: DataConfig, *, cache_dir: Path, collective: bool = False) -> Dataset:
    datasets = _need("datasets", "hf")
    path = Path(config.path)
    if not path.is_dir():
        raise MemlensError(f"Hugging Face dataset directory not found: {path}")
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise MemlensError(f"{path} is not a dataset saved with save_to_disk: {str(exc).splitlines()[0]}") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        test = "test" if "test" in names else ("validation" if "validation" in names else None)
        if "train" not in names and test is None:
            splits: list[tuple[str | None, str]] = [(names[0], "train")]
        else:
            splits = ([("train", "train")] if "train" in names else []) + ([(test, "test")] if test else [])
        first = loaded[splits[0][0]]
    else:
        splits, first = [(None, "train")], loaded
    features = first.features
    image_col = config.image_column or next(
        (k for k, v in features.items() if isinstance(v, datasets.Image)), None) or _pick(
        list(features), None, IMAGE_NAMES, "images", str(path))
    if image_col is None or image_col not in features:
        raise MemlensError(f"{path}: no image column found (features: {', '.join(features)}); set data.image_column")
    label_col = config.label_column or next(
        (k for k, v in features.items() if isinstance(v, datasets.ClassLabel)), None) or _pick(
        list(features), None, LABEL_NAMES, "labels", str(path))
    id_col = _pick(list(features), config.id_column, ID_NAMES, "ids", str(path))
    files = sorted({f["filename"] for name, _ in splits
                    for f in (loaded[name] if name is not None else loaded).cache_files})
    key = "\n".join(stat_key(f) for f in files) + f"|{image_col}|{label_col}|{id_col}|{splits}"

    def build() -> Index:
        tables = open_hf_splits(str(path), [s for s, _ in splits], image_col)
        ids, parts, labels, rows = [], [], [], []
        for k, (ds, (_, part)) in enumerate(zip(tables, splits, strict=True)):
            names = ds.features[label_col].names if label_col and isinstance(
                ds.features.get(label_col), datasets.ClassLabel) else None
            lab = ds[label_col] if label_col else [None] * len(ds)
            idv = ds[id_col] if id_col else [f"{part}/{r:07d}" for r in range(len(ds))]
            ids += [str(i) for i in idv]
            labels += [None if v is None else (names[int(v)] if names else str(v)) for v in lab]
            parts += [part] * len(ds)
            rows += [(k, r) for r in range(len(ds))]
        reader = HFImages(str(path), [s for s, _ in splits], image_col, rows)
        digests, headers = digest_all(len(ids), reader.read, collective=collective)
        return make_index(ids, parts, labels, digests, headers, {"rows": rows})

    index = cached_index(cache_dir, "hf", key, build, collective=collective)
    reader = HFImages(str(path), [s for s, _ in splits], image_col, index.facts.pop("rows"))
    _check_ids(index, str(path))
    return finish(index, reader, config, source=f"hf dataset {path.name}", cache_dir=cache_dir, where=str(path))


def _check_ids(index: Index, where: str) -> None:

    dup = next((i for i, c in Counter(index.ids).items() if c > 1), None)
    if dup is not None:
        raise MemlensError(f"{where}: id '{dup}' appears twice; ids must be unique (set data.id_column)")


# ----------------------------------------------------------------------------- parquet


def _parquet_files(pattern: str) -> list[str]:
    p = Path(pattern)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*.parquet"))
    elif any(ch in pattern for ch in "*?["):
        files = sorted(glob.glob(pattern))
    else:
        files = [pattern] if p.is_file() else []
    if not files:
        raise MemlensError(f"no parquet files at '{pattern}'")
    return files


def parquet(config: DataConfig, *, cache_dir: Path, collective: bool = False) -> Dataset:
    pa = _need("pyarrow", "hf")
    # pyarrow: optional or slow to import, loaded only on this path
    import pyarrow.parquet as pq

    sources = [(f, "train") for f in _parquet_files(config.path)]
    if config.test_path:
        sources += [(f, "test") for f in _parquet_files(config.test_path)]
    try:
        schema = pq.read_schema(sources[0][0])
    except (OSError, pa.ArrowException) as exc:
        raise MemlensError(f"{sources[0][0]} is not a readable parquet file: {exc}") from None
    names = list(schema.names)
    image_col = _pick(names, config.image_column, IMAGE_NAMES, "images", sources[0][0])
    if image_col is None:
        raise MemlensError(f"{sources[0][0]}: no image column found (columns: {', '.join(names)}); set "
                           f"data.image_column")
    label_col = _pick(names, config.label_column, LABEL_NAMES, "labels", sources[0][0])
    id_col = _pick(names, config.id_column, ID_NAMES, "ids", sources[0][0])
    key = "\n".join(stat_key(f) for f, _ in sources) + f"|{image_col}|{label_col}|{id_col}"
    ipc = cache_dir / f"arrow-{sha256_bytes(key.encode())[:32]}.arrow"
    if not ipc.is_file():
        _to_ipc(sources, ipc, image_col, label_col, id_col)
    reader = ArrowImages(str(ipc), "image")

    def build() -> Index:
        table = pa.ipc.open_file(pa.memory_map(str(ipc), "r")).read_all()
        ids = [str(x) for x in table.column("id").to_pylist()]
        parts = [str(x) for x in table.column("part").to_pylist()]
        labels = [None if x is None else str(x) for x in table.column("label").to_pylist()]
        digests, headers = digest_all(len(ids), reader.read, collective=collective)
        return make_index(ids, parts, labels, digests, headers)

    index = cached_index(cache_dir, "parquet", key, build, collective=collective)
    _check_ids(index, config.path)
    return finish(index, reader, config, source=f"parquet {Path(sources[0][0]).name}", cache_dir=cache_dir,
                  where=config.path)


def _to_ipc(sources: list[tuple[str, str]], out: Path, image_col: str, label_col: str | None,
            id_col: str | None) -> None:
    """Rewrite the parquet rows as one uncompressed Arrow IPC file (id, part, label, image bytes),
    batch by batch (memory stays one batch)."""
    # pyarrow: optional or slow to import, loaded only on this path
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), ("part", pa.string()), ("label", pa.string()), ("image", pa.binary())])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    counts = {"train": 0, "test": 0}
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for path, part in sources:
                cols = [c for c in (image_col, label_col, id_col) if c]
                for batch in pq.ParquetFile(path).iter_batches(batch_size=512, columns=cols):
                    n = batch.num_rows
                    images = [image_bytes(v) if v is not None else b"" for v in batch.column(image_col).to_pylist()]
                    labels = batch.column(label_col).to_pylist() if label_col else [None] * n
                    if id_col:
                        ids = [str(v) for v in batch.column(id_col).to_pylist()]
                    else:
                        ids = [f"{part}/{counts[part] + r:07d}" for r in range(n)]
                    counts[part] += n
                    writer.write_batch(pa.record_batch(
                        [pa.array(ids), pa.array([part] * n), pa.array([None if v is None else str(v) for v in labels],
                                                                         pa.string()),
                         pa.array(images, pa.binary())], schema=schema))
        os.replace(tmp, out)
    except (OSError, pa.ArrowException) as exc:
        Path(tmp).unlink(missing_ok=True)
        raise MemlensError(f"could not read parquet {path}: {exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
