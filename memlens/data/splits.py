"""The four disjoint subsets of the SSLMem setup, saved as ``splits.json``.

* S_S (shared): trains both f and g.
* S_C (candidates): trains f only; the points whose memorization is measured.
* S_I (independent): trains g only; replaces S_C so f and g see equally many points.
* S_E (extra): trains neither; from the test part when the source has one.

(SSLMem paper Section 4 and Appendix A.1.)
"""

from __future__ import annotations

import csv
import io
import os
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from memlens.config import SUBSETS, DataConfig, SplitConfig, Subset, format_validation_error
from memlens.data.dataset import Dataset
from memlens.errors import MemlensError
from memlens.io import atomic_write_text, read_json, sha256_json, write_json

SIDES: dict[str, tuple[str, ...]] = {"f": ("S_S", "S_C"), "g": ("S_S", "S_I"), "all": ()}


class Splits(BaseModel):
    """A validated ``splits.json``."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    fingerprint: str
    source: str
    seed: int
    settings: dict
    requested: list[str] = []
    subsets: dict[Subset, list[str]]
    data: DataConfig | None = None
    skipped: list[dict] = []  # images left out as unreadable (on_bad_image: skip): id and problem

    @property
    def hash(self) -> str:
        """sha256 of the data fingerprint and the four id lists: what a run records."""
        return sha256_json({"fingerprint": self.fingerprint, "subsets": {k: self.subsets[k] for k in SUBSETS}})

    def sizes(self) -> dict[str, int]:
        return {k: len(self.subsets[k]) for k in SUBSETS}

    def ids(self, *names: str) -> list[str]:
        out: list[str] = []
        for name in names:
            out += self.subsets[name]
        return out

    def subset_of(self) -> dict[str, str]:
        return {i: name for name in SUBSETS for i in self.subsets[name]}

    def save(self, path: str | Path) -> None:
        write_json(path, self.model_dump(mode="json"))

    @classmethod
    def load(cls, path: str | Path, dataset: Dataset | None = None) -> "Splits":
        """Read and check a splits file; with ``dataset``, also check it belongs to that data."""
        raw = read_json(path, what="splits file")
        try:
            splits = cls.model_validate(raw)
        except ValidationError as exc:
            raise MemlensError(format_validation_error(exc, source=f"splits file {path}")) from None
        missing = [k for k in SUBSETS if k not in splits.subsets]
        if missing:
            raise MemlensError(f"splits file {path}: missing subset(s) {', '.join(missing)}")
        seen: dict[str, str] = {}
        for name in SUBSETS:
            ids = splits.subsets[name]
            if len(set(ids)) != len(ids):
                raise MemlensError(f"splits file {path}: {name} lists an id twice")
            for i in ids:
                if i in seen:
                    raise MemlensError(f"splits file {path}: id '{i}' is in both {seen[i]} and {name}; "
                                       f"subsets must be disjoint")
                seen[i] = name
        if dataset is not None:
            splits.check(dataset, where=str(path))
        return splits

    def check(self, dataset: Dataset, *, where: str = "splits") -> None:
        if dataset.fingerprint != self.fingerprint:
            raise MemlensError(f"{where} was made for other data (fingerprint {self.fingerprint[:12]}, "
                               f"this data is {dataset.fingerprint[:12]}); re-run memlens split")
        for name in SUBSETS:
            ids = self.subsets[name]
            try:
                dataset.indices(ids)
            except MemlensError as exc:
                raise MemlensError(f"{where}: {name}: {exc}") from None


def side_subsets(side: str | list[str]) -> tuple[str, ...]:
    if isinstance(side, str):
        if side not in SIDES:
            raise MemlensError(f"unknown training side '{side}'; valid: f, g, all, or a list of subsets")
        return SIDES[side]
    bad = [s for s in side if s not in SUBSETS]
    if bad:
        raise MemlensError(f"unknown subset(s) {', '.join(bad)}; valid: {', '.join(SUBSETS)}")
    return tuple(side)


def _listed_lines(path: Path, *, missing: str, empty: str) -> list[str]:
    """The non-blank lines of a list file, '#' comments skipped; ``missing``/``empty``: error texts."""
    if not path.is_file():
        raise MemlensError(missing)
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        raise MemlensError(f"{path} is not a text list (one id or path per line): it holds binary data")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MemlensError(f"{path} is not a UTF-8 text list (one id or path per line): {exc.reason} at byte "
                           f"{exc.start}") from None
    lines = [ln.strip() for ln in text.splitlines()]
    items = [ln for ln in lines if ln and not ln.startswith("#")]
    if not items:
        raise MemlensError(empty)
    return items


def read_id_file(path: str | Path) -> list[str]:
    path = Path(path)
    ids = _listed_lines(path, missing=f"candidates file not found: {path}",
                        empty=f"candidates file {path} lists no ids")
    if len(set(ids)) != len(ids):
        raise MemlensError(f"candidates file {path} lists an id twice")
    return ids


def make_splits(dataset: Dataset, config: SplitConfig | None = None) -> Splits:
    """Cut ``dataset`` into S_S, S_C, S_I, S_E (seeded; see the module docstring).

    Raises:
        MemlensError: the requested sizes do not fit, or a requested candidate is unknown
            or not a training image.
    """
    config = config or SplitConfig()
    rng = np.random.default_rng(config.seed)
    train = dataset.part_indices("train")
    test = dataset.part_indices("test")
    f_s, f_c, f_i = config.fractions
    has_test = len(test) > 0
    # Without a test part, S_E (|S_E| = |S_C|) is set aside from the training part first, and
    # the fractions apply to what remains: N' = N / (1 + f_C).
    base = len(train) if has_test else len(train) / (1.0 + f_c)
    sizes = config.sizes.model_dump() if config.sizes else {}
    n_c = sizes.get("S_C") or max(1, round(f_c * base))

    requested: list[str] = []
    if config.candidates_file:
        requested = read_id_file(config.candidates_file)
        rows = dataset.indices(requested)
        not_train = [requested[k] for k, r in enumerate(rows) if dataset.parts[r] != "train"]
        if not_train:
            raise MemlensError(f"candidate '{not_train[0]}' is in the test part; candidates must be training images")
        n_c = max(n_c, len(requested)) if config.fill_candidates else len(requested)
    n_i = sizes.get("S_I") or (max(1, round(f_i * base)) if not requested or config.fill_candidates else n_c)
    n_e = sizes.get("S_E") or n_c
    n_s = sizes.get("S_S") or max(1, round(f_s * base))
    if has_test and n_e > len(test):
        raise MemlensError(f"S_E needs {n_e} images but the test part has {len(test)}; set sizes.S_E")
    need = n_s + n_c + n_i + (0 if has_test else n_e)
    if need > len(train):
        # Rounding of fractions can overshoot by a point or two: shrink S_S rather than fail.
        if not sizes.get("S_S") and need - len(train) <= 3:
            n_s -= need - len(train)
        else:
            raise MemlensError(f"splits need {need} training images (S_S {n_s}, S_C {n_c}, S_I {n_i}"
                               f"{'' if has_test else f', S_E {n_e}'}) but the data has {len(train)}")

    requested_rows = set(dataset.indices(requested).tolist()) if requested else set()
    pool = rng.permutation(np.array([r for r in train if r not in requested_rows], dtype=np.int64))
    take = iter(np.split(pool, np.cumsum([n_c - len(requested), n_i, n_s])))
    c_rows = np.concatenate([dataset.indices(requested), next(take)]) if requested else next(take)
    i_rows, s_rows, rest = next(take), next(take), next(take)
    e_rows = rng.permutation(test)[:n_e] if has_test else rest[:n_e]
    ids = dataset.ids
    subsets = {name: [ids[r] for r in rows] for name, rows in
               (("S_S", s_rows), ("S_C", c_rows), ("S_I", i_rows), ("S_E", e_rows))}
    subsets, dropped = _one_subset_per_image(dataset, subsets, set(requested))
    settings = config.model_dump(mode="json")
    if dropped:
        settings["duplicates_dropped"] = dropped
    return Splits(fingerprint=dataset.fingerprint, source=dataset.source, seed=config.seed,
                  settings=settings, requested=requested, subsets=subsets)


def _one_subset_per_image(dataset: Dataset, subsets: dict[str, list[str]],
                          requested: set[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Copies of one image (equal content digests) must not land in two subsets (a copy in S_E of a
    trained image is not "never seen"): each group keeps the copies of its first subset in the order
    S_S, S_C, S_I, S_E (a requested candidate's, when there is one) and drops the rest (recorded)."""
    all_ids = [i for name in SUBSETS for i in subsets[name]]
    groups = duplicate_groups(dataset, all_ids)
    if not groups:
        return subsets, []
    where = {i: name for name in SUBSETS for i in subsets[name]}
    drop: set[str] = set()
    for group in groups:
        keep = next((where[i] for i in group if i in requested), None) or min(
            (where[i] for i in group), key=SUBSETS.index)
        drop |= {i for i in group if where[i] != keep}
    return {name: [i for i in subsets[name] if i not in drop] for name in SUBSETS}, sorted(drop)


