"""The audit as a plan of passes: scoring, units, losses, per-image inference, privacy, tables.

``run_audit`` resolves the encoders (f and g, or K references and an optional target) into a
:class:`~memlens.audit.design.Design` (who trained on which point) and runs:

1. :func:`_setup`: the points, the layers, the augmentations, the pass context;
2. :func:`_score`: every encoder on every point's views (:func:`memlens.audit.passes.scoring_pass`),
   repeated with more views under ``views: auto``;
3. :func:`_units`: UnitMem's accumulators (from the scoring pass, or their own pass);
4. :func:`_losses`: the training loss of every encoder on every point (per-example objectives);
5. :func:`_estimate`: per-image memorization with intervals, p-values and the FDR at-risk list,
   and the reliability of the ranking over views and over encoders
   (:mod:`memlens.audit.inference`);
6. :func:`memlens.audit.membership.membership_findings`: membership scores, metrics and the epsilon bound;
7. :func:`_top_least`: UnitMem of the most and least memorized images (Table 11);
8. :func:`memlens.audit.assemble.assemble`: the tables, the tests and ``audit.json``.

Each step is a function of the previous steps' results, so each paper's formula sits in one small
function of its own module.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from memlens import distributed as D
from memlens import resources
from memlens.audit import inference, nulls
from memlens.audit import membership as mem
from memlens.audit.alignment import alignment_from_distances
from memlens.audit.assemble import assemble
from memlens.audit.design import (
    Design,
    Points,
    check_data,
    check_design,
    check_not_degenerate,
    choose_points,
    fg_design,
    membership,
    references_design,
    with_canaries,
)
from memlens.audit.encoders import AuditEncoder, resolve
from memlens.audit.passes import PassContext, gather, loss_pass, merge_passes, scoring_pass, unit_pass
from memlens.audit.reliability import ranking_reliability
from memlens.audit.results import AuditResult
from memlens.audit.state import Estimates, Findings, Measured, Setup, UnitNull
from memlens.audit.unitmem import unitmem_null_p
from memlens.config import AuditConfig, DataConfig, validate
from memlens.data import Augmenter, Dataset, Splits, load
from memlens.data.augment import EvalTransform
from memlens.data.canaries import canary_labels, load_canaries
from memlens.data.dataset import ConcatPixels
from memlens.data.loader import Unit, fetch
from memlens.data.references import read_design
from memlens.data.splits import check_duplicates
from memlens.device import resolve_device
from memlens.errors import MemlensError
from memlens.io import read_json, sha256_file
from memlens.rng import derive_seed
from memlens.train.run import load_objective

Progress = Callable[[str, int, int], None]


# ----------------------------------------------------------------------------- inputs


def resolve_data(cfg: AuditConfig, encoders: list[AuditEncoder], splits_path: str,
                 cache_dir: str | Path | None, *, collective: bool = False) -> Dataset:
    """The images of the audit: ``data`` of the config, else the runs' data, else the data the
    splits file records (``memlens split`` of membership lists writes it)."""

    if cfg.data is not None:
        return load(cfg.data, cache_dir=cache_dir, collective=collective)
    runs = [e for e in encoders if e.record is not None]
    if runs:
        return load(runs[0].record.config.data, cache_dir=cache_dir, collective=collective)
    raw = read_json(splits_path, what="splits file")
    if isinstance(raw, dict) and raw.get("data"):

        return load(validate(DataConfig, raw["data"], source=f"{splits_path}: data"), cache_dir=cache_dir,
                    collective=collective)
    raise MemlensError("the encoders are not memlens runs and the splits file records no data source; give the "
                       "images with --data PATH (a folder, archive, .npz or manifest .csv)")


def run_audit(config: AuditConfig, *, cache_dir: str | Path | None = None, dataset: Dataset | None = None,
              f: list[nn.Module | AuditEncoder] | None = None, g: list[nn.Module | AuditEncoder] | None = None,
              progress: Progress | None = None) -> AuditResult:
    """Audit encoders: f (trained with the candidates) against g (without), or K references.

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
    declared = None
    if cfg.design and not cfg.references:
        raise MemlensError("design is for references trained outside memlens: give them with references")
    if cfg.references:
        refs = [resolve(e, default_rep=rep, device=device, side="reference") for e in cfg.references]
        target = resolve(cfg.target, default_rep=rep, device=device, side="target") if cfg.target is not None \
            else None
        declared = read_design(cfg.design) if cfg.design else None
        design = references_design(refs, target, declared=declared,
                                   indices=[getattr(e, "reference", None) for e in cfg.references])
        design.target_subsets = list(cfg.target_subsets)
    else:
        f_enc = [resolve(e, default_rep=rep, device=device, side="f") for e in (f if f is not None else cfg.f)]
        g_enc = [resolve(e, default_rep=rep, device=device, side="g") for e in (g if g is not None else cfg.g)]
        design = fg_design(f_enc, g_enc)
    dataset = dataset if dataset is not None else resolve_data(cfg, design.encoders, cfg.splits, cache_dir,
                                                               collective=D.active())
    check_data(design.encoders, dataset)  # before the splits: a run of other data is the run's problem
    splits = Splits.load(cfg.splits, dataset)
    if cfg.design and declared[1]["splits_hash"] != splits.hash:
        raise MemlensError(f"the design {cfg.design} was made from other splits than {cfg.splits}")

    check_duplicates(dataset, splits)
    warnings = check_design(design, splits)
    plan = resources.plan(lazy=dataset.lazy, workers=cfg.workers, threads=cfg.threads,
                          processes_per_node=D.local_world_size())
    # inference_mode, not just no_grad: no version counters or view tracking on the large
    # activations (measured: about a third off ResNet9's forward passes here).
    with torch.inference_mode(), resources.using(plan):
        return _audit(cfg, design, splits, dataset, device, progress, t_start, plan, warnings)


