"""The audit: SSLMem, LayerMem/ΔLayerMem, UnitMem/ClassMem and the tests, from one streaming pass.

For every point, V augmented views are drawn once and shared by every encoder (common random
numbers: the f - g difference is measured on identical views, which removes the augmentation
noise common to both). A point's views are seeded by the point itself (the audit seed, the
augmentation set, its id and the view number), never by its position in a batch, so every score
is independent of the batch size, the order of the points and the number of processes scoring
them. Each view batch goes once through each encoder with hooks on the hooked layers; the hooks
reduce every layer's output on the spot to per-point alignment losses (LayerMem) and, for the
audited encoder f[0] on D', to per-unit mean activations, which feed O(units) running
accumulators (UnitMem, ClassMem). Of the representation, the audit keeps each point's matrix of
view distances (V x V), from which the alignment over all pairs, the split-half reliability
and the bootstrap over views all follow without another forward pass.

Under ``torchrun`` the points are split across processes; per-point results are gathered and
the unit accumulators merged (sums, maxima with the lowest-position argmax), so a sharded audit
equals the single-process one.

Two small extra passes happen only when needed: UnitMem measured with other views than SSLMem's
(a different set, a different number, or ``none``), and UnitMem of the Top/Least memorized
candidates (Table 11), which are only known once SSLMem is.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

import memlens
from memlens import distributed as D
from memlens import resources
from memlens.audit.classmem import ClassMemAccumulator
from memlens.audit.encoders import AuditEncoder, resolve
from memlens.audit.hooks import tap
from memlens.audit.layermem import delta_layermem, vit_block_table
from memlens.audit.reliability import ranking_reliability
from memlens.audit.results import AUDIT_FILE, AuditSummary
from memlens.audit.sslmem import alignment_from_distances, pairwise_distances, range_normalize, symmetric_normalize
from memlens.audit.stats import bootstrap_ci, ranking_consistency, sslmem_tests, welch
from memlens.audit.unitmem import NONE, UnitMemAccumulator, unitmem
from memlens.config import SUBSETS, AuditConfig, EncoderSpec
from memlens.data import Augmenter, Dataset, Splits, load
from memlens.data.augment import EvalTransform, describe
from memlens.data.dataset import ConcatPixels, Pixels
from memlens.data.loader import Unit, eval_batches, fetch, mode_for
from memlens.device import autocast, describe_device, resolve_device
from memlens.errors import MemlensError
from memlens.io import atomic_write_text, dumps, sha256_bytes, sha256_file
from memlens.rng import RowStreams, derive_seed

RECIPE_IGNORED = ("seed", "subsets", "splits", "device", "precision", "workers", "threads", "distributed", "canaries")
SCORING_ORDER = ("S_C", "S_S", "S_I", "S_E")  # candidates first
Progress = Callable[[str, int, int], None]


@dataclass
class AuditResult:
    """An audit in memory: the summary and pandas tables; :meth:`save` writes what ``memlens
    report`` and ``memlens gate`` read."""

    summary: AuditSummary
    points: pd.DataFrame
    layers: pd.DataFrame
    units: pd.DataFrame
    tests: pd.DataFrame
    canaries: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)

    def save(self, out_dir: str | Path, *, force: bool = False) -> Path:
        return write_audit(self, out_dir, force=force)

    def tables(self) -> dict[str, pd.DataFrame]:
        out = {"points": self.points, "layers": self.layers, "units": self.units, "tests": self.tests}
        if self.canaries is not None:
            out["canaries"] = self.canaries
        return out


# ----------------------------------------------------------------------------- inputs


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
    """Refuse memlens runs trained on other images than the audit reads, naming the run and both data.

    Raises:
        MemlensError: the first run whose data fingerprint differs.
    """
    for enc in encoders:
        rec = enc.record
        if rec is not None and rec.data["fingerprint"] != dataset.fingerprint:
            raise MemlensError(f"run {enc.info.get('path', enc.label)} was trained on other data than the audit's: the "
                               f"run's data is {rec.data.get('source')} (fingerprint {rec.data['fingerprint'][:12]}), "
                               f"the audit reads {dataset.source} (fingerprint {dataset.fingerprint[:12]})")


def check_encoders(f: list[AuditEncoder], g: list[AuditEncoder], splits: Splits, dataset: Dataset) -> None:
    """Refuse encoders that were not trained as the SSLMem setup requires (what can be checked).

    memlens runs carry a record of their data, splits and recipe, which must match; encoders
    from elsewhere are taken at the membership the splits declare.

    Raises:
        MemlensError: naming the encoder and what does not match.
    """
    runs = [(e, side) for side, encs in (("f", f), ("g", g)) for e in encs if e.record is not None]
    ref = runs[0][0] if runs else None
    for enc, side in runs:
        rec = enc.record
        where = enc.info.get("path", enc.label)
        if rec.data["fingerprint"] != dataset.fingerprint:
            raise MemlensError(f"run {where} was trained on other data than the audit's: the run's data is "
                               f"{rec.data.get('source')} (fingerprint {rec.data['fingerprint'][:12]}), the audit "
                               f"reads {dataset.source} (fingerprint {dataset.fingerprint[:12]})")
        if rec.splits is None:
            raise MemlensError(f"run {where} was not trained from a splits file, so its subsets are unknown")
        if rec.splits["hash"] != splits.hash:
            raise MemlensError(f"run {where} was trained with other splits (hash {rec.splits['hash'][:12]}, "
                               f"given {splits.hash[:12]})")
        expected = ["S_S", "S_C"] if side == "f" else ["S_S", "S_I"]
        if sorted(rec.splits["subsets"]) != sorted(expected):
            raise MemlensError(f"run {where} was trained on {'+'.join(rec.splits['subsets'])}, but a {side} run "
                               f"must be trained on {'+'.join(expected)}")
        d = _diff(_recipe(ref.record), _recipe(rec))
        if d:
            raise MemlensError(f"runs {ref.info.get('path')} and {where} differ in their recipe ({d}); f and g must "
                               f"share it")
    paths = [e.info.get("path") for e in f + g if e.info.get("path")]
    if len(set(paths)) != len(paths):
        raise MemlensError("the same run is given twice")
    first = f[0]
    for enc in f + g:
        if (enc.input_size, enc.in_chans) != (first.input_size, first.in_chans):
            raise MemlensError(f"encoders {first.label} and {enc.label} take different inputs "
                               f"({first.in_chans}x{first.input_size}px vs {enc.in_chans}x{enc.input_size}px); f and "
                               f"g must be the same architecture")


def resolve_data(cfg: AuditConfig, encoders: list[AuditEncoder], splits_path: str,
                 cache_dir: str | Path | None, *, collective: bool = False) -> Dataset:
    """The images of the audit: ``data`` of the config, else the runs' data, else the data the
    splits file records (``memlens split`` of membership lists writes it)."""
    from memlens.io import read_json

    if cfg.data is not None:
        return load(cfg.data, cache_dir=cache_dir, collective=collective)
    runs = [e for e in encoders if e.record is not None]
    if runs:
        return load(runs[0].record.config.data, cache_dir=cache_dir, collective=collective)
    raw = read_json(splits_path, what="splits file")
    if isinstance(raw, dict) and raw.get("data"):
        from memlens.config import DataConfig, validate

        return load(validate(DataConfig, raw["data"], source=f"{splits_path}: data"), cache_dir=cache_dir,
                    collective=collective)
    raise MemlensError("the encoders are not memlens runs and the splits file records no data source; give the "
                       "images with --data PATH (a folder, archive, .npz or manifest .csv)")


def _choose_points(splits: Splits, dataset: Dataset, cfg: AuditConfig) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(derive_seed(cfg.seed, "points"))
    rows, subset_of, ids = [], [], []
    requested = set(splits.requested)
    for name in [s for s in SCORING_ORDER if s in cfg.subsets]:
        sub = list(splits.subsets[name])
        if not sub:
            raise MemlensError(f"subset {name} of the splits is empty")
        if cfg.max_per_subset and len(sub) > cfg.max_per_subset:
            keep = set(rng.choice(len(sub), cfg.max_per_subset, replace=False).tolist())
            sub = [i for k, i in enumerate(sub) if k in keep or i in requested]
        rows.append(dataset.indices(sub))
        subset_of += [name] * len(sub)
        ids += sub
    return np.concatenate(rows), np.array(subset_of), ids


# ----------------------------------------------------------------------------- the pass


@dataclass
class _Ctx:
    cfg: AuditConfig
    dataset: Dataset
    pixels: Pixels  # the dataset's images, then the canaries' (rows index both)
    rows: np.ndarray
    ids: list[str]
    subset_of: np.ndarray
    f: list[AuditEncoder]
    g: list[AuditEncoder]
    specs: list
    unit_layers: list[str]
    device: torch.device
    dprime_pos: np.ndarray  # position of each point in D' (-1: not in D')
    progress: Progress | None
    workers: int = 0
    forwards: int = 0
    modules: dict = field(default_factory=dict)

    @property
    def mode(self) -> str:
        return mode_for(self.pixels, augmented=True)

    def _units(self, positions: np.ndarray, per_point: int = 1, keys=None) -> list[Unit]:
        out = []
        for k in range(0, len(positions), self.cfg.batch_points):
            pos = positions[k:k + self.cfg.batch_points]
            rows = np.repeat(self.rows[pos], per_point)
            out.append(Unit(rows, None if keys is None else np.asarray(keys(pos), dtype=np.uint64)))
        return out

    @staticmethod
    def _bad(got) -> None:
        """An unreadable image stops the audit naming it (``on_bad_image: skip`` checked every point
        before scoring, see :func:`_readable_points`)."""
        if got.bad:
            raise MemlensError(next(iter(got.bad.values())) + "; set data.on_bad_image: skip to leave such images "
                               "out of the audit (recorded in audit.json)")

    def view_keys(self, augmenter: Augmenter, positions: np.ndarray, n_views: int) -> list[int]:
        return [derive_seed(self.cfg.seed, "view", augmenter.name, self.ids[p], j) for p in positions
                for j in range(n_views)]

    def view_batches(self, positions: np.ndarray, n_views: int, augmenter: Augmenter):
        """(positions, views in [0, 1]) batch by batch: ``n_views`` seeded views per point, (B * V, C, S, S)."""
        cut = self.mode == "cut"
        per_point = n_views if cut else 1  # a loader cutting views reads one row per view
        keys = (lambda pos: self.view_keys(augmenter, pos, n_views)) if cut else None
        units = self._units(positions, per_point, keys)
        got_all = fetch(self.pixels, units, mode=self.mode, device=self.device, workers=self.workers,
                        geometry=augmenter.geometry(1) if cut else None, augmenter=augmenter)
        start = 0
        for unit, got in zip(units, got_all, strict=True):
            pos = positions[start:start + len(unit.rows) // per_point]
            start += len(pos)
            self._bad(got)
            draws = RowStreams(self.view_keys(augmenter, pos, n_views), self.device)
            yield pos, augmenter.views(got.images, n_views, draws)

    def eval_batches(self, positions: np.ndarray, size: int, evaluation: EvalTransform):
        """(positions, un-augmented inputs in [0, 1]) at the encoders' input size, (B, C, S, S)."""
        units = self._units(positions)
        start = 0
        for unit, got in zip(units, eval_batches(self.pixels, units, size=size, evaluation=evaluation,
                                                 device=self.device, workers=self.workers), strict=True):
            pos = positions[start:start + len(unit.rows)]
            start += len(unit.rows)
            self._bad(got)
            yield pos, got.images


