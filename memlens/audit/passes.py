"""The audit's forward passes: each batch of views goes once through each encoder, reduced on the spot.

For every point, V augmented views are drawn once and shared by every encoder (common random
numbers: differences between encoders are measured on identical views). A point's views are seeded
by the point itself (the audit seed, the augmentation set, its id and the view number), never by
its position in a batch, so every score is independent of the batch size, the order of the points
and the number of processes scoring them.

* :func:`scoring_pass`: every encoder's representation on every point's views, kept as the
  point's matrix of view distances (V x V), from which the alignment over all pairs, the views'
  jackknife and the split-half reliability follow without another pass; hooks reduce every
  layer's output to per-point alignments (LayerMem) on the points that need them and, for the
  encoder whose units are measured, to per-unit mean activations fed to O(units) accumulators
  (UnitMem, ClassMem).
* :func:`unit_pass`: unit responses alone, when UnitMem is measured on other views than SSLMem's,
  and for the most and least memorized images (localizing paper, Table 11).
* :func:`loss_pass`: every encoder's training loss on every point's un-augmented image (MAE
  reconstruction on fixed masks, or cross-entropy), for loss-based membership scores.

Under ``torchrun`` each process scores a share of the points; results are gathered and the unit
accumulators merged (sums, maxima with the lowest-position argmax), so a sharded audit equals
the single-process one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from memlens import distributed as D
from memlens.audit.alignment import pairwise_distances
from memlens.audit.classmem import ClassMemAccumulator
from memlens.audit.hooks import tap
from memlens.audit.unitmem import UnitMemAccumulator
from memlens.config import AuditConfig
from memlens.data import Augmenter, Dataset
from memlens.data.augment import EvalTransform
from memlens.data.dataset import Pixels
from memlens.data.loader import Unit, eval_batches, fetch, mode_for
from memlens.device import autocast
from memlens.errors import MemlensError
from memlens.rng import RowStreams, derive_seed

Progress = Callable[[str, int, int], None]


@dataclass
class PassContext:
    """What every pass needs: the settings, the points, the encoders, the layers, the device."""

    cfg: AuditConfig
    dataset: Dataset
    pixels: Pixels  # the dataset's images, then the canaries' (rows index both)
    rows: np.ndarray
    ids: list[str]
    encoders: list  # AuditEncoder, in the design's order
    unit_encoder: int
    specs: list
    unit_layers: list[str]
    device: torch.device
    dprime_pos: np.ndarray  # position of each point in D' (-1: not in D')
    layer_points: np.ndarray  # bool per point: its per-layer alignments are needed
    progress: Progress | None = None
    workers: int = 0
    forwards: int = 0
    modules: dict = field(default_factory=dict)
    class_labels: np.ndarray | None = None  # per point (canaries: the class they were trained with)

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
        before scoring)."""
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


# ----------------------------------------------------------------------------- accumulators


def unit_accumulators(ctx: PassContext) -> tuple[dict, dict]:
    u = ctx.cfg.unitmem
    specs = {s.name: s for s in ctx.specs}
    unit = {name: UnitMemAccumulator(specs[name].units, rest=u.rest,
                                     shift="shift" if (u.signed == "shift" and not specs[name].is_unit_layer)
                                     else "none", min_activation=u.min_activation)
            for name in ctx.unit_layers}
    cls = {}
    if ctx.class_labels is not None:
        n_cls = len(ctx.dataset.class_names)
        cls = {name: ClassMemAccumulator(specs[name].units, n_cls, shift=unit[name].shift,
                                         min_activation=u.min_activation) for name in ctx.unit_layers}
    return unit, cls


def _feed(ctx: PassContext, tapped, positions: np.ndarray, unit_acc: dict, class_acc: dict) -> None:
    sel = np.flatnonzero(ctx.dprime_pos[positions] >= 0)
    if len(sel) == 0:
        return
    idx = torch.from_numpy(sel).to(ctx.device)
    dpos = torch.from_numpy(ctx.dprime_pos[positions[sel]])
    lab = ctx.class_labels[positions[sel]] if class_acc else None
    for name in ctx.unit_layers:
        mu = tapped.units[name].index_select(0, idx)
        unit_acc[name].update(mu, dpos)
        if class_acc:
            class_acc[name].update(mu, torch.from_numpy(lab))


# ----------------------------------------------------------------------------- passes