# ----------------------------------------------------------------------------- the plan


def _audit(cfg: AuditConfig, design: Design, splits: Splits, dataset: Dataset, device: torch.device,
           progress: Progress | None, t_start: float, plan: resources.ResourcePlan,
           warnings: list[str]) -> AuditResult:

    s = _setup(cfg, design, splits, dataset, device, progress, plan, warnings)
    s.timings["load"] = time.perf_counter() - t_start
    res, rel, freq, n_views = _score(s)
    check_not_degenerate(res["dist"], design.labels())
    s.timings["pass"] = time.perf_counter() - t_start - s.timings["load"]
    t = time.perf_counter()
    unit_acc, class_acc, unit_views = _units(s, res, n_views)
    unit_null = _unit_null(s, unit_acc, unit_views)
    s.timings["unit_pass"] = time.perf_counter() - t
    align = _alignments(res["dist"], cfg.pairing)
    t = time.perf_counter()
    losses, loss_name = _losses(s)
    s.timings["loss_pass"] = time.perf_counter() - t
    est = _estimate(s, res, align, n_views, losses)
    _check_scores(s, est)
    t = time.perf_counter()
    found = Findings(*mem.membership_findings(
        design, s.points, align, losses, cset=s.cset, settings=cfg.privacy, loss_name=loss_name,
        claimed=_claimed(design), n_train=_n_train(design, dataset), seed=derive_seed(cfg.seed, "privacy") % 2**32,
        coupled=_coupled(design)))
    s.timings["privacy"] = time.perf_counter() - t
    t = time.perf_counter()
    groups = _top_least(s, est, unit_views)
    s.timings["top_least_pass"] = time.perf_counter() - t
    measured = Measured(res, align, losses, loss_name, rel, freq, n_views, unit_acc, class_acc, unit_views, unit_null,
                        groups)
    return assemble(s, measured, est, found, t_start=t_start)


