"""The reference design: K encoders of one recipe, each trained on the shared data and half of a pool.

Feldman and Zhang ("What Neural Networks Memorize and Why", NeurIPS 2020) estimate memorization
from many models trained on random subsets, every point in about half of them; LiRA (Carlini et
al., S&P 2022) and RMIA (Zarifzadeh et al., ICML 2024) calibrate membership scores with the same
kind of reference models. memlens's ``halves`` design:

* the **pool** (default S_C and S_I of the splits, optionally S_S too, and the canaries) is what
  the references disagree on; the rest of S_S (when not in the pool) is in every reference, S_E in
  none;
* the K references form K/2 **pairs** (2j, 2j+1) sharing a seed (the same initialisation, data
  order, augmentations and, with ``coupling: shared``, DP noise), so a pair's two encoders differ
  only in their data;
* pair j splits the natural pool images into two halves of equal size, one per encoder: every
  pool image is in exactly K/2 references, and every reference trains on as many images. Pair 0
  of the default pool takes the splits' own halves, S_C and S_I: with K = 2 the references are
  exactly the classic f (S_S + S_C) and g (S_S + S_I);
* each canary goes to one encoder of each pair by an independent fair coin, so in every single
  reference the canaries are included independently with probability 1/2, as the one-run privacy
  audit (Steinke, Nasr and Jagielski 2023) requires.

The design is a pure function of (splits, canary ids, K, seed, pool): training derives a
reference's data from it, and the audit derives every reference's membership from it again and
checks it against the digest the run recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memlens.errors import MemlensError
from memlens.integrity import read_verified, stamp
from memlens.io import atomic_write_text, dumps, sha256_file, sha256_json

DEFAULT_POOL = ("S_C", "S_I")


@dataclass(frozen=True)
class ReferenceDesign:
    """A halves design (see the module docstring)."""

    k: int
    seed: int = 0
    pool: tuple[str, ...] = DEFAULT_POOL

    def __post_init__(self) -> None:
        if self.k < 2 or self.k % 2:
            raise MemlensError(f"references need an even number of encoders (pairs), at least 2; got k = {self.k}")
        bad = [s for s in self.pool if s not in ("S_S", "S_C", "S_I")]
        if bad or not self.pool:
            raise MemlensError(f"references pool must be training subsets among S_S, S_C, S_I; got {list(self.pool)}")

    @property
    def pairs(self) -> int:
        return self.k // 2

    @staticmethod
    def pair_of(index: int) -> int:
        return index // 2


def _rng(seed: int, *tags: int) -> np.random.Generator:
    return np.random.default_rng([seed, 0x5EF, *tags])


def pool_ids(splits, design: ReferenceDesign) -> list[str]:
    return splits.ids(*design.pool)


def shared_ids(splits, design: ReferenceDesign) -> list[str]:
    """Training images every reference has: S_S unless S_S is in the pool."""
    return [] if "S_S" in design.pool else splits.ids("S_S")


def natural_halves(splits, design: ReferenceDesign, pair: int) -> tuple[list[str], list[str]]:
    """The two halves of the natural pool for ``pair`` (encoders 2 pair and 2 pair + 1)."""
    pool = pool_ids(splits, design)
    if pair == 0 and tuple(design.pool) == DEFAULT_POOL:
        return list(splits.subsets["S_C"]), list(splits.subsets["S_I"])
    order = _rng(design.seed, 1, pair).permutation(len(pool))
    half = len(pool) // 2
    return [pool[i] for i in sorted(order[:half])], [pool[i] for i in sorted(order[half:])]


def canary_coins(canary_ids: list[str], design: ReferenceDesign, pair: int) -> np.ndarray:
    """True where the canary joins encoder 2 pair (else 2 pair + 1): independent fair coins."""
    return _rng(design.seed, 2, pair).random(len(canary_ids)) < 0.5


def reference_members(splits, canary_ids: list[str], design: ReferenceDesign,
                      index: int) -> tuple[list[str], list[str]]:
    """(training image ids, canary ids) of reference ``index``."""
    if not 0 <= index < design.k:
        raise MemlensError(f"reference index {index} is outside 0..{design.k - 1}")
    pair, side = divmod(index, 2)
    halves = natural_halves(splits, design, pair)
    coins = canary_coins(canary_ids, design, pair)
    canaries = [c for c, heads in zip(canary_ids, coins, strict=True) if bool(heads) == (side == 0)]
    return shared_ids(splits, design) + halves[side], canaries


def membership_digest(images: list[str], canaries: list[str]) -> str:
    """What a run records of its membership (and the audit checks): sha256 of the sorted ids."""
    return sha256_json({"images": sorted(images), "canaries": sorted(canaries)})


# ----------------------------------------------------------------------------- design files for any trainer

DESIGN_FILE = "design.json"


def write_design_files(splits, splits_path: str | Path, canary_ids: list[str], design: ReferenceDesign,
                       out_dir: str | Path, *, canaries_sha256: str | None = None) -> Path:
    """The design as files a training loop of any kind can follow: ``ref-NN.txt`` (the image ids reference NN
    trains on, one per line: for folder data, paths relative to the folder), ``ref-NN.canaries.txt`` (its
    canaries) and ``design.json`` (the parameters, the splits' hash and each reference's membership digest,
    which the audit checks the declared references against). Returns design.json's path."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    refs = []
    for i in range(design.k):
        images, canaries = reference_members(splits, canary_ids, design, i)
        name = f"ref-{i:02d}"
        atomic_write_text(out / f"{name}.txt", "".join(f"{x}\n" for x in images))
        atomic_write_text(out / f"{name}.canaries.txt", "".join(f"{x}\n" for x in canaries))
        refs.append({"index": i, "pair": design.pair_of(i), "images": f"{name}.txt",
                     "canaries": f"{name}.canaries.txt", "n_images": len(images), "n_canaries": len(canaries),
                     "membership_sha256": membership_digest(images, canaries)})
    doc = {"kind": "memlens-reference-design", "version": 1, "k": design.k, "seed": design.seed,
           "pool": list(design.pool), "design": "halves", "splits": str(Path(splits_path).resolve()),
           "splits_hash": splits.hash, "splits_sha256": sha256_file(splits_path),
           "canaries_sha256": canaries_sha256, "references": refs}
    files = {r[k]: sha256_file(out / r[k]) for r in refs for k in ("images", "canaries")}
    atomic_write_text(out / DESIGN_FILE, dumps(stamp(doc, files=files)) + "\n")
    return out / DESIGN_FILE


def read_design(path: str | Path) -> tuple[ReferenceDesign, dict]:
    """A design written by :func:`write_design_files` (a directory or its design.json), verified.

    Raises:
        MemlensError: not a design, or its files changed since.
    """

    p = Path(path)
    p = p / DESIGN_FILE if p.is_dir() else p
    doc = read_verified(p, what="reference design")
    if doc.get("kind") != "memlens-reference-design":
        raise MemlensError(f"{p} is not a memlens reference design (memlens design writes one)")
    return ReferenceDesign(k=int(doc["k"]), seed=int(doc["seed"]), pool=tuple(doc["pool"])), doc
