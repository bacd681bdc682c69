"""Canaries: atypical images planted on purpose, each in f's training data with probability 1/2.

A canary set is made once from a seed and saved as a directory:

* ``canaries.json``: version, seed, kinds, image shape, the ids and kind of every canary, and
  the sha256 of the images (with ids) that makes the set verifiable;
* ``canaries.npz``: the images (uint8, no pickle) and ids;
* ``membership.json``: which canaries were drawn into f's training data (each independently with
  probability ``p_include``, from its own seed). The audit scores every canary without reading
  it; only the evaluation (:mod:`memlens.audit.privacy`) does.

Kinds (the canary literature's image kinds, sized to the data):

* ``natural``: a real image of the data that no encoder otherwise trains on (outside S_S, S_C,
  S_I and S_E), unchanged: the canaries of Steinke et al.'s one-run audit, and the closest to the
  images whose privacy is at stake;
* ``synthetic``: a busy colour field with a bright blob, like nothing in the data (its crops
  differ from one another, so only an encoder that saw it maps them together);
* ``marked``: a real image of the data that no encoder trains on (the test part, else images left
  out of the splits) with a unique square of colour noise pasted over a quarter of its area.

Canaries never enter g's training data: g is the reference a member is compared with.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from memlens.errors import MemlensError
from memlens.integrity import file_digests, read_verified, stamp, verify
from memlens.io import atomic_write_bytes, read_json, sha256_bytes, write_json

CanaryKind = Literal["natural", "synthetic", "marked"]
KINDS = ("natural", "synthetic", "marked")
SET_FILE, IMAGES_FILE, MEMBERSHIP_FILE = "canaries.json", "canaries.npz", "membership.json"


class CanaryManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    kind: Literal["memlens-canaries"] = "memlens-canaries"
    seed: int
    m: int
    kinds: list[CanaryKind]
    image_shape: list[int] | None  # None: canaries of their own sizes (data of mixed sizes)
    data_fingerprint: str
    ids: list[str]
    canary_kind: list[CanaryKind]
    sha256: str
    p_include: float
    membership_seed: int
    integrity: dict | None = None


class Membership(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    set_sha256: str
    p_include: float
    included: list[str]
    integrity: dict | None = None


class CanarySet:
    """Canary images and ids (and, once read, which are members).

    ``images`` is one uint8 (m, H, W, C) array when the canaries share a size, else a list of
    (H, W, C) arrays (natural canaries of data of mixed sizes keep their own size)."""

    def __init__(self, manifest: CanaryManifest, images: np.ndarray | list[np.ndarray], path: Path | None = None):
        self.manifest, self.images, self.path = manifest, images, path

    @property
    def ids(self) -> list[str]:
        return self.manifest.ids

    @property
    def pixels(self):
        # torch: loaded where this runs, so importing memlens.data.canaries stays light
        from memlens.data.dataset import ArrayPixels, ListPixels

        return ArrayPixels(self.images) if isinstance(self.images, np.ndarray) else ListPixels(self.images)

    def __len__(self) -> int:
        return self.manifest.m

    def membership(self) -> Membership:
        """Which canaries f trained on (read from ``membership.json`` and verified against its own digest and
        the one ``canaries.json`` recorded: for training and evaluation)."""

        if self.path is None:
            raise MemlensError("this canary set has not been saved; its membership is not recorded")
        raw = read_verified(self.path / MEMBERSHIP_FILE, what="canary membership")
        mem = Membership.model_validate(raw)
        if mem.set_sha256 != self.manifest.sha256:
            raise MemlensError(f"{self.path / MEMBERSHIP_FILE} belongs to another canary set")
        return mem

    def member_rows(self) -> np.ndarray:
        included = set(self.membership().included)
        return np.array([k for k, i in enumerate(self.ids) if i in included], dtype=np.int64)


def _images_hash(images: np.ndarray | list[np.ndarray], ids: list[str]) -> str:
    if isinstance(images, np.ndarray):
        return sha256_bytes(np.ascontiguousarray(images).tobytes() + "\0".join(ids).encode())
    h = hashlib.sha256()
    for im in images:  # shapes too: the same bytes cut into other sizes are other images
        h.update(repr(im.shape).encode())
        h.update(np.ascontiguousarray(im).tobytes())
    h.update("\0".join(ids).encode())
    return h.hexdigest()


def _synthetic(rng: np.random.Generator, s: int, c: int) -> np.ndarray:
    """A smooth but busy colour field (3 plane waves of 2-6 cycles) with a bright blob: structured
    enough that an encoder can learn it, unlike any data image, and its crops differ from one
    another (the design of the synthetic source's planted outliers, which SSL encoders memorize)."""
    yy, xx = np.meshgrid(np.linspace(0, 1, s, endpoint=False), np.linspace(0, 1, s, endpoint=False), indexing="ij")
    field = np.zeros((s, s, c))
    for _ in range(3):
        fy, fx = rng.integers(2, 6, size=2)
        phase = rng.uniform(0, 2 * np.pi)
        field += np.sin(2 * np.pi * (fy * yy + fx * xx) + phase)[..., None] * rng.uniform(-1, 1, size=c)
    cy, cx = rng.uniform(0.15, 0.85, size=2)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 0.12 ** 2))[..., None] * rng.uniform(-1, 1, size=c)
    img = 0.5 + 0.4 * field + 0.8 * blob + rng.normal(0, 0.03, size=(s, s, c))
    return np.rint(img.clip(0, 1) * 255).astype(np.uint8)