def _unit_accumulators(ctx: _Ctx) -> tuple[dict, dict]:
    u = ctx.cfg.unitmem
    specs = {s.name: s for s in ctx.specs}
    unit = {name: UnitMemAccumulator(specs[name].units, rest=u.rest,
                                     shift="shift" if (u.signed == "shift" and not specs[name].is_unit_layer)
                                     else "none", min_activation=u.min_activation)
            for name in ctx.unit_layers}
    labels = ctx.dataset.labels
    cls = {}
    if labels is not None:
        n_cls = len(ctx.dataset.class_names)
        cls = {name: ClassMemAccumulator(specs[name].units, n_cls, shift=unit[name].shift,
                                         min_activation=u.min_activation) for name in ctx.unit_layers}
    return unit, cls


def _feed(ctx: _Ctx, tapped, positions: np.ndarray, unit_acc: dict, class_acc: dict) -> None:
    sel = np.flatnonzero(ctx.dprime_pos[positions] >= 0)
    if len(sel) == 0:
        return
    idx = torch.from_numpy(sel).to(ctx.device)
    dpos = torch.from_numpy(ctx.dprime_pos[positions[sel]])
    lab = ctx.dataset.labels[ctx.rows[positions[sel]]] if class_acc else None
    for name in ctx.unit_layers:
        mu = tapped.units[name].index_select(0, idx)
        unit_acc[name].update(mu, dpos)
        if class_acc:
            class_acc[name].update(mu, torch.from_numpy(lab))