def _setup(cfg: AuditConfig, design: Design, splits: Splits, dataset: Dataset, device: torch.device,
           progress: Progress | None, plan: resources.ResourcePlan, warnings: list[str]) -> Setup:
    """The points (natural, readable, then canaries), the membership, the layers and augmentations."""
    ref = design.encoders[0]
    aug_name = cfg.augment or (ref.record.config.augmentation if ref.record is not None else "mae")
    augmenter = Augmenter(aug_name, size=ref.input_size, eval_transform=ref.eval_transform)
    unit_aug_name = cfg.unitmem.augment or aug_name
    unit_augmenter = augmenter if unit_aug_name == aug_name else Augmenter(unit_aug_name, size=ref.input_size,
                                                                           eval_transform=ref.eval_transform)
    specs = _discover(cfg, design.encoders)
    unit_layers = [sp.name for sp in specs if sp.is_unit_layer or cfg.unitmem.signed != "exclude"]
    natural, unreadable = _readable(dataset, choose_points(splits, dataset, cfg), device, plan.workers)
    cset = _canary_set(cfg, design, dataset)
    points = with_canaries(natural, cset, len(dataset))
    design.member = membership(design, points, splits, cset)
    scored = design.member[design.scored]
    contrast = inference.contrast(scored)
    eligible = contrast & ~points.is_canary
    if design.kind == "fg":
        eligible &= points.subset_of == "S_C"  # the candidates, as the papers rank them
    dprime = np.isin(points.subset_of, cfg.unitmem.subsets)
    controls = nulls.control_images(scored, ~points.is_canary) if cfg.inference.null == "controls" else \
        np.zeros(len(points), dtype=bool)
    # per-layer alignments: the candidates (the paper's LayerMem), and the controls (its offset-free null)
    layer_points = ((points.subset_of == "S_C") if design.kind == "fg" else eligible) | controls
    pixels = ConcatPixels([dataset.pixels, cset.pixels]) if cset is not None else dataset.pixels
    ctx = PassContext(cfg=cfg, dataset=dataset, pixels=pixels, rows=points.rows, ids=points.ids,
                      encoders=design.encoders, unit_encoder=design.units_encoder, specs=specs, unit_layers=unit_layers,
                      device=device, dprime_pos=np.where(dprime, np.cumsum(dprime) - 1, -1), layer_points=layer_points,
                      progress=progress, workers=plan.workers,
                      modules={id(e): dict(e.module.named_modules()) for e in design.encoders},
                      class_labels=_class_labels(dataset, points, cset))
    return Setup(cfg, design, splits, dataset, points, cset, ctx, augmenter, unit_augmenter, aug_name, unit_aug_name,
                 eligible, unreadable, plan, warnings, controls)