def scoring_pass(ctx: PassContext, positions: np.ndarray, n_views: int, augmenter: Augmenter, *,
                 units: bool) -> dict[str, Any]:
    """Score ``positions`` (this process's share) with ``n_views`` views per point.

    Returns:
        ``dist`` (E, n, V, V) float32 view distances of each encoder's representation; ``layer``
        (E, L, n) per-layer alignments (zero where ``ctx.layer_points`` is False: not computed); unit and class
        accumulators of the units encoder (when ``units``).
    """
    cfg = ctx.cfg
    n = len(positions)
    names = [s.name for s in ctx.specs]
    e_count = len(ctx.encoders)
    out = {"positions": positions, "dist": np.zeros((e_count, n, n_views, n_views), np.float32),
           "layer": np.zeros((e_count, len(names), n))}
    unit_acc, class_acc = unit_accumulators(ctx) if units else ({}, {})
    done = 0
    n_batches = math.ceil(n / cfg.batch_points) if n else 0
    for b, (pos, v01) in enumerate(ctx.view_batches(positions, n_views, augmenter)):
        local = np.arange(done, done + len(pos))
        done += len(pos)
        # per-layer alignments of the points that need them (LayerMem's candidates and its null's controls)
        layer_sel = np.flatnonzero(ctx.layer_points[pos])
        want_layers = len(layer_sel) > 0
        subset = torch.from_numpy(layer_sel).to(ctx.device) if 0 < len(layer_sel) < len(pos) else None
        for e, enc in enumerate(ctx.encoders):
            want_units = units and e == ctx.unit_encoder and bool((ctx.dprime_pos[pos] >= 0).any())
            with tap(enc.module, ctx.specs, views_per_point=n_views, pairing=cfg.pairing if want_layers else None,
                     distance=cfg.distance, unit_layers=set(ctx.unit_layers) if want_units else None,
                     signed=cfg.unitmem.signed, modules=ctx.modules[id(enc)], align_points=subset) as tapped, \
                    autocast(ctx.device, cfg.precision):
                z = enc.represent(enc.prepare(v01))
            tapped.check_finite(f"encoder {enc.label}")  # first: it names the layer
            dist = pairwise_distances(z, views_per_point=n_views, metric=cfg.distance)
            if not bool(torch.isfinite(dist).all()):
                raise MemlensError(f"encoder {enc.label}: its representation is NaN or inf on point "
                                   f"'{ctx.ids[pos[0]]}' or its batch; the encoder cannot be audited")
            out["dist"][e, local] = dist.float().cpu().numpy()
            if want_layers:
                for li, name in enumerate(names):
                    out["layer"][e, li, local[layer_sel]] = tapped.align[name].cpu().numpy()
            if want_units:
                _feed(ctx, tapped, pos, unit_acc, class_acc)
            ctx.forwards += len(v01)
        if ctx.progress:
            ctx.progress("scoring", b + 1, n_batches)
    out["unit_acc"], out["class_acc"] = unit_acc, class_acc
    return out


def unit_pass(ctx: PassContext, positions: np.ndarray, n_views: int, augmenter: Augmenter, *,
              accumulate: bool) -> tuple[dict, dict, dict[str, np.ndarray]]:
    """Unit responses of the units encoder on ``positions`` only (no alignment): accumulated, or per point."""
    enc = ctx.encoders[ctx.unit_encoder]
    unit_acc, class_acc = unit_accumulators(ctx) if accumulate else ({}, {})
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


def merge_passes(parts: list[dict]) -> dict[str, Any]:
    """Combine the passes of all processes into one, in global point order."""
    if len(parts) == 1:
        return parts[0]
    out: dict[str, Any] = {"positions": np.concatenate([p["positions"] for p in parts])}
    for key, axis in (("dist", 1), ("layer", 2)):
        if key in parts[0]:
            out[key] = np.concatenate([p[key] for p in parts], axis=axis)
    for key in ("unit_acc", "class_acc"):
        merged = parts[0][key]
        for p in parts[1:]:
            for name, acc in p[key].items():
                merged[name].merge(acc)
        out[key] = merged
    return out


def gather(result: dict[str, Any]) -> dict[str, Any]:
    return merge_passes(D.all_gather_object(result)) if D.active() else result


def loss_pass(ctx: PassContext, objectives: list, framework: str, labels: np.ndarray | None) -> np.ndarray:
    """Every point's loss under each encoder's training objective, averaged over fixed draws: (E, n).

    * MAE: the reconstruction loss of the un-augmented image under ``privacy.mae_masks`` masks drawn
      from the point's own key, the same masks for every encoder;
    * supervised: the cross-entropy of the un-augmented image with its label (a canary's label is
      the random class it was trained with).
    """
    draws = ctx.cfg.privacy.mae_masks if framework == "mae" else 1
    mine = D.shard(np.arange(len(ctx.rows)))
    out = np.zeros((len(objectives), len(mine)))
    done = 0
    ref = ctx.encoders[0]
    for pos, x in ctx.eval_batches(mine, ref.input_size, ref.eval_transform):
        local = np.arange(done, done + len(pos))
        done += len(pos)
        lab = torch.from_numpy(labels[pos]).to(ctx.device) if labels is not None else None
        for r in range(draws):
            keys = [derive_seed(ctx.cfg.seed, "mae-mask", ctx.ids[p], r) for p in pos]
            for k, (enc, obj) in enumerate(zip(ctx.encoders, objectives, strict=True)):
                with autocast(ctx.device, ctx.cfg.precision):
                    if framework == "mae":
                        noise = RowStreams(keys, ctx.device).rand(obj.encoder.num_patches)
                        loss = obj.losses_on_views(enc.prepare(x), None, noise)
                    else:
                        feats = obj.encoder.head_features(obj.encoder(enc.prepare(x)))
                        loss = torch.nn.functional.cross_entropy(obj.classifier(feats).float(), lab, reduction="none")
                out[k, local] += loss.float().cpu().numpy() / draws
    return np.concatenate(D.all_gather_object(out), axis=1)
