"""Who trained on what: the audited encoders, their pairs, and their membership of every scored point.

Two designs, one representation:

* **f and g** (the SSLMem paper's): f encoders trained on S_S + S_C (and the canaries drawn in),
  g encoders on S_S + S_I. f and g of one seed form a pair when both sides have as many seeds.
* **references** (:mod:`memlens.data.references`): K memlens runs, each the shared data plus half of
  a pool; references 2j and 2j+1 form pair j. Every run's membership is derived again from the
  design and checked against the digest the run recorded.

Either way the audit works on a membership matrix ``member[e, i]`` (encoder e trained on scored
point i) and the list of pairs; the classic columns (align_f, align_g, SSLMem = align_g - align_f)
are kept for the f/g design. An optional **target** (the encoder to be released, a memlens run) is
scored beside them: its membership comes from its own run record.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from memlens.audit.encoders import AuditEncoder
from memlens.config import SUBSETS
from memlens.data import Dataset, Splits
from memlens.data.references import ReferenceDesign, membership_digest, reference_members
from memlens.errors import MemlensError
from memlens.rng import derive_seed

RECIPE_IGNORED = ("seed", "subsets", "splits", "device", "precision", "workers", "threads", "distributed",
                  "canaries", "reference")


@dataclass
class Points:
    """The scored points: natural images (by subset), then the canaries."""

    rows: np.ndarray  # rows of the dataset, then len(dataset) + canary index
    subset_of: np.ndarray  # "S_S", "S_C", "S_I", "S_E" or "canary"
    ids: list[str]
    n_nat: int

    @property
    def is_canary(self) -> np.ndarray:
        return self.subset_of == "canary"

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class Design:
    """The encoders of an audit and their membership (see the module docstring)."""

    kind: str  # "fg" or "references"
    encoders: list[AuditEncoder]  # scored together: f..., g... or the references, then the target
    roles: list[str]  # "f", "g", "ref" or "target"
    pairs: list[tuple[int, int]]
    member: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=bool))
    reference: dict | None = None  # the references' design parameters
    target_subsets: list[str] = field(default_factory=lambda: ["S_S", "S_C", "S_I"])  # of a target without record

    @property
    def f(self) -> list[AuditEncoder]:
        return [e for e, r in zip(self.encoders, self.roles, strict=True) if r == "f"]

    @property
    def g(self) -> list[AuditEncoder]:
        return [e for e, r in zip(self.encoders, self.roles, strict=True) if r == "g"]

    @property
    def scored(self) -> list[int]:
        """Indices of the encoders the memorization estimates use (all but the target)."""
        return [i for i, r in enumerate(self.roles) if r != "target"]

    @property
    def target(self) -> int | None:
        return self.roles.index("target") if "target" in self.roles else None

    @property
    def units_encoder(self) -> int:
        """Whose units UnitMem measures: the target, else the first f, else reference 0."""
        return self.target if self.target is not None else 0

    def scored_pairs(self) -> list[tuple[int, int]]:
        """The pairs, as indices among the scored encoders (the target is not in a pair)."""
        pos = {e: k for k, e in enumerate(self.scored)}
        return [(pos[a], pos[b]) for a, b in self.pairs]

    def labels(self) -> list[str]:
        return [e.label for e in self.encoders]


# ----------------------------------------------------------------------------- building


def fg_design(f: list[AuditEncoder], g: list[AuditEncoder]) -> Design:
    pairs = [(i, len(f) + i) for i in range(len(f))] if len(f) == len(g) else []
    return Design("fg", f + g, ["f"] * len(f) + ["g"] * len(g), pairs)


def references_design(refs: list[AuditEncoder], target: AuditEncoder | None, *,
                      declared: tuple[object, dict] | None = None, indices: list[int | None] | None = None) -> Design:
    """The references ordered by their index; refuses what is not one complete design.

    memlens runs recorded their place in the design. Encoders trained elsewhere follow a design written
    by ``memlens design`` (``declared``: the design and its record) and declare which reference each one
    is (``indices``: the spec's ``reference``, else its position in the list)."""
    records = []
    for k, enc in enumerate(refs):
        rec = enc.record
        if rec is not None and rec.reference is not None:
            records.append(rec.reference)
            continue
        if declared is None:
            raise MemlensError(f"{enc.label} is not a reference run (memlens train --reference i --of K): give the "
                               f"design it followed (--design, from memlens design) and which reference it is")
        d, doc = declared
        index = indices[k] if indices and indices[k] is not None else k
        if not 0 <= index < d.k:
            raise MemlensError(f"{enc.label}: reference {index} is outside the design's 0..{d.k - 1}")
        records.append({"k": d.k, "seed": d.seed, "pool": list(d.pool), "design": "halves", "index": index,
                        "membership_sha256": doc["references"][index]["membership_sha256"], "declared": True})
    params = {(r["k"], r["seed"], tuple(r["pool"]), r.get("design", "halves")) for r in records}
    if len(params) != 1:
        raise MemlensError("the references come from different designs (k, seed or pool differ); give the runs of "
                           "one design")
    k, seed, pool, kind = params.pop()
    index = [r["index"] for r in records]
    twice = sorted({i for i in index if index.count(i) > 1})
    if twice:
        raise MemlensError(f"references {twice} are given twice")
    half = sorted({i ^ 1 for i in index} - set(index))  # the missing partner of a pair
    if half:
        raise MemlensError(f"the references are not whole pairs of the design of {k}: missing {half} (references "
                           f"2j and 2j+1 share a seed and split the pool between them; give both)")
    order = sorted(range(len(refs)), key=lambda i: index[i])
    encoders = [refs[i] for i in order]
    roles = ["ref"] * len(encoders)
    if target is not None:
        encoders.append(target)
        roles.append("target")
    pairs = [(2 * j, 2 * j + 1) for j in range(len(order) // 2)]
    declared_digests = {r["index"]: r["membership_sha256"] for r in records if r.get("declared")}
    extra = {"declared": declared_digests, "declared_canaries": declared[1].get("canaries_sha256")} \
        if declared_digests else {}
    return Design("references", encoders, roles, pairs,
                  reference={"k": k, "seed": seed, "pool": list(pool), "design": kind,
                             "indices": sorted(index), **extra})


def membership(design: Design, points: Points, splits: Splits, cset) -> np.ndarray:
    """(E, n) bool: encoder e trained on point i (checked against what each run recorded)."""
    n = len(points)
    sub = points.subset_of
    canary_in_f = np.zeros(n, dtype=bool)
    if cset is not None and design.kind == "fg":
        included = set(cset.membership().included)
        canary_in_f = np.array([c and i in included for c, i in zip(points.is_canary, points.ids, strict=True)])
    out = np.zeros((len(design.encoders), n), dtype=bool)
    ref_rows = _reference_rows(design, points, splits, cset) if design.kind == "references" else None
    for e, (enc, role) in enumerate(zip(design.encoders, design.roles, strict=True)):
        if role == "f":
            out[e] = np.isin(sub, ["S_S", "S_C"]) | canary_in_f
        elif role == "g":
            out[e] = np.isin(sub, ["S_S", "S_I"])
        elif role == "ref":
            out[e] = ref_rows[e]
        else:
            out[e] = _target_member(enc, points, cset, design.target_subsets)
    return out


def _reference_rows(design: Design, points: Points, splits: Splits, cset) -> np.ndarray:

    p = design.reference
    d = ReferenceDesign(k=p["k"], seed=p["seed"], pool=tuple(p["pool"]))
    canary_ids = list(cset.ids) if cset is not None else []
    indices = p.get("indices", list(range(d.k)))
    out = np.zeros((len(indices), len(points)), dtype=bool)
    nat, can = ~points.is_canary, points.is_canary
    ids = np.array(points.ids, dtype=object)
    declared = p.get("declared") or {}
    planted = p.get("declared_canaries")
    if declared and planted and (cset is None or cset.manifest.sha256 != planted):
        raise MemlensError("the design planted a canary set its references trained with; give the same set to the "
                           "audit (canaries: DIR, --canaries DIR), or the references' membership cannot be checked")
    for k, index in enumerate(indices):
        images, canaries = reference_members(splits, canary_ids, d, index)
        rec = design.encoders[k].record
        digest = membership_digest(images, canaries)
        recorded = rec.reference.get("membership_sha256") if rec is not None and rec.reference else declared.get(index)
        if recorded != digest:
            raise MemlensError(f"reference {design.encoders[k].label} did not train on what its design says (its "
                               f"recorded membership differs): other splits or canaries than this audit's")
        out[k] = (nat & np.isin(ids, images)) | (can & np.isin(ids, canaries))
    return out


def _target_member(enc: AuditEncoder, points: Points, cset, target_subsets: list[str]) -> np.ndarray:
    """The target's membership from its run record: its training subsets (or reference half) and canaries."""
    rec = enc.record
    if rec is None:  # trained elsewhere: what it trained on is declared (target_subsets); canaries: none declared
        return np.isin(points.subset_of, list(target_subsets))
    subsets = rec.splits["subsets"] if rec.splits else []
    if rec.reference is not None:
        raise MemlensError(f"target {enc.label} is itself a reference run; the target is the encoder to be "
                           f"released, trained on its own")
    trained = set(subsets) if subsets else {"S_S", "S_C", "S_I"}  # "all": every training image (S_E is test)
    out = np.isin(points.subset_of, sorted(trained))
    if cset is not None and (rec.canaries or {}).get("sha256") == cset.manifest.sha256 and "S_C" in trained:
        included = set(cset.membership().included)
        out |= np.array([c and i in included for c, i in zip(points.is_canary, points.ids, strict=True)])
    return out


# ----------------------------------------------------------------------------- checks


def _recipe(record) -> dict:
    cfg = record.config.model_dump(mode="json")
    for key in RECIPE_IGNORED:
        cfg.pop(key, None)
    if cfg.get("dp"):
        for key in ("noise_seed", "coupling"):
            cfg["dp"].pop(key, None)
    return cfg


def _diff(a: dict, b: dict, prefix: str = "") -> str | None:
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            d = _diff(va, vb, f"{prefix}{key}.")
            if d:
                return d
        elif va != vb:
            return f"{prefix}{key}: {va!r} vs {vb!r}"
    return None


def check_data(encoders: list[AuditEncoder], dataset: Dataset) -> None:
    """Refuse memlens runs trained on other images than the audit reads, naming the run and both data."""
    for enc in encoders:
        rec = enc.record
        if rec is not None and rec.data["fingerprint"] != dataset.fingerprint:
            raise MemlensError(f"run {enc.info.get('path', enc.label)} was trained on other data than the audit's: the "
                               f"run's data is {rec.data.get('source')} (fingerprint {rec.data['fingerprint'][:12]}), "
                               f"the audit reads {dataset.source} (fingerprint {dataset.fingerprint[:12]})")


def check_design(design: Design, splits: Splits) -> list[str]:
    """Refuse encoders that were not trained as the design requires (what can be checked).

    memlens runs carry a record of their data, splits and recipe, which must match; encoders from
    elsewhere are taken at the membership the splits declare. Returns warnings (a target of
    another recipe: its calibration is then approximate).
    """
    warnings = []
    runs = [(e, r) for e, r in zip(design.encoders, design.roles, strict=True) if e.record is not None]
    scored = [(e, r) for e, r in runs if r != "target"]
    ref = scored[0][0] if scored else None
    for enc, role in runs:
        rec = enc.record
        where = enc.info.get("path", enc.label)
        if rec.splits is None:
            raise MemlensError(f"run {where} was not trained from a splits file, so its subsets are unknown")
        if rec.splits["hash"] != splits.hash:
            raise MemlensError(f"run {where} was trained with other splits (hash {rec.splits['hash'][:12]}, "
                               f"given {splits.hash[:12]})")
        if role in ("f", "g"):
            expected = ["S_S", "S_C"] if role == "f" else ["S_S", "S_I"]
            if sorted(rec.splits["subsets"]) != sorted(expected):
                raise MemlensError(f"run {where} was trained on {'+'.join(rec.splits['subsets'])}, but a {role} run "
                                   f"must be trained on {'+'.join(expected)}")
        d = _diff(_recipe(ref.record), _recipe(rec)) if ref is not None and ref.record is not None else None
        if d and role == "target":
            warnings.append(f"the target {where} differs from the references' recipe ({d}): its membership scores "
                            f"are calibrated by encoders trained otherwise")
        elif d:
            raise MemlensError(f"runs {ref.info.get('path')} and {where} differ in their recipe ({d}); the encoders "
                               f"of one audit must share it")
    paths = [e.info.get("path") for e in design.encoders if e.info.get("path")]
    if len(set(paths)) != len(paths):
        raise MemlensError("the same run is given twice")
    _check_distinct_weights(design)
    first = design.encoders[0]
    for enc in design.encoders:
        if (enc.input_size, enc.in_chans) != (first.input_size, first.in_chans):
            raise MemlensError(f"encoders {first.label} and {enc.label} take different inputs "
                               f"({first.in_chans}x{first.input_size}px vs {enc.in_chans}x{enc.input_size}px); the "
                               f"encoders of one audit must be the same architecture")
    return warnings


def weights_digest(module) -> str:
    """sha256 over a module's parameters and buffers (names, shapes, bytes): equal for equal weights."""

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _check_distinct_weights(design: Design) -> None:
    """Refuse two encoders with identical weights: f and g that are the same model measure nothing
    (every score 0, every p-value undefined), and a target that is one of its references is no
    test of membership."""
    seen: dict[str, str] = {}
    for enc, role in zip(design.encoders, design.roles, strict=True):
        d = weights_digest(enc.module)
        if d in seen:
            raise MemlensError(f"encoders {seen[d]} and {enc.label} ({role}) have identical weights: the audit would "
                               f"compare a model with itself (every score 0); check that each encoder was given its "
                               f"own weights")
        seen[d] = enc.label


def check_not_degenerate(dist: np.ndarray, labels: list[str]) -> None:
    """Refuse views that do not differ: with every pair of views at distance 0 the alignment is 0 for
    every encoder and SSLMem is 0 for every image, a pass on p = nan rather than a measurement."""
    for e, label in enumerate(labels):
        if dist.shape[-1] >= 2 and float(np.max(dist[e], initial=0.0)) <= 1e-12:
            raise MemlensError(f"encoder {label} maps every view of every image to the same representation (all view "
                               f"distances are 0): the views do not differ (augmentation 'none'?) or the encoder is "
                               f"constant; audit with an augmentation that changes the views, e.g. --augment mae")


def choose_points(splits: Splits, dataset: Dataset, cfg) -> Points:
    """The natural points of the audit, candidates first (a random ``max_per_subset`` when set)."""

    rng = np.random.default_rng(derive_seed(cfg.seed, "points"))
    rows, subset_of, ids = [], [], []
    requested = set(splits.requested)
    for name in [s for s in ("S_C", "S_S", "S_I", "S_E") if s in cfg.subsets]:
        sub = list(splits.subsets[name])
        if not sub:
            raise MemlensError(f"subset {name} of the splits is empty")
        if cfg.max_per_subset and len(sub) > cfg.max_per_subset:
            keep = set(rng.choice(len(sub), cfg.max_per_subset, replace=False).tolist())
            sub = [i for k, i in enumerate(sub) if k in keep or i in requested]
        rows.append(dataset.indices(sub))
        subset_of += [name] * len(sub)
        ids += sub
    return Points(np.concatenate(rows), np.array(subset_of), ids, len(ids))


def with_canaries(points: Points, cset, n_dataset: int) -> Points:
    """The points followed by the canaries (rows len(dataset) + k), scored like any point."""
    if cset is None:
        return points
    return Points(np.concatenate([points.rows, n_dataset + np.arange(len(cset))]),
                  np.concatenate([points.subset_of, np.full(len(cset), "canary")]), points.ids + list(cset.ids),
                  points.n_nat)


__all__ = ["SUBSETS", "Design", "Points", "check_data", "check_design", "choose_points", "fg_design", "membership",
           "references_design", "with_canaries"]