def _score(s: Setup):
    """The scoring pass; under ``views: auto`` repeated with more views until the views-only
    reliability of the ranking reaches its target or the budget."""
    cfg, design = s.cfg, s.design
    mine = D.shard(np.arange(len(s.points)))
    rel_cfg = cfg.reliability
    auto = cfg.views == "auto"
    n_views = 10 if auto else int(cfg.views)
    idx = np.flatnonzero(s.eligible)
    k_top = max(1, min(cfg.top_k, len(idx) // 2))
    scored = design.scored
    history = []
    while True:
        shared_units = s.unit_aug_name == s.aug_name and (cfg.unitmem.views or n_views) == n_views
        res = gather(scoring_pass(s.ctx, mine, n_views, s.augmenter, units=shared_units))
        res["shared_units"] = shared_units
        rel, freq = ranking_reliability(res["dist"][scored][:, idx], design.member[scored][:, idx],
                                        pairing=cfg.pairing, target=rel_cfg.target, top_k=k_top,
                                        bootstrap=rel_cfg.bootstrap, seed=derive_seed(cfg.seed, "reliability") % 2**32)
        history.append({"views": n_views, "reliability": rel.reliability, "split_half_r": rel.split_half_r})
        if not auto or rel.meets_target or n_views >= rel_cfg.max_views:
            break
        wanted = rel.views_for_target if math.isfinite(rel.views_for_target) else rel_cfg.max_views
        n_views = int(min(rel_cfg.max_views, max(2 * n_views, wanted)))
        n_views += n_views % 2
    rel.history = history
    full_freq = np.full(len(s.points), np.nan)
    full_freq[idx] = freq
    return res, rel, full_freq, n_views


def _units(s: Setup, res: dict, n_views: int) -> tuple[dict, dict, int]:
    """UnitMem's accumulators: from the scoring pass when it used UnitMem's views, else a pass of its own."""
    cfg = s.cfg
    unit_views = cfg.unitmem.views or n_views
    if res["shared_units"] or not s.ctx.unit_layers:
        return res["unit_acc"], res["class_acc"], unit_views
    dprime = np.flatnonzero(s.ctx.dprime_pos >= 0)
    part = D.shard(dprime)
    ua, ca, _ = unit_pass(s.ctx, part, unit_views, s.unit_augmenter, accumulate=True)
    merged = merge_passes(D.all_gather_object({"positions": part, "unit_acc": ua, "class_acc": ca})) \
        if D.active() else {"unit_acc": ua, "class_acc": ca}
    return merged["unit_acc"], merged["class_acc"], unit_views


def _unit_null(s: Setup, unit_acc: dict, unit_views: int) -> UnitNull | None:
    """The units' null (:func:`memlens.audit.unitmem.unitmem_null_p`): the units encoder's responses
    on the D' images it trained on and on up to twice as many natural images it did not train on."""
    cfg, design = s.cfg, s.design
    if not s.ctx.unit_layers or cfg.unitmem.permutations == 0:
        return None
    member = design.member[design.units_encoder]
    natural = ~s.points.is_canary
    members = np.flatnonzero((s.ctx.dprime_pos >= 0) & member & natural)
    others = np.flatnonzero(~member & natural)
    if len(members) < 2 or len(others) < 2:
        return None
    rng = np.random.default_rng(derive_seed(cfg.seed, "unit-null"))
    if len(others) > 2 * len(members):
        others = np.sort(rng.choice(others, 2 * len(members), replace=False))
    positions = np.r_[members, others]
    _, _, rows_mu = unit_pass(s.ctx, D.shard(positions), unit_views, s.unit_augmenter, accumulate=False)
    gathered = D.all_gather_object(rows_mu)  # contiguous shards in rank order: the order of positions
    is_member = torch.from_numpy(np.arange(len(positions)) < len(members))
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "unit-null-draws") % 2**63)
    p = {}
    for name in s.ctx.unit_layers:
        mu = torch.from_numpy(np.concatenate([g[name] for g in gathered if g[name].size]))
        _, p[name] = unitmem_null_p(mu, is_member, permutations=cfg.unitmem.permutations, generator=gen,
                                    rest=cfg.unitmem.rest, shift=unit_acc[name].shift,
                                    min_activation=cfg.unitmem.min_activation)
        p[name] = p[name].numpy()
    return UnitNull(p, len(members), len(others), cfg.unitmem.permutations, cfg.unitmem.alpha)


def _alignments(dist: np.ndarray, pairing: str) -> np.ndarray:
    """(E, n) alignment of every encoder on every point from its view distances (SSLMem paper, Eq. 1)."""
    return np.stack([alignment_from_distances(torch.from_numpy(d).double(), pairing).numpy() for d in dist])


def _losses(s: Setup) -> tuple[np.ndarray | None, str | None]:
    """(E, n) training losses of per-example objectives (MAE, supervised) of memlens runs, else None."""

    encs = s.design.encoders
    framework = {e.record.config.framework if e.record is not None else None for e in encs}
    if len(framework) != 1 or framework & {None} or not framework & {"mae", "supervised"}:
        return None, None
    framework = framework.pop()
    try:
        objectives = [load_objective(e.info["path"]).to(s.ctx.device) for e in encs]
    except MemlensError:
        return None, None
    labels = _class_labels(s.dataset, s.points, s.cset) if framework == "supervised" else None
    return loss_pass(s.ctx, objectives, framework, labels), {
        "mae": "MAE reconstruction loss", "supervised": "cross-entropy"}[framework]