def _scoring_pass(ctx: _Ctx, positions: np.ndarray, n_views: int, augmenter: Augmenter, *,
                  units: bool) -> dict[str, Any]:
    """Score ``positions`` (this process's share) with ``n_views`` views per point."""
    cfg = ctx.cfg
    n = len(positions)
    names = [s.name for s in ctx.specs]
    out = {"positions": positions,
           "dist_f": np.zeros((len(ctx.f), n, n_views, n_views), np.float32),
           "dist_g": np.zeros((len(ctx.g), n, n_views, n_views), np.float32),
           "layer_f": np.zeros((len(names), n)), "layer_g": np.zeros((len(names), n))}
    unit_acc, class_acc = _unit_accumulators(ctx) if units else ({}, {})
    is_cand = ctx.subset_of == "S_C"
    done = 0
    n_batches = math.ceil(n / cfg.batch_points) if n else 0
    for b, (pos, v01) in enumerate(ctx.view_batches(positions, n_views, augmenter)):
        local = np.arange(done, done + len(pos))
        done += len(pos)
        # LayerMem is measured on the candidates: other batches need only the representation.
        want_layers = bool(is_cand[pos].any())
        for side, encs in (("f", ctx.f), ("g", ctx.g)):
            layer = out[f"layer_{side}"]
            for i, enc in enumerate(encs):
                want_units = units and side == "f" and i == 0 and bool((ctx.dprime_pos[pos] >= 0).any())
                with tap(enc.module, ctx.specs, views_per_point=n_views, pairing=cfg.pairing if want_layers else None,
                         distance=cfg.distance, unit_layers=set(ctx.unit_layers) if want_units else None,
                         signed=cfg.unitmem.signed, modules=ctx.modules[id(enc)]) as tapped, \
                        autocast(ctx.device, cfg.precision):
                    z = enc.represent(enc.prepare(v01))
                tapped.check_finite(f"encoder {enc.label}")  # first: it names the layer
                dist = pairwise_distances(z, views_per_point=n_views, metric=cfg.distance)
                if not bool(torch.isfinite(dist).all()):
                    raise MemlensError(f"encoder {enc.label}: its representation is NaN or inf on point "
                                       f"'{ctx.ids[pos[0]]}' or its batch; the encoder cannot be audited")
                out[f"dist_{side}"][i, local] = dist.float().cpu().numpy()
                if want_layers:
                    for li, name in enumerate(names):
                        layer[li, local] += tapped.align[name].cpu().numpy()
                if want_units:
                    _feed(ctx, tapped, pos, unit_acc, class_acc)
                ctx.forwards += len(v01)
        if ctx.progress:
            ctx.progress("scoring", b + 1, n_batches)
    out["layer_f"] /= len(ctx.f)
    out["layer_g"] /= len(ctx.g)
    out["unit_acc"], out["class_acc"] = unit_acc, class_acc
    return out


def _unit_pass(ctx: _Ctx, positions: np.ndarray, n_views: int, augmenter: Augmenter, *,
               accumulate: bool) -> tuple[dict, dict, dict[str, np.ndarray]]:
    """Unit responses of f[0] on ``positions`` only (no alignment): accumulated, or per point."""
    enc = ctx.f[0]
    unit_acc, class_acc = _unit_accumulators(ctx) if accumulate else ({}, {})
    rows: dict[str, list[np.ndarray]] = {name: [] for name in ctx.unit_layers}
    for pos, v01 in ctx.view_batches(positions, n_views, augmenter):
        with tap(enc.module, ctx.specs, views_per_point=n_views, pairing=None, unit_layers=set(ctx.unit_layers),
                 signed=ctx.cfg.unitmem.signed, modules=ctx.modules[id(enc)]) as tapped, \
                autocast(ctx.device, ctx.cfg.precision):
            enc.represent(enc.prepare(v01))
        tapped.check_finite(f"encoder {enc.label}")
        if accumulate:
            _feed(ctx, tapped, pos, unit_acc, class_acc)
        else:
            for name in ctx.unit_layers:
                rows[name].append(tapped.units[name].cpu().double().numpy())
        ctx.forwards += len(v01)
    stacked = {name: (np.concatenate(r) if r else np.zeros((0, 0))) for name, r in rows.items()}
    return unit_acc, class_acc, stacked


def _merge_pass(parts: list[dict]) -> dict[str, Any]:
    """Combine the passes of all processes into one, in global point order."""
    if len(parts) == 1:
        return parts[0]
    out: dict[str, Any] = {"positions": np.concatenate([p["positions"] for p in parts])}
    for key, axis in (("dist_f", 1), ("dist_g", 1), ("layer_f", 1), ("layer_g", 1)):
        out[key] = np.concatenate([p[key] for p in parts], axis=axis)
    for key in ("unit_acc", "class_acc"):
        merged = parts[0][key]
        for p in parts[1:]:
            for name, acc in p[key].items():
                merged[name].merge(acc)
        out[key] = merged
    return out


def _gather(result: dict[str, Any]) -> dict[str, Any]:
    return _merge_pass(D.all_gather_object(result)) if D.active() else result


# ----------------------------------------------------------------------------- entry points