def _marked(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    h, w, c = base.shape
    side = max(2, min(h, w) // 2)  # a quarter of a square image's area
    top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    out = base.copy()
    out[top:top + side, left:left + side] = rng.integers(0, 256, size=(side, side, c), dtype=np.uint8)
    return out


def make_canaries(dataset, *, m: int, kinds: list[str], seed: int = 0, p_include: float = 0.5,
                  exclude_ids: set[str] | None = None) -> CanarySet:
    """Draw ``m`` canaries of the given kinds (cycled) at the data's size and channels.

    Args:
        dataset: the :class:`~memlens.data.Dataset` the canaries join.
        m: number of canaries.
        kinds: ``natural``, ``synthetic`` and/or ``marked`` (cycled).
        seed: everything (images, kinds, membership) follows from it.
        p_include: probability that a canary is in f's training data.
        exclude_ids: images of the splits (S_S, S_C, S_I, S_E): never natural canaries nor bases of
            marked ones.

    Raises:
        MemlensError: unknown kinds, or no image to mark.
    """
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise MemlensError(f"unknown canary kind(s) {bad or kinds}; valid: {', '.join(KINDS)}")
    if m < 2:
        raise MemlensError("a canary set needs at least 2 canaries (members and non-members)")
    rng = np.random.default_rng([seed, 0xCA7A])
    c = dataset.channels
    # synthetic canaries take the data's size (images of mixed sizes: the median shorter side)
    s = dataset.square_size or int(np.median(dataset.sizes().min(axis=1)))
    exclude = exclude_ids or set()
    # a copy of a training image is not a fresh canary: exclude images equal to an excluded one
    digests = dataset.digests()
    taken = {digests[k] for k, i in enumerate(dataset.ids) if i in exclude}
    pool = [k for k, i in enumerate(dataset.ids) if i not in exclude and digests[k] not in taken]
    test = [k for k in pool if dataset.parts[k] == "test"]
    bases = test or pool
    if "marked" in kinds and not bases:
        raise MemlensError("no image is left outside the training subsets to make 'marked' canaries from")
    n_natural = sum(1 for j in range(m) if kinds[j % len(kinds)] == "natural")
    if n_natural > len(pool):
        raise MemlensError(f"{n_natural} natural canaries need as many images outside the splits' subsets; only "
                           f"{len(pool)} are left (make smaller splits or fewer canaries)")
    natural = iter(rng.permutation(np.array(pool, dtype=np.int64))[:n_natural].tolist())
    images, ids, kind_of = [], [], []
    for j in range(m):
        kind = kinds[j % len(kinds)]
        if kind == "natural":
            images.append(np.array(dataset.pixels.read(next(natural))))
        else:
            images.append(_synthetic(rng, s, c) if kind == "synthetic" else
                          _marked(rng, np.array(dataset.pixels.read(bases[int(rng.integers(len(bases)))]))))
        ids.append(f"canary/{j:05d}")
        kind_of.append(kind)
    arr = np.stack(images) if len({im.shape for im in images}) == 1 else images
    manifest = CanaryManifest(seed=seed, m=m, kinds=list(kinds),
                              image_shape=list(arr.shape[1:]) if isinstance(arr, np.ndarray) else None,
                              data_fingerprint=dataset.fingerprint, ids=ids, canary_kind=kind_of,
                              sha256=_images_hash(arr, ids), p_include=p_include, membership_seed=seed)
    return CanarySet(manifest, arr)


def canary_labels(canaries: CanarySet, num_classes: int) -> np.ndarray:
    """The class each canary is trained with under a supervised objective: a random one from the
    set's seed, so a member canary is also a mislabelled point."""
    rng = np.random.default_rng([canaries.manifest.seed, 0x1AB])
    return rng.integers(0, num_classes, len(canaries)).astype(np.int64)


def save_canaries(canaries: CanarySet, out_dir: str | Path) -> Path:
    """Write the set and its membership draw (see the module docstring)."""


    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    man = canaries.manifest
    buf = io.BytesIO()
    if isinstance(canaries.images, np.ndarray):
        np.savez(buf, x=canaries.images, ids=np.array(man.ids))
    else:  # one array per canary (no pickle): images of their own sizes
        np.savez(buf, ids=np.array(man.ids), **{f"x{k:07d}": im for k, im in enumerate(canaries.images)})
    atomic_write_bytes(out / IMAGES_FILE, buf.getvalue())

    rng = np.random.default_rng([man.membership_seed, 0x1D])
    draws = rng.random(man.m) < man.p_include
    included = [i for i, d in zip(man.ids, draws, strict=True) if d]
    write_json(out / MEMBERSHIP_FILE, stamp(Membership(set_sha256=man.sha256, p_include=man.p_include,
                                                       included=included).model_dump(mode="json")))
    # the set records the digests of its images and of the membership draw: an edited or swapped
    # membership.json (one canary's label flipped) is refused wherever the set is read
    write_json(out / SET_FILE, stamp(man.model_dump(mode="json"), files=file_digests(out, [IMAGES_FILE,
                                                                                          MEMBERSHIP_FILE])))
    canaries.path = out
    return out


def load_canaries(path: str | Path, *, dataset=None) -> CanarySet:
    """Read and verify a canary set directory (images against the recorded sha256).

    Raises:
        MemlensError: missing or altered files, or a set made for other data.
    """

    path = Path(path)
    raw = read_json(path / SET_FILE, what="canary set")
    if not isinstance(raw, dict) or raw.get("kind") != "memlens-canaries":
        raise MemlensError(f"{path / SET_FILE} is not a memlens canary set")
    verify(raw, path / SET_FILE)  # its digest, and the digests of canaries.npz and membership.json
    man = CanaryManifest.model_validate(raw)
    try:
        with np.load(path / IMAGES_FILE, allow_pickle=False) as z:
            ids = [str(i) for i in z["ids"].tolist()]
            images = z["x"] if "x" in z.files else [z[f"x{k:07d}"] for k in range(len(ids))]
    except (OSError, ValueError, KeyError) as exc:
        raise MemlensError(f"{path / IMAGES_FILE} is not a readable canary image file: {exc}") from None
    if ids != man.ids or _images_hash(images, ids) != man.sha256:
        raise MemlensError(f"{path / IMAGES_FILE} does not match {SET_FILE} (sha256 differs): the canaries were "
                           f"altered")
    if dataset is not None and man.data_fingerprint != dataset.fingerprint:
        raise MemlensError(f"canary set {path} was made for other data (fingerprint {man.data_fingerprint[:12]}, "
                           f"this data is {dataset.fingerprint[:12]})")
    return CanarySet(man, images, path)