def _estimate(s: Setup, res: dict, align: np.ndarray, n_views: int, losses: np.ndarray | None) -> Estimates:
    """Per-image memorization on alignment (SSLMem), and on the training loss where the objective has
    a per-example one (MAE reconstruction, cross-entropy): the same in/out estimator and inference."""
    cfg, design = s.cfg, s.design
    scored = design.scored
    member = design.member[scored]
    dist = res["dist"][scored]
    controls = s.controls
    # offset-free: every encoder's scores centred on the control images (nulls module docstring)
    a = nulls.centre_on_controls(align[scored], controls)
    view_var = inference.view_jackknife(dist, member, cfg.pairing)
    pairs = design.scored_pairs()
    common = {"fdr": cfg.inference.fdr, "confidence": cfg.confidence}

    def control_view_var(relabelled: np.ndarray) -> np.ndarray:
        out = np.full(a.shape[1], np.nan)
        out[controls] = inference.view_jackknife(dist[:, controls], relabelled[:, controls], cfg.pairing)
        return out

    null = inference.ControlNull(controls, control_view_var) if controls.any() else None
    per = inference.per_image(a, member, pairs, view_var=view_var, moderated=cfg.inference.moderated,
                              eligible=s.eligible, null=null, **common)
    enc = inference.encoder_reliability(a, member, pairs, view_var=view_var, views=n_views, eligible=s.eligible,
                                        target=cfg.reliability.target, null=null, **common)
    est = Estimates(per, enc, view_var, controls=controls)
    if losses is not None:
        # The loss is averaged over fixed mask draws shared by every encoder (common random numbers):
        # its draw noise is in the pair differences, and there is no separate view term to measure
        # (NaN). With one pair the controls' null still gives every image a p-value.
        lo, none = nulls.centre_on_controls(losses[scored], controls), np.full(a.shape[1], np.nan)
        loss_null = inference.ControlNull(controls) if null is not None else None
        est.loss_per_image = inference.per_image(lo, member, pairs, view_var=none, moderated=cfg.inference.moderated,
                                                 eligible=s.eligible, null=loss_null, **common)
        est.loss_encoders = inference.encoder_reliability(lo, member, pairs, view_var=none, views=1,
                                                          eligible=s.eligible, target=cfg.reliability.target,
                                                          null=loss_null, **common)
    return est


def _check_scores(s: Setup, est: Estimates) -> None:
    """Refuse constant candidate scores: no ranking, no test, nothing a gate could pass on."""
    mem = est.per_image.mem[s.eligible]
    if len(mem) >= 2 and np.isfinite(mem).all() and float(np.ptp(mem)) <= 1e-12:
        raise MemlensError(f"every candidate has the same SSLMem ({mem[0]:.3g}): the encoders do not tell the "
                           f"images apart (identical or constant encoders?); nothing can be ranked or tested")


