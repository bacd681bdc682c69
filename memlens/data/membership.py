"""Splits from the membership of encoders trained elsewhere: lists of the images f and g trained on
(and of images neither saw), or a manifest declaring each image's subset (``memlens split
--members-f/--members-g/--extra`` or ``--manifest``)."""

from __future__ import annotations

import os
from pathlib import Path

from memlens.config import DataConfig
from memlens.data.dataset import Dataset
from memlens.data.sources import load
from memlens.data.splits import (
    Splits,
    check_duplicates,
    membership_subsets,
    read_path_list,
    splits_from_manifest,
    write_manifest,
)
from memlens.errors import MemlensError


def membership_splits(out: Path, *, members_f: Path | None, members_g: Path | None, extra: Path | None,
                      manifest: Path | None, resize: int | None, force: bool,
                      cache_dir: str | None) -> tuple[Splits, Dataset]:
    """The splits of encoders trained on the given lists (written as ``<out>.manifest.csv`` once every
    check passed), or of a manifest.

    Raises:
        MemlensError: missing lists, a manifest already there (without ``force``), duplicate images, or
            a problem of the manifest (named by the name it will have, not the temporary copy's).
    """
    if manifest and (members_f or members_g or extra):
        raise MemlensError("give either --manifest or --members-f/--members-g/--extra, not both")
    written: Path | None = None  # the manifest written here, kept only if the splits are written too
    if not manifest:
        if not (members_f and members_g):
            raise MemlensError("--members-f and --members-g are both needed (what f and g were trained on)")
        subsets = membership_subsets(read_path_list(members_f, what="--members-f"),
                                     read_path_list(members_g, what="--members-g"),
                                     read_path_list(extra, what="--extra") if extra else [])
        written = Path(str(out.with_suffix("")) + ".manifest.csv")
        if written.exists() and not force:
            raise MemlensError(f"{written} already exists; pass --force to overwrite it")
        manifest = write_manifest(written.with_name(f".{written.name}.{os.getpid()}.tmp"), subsets)
    try:
        data = DataConfig(source="manifest", path=str(manifest.resolve()), resize=resize)
        dataset = load(data, cache_dir=cache_dir)
        splits = splits_from_manifest(dataset, data)
        check_duplicates(dataset, splits)
        if written is not None:  # every check passed: the manifest takes its name
            os.replace(manifest, written)
            splits.data = DataConfig(source="manifest", path=str(written.resolve()), resize=resize)
    except MemlensError as exc:
        if written is None:
            raise
        # the checks ran on a temporary copy; the user knows the manifest by the name it will have
        text = str(exc).replace(str(manifest.resolve()), str(written)).replace(str(manifest), str(written))
        raise MemlensError(text) from None
    finally:
        if written is not None and manifest.exists() and manifest != written:
            manifest.unlink(missing_ok=True)
    return splits, dataset