# ----------------------------------------------------------------------------- membership


def read_path_list(path: str | Path, *, what: str) -> list[str]:
    """Image paths, one per line ('#' comments and blank lines skipped), relative to the list's folder."""
    path = Path(path)
    items = _listed_lines(path, missing=f"{what} list not found: {path}", empty=f"{what} list {path} names no images")
    out = []
    for item in items:
        p = Path(item)
        out.append(str((p if p.is_absolute() else path.parent / p).resolve()))

    dup = next((i for i, c in Counter(items).items() if c > 1), None)
    if dup:
        raise MemlensError(f"{what} list {path} names '{dup}' twice")
    return out


def membership_subsets(members_f: list[str], members_g: list[str], extra: list[str]) -> dict[str, list[str]]:
    """S_S = in f and g, S_C = in f only, S_I = in g only, S_E = extra (in neither).

    Raises:
        MemlensError: an extra image that f or g was trained on, or no candidates at all.
    """
    f_set, g_set = set(members_f), set(members_g)
    bad = [p for p in extra if p in f_set or p in g_set]
    if bad:
        which = "f" if bad[0] in f_set else "g"
        raise MemlensError(f"'{bad[0]}' is listed as extra (never trained on) but {which} was trained on it")
    subsets = {"S_S": [p for p in members_f if p in g_set], "S_C": [p for p in members_f if p not in g_set],
               "S_I": [p for p in members_g if p not in f_set], "S_E": list(dict.fromkeys(extra))}
    if not subsets["S_C"]:
        raise MemlensError("every image f was trained on is also in g's list: there are no candidates (S_C = f only)")
    return subsets