def run_audit(config: AuditConfig, *, cache_dir: str | Path | None = None, dataset: Dataset | None = None,
              f: list[nn.Module | AuditEncoder] | None = None, g: list[nn.Module | AuditEncoder] | None = None,
              progress: Progress | None = None) -> AuditResult:
    """Audit encoders f (trained with the candidates) against g (trained without them).

    Under ``torch.distributed`` (``torchrun``) each process scores its share of the points and
    every process returns the same, complete result.

    Args:
        config: the audit settings.
        cache_dir: data cache directory.
        dataset: already-loaded data (skips loading).
        f, g: encoder objects replacing ``config.f`` / ``config.g`` (Python API: any
            ``nn.Module`` or :class:`~memlens.audit.encoders.AuditEncoder`).
        progress: called as progress(stage, done, total) during the passes.

    Returns:
        The summary and the tables, ready for :func:`write_audit`.
    """
    t_start = time.perf_counter()
    cfg = config
    device = resolve_device(cfg.device)
    rep = cfg.representation
    f_enc = [resolve(e, default_rep=rep, device=device) for e in (f if f is not None else cfg.f)]
    g_enc = [resolve(e, default_rep=rep, device=device) for e in (g if g is not None else cfg.g)]
    dataset = dataset if dataset is not None else resolve_data(cfg, f_enc + g_enc, cfg.splits, cache_dir,
                                                               collective=D.active())
    check_data(f_enc + g_enc, dataset)  # before the splits: a run of other data is the run's problem
    splits = Splits.load(cfg.splits, dataset)
    check_encoders(f_enc, g_enc, splits, dataset)
    plan = resources.plan(lazy=dataset.lazy, workers=cfg.workers, threads=cfg.threads,
                          processes_per_node=D.local_world_size())
    # inference_mode, not just no_grad: no version counters or view tracking on the large
    # activations (measured: about a third off ResNet9's forward passes here).
    with torch.inference_mode(), resources.using(plan):
        return _audit(cfg, f_enc, g_enc, splits, dataset, device, progress, t_start, plan)


def _readable_points(dataset: Dataset, rows: np.ndarray, subset_of: np.ndarray, ids: list[str], device: torch.device,
                     workers: int) -> tuple[np.ndarray, np.ndarray, list[str], list[dict]]:
    """With ``on_bad_image: skip`` on data read lazily, the points whose image cannot be decoded are
    left out before scoring (one decode per point, split across processes) and recorded; with
    ``fail`` an unreadable image stops the audit when it is read, naming it."""
    if not dataset.lazy or dataset.meta.get("on_bad_image", "fail") != "skip":
        return rows, subset_of, ids, []
    mine = D.shard(np.arange(len(rows)))
    units = [Unit(rows[mine[k:k + 256]]) for k in range(0, len(mine), 256)]
    bad: dict[int, str] = {}
    start = 0
    for unit, got in zip(units, fetch(dataset.pixels, units, mode="eval", device=torch.device("cpu"), workers=workers,
                                      evaluation=EvalTransform(8)), strict=True):
        bad.update({int(mine[start + j]): why for j, why in got.bad.items()})
        start += len(unit.rows)
    for part in D.all_gather_object(bad) if D.active() else [bad]:
        bad.update(part)
    if not bad:
        return rows, subset_of, ids, []
    keep = np.array([p not in bad for p in range(len(rows))])
    skipped = [{"id": ids[p], "problem": why, "when": "audit"} for p, why in sorted(bad.items())]
    return rows[keep], subset_of[keep], [i for i, k in zip(ids, keep, strict=True) if k], skipped


def _discover(cfg: AuditConfig, f: list[AuditEncoder], g: list[AuditEncoder]) -> list:
    specs = f[0].discover(cfg.layers)
    ref = [(s.name, s.units) for s in specs]
    for enc in f[1:] + g:
        other = enc.discover(cfg.layers)
        if [(s.name, s.units) for s in other] != ref:
            raise MemlensError(f"encoders {f[0].label} and {enc.label} expose different layers; f and g must be the "
                               f"same architecture")
    return specs