def _top_least(s: Setup, est: Estimates, unit_views: int) -> dict:
    """UnitMem of the most and the least memorized images (localizing paper, Table 11)."""
    cfg = s.cfg
    idx = np.flatnonzero(s.eligible)
    mem = est.per_image.mem
    order = idx[np.argsort(-mem[idx], kind="stable")]
    k_top = max(1, min(cfg.top_k, len(idx) // 2))
    top, least = order[:k_top], order[::-1][:k_top]
    groups: dict[str, Any] = {"top": top, "least": least, "k": k_top, "mu": {"top": {}, "least": {}}}
    if k_top >= 2 and s.ctx.unit_layers:
        for group, positions in (("top", top), ("least", least)):
            part = D.shard(positions)
            _, _, rows_mu = unit_pass(s.ctx, part, unit_views, s.unit_augmenter, accumulate=False)
            gathered = D.all_gather_object(rows_mu)
            groups["mu"][group] = {name: np.concatenate([gm[name] for gm in gathered if gm[name].size])
                                   for name in s.ctx.unit_layers}
    return groups


# ----------------------------------------------------------------------------- helpers


def _discover(cfg: AuditConfig, encoders: list[AuditEncoder]) -> list:
    specs = encoders[0].discover(cfg.layers)
    ref = [(sp.name, sp.units) for sp in specs]
    for enc in encoders[1:]:
        other = enc.discover(cfg.layers)
        if [(sp.name, sp.units) for sp in other] != ref:
            raise MemlensError(f"encoders {encoders[0].label} and {enc.label} expose different layers; the encoders "
                               f"of one audit must be the same architecture")
    return specs


def _readable(dataset: Dataset, points: Points, device: torch.device, workers: int) -> tuple[Points, list[dict]]:
    """With ``on_bad_image: skip`` on data read lazily, the points whose image cannot be decoded are
    left out before scoring (one decode per point, split across processes) and recorded; with
    ``fail`` an unreadable image stops the audit when it is read, naming it."""
    if not dataset.lazy or dataset.meta.get("on_bad_image", "fail") != "skip":
        return points, []
    rows = points.rows
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
        return points, []
    keep = np.array([p not in bad for p in range(len(rows))])
    skipped = [{"id": points.ids[p], "problem": why, "when": "audit"} for p, why in sorted(bad.items())]
    ids = [i for i, k in zip(points.ids, keep, strict=True) if k]
    return Points(rows[keep], points.subset_of[keep], ids, len(ids)), skipped


def _canary_set(cfg: AuditConfig, design: Design, dataset: Dataset):
    """The canary set of the audit: the config's, else the one the runs trained with (None without)."""

    trained = [e for e, r in zip(design.encoders, design.roles, strict=True) if r in ("f", "ref", "target")]
    path = cfg.canaries
    if path is None:
        recorded = {(r.record.canaries or {}).get("path") for r in trained if r.record is not None}
        recorded.discard(None)
        if len(recorded) > 1:
            raise MemlensError("the runs trained with different canary sets; give the one to score with canaries:")
        path = recorded.pop() if recorded else None
    if path is None:
        return None
    cset = load_canaries(path, dataset=dataset)

    membership_now = sha256_file(Path(path) / "membership.json")
    for r in trained:
        rc = (r.record.canaries or {}) if r.record is not None else {}
        if rc and rc.get("sha256") != cset.manifest.sha256:
            raise MemlensError(f"run {r.label} trained with another canary set than {path}")
        if rc.get("membership_sha256") and rc["membership_sha256"] != membership_now:
            raise MemlensError(f"{Path(path) / 'membership.json'} is not the membership run {r.label} trained with "
                               f"(its sha256 changed since): the canaries' labels would be wrong")
    return cset


def _class_labels(dataset: Dataset, points: Points, cset) -> np.ndarray | None:
    """Each point's class (a canary's: the random class a supervised run trained it with)."""
    if dataset.labels is None:
        return None
    labels = dataset.labels[np.minimum(points.rows, len(dataset) - 1)].copy()
    if cset is not None:

        extra = points.rows >= len(dataset)
        labels[extra] = canary_labels(cset, len(dataset.class_names))[points.rows[extra] - len(dataset)]
    return labels


def _claimed(design: Design) -> dict:
    """The DP guarantee of the attacked encoders (recorded, else declared): the largest epsilon."""
    attacked = [e for e, r in zip(design.encoders, design.roles, strict=True)
                if r in ("f", "target") or (r == "ref" and design.target is None)]
    dp = [e.record.dp if e.record is not None else None for e in attacked]
    eps = [d.get("epsilon_spent") for d in dp if d] if all(dp) else []
    deltas = [d.get("delta") for d in dp if d] if all(dp) else []
    declared = [e.info.get("declared_dp") for e in attacked]
    if not eps and all(declared):
        eps, deltas = [d["epsilon"] for d in declared], [d["delta"] for d in declared]
    return {"epsilon": max(eps) if eps else None, "delta": max(deltas) if deltas else None}


def _n_train(design: Design, dataset: Dataset) -> int:
    return max((e.record.train_points for e in design.encoders if e.record is not None), default=len(dataset))


def _coupled(design: Design) -> bool:
    """Whether attacked and reference encoders may share randomness: non-private runs of one seed do; DP runs
    only if they recorded a shared key (what they did, not what their config asked for)."""
    return any((e.record.config.dp is None or (e.record.dp or {}).get("coupling") == "shared")
               for e in design.encoders if e.record is not None)