def write_manifest(path: str | Path, subsets: dict[str, list[str]]) -> Path:
    """Write a manifest CSV (path,subset), paths relative to its folder where possible."""


    path = Path(path).resolve()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "subset"])
    for name in SUBSETS:
        for p in subsets[name]:
            try:
                rel = os.path.relpath(p, path.parent)
            except ValueError:  # another drive (Windows)
                rel = p
            w.writerow([Path(rel).as_posix(), name])
    atomic_write_text(path, buf.getvalue())
    return path


def splits_from_manifest(dataset: Dataset, data: DataConfig) -> Splits:
    """Splits whose subsets the manifest's ``subset`` column declares (membership the user knows)."""
    subsets_col = dataset.meta.get("subsets") or []
    if not subsets_col or any(s is None for s in subsets_col):
        missing = next((i for i, s in zip(dataset.ids, subsets_col or [None] * len(dataset), strict=True)
                        if s is None), None)
        raise MemlensError(f"the manifest must give every image a subset (S_S, S_C, S_I, S_E); '{missing}' has none")
    subsets = {name: [i for i, s in zip(dataset.ids, subsets_col, strict=True) if s == name] for name in SUBSETS}
    if not subsets["S_C"]:
        raise MemlensError("the manifest lists no candidates (S_C: images f was trained on and g was not)")
    return Splits(fingerprint=dataset.fingerprint, source=dataset.source, seed=0,
                  settings={"from": "membership"}, subsets=subsets, data=data)


def duplicate_groups(dataset: Dataset, ids: list[str]) -> list[list[str]]:
    """Groups (of two or more) of ``ids`` whose images are byte-for-byte (or pixel-for-pixel) the same."""
    digests = dataset.digests()
    rows = dataset.indices(ids)
    groups: dict[str, list[str]] = {}
    for i, r in zip(ids, rows, strict=True):
        groups.setdefault(digests[int(r)], []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def check_duplicates(dataset: Dataset, splits: "Splits") -> None:
    """Refuse membership that copies of one image contradict: a copy never trained on (S_E) of an image
    f or g trained on, or a copy in S_C (f only) of an image in S_I (g only). Only paths differ; the
    encoders saw the same image.

    Raises:
        MemlensError: naming the first conflicting pair (and how many there are).
    """
    where = splits.subset_of()
    conflicts = []
    for group in duplicate_groups(dataset, splits.ids("S_S", "S_C", "S_I", "S_E")):
        subs = {where[i] for i in group}
        trained = subs & {"S_S", "S_C", "S_I"}
        if ("S_E" in subs and trained) or {"S_C", "S_I"} <= subs:
            a = next(i for i in group if where[i] in (trained or {"S_C"}))
            b = next(i for i in group if i != a and where[i] != where[a])
            conflicts.append((a, where[a], b, where[b]))
    if conflicts:
        a, sa, b, sb = conflicts[0]
        more = f" ({len(conflicts)} such pairs)" if len(conflicts) > 1 else ""
        raise MemlensError(f"'{b}' ({sb}) is the same image as '{a}' ({sa}){more}: an image cannot be both trained on "
                           f"and not, or in f only and g only; remove the copies or list them together")