def _audit(cfg: AuditConfig, f: list[AuditEncoder], g: list[AuditEncoder], splits: Splits, dataset: Dataset,
           device: torch.device, progress: Progress | None, t_start: float,
           plan: resources.ResourcePlan) -> AuditResult:
    ref = f[0]
    aug_name = cfg.augment or (ref.record.config.augmentation if ref.record is not None else "mae")
    augmenter = Augmenter(aug_name, size=ref.input_size, eval_transform=ref.eval_transform)
    specs = _discover(cfg, f, g)
    names = [s.name for s in specs]
    spec_by_name = {s.name: s for s in specs}
    unit_layers = [s.name for s in specs if s.is_unit_layer or cfg.unitmem.signed != "exclude"]

    rows, subset_of, ids = _choose_points(splits, dataset, cfg)
    rows, subset_of, ids, unreadable = _readable_points(dataset, rows, subset_of, ids, device, plan.workers)
    n_nat = len(rows)
    cset = _canary_set(cfg, f, dataset)
    pixels = dataset.pixels
    if cset is not None:  # canaries are scored like any point, after the natural ones
        rows = np.concatenate([rows, len(dataset) + np.arange(len(cset))])
        subset_of = np.concatenate([subset_of, np.full(len(cset), "canary")])
        ids = ids + list(cset.ids)
        pixels = ConcatPixels([pixels, cset.pixels])
    n = len(rows)
    dprime = np.isin(subset_of, cfg.unitmem.subsets)
    dprime_pos = np.where(dprime, np.cumsum(dprime) - 1, -1)
    dprime_ids = [ids[p] for p in np.flatnonzero(dprime)]
    labels = dataset.labels
    has_labels = labels is not None
    ctx = _Ctx(cfg=cfg, dataset=dataset, pixels=pixels, rows=rows, ids=ids, subset_of=subset_of, f=f, g=g, specs=specs,
               unit_layers=unit_layers, device=device, dprime_pos=dprime_pos, progress=progress,
               modules={id(e): dict(e.module.named_modules()) for e in f + g}, workers=plan.workers)
    t_loaded = time.perf_counter()

    mine = D.shard(np.arange(n))
    cand = np.flatnonzero(subset_of == "S_C")
    k_top = max(1, min(cfg.top_k, len(cand) // 2))
    rel_cfg = cfg.reliability
    auto = cfg.views == "auto"
    n_views = 10 if auto else int(cfg.views)
    unit_aug_name = cfg.unitmem.augment or aug_name
    history = []
    while True:
        unit_views = cfg.unitmem.views or n_views
        shared_units = unit_aug_name == aug_name and unit_views == n_views
        res = _gather(_scoring_pass(ctx, mine, n_views, augmenter, units=shared_units))
        rel, freq = ranking_reliability(res["dist_f"][:, cand], res["dist_g"][:, cand], pairing=cfg.pairing,
                                        target=rel_cfg.target, top_k=k_top, bootstrap=rel_cfg.bootstrap,
                                        seed=derive_seed(cfg.seed, "reliability") % 2**32)
        history.append({"views": n_views, "reliability": rel.reliability, "split_half_r": rel.split_half_r})
        if not auto or rel.meets_target or n_views >= rel_cfg.max_views:
            break
        wanted = rel.views_for_target if math.isfinite(rel.views_for_target) else rel_cfg.max_views
        n_views = int(min(rel_cfg.max_views, max(2 * n_views, wanted)))
        n_views += n_views % 2
    rel.history = history
    t_pass = time.perf_counter()

    unit_augmenter = augmenter if unit_aug_name == aug_name else Augmenter(unit_aug_name, size=ref.input_size,
                                                                           eval_transform=ref.eval_transform)
    unit_acc, class_acc = res["unit_acc"], res["class_acc"]
    if not shared_units and unit_layers:
        d_mine = D.shard(np.flatnonzero(dprime))
        ua, ca, _ = _unit_pass(ctx, d_mine, unit_views, unit_augmenter, accumulate=True)
        merged = _merge_pass(D.all_gather_object({"positions": d_mine, "dist_f": np.zeros((0, 0, 0, 0)),
                                                  "dist_g": np.zeros((0, 0, 0, 0)), "layer_f": np.zeros((0, 0)),
                                                  "layer_g": np.zeros((0, 0)), "unit_acc": ua, "class_acc": ca})) \
            if D.active() else {"unit_acc": ua, "class_acc": ca}
        unit_acc, class_acc = merged["unit_acc"], merged["class_acc"]
    t_units = time.perf_counter()

    # ------------------------------------------------------------------ per-point scores
    align_f = np.stack([alignment_from_distances(torch.from_numpy(d).double(), cfg.pairing).numpy()
                        for d in res["dist_f"]])
    align_g = np.stack([alignment_from_distances(torch.from_numpy(d).double(), cfg.pairing).numpy()
                        for d in res["dist_g"]])
    af_all, ag_all = align_f.mean(axis=0), align_g.mean(axis=0)
    recon = _loss_scores(ctx, f, g, cset)
    t_mae = time.perf_counter()
    canary_table, privacy = _privacy(ctx, cset, f, af_all, ag_all, recon, n_nat, dataset)
    t_privacy = time.perf_counter()
    # the natural points: everything below is about them
    align_f, align_g = align_f[:, :n_nat], align_g[:, :n_nat]
    af, ag = af_all[:n_nat], ag_all[:n_nat]
    rows, subset_of, ids = rows[:n_nat], subset_of[:n_nat], ids[:n_nat]
    raw = ag - af
    range_norm = range_normalize(torch.from_numpy(raw)).numpy()
    sym = symmetric_normalize(torch.from_numpy(af), torch.from_numpy(ag)).numpy()
    topk_freq = np.full(n_nat, np.nan)
    topk_freq[cand] = freq
    points = pd.DataFrame({"id": ids, "subset": subset_of,
                           "label": [dataset.class_names[labels[r]] if has_labels else "" for r in rows],
                           "align_f": af, "align_g": ag, "sslmem": raw, "sslmem_range_norm": range_norm,
                           "sslmem_sym_norm": sym})
    if recon is not None:
        points["loss_f"], points["loss_g"] = recon[0][:n_nat], recon[1][:n_nat]
    points["rank"] = points.groupby("subset")["sslmem"].rank(ascending=False, method="first").astype(int)
    points["requested"] = points["id"].isin(set(splits.requested))
    points["topk_freq"] = topk_freq

    order = cand[np.argsort(-raw[cand], kind="stable")]
    top, least = order[:k_top], order[::-1][:k_top]

    # ------------------------------------------------------------------ UnitMem of Top / Least (Table 11)
    mu_groups: dict[str, dict[str, np.ndarray]] = {"top": {}, "least": {}}
    if k_top >= 2 and unit_layers:
        for group, positions in (("top", top), ("least", least)):
            part = D.shard(positions)
            _, _, rows_mu = _unit_pass(ctx, part, unit_views, unit_augmenter, accumulate=False)
            gathered = D.all_gather_object(rows_mu)
            mu_groups[group] = {name: np.concatenate([gm[name] for gm in gathered if gm[name].size])
                                for name in unit_layers}
    t_topleast = time.perf_counter()

    # ------------------------------------------------------------------ layers and units
    lf, lg = res["layer_f"][:, cand], res["layer_g"][:, cand]
    prime = symmetric_normalize(torch.from_numpy(lf), torch.from_numpy(lg)).numpy()  # (L, |S_C|) per-layer SSLMem'
    pos_in_cand = {p: j for j, p in enumerate(cand)}
    top_idx = [pos_in_cand[p] for p in top]
    least_idx = [pos_in_cand[p] for p in least]
    lm = {name: float(prime[li].mean()) for li, name in enumerate(names)}
    lm_top = {name: float(prime[li, top_idx].mean()) for li, name in enumerate(names)}
    lm_least = {name: float(prime[li, least_idx].mean()) for li, name in enumerate(names)}
    prev = {s.name: s.prev for s in specs}
    delta, delta_top = delta_layermem(lm, prev), delta_layermem(lm_top, prev)

    d_size = int(dprime.sum())
    unit_rows, layer_rows, tests_extra = [], [], []
    for s in specs:
        row = {"layer": s.name, "kind": s.kind, "depth": s.depth, "block": s.block, "units": s.units,
               "unit_kind": s.unit_kind, "layermem": lm[s.name], "delta_layermem": delta[s.name],
               "layermem_top": lm_top[s.name], "layermem_least": lm_least[s.name],
               "delta_layermem_top": delta_top[s.name], "units_measured": s.name in unit_layers}
        if s.name in unit_layers and d_size >= 2:
            r = unit_acc[s.name].result()
            cm = None
            if has_labels:
                try:
                    cm = class_acc[s.name].result().numpy()
                except ValueError:
                    cm = None
            um = r.unitmem.numpy()
            ranked = ~np.isnan(um)
            for u in range(s.units):
                arg = int(r.argmax[u])
                unit_rows.append((s.name, u, um[u], float(r.mu_max[u]), float(r.mu_rest[u]),
                                  dprime_ids[arg] if arg != NONE else "",
                                  float(r.active[u]) / d_size if unit_acc[s.name].shift == "none" else np.nan,
                                  float(cm[u]) if cm is not None else np.nan))
            top_mean = least_mean = None
            if mu_groups["top"]:
                kw = dict(rest=cfg.unitmem.rest, shift=unit_acc[s.name].shift,
                          min_activation=cfg.unitmem.min_activation)
                ut = unitmem(torch.from_numpy(mu_groups["top"][s.name]), **kw).unitmem.numpy()
                ul = unitmem(torch.from_numpy(mu_groups["least"][s.name]), **kw).unitmem.numpy()
                ut, ul = ut[~np.isnan(ut)], ul[~np.isnan(ul)]
                top_mean = float(ut.mean()) if len(ut) else None
                least_mean = float(ul.mean()) if len(ul) else None
                tests_extra.append(welch(ut, ul, alternative="greater", name=f"unitmem_top>least[{s.name}]",
                                         hypothesis=f"UnitMem of layer {s.name} is higher on the {k_top} most than "
                                                    f"on the {k_top} least memorized candidates (units as samples)"))
            row.update(units_ranked=int(ranked.sum()), units_silent=int((~ranked).sum()),
                       unitmem_mean=float(np.nanmean(um)) if ranked.any() else None,
                       unitmem_median=float(np.nanmedian(um)) if ranked.any() else None,
                       unitmem_max=float(np.nanmax(um)) if ranked.any() else None,
                       frac_units_above_half=float(np.mean(um[ranked] > 0.5)) if ranked.any() else None,
                       classmem_mean=float(np.nanmean(cm)) if cm is not None and np.isfinite(cm).any() else None,
                       unitmem_top_mean=top_mean, unitmem_least_mean=least_mean)
        layer_rows.append(row)
    units = pd.DataFrame(unit_rows, columns=["layer", "unit", "unitmem", "mu_max", "mu_rest", "argmax_id",
                                             "active_frac", "classmem"])
    layers = pd.DataFrame(layer_rows)
    top_units = [{"layer": r["layer"], "unit": int(r["unit"]), "unitmem": float(r["unitmem"]),
                  "mu_max": float(r["mu_max"]), "active_frac": float(r["active_frac"]), "argmax_id": r["argmax_id"]}
                 for _, r in units.dropna(subset=["unitmem"]).sort_values("unitmem", ascending=False,
                                                                          kind="stable").head(20).iterrows()]

    # ------------------------------------------------------------------ statistics
    scores = {name: raw[subset_of == name] for name in SUBSETS if name in cfg.subsets}
    tests = sslmem_tests(scores) + tests_extra
    ranking_layers = [s for s in specs if s.kind in ("conv", "block", "stage")] or [s for s in specs
                                                                                  if s.is_unit_layer]
    cons_layers = []
    for i in range(len(ranking_layers)):
        for j in range(i + 1, len(ranking_layers)):
            a, b = ranking_layers[i], ranking_layers[j]
            c = ranking_consistency(prime[names.index(a.name)], prime[names.index(b.name)], k=cfg.ranking_k,
                                    name_a=a.name, name_b=b.name)
            cons_layers.append(c.to_dict())
    cons_seeds = []
    if len(f) > 1:
        per_run = [ag[cand] - align_f[i, cand] for i in range(len(f))]
        for i in range(len(f)):
            for j in range(i + 1, len(f)):
                c = ranking_consistency(per_run[i], per_run[j], k=cfg.ranking_k, name_a=f[i].label,
                                        name_b=f[j].label)
                cons_seeds.append(c.to_dict())

    subsets = {}
    for name, x in scores.items():
        mask = subset_of == name
        lo, hi = bootstrap_ci(x, confidence=cfg.confidence, n_resamples=cfg.bootstrap,
                              seed=derive_seed(cfg.seed, "bootstrap", name) % 2**32)
        subsets[name] = {"n": int(len(x)), "mean": float(np.mean(x)), "std": float(np.std(x, ddof=1)) if len(x) > 1
                         else 0.0, "median": float(np.median(x)), "ci_low": lo, "ci_high": hi,
                         "mean_range_norm": float(range_norm[mask].mean()), "mean_sym_norm": float(sym[mask].mean()),
                         "mean_align_f": float(af[mask].mean()), "mean_align_g": float(ag[mask].mean())}
    t_stats = time.perf_counter()

    ranked_um = units["unitmem"].dropna().to_numpy()
    vit_rows = [r.__dict__ for r in vit_block_table(lm, specs)] if any(s.kind == "resblock_attn" for s in specs) \
        else None
    runs = [_encoder_input(e, side) for side, encs in (("f", f), ("g", g)) for e in encs]
    rec = ref.record
    set_aside = {name: int((units["layer"] == name).sum() - units.loc[units["layer"] == name, "unitmem"].notna().sum())
                 for name in unit_layers}
    summary = AuditSummary(
        created=_now(), memlens_version=memlens.__version__, settings=cfg,
        environment={"device": describe_device(device), "precision": cfg.precision, "world_size": D.world_size(),
                     "backend": D.backend(), "versions": _versions(), "resources": plan.to_dict()},
        data={"source": dataset.source, "fingerprint": dataset.fingerprint, "n": len(dataset),
              "image_shape": dataset.describe()["image_shape"], "sizes": dataset.size_summary(),
              "read": dataset.describe()["read"], "classes": list(dataset.class_names or []),
              **({"skipped": dataset.meta.get("skipped", []) + unreadable}
                 if dataset.meta.get("skipped") or unreadable else {})},
        splits={"path": str(Path(cfg.splits).resolve()), "hash": splits.hash, "sha256": sha256_file(cfg.splits),
                "sizes": splits.sizes(), "requested": list(splits.requested)},
        model={"arch": rec.model["arch"] if rec is not None else ref.info.get("spec", ref.label),
               "family": ref.family, "parameters": int(sum(p.numel() for p in ref.module.parameters())),
               "representation": ref.representation, "input_size": ref.input_size,
               "layers_exposed": len(specs), "units_total": int(sum(spec_by_name[n].units for n in unit_layers)),
               "unit_layers": len(unit_layers)},
        framework=rec.config.framework if rec is not None else None,
        recipe=({k: v for k, v in rec.config.model_dump(mode="json").items() if k not in RECIPE_IGNORED}
                if rec is not None else None),
        encoders=runs,
        augmentation={"sslmem": f"{aug_name}: {describe(aug_name)}",
                      "unitmem": f"{unit_aug_name}: {describe(unit_aug_name)} ({unit_views} views)"},
        views={"count": n_views, "pairing": cfg.pairing, "auto": auto,
               "pairs_per_point": n_views * (n_views - 1) // 2 if cfg.pairing == "all" else n_views // 2},
        reliability=rel.to_dict(),
        subsets=subsets, layers=layer_rows, vit_blocks=vit_rows,
        units={"n": int(len(units)), "ranked": int(len(ranked_um)), "set_aside": set_aside,
               "min_activation": cfg.unitmem.min_activation, "signed": cfg.unitmem.signed,
               "d_prime": list(cfg.unitmem.subsets), "d_prime_size": d_size,
               "mean": float(ranked_um.mean()) if len(ranked_um) else None,
               "median": float(np.median(ranked_um)) if len(ranked_um) else None,
               "frac_above_half": float(np.mean(ranked_um > 0.5)) if len(ranked_um) else None,
               "max": float(ranked_um.max()) if len(ranked_um) else None,
               "classmem_mean": float(units["classmem"].mean()) if has_labels and len(units) else None,
               "top_least_k": k_top},
        top_units=top_units, top_points=points.iloc[order[:k_top]].to_dict(orient="records"),
        requested_points=points[points["requested"]].to_dict(orient="records"),
        tests=[t.to_dict() for t in tests],
        consistency={"layers": cons_layers, "seeds": cons_seeds},
        privacy=privacy,
        timings={"load": round(t_loaded - t_start, 3), "pass": round(t_pass - t_loaded, 3),
                 "mae_scores": round(t_mae - t_units, 3), "privacy": round(t_privacy - t_mae, 3),
                 "unit_pass": round(t_units - t_pass, 3), "top_least_pass": round(t_topleast - t_privacy, 3),
                 "stats": round(t_stats - t_topleast, 3), "total": round(time.perf_counter() - t_start, 3),
                 "images_forwarded": float(ctx.forwards)})
    tests_df = pd.DataFrame([t.to_dict() for t in tests],
                            columns=["name", "hypothesis", "statistic", "p_value", "effect_size", "method", "n_a",
                                     "n_b", "p_holm"])
    return AuditResult(summary, points, layers, units, tests_df, canaries=canary_table)


def _canary_set(cfg: AuditConfig, f: list[AuditEncoder], dataset: Dataset):
    """The canary set of the audit: the config's, else the one the f runs trained with (None without)."""
    from memlens.data.canaries import load_canaries

    path = cfg.canaries
    if path is None:
        recorded = {(r.record.canaries or {}).get("path") for r in f if r.record is not None}
        recorded.discard(None)
        if len(recorded) > 1:
            raise MemlensError("the f runs trained with different canary sets; give the one to score with canaries:")
        path = recorded.pop() if recorded else None
    if path is None:
        return None
    cset = load_canaries(path, dataset=dataset)
    for r in f:
        rc = (r.record.canaries or {}) if r.record is not None else {}
        if rc and rc.get("sha256") != cset.manifest.sha256:
            raise MemlensError(f"run {r.label} trained with another canary set than {path}")
    return cset


def _loss_scores(ctx: _Ctx, f: list[AuditEncoder], g: list[AuditEncoder], cset) -> \
        tuple[np.ndarray, np.ndarray, str] | None:
    """Every point's loss under the objective the encoders were trained with, averaged over fixed
    draws and over encoders: (f, g, objective), each (n,). The classic loss-based membership score
    (and, f against g, a likelihood-ratio-style one with g as the reference). Only for memlens
    runs of per-example objectives, whose heads the run kept:

    * MAE: the reconstruction loss of the unaugmented image under ``privacy.mae_masks`` masks drawn
      from the point's own key, the same masks for f and g;
    * supervised: the cross-entropy of the unaugmented image with its label (a canary's label is
      the random class it was trained with).
    """
    from memlens.train.run import load_objective

    encs = f + g
    framework = {e.record.config.framework if e.record is not None else None for e in encs}
    if len(framework) != 1 or framework & {None} or not framework & {"mae", "supervised"}:
        return None
    framework = framework.pop()
    try:
        objectives = [load_objective(e.info["path"]).to(ctx.device) for e in encs]
    except MemlensError:
        return None
    labels = None
    if framework == "supervised":
        from memlens.data.canaries import canary_labels

        labels = ctx.dataset.labels[np.minimum(ctx.rows, len(ctx.dataset) - 1)].copy()
        if cset is not None:
            extra = ctx.rows >= len(ctx.dataset)
            labels[extra] = canary_labels(cset, len(ctx.dataset.class_names))[ctx.rows[extra] - len(ctx.dataset)]
    draws = ctx.cfg.privacy.mae_masks if framework == "mae" else 1
    mine = D.shard(np.arange(len(ctx.rows)))
    out = np.zeros((len(encs), len(mine)))
    done = 0
    ref = f[0]
    for pos, x in ctx.eval_batches(mine, ref.input_size, ref.eval_transform):
        local = np.arange(done, done + len(pos))
        done += len(pos)
        lab = torch.from_numpy(labels[pos]).to(ctx.device) if labels is not None else None
        for r in range(draws):
            keys = [derive_seed(ctx.cfg.seed, "mae-mask", ctx.ids[p], r) for p in pos]
            for k, (enc, obj) in enumerate(zip(encs, objectives, strict=True)):
                with autocast(ctx.device, ctx.cfg.precision):
                    if framework == "mae":
                        noise = RowStreams(keys, ctx.device).rand(obj.encoder.num_patches)
                        loss = obj.losses_on_views(enc.prepare(x), None, noise)
                    else:
                        feats = obj.encoder.head_features(obj.encoder(enc.prepare(x)))
                        loss = torch.nn.functional.cross_entropy(obj.classifier(feats).float(), lab, reduction="none")
                out[k, local] += loss.float().cpu().numpy() / draws
    out = np.concatenate(D.all_gather_object(out), axis=1)
    return out[:len(f)].mean(axis=0), out[len(f):].mean(axis=0), framework


def _privacy(ctx: _Ctx, cset, f: list[AuditEncoder], af: np.ndarray, ag: np.ndarray,
             recon: tuple[np.ndarray, np.ndarray, str] | None, n_nat: int, dataset: Dataset):
    """The canary table and the empirical privacy summary (membership read only here)."""
    from memlens.audit.privacy import epsilon_lower_bound, membership_metrics

    cfg = ctx.cfg.privacy
    dp = [e.record.dp if e.record is not None else None for e in f]
    claimed_eps = [d.get("epsilon_spent") for d in dp if d] if all(dp) else []
    claimed_delta = [d.get("delta") for d in dp if d] if all(dp) else []
    declared = [e.info.get("declared_dp") for e in f]
    if not claimed_eps and all(declared):
        claimed_eps = [d["epsilon"] for d in declared]
        claimed_delta = [d["delta"] for d in declared]
    n_train = max((e.record.train_points for e in f if e.record is not None), default=len(dataset))
    delta = cfg.delta or (max(claimed_delta) if claimed_delta else 1.0 / (10 * n_train))
    seed = derive_seed(ctx.cfg.seed, "privacy") % 2**32

    scores_all = {"sslmem": ag - af, "neg_align_f": -af}
    loss_name = {"mae": "MAE reconstruction loss", "supervised": "cross-entropy"}.get(recon[2]) if recon else None
    if recon is not None:
        scores_all["loss_ref"] = recon[1] - recon[0]
        scores_all["neg_loss_f"] = -recon[0]
    primary = "loss_ref" if recon is not None else "sslmem"
    out: dict = {"primary_score": primary, "delta": delta, "confidence": cfg.confidence,
                 "claimed_epsilon": max(claimed_eps) if claimed_eps else None,
                 "claimed_delta": max(claimed_delta) if claimed_delta else None,
                 "scores": {"sslmem": "align_g - align_f (reference g)", "neg_align_f": "-align_f (f alone)",
                            **({"loss_ref": f"{loss_name} on g - on f (reference g)",
                                "neg_loss_f": f"-{loss_name} on f (f alone)"} if loss_name else {})}}
    # natural membership: S_C (f trained on them) against S_E (neither trained on them)
    sub = ctx.subset_of[:n_nat]
    members, others = sub == "S_C", sub == "S_E"
    if members.any() and others.any():
        out["natural"] = {"members": "S_C", "non_members": "S_E",
                          "metrics": {k: membership_metrics(v[:n_nat][members], v[:n_nat][others], score=k,
                                                            bootstrap=cfg.bootstrap, confidence=cfg.confidence,
                                                            seed=seed).to_dict() for k, v in scores_all.items()}}
    if cset is None:
        return None, out
    mem = cset.membership()
    included = np.isin(np.array(cset.ids), mem.included)
    table = pd.DataFrame({"id": cset.ids, "kind": cset.manifest.canary_kind, "included": included,
                          "score_ref": scores_all["sslmem"][n_nat:], "score_f": scores_all["neg_align_f"][n_nat:],
                          "align_f": af[n_nat:], "align_g": ag[n_nat:]})
    if recon is not None:
        table["score_loss_ref"] = scores_all["loss_ref"][n_nat:]
        table["score_loss_f"] = scores_all["neg_loss_f"][n_nat:]
    canary_scores = {k: v[n_nat:] for k, v in scores_all.items()}
    metrics = {}
    if included.any() and (~included).any():
        metrics = {k: membership_metrics(v[included], v[~included], score=k, bootstrap=cfg.bootstrap,
                                         confidence=cfg.confidence, seed=seed).to_dict()
                   for k, v in canary_scores.items()}
        prim = canary_scores[primary]
        bound = epsilon_lower_bound(prim[included], prim[~included], delta=delta, confidence=cfg.confidence,
                                    method=cfg.method, strategy=cfg.strategy, seed=seed)
        other = epsilon_lower_bound(prim[included], prim[~included], delta=delta, confidence=cfg.confidence,
                                    method="one-run" if cfg.method == "fdp" else "fdp", strategy=cfg.strategy,
                                    seed=seed)
        out["epsilon_lower_bound"] = bound.to_dict()
        out["epsilon_lower_bound_other"] = other.to_dict()
    out["canaries"] = {"path": str(cset.path), "sha256": cset.manifest.sha256, "m": len(cset),
                       "kinds": cset.manifest.kinds, "n_in": int(included.sum()), "n_out": int((~included).sum()),
                       "metrics": metrics}
    return table, out


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _versions() -> dict[str, str]:
    from memlens.train.run import versions

    return versions()


def _encoder_input(enc: AuditEncoder, side: str) -> dict:
    base = {"label": enc.label, "side": side, "source": enc.source, "spec": enc.info.get("spec"),
            "path": enc.info.get("path") or enc.info.get("weights"), "weights_sha256": enc.info.get("weights_sha256"),
            "run_json_sha256": enc.info.get("run_json_sha256"), "representation": enc.representation,
            "input_size": enc.input_size, "parameters": int(sum(p.numel() for p in enc.module.parameters())),
            "load": enc.info.get("load")}
    rec = enc.record
    if rec is not None:
        d = rec.dp or {}
        base.update(seed=rec.config.seed, status=rec.status, epsilon=d.get("epsilon_spent"), delta=d.get("delta"),
                    noise_multiplier=d.get("noise_multiplier"), sample_rate=d.get("sample_rate"),
                    steps=d.get("steps_taken"), max_grad_norm=d.get("max_grad_norm"), accountant=d.get("accountant"),
                    poisson=d.get("poisson"), coupling=d.get("coupling"),
                    probe_accuracy=(rec.probe or {}).get("accuracy"), train_points=rec.train_points,
                    wall_seconds=rec.wall_seconds)
    elif enc.info.get("declared_dp"):
        dp = enc.info["declared_dp"]
        base.update(epsilon=dp["epsilon"], delta=dp["delta"], accountant=dp.get("accountant"), dp_declared=True)
    return base


def write_audit(result: AuditResult, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write audit.json and the CSV tables into ``out_dir`` as one atomic step.

    Everything is written into a temporary sibling directory which then replaces ``out_dir``,
    so readers never see a half-written audit. audit.json records each table's sha256 and row
    count, which readers verify.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise MemlensError(f"{out} already holds {'an audit' if (out / AUDIT_FILE).exists() else 'other files'}; "
                           f"pass --force to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        from memlens.io import directory_mode

        os.chmod(tmp, directory_mode())
        infos = {}
        for name, table in result.tables().items():
            text = table.to_csv(index=False, float_format="%.6g")
            atomic_write_text(tmp / f"{name}.csv", text)
            infos[name] = {"sha256": sha256_bytes(text.encode("utf-8")), "rows": int(len(table))}
        from memlens.audit.results import TableInfo

        result.summary.tables = {name: TableInfo(**info) for name, info in infos.items()}
        atomic_write_text(tmp / AUDIT_FILE, dumps(result.summary) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def spec_of(value: Any) -> EncoderSpec | Any:
    """A CLI/API value as an encoder spec (strings are run directories or timm:/py: names)."""
    return EncoderSpec(model=value) if isinstance(value, str) else value
