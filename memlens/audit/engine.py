"""The audit: SSLMem, LayerMem/ΔLayerMem, UnitMem/ClassMem and the tests, from one streaming pass.

For each batch of points, 2K augmented views per point are drawn once and shared by every
encoder (common random numbers: the f-g difference is measured on identical views, which
removes the augmentation noise common to both). Each view batch goes once through each encoder
with hooks on all exposed layers; the hooks reduce every layer's output on the spot to per-point
alignment losses (LayerMem) and, for the audited encoder f[0] on D', to per-unit mean
activations, which feed O(units) running accumulators (UnitMem, ClassMem). Nothing is
re-run per layer and no activations of all points are kept.

Two small extra passes happen only when needed: UnitMem measured with other views than SSLMem's
(a different set, or ``none``), and UnitMem of the Top/Least memorized candidates (Table 11),
which are only known once SSLMem is.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

import memlens
from memlens.audit.classmem import ClassMemAccumulator
from memlens.audit.hooks import tap
from memlens.audit.layermem import delta_layermem, vit_block_table
from memlens.audit.results import AUDIT_FILE, AuditSummary
from memlens.audit.sslmem import range_normalize, symmetric_normalize
from memlens.audit.stats import bootstrap_ci, ranking_consistency, sslmem_tests, welch
from memlens.audit.unitmem import UnitMemAccumulator, unitmem
from memlens.config import SUBSETS, AuditConfig
from memlens.data import Augmenter, Dataset, Splits, load
from memlens.data.augment import describe
from memlens.errors import MemlensError
from memlens.io import atomic_write_text, dumps, sha256_file
from memlens.train.loop import derive_seed
from memlens.train.run import MODEL_FILE, RUN_FILE, RunRecord, load_encoder, now

RECIPE_IGNORED = ("seed", "subsets", "splits")
SCORING_ORDER = ("S_C", "S_S", "S_I", "S_E")  # candidates first


@dataclass
class LoadedRun:
    path: Path
    side: str
    record: RunRecord
    encoder: nn.Module


@dataclass
class AuditResult:
    summary: AuditSummary
    points: pd.DataFrame
    layers: pd.DataFrame
    units: pd.DataFrame
    tests: pd.DataFrame
    notes: list[str] = field(default_factory=list)


def _recipe(record: RunRecord) -> dict:
    cfg = record.config.model_dump(mode="json")
    for key in RECIPE_IGNORED:
        cfg.pop(key, None)
    if cfg.get("dp"):
        cfg["dp"].pop("noise_seed", None)
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


def load_runs(paths: list[str], side: str) -> list[LoadedRun]:
    runs = []
    for p in paths:
        enc = load_encoder(p)
        runs.append(LoadedRun(Path(p), side, enc.record, enc))
    return runs


def check_runs(f_runs: list[LoadedRun], g_runs: list[LoadedRun], splits: Splits, dataset: Dataset) -> None:
    """Refuse encoders that were not trained as the SSLMem setup requires.

    Raises:
        MemlensError: naming the run and what does not match.
    """
    ref = f_runs[0]
    ref_recipe = _recipe(ref.record)
    for run in f_runs + g_runs:
        rec = run.record
        if rec.data["fingerprint"] != dataset.fingerprint:
            raise MemlensError(f"run {run.path} was trained on other data (fingerprint {rec.data['fingerprint'][:12]}, "
                               f"the splits' data is {dataset.fingerprint[:12]})")
        if rec.splits is None:
            raise MemlensError(f"run {run.path} was not trained from a splits file, so its subsets are unknown")
        if rec.splits["hash"] != splits.hash:
            raise MemlensError(f"run {run.path} was trained with other splits (hash {rec.splits['hash'][:12]}, "
                               f"given {splits.hash[:12]})")
        expected = ["S_S", "S_C"] if run.side == "f" else ["S_S", "S_I"]
        if sorted(rec.splits["subsets"]) != sorted(expected):
            raise MemlensError(f"run {run.path} was trained on {'+'.join(rec.splits['subsets'])}, but a {run.side} run "
                               f"must be trained on {'+'.join(expected)}")
        d = _diff(ref_recipe, _recipe(rec))
        if d:
            raise MemlensError(f"runs {ref.path} and {run.path} differ in their recipe ({d}); f and g must share it")
    if len({(r.path.resolve()) for r in f_runs + g_runs}) != len(f_runs) + len(g_runs):
        raise MemlensError("the same run is given twice")


def _choose_points(splits: Splits, dataset: Dataset, cfg: AuditConfig) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(derive_seed(cfg.seed, "points"))
    rows, subset_of, ids = [], [], []
    for name in [s for s in SCORING_ORDER if s in cfg.subsets]:
        sub = list(splits.subsets[name])
        if not sub:
            raise MemlensError(f"subset {name} of the splits is empty")
        if cfg.max_per_subset and len(sub) > cfg.max_per_subset:
            keep = set(rng.choice(len(sub), cfg.max_per_subset, replace=False).tolist())
            requested = set(splits.requested)
            sub = [i for k, i in enumerate(sub) if k in keep or i in requested]
        rows.append(dataset.indices(sub))
        subset_of += [name] * len(sub)
        ids += sub
    return np.concatenate(rows), np.array(subset_of), ids


def run_audit(config: AuditConfig, *, cache_dir: str | Path | None = None, dataset: Dataset | None = None,
              progress: Callable[[str, int, int], None] | None = None) -> AuditResult:
    """Audit encoders f (trained with the candidates) against g (trained without them).

    Args:
        config: the audit settings.
        cache_dir: data cache directory.
        dataset: already-loaded data (skips loading).
        progress: called as progress(stage, done, total) during the passes.

    Returns:
        The summary and the four tables, ready for :func:`write_audit`.
    """
    t_start = time.perf_counter()
    cfg = config
    f_runs, g_runs = load_runs(cfg.f, "f"), load_runs(cfg.g, "g")
    ref = f_runs[0].record
    dataset = dataset if dataset is not None else load(ref.config.data, cache_dir=cache_dir)
    splits = Splits.load(cfg.splits, dataset)
    check_runs(f_runs, g_runs, splits, dataset)
    # inference_mode, not just no_grad: no version counters or view tracking on the large
    # activations (measured: about a third off ResNet9's forward passes here).
    with torch.inference_mode():
        return _audit(cfg, f_runs, g_runs, splits, dataset, progress, t_start)


def _audit(cfg, f_runs, g_runs, splits, dataset, progress, t_start) -> AuditResult:
    ref = f_runs[0].record
    mean, std = ref.data["normalize"]["mean"], ref.data["normalize"]["std"]
    aug_name = cfg.augment or ref.config.augmentation
    augmenter = Augmenter(aug_name, mean=mean, std=std)
    k = cfg.pairs
    n_views = 2 * k
    unit_aug_name = cfg.unitmem.augment or aug_name
    shared_units = unit_aug_name == aug_name and cfg.unitmem.views == n_views
    specs = f_runs[0].encoder.layer_specs()
    names = [s.name for s in specs]
    n_layers = len(specs)

    rows, subset_of, ids = _choose_points(splits, dataset, cfg)
    n = len(rows)
    images = torch.from_numpy(dataset.images)
    labels = dataset.labels
    dprime = np.isin(subset_of, cfg.unitmem.subsets)
    is_candidate = subset_of == "S_C"
    has_labels = labels is not None
    num_classes = len(dataset.class_names) if has_labels else 0
    t_loaded = time.perf_counter()

    align_f = np.zeros((len(f_runs), n))
    align_g = np.zeros((len(g_runs), n))
    layer_f = np.zeros((n_layers, n))
    layer_g = np.zeros((n_layers, n))
    unit_acc = {s.name: UnitMemAccumulator(s.units, rest=cfg.unitmem.rest, negative=cfg.unitmem.negative)
                for s in specs}
    class_acc = ({s.name: ClassMemAccumulator(s.units, num_classes, negative=cfg.unitmem.negative) for s in specs}
                 if has_labels else {})
    dprime_order: list[int] = []  # positions of D' points in the order the accumulators saw them
    forwards = 0

    def feed_units(tapped, positions: np.ndarray) -> None:
        sel = torch.from_numpy(np.flatnonzero(dprime[positions]))
        if len(sel) == 0:
            return
        dprime_order.extend(positions[sel.numpy()].tolist())
        lab = torch.from_numpy(labels[rows[positions[sel.numpy()]]]) if has_labels else None
        for s in specs:
            mu = tapped.units[s.name][sel]
            unit_acc[s.name].update(mu)
            if has_labels:
                class_acc[s.name].update(mu, lab)

    batch = cfg.batch_points
    n_batches = math.ceil(n / batch)
    modules = {id(r): dict(r.encoder.named_modules()) for r in f_runs + g_runs}
    for b in range(n_batches):
        sl = slice(b * batch, min(n, (b + 1) * batch))
        positions = np.arange(sl.start, sl.stop)
        views = augmenter.views(images[torch.from_numpy(rows[sl])], n_views,
                                torch.Generator().manual_seed(derive_seed(cfg.seed, "views", b)))
        # LayerMem is measured on the candidates: other batches only need the representation.
        layers_needed = None if is_candidate[sl].any() else {names[-1]}
        for side, runs, align, layer in (("f", f_runs, align_f, layer_f), ("g", g_runs, align_g, layer_g)):
            for i, run in enumerate(runs):
                want_units = side == "f" and i == 0 and shared_units and bool(dprime[sl].any())
                with tap(run.encoder, specs, views_per_point=n_views, pairs=k, distance=cfg.distance,
                         units=want_units, align_layers=layers_needed, modules=modules[id(run)]) as tapped:
                    run.encoder.representation(views)
                # The representation is the last exposed layer's output, flattened (tested for
                # every architecture), so its alignment is the one that layer's hook computed.
                align[i, sl] = tapped.align[names[-1]].numpy()
                if layers_needed is None:
                    for li, name in enumerate(names):
                        layer[li, sl] += tapped.align[name].numpy()
                if want_units:
                    feed_units(tapped, positions)
                forwards += len(views)
        if progress:
            progress("scoring", b + 1, n_batches)
    layer_f /= len(f_runs)
    layer_g /= len(g_runs)
    t_pass = time.perf_counter()

    unit_augmenter = augmenter if unit_aug_name == aug_name else Augmenter(unit_aug_name, mean=mean, std=std)
    auditee = f_runs[0].encoder
    if not shared_units:
        d_pos = np.flatnonzero(dprime)
        for b in range(0, len(d_pos), batch):
            positions = d_pos[b:b + batch]
            views = unit_augmenter.views(images[torch.from_numpy(rows[positions])], cfg.unitmem.views,
                                         torch.Generator().manual_seed(derive_seed(cfg.seed, "unit-views", b)))
            with tap(auditee, specs, views_per_point=cfg.unitmem.views, pairs=None, units=True) as tapped:
                auditee.forward_features(views)
            feed_units(tapped, positions)
            forwards += len(views)
    t_units = time.perf_counter()

    # ------------------------------------------------------------------ per-point scores
    af, ag = align_f.mean(axis=0), align_g.mean(axis=0)
    raw = ag - af
    range_norm = range_normalize(torch.from_numpy(raw)).numpy()
    sym = symmetric_normalize(torch.from_numpy(af), torch.from_numpy(ag)).numpy()
    points = pd.DataFrame({"id": ids, "subset": subset_of,
                           "label": [dataset.class_names[labels[r]] if has_labels else "" for r in rows],
                           "align_f": af, "align_g": ag, "sslmem": raw, "sslmem_range_norm": range_norm,
                           "sslmem_sym_norm": sym})
    points["rank"] = points.groupby("subset")["sslmem"].rank(ascending=False, method="first").astype(int)
    points["requested"] = points["id"].isin(set(splits.requested))

    cand = np.flatnonzero(subset_of == "S_C")
    order = cand[np.argsort(-raw[cand], kind="stable")]
    k_top = max(1, min(cfg.top_k, len(cand) // 2))
    top, least = order[:k_top], order[::-1][:k_top]

    # ------------------------------------------------------------------ UnitMem of Top / Least (Table 11)
    mu_groups: dict[str, dict[str, torch.Tensor]] = {"top": {}, "least": {}}
    if k_top >= 2:
        for group, positions in (("top", top), ("least", least)):
            chunks: dict[str, list[torch.Tensor]] = {s.name: [] for s in specs}
            for b in range(0, len(positions), batch):
                pos = positions[b:b + batch]
                views = unit_augmenter.views(images[torch.from_numpy(rows[pos])], cfg.unitmem.views,
                                             torch.Generator().manual_seed(derive_seed(cfg.seed, group, b)))
                with tap(auditee, specs, views_per_point=cfg.unitmem.views, pairs=None, units=True) as tapped:
                    auditee.forward_features(views)
                for s in specs:
                    chunks[s.name].append(tapped.units[s.name])
                forwards += len(views)
            mu_groups[group] = {name: torch.cat(c) for name, c in chunks.items()}
    t_topleast = time.perf_counter()

    # ------------------------------------------------------------------ layers and units
    cand_f, cand_g = torch.from_numpy(layer_f[:, cand]), torch.from_numpy(layer_g[:, cand])
    prime = symmetric_normalize(cand_f, cand_g).numpy()  # (L, |S_C|) per-layer SSLMem'
    pos_in_cand = {p: j for j, p in enumerate(cand)}
    top_idx = [pos_in_cand[p] for p in top]
    least_idx = [pos_in_cand[p] for p in least]
    lm = {name: float(prime[li].mean()) for li, name in enumerate(names)}
    lm_top = {name: float(prime[li, top_idx].mean()) for li, name in enumerate(names)}
    lm_least = {name: float(prime[li, least_idx].mean()) for li, name in enumerate(names)}
    prev = {s.name: s.prev for s in specs}
    delta, delta_top = delta_layermem(lm, prev), delta_layermem(lm_top, prev)

    dprime_ids = [ids[p] for p in dprime_order]
    unit_rows, layer_rows, tests_extra, top_units = [], [], [], []
    for s in specs:
        res = unit_acc[s.name].result() if len(dprime_order) >= 2 else None
        cm = None
        if has_labels:
            try:
                cm = class_acc[s.name].result().numpy()
            except ValueError:
                cm = None
        um = res.unitmem.numpy() if res is not None else np.full(s.units, np.nan)
        for u in range(s.units):
            unit_rows.append((s.name, u, um[u], float(res.mu_max[u]) if res else np.nan,
                              float(res.mu_rest[u]) if res else np.nan,
                              dprime_ids[int(res.argmax[u])] if res else "",
                              float(cm[u]) if cm is not None else np.nan))
        top_mean = least_mean = None
        if mu_groups["top"]:
            ut = unitmem(mu_groups["top"][s.name], rest=cfg.unitmem.rest, negative=cfg.unitmem.negative).unitmem
            ul = unitmem(mu_groups["least"][s.name], rest=cfg.unitmem.rest, negative=cfg.unitmem.negative).unitmem
            top_mean, least_mean = float(ut.mean()), float(ul.mean())
            t = welch(ut.numpy(), ul.numpy(), alternative="greater", name=f"unitmem_top>least[{s.name}]",
                      hypothesis=f"UnitMem of layer {s.name} is higher on the {k_top} most than on the {k_top} "
                                 f"least memorized candidates (units as samples)")
            tests_extra.append(t)
        layer_rows.append({
            "layer": s.name, "kind": s.kind, "depth": s.depth, "block": s.block, "units": s.units,
            "layermem": lm[s.name], "delta_layermem": delta[s.name], "layermem_top": lm_top[s.name],
            "layermem_least": lm_least[s.name], "delta_layermem_top": delta_top[s.name],
            "unitmem_mean": float(np.nanmean(um)) if res else float("nan"),
            "unitmem_median": float(np.nanmedian(um)) if res else float("nan"),
            "unitmem_max": float(np.nanmax(um)) if res else float("nan"),
            "frac_units_above_half": float(np.mean(um > 0.5)) if res else float("nan"),
            "classmem_mean": float(np.mean(cm)) if cm is not None else None,
            "unitmem_top_mean": top_mean, "unitmem_least_mean": least_mean})
    units = pd.DataFrame(unit_rows, columns=["layer", "unit", "unitmem", "mu_max", "mu_rest", "argmax_id", "classmem"])
    layers = pd.DataFrame(layer_rows)
    for _, r in units.sort_values("unitmem", ascending=False, kind="stable").head(20).iterrows():
        if np.isfinite(r["unitmem"]):
            top_units.append({"layer": r["layer"], "unit": int(r["unit"]), "unitmem": float(r["unitmem"]),
                              "mu_max": float(r["mu_max"]), "argmax_id": r["argmax_id"]})

    # ------------------------------------------------------------------ statistics
    scores = {name: raw[subset_of == name] for name in SUBSETS if name in cfg.subsets}
    tests = sslmem_tests(scores) + tests_extra
    ranking_layers = [s for s in specs if s.kind in ("conv", "block")]
    cons_layers = []
    for i in range(len(ranking_layers)):
        for j in range(i + 1, len(ranking_layers)):
            a, b = ranking_layers[i], ranking_layers[j]
            c = ranking_consistency(prime[names.index(a.name)], prime[names.index(b.name)], k=cfg.ranking_k,
                                    name_a=a.name, name_b=b.name)
            cons_layers.append(c.to_dict())
    cons_seeds = []
    if len(f_runs) > 1:
        per_run = [ag[cand] - align_f[i, cand] for i in range(len(f_runs))]
        for i in range(len(f_runs)):
            for j in range(i + 1, len(f_runs)):
                c = ranking_consistency(per_run[i], per_run[j], k=cfg.ranking_k, name_a=str(f_runs[i].path),
                                        name_b=str(f_runs[j].path))
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

    top_points = points.iloc[order[:k_top]].to_dict(orient="records")
    requested_points = points[points["requested"]].to_dict(orient="records")
    all_um = units["unitmem"].to_numpy()
    vit_rows = None
    if getattr(auditee, "family", "") == "vit":
        vit_rows = [r.__dict__ for r in vit_block_table(lm, len(auditee.blocks))]
    summary = AuditSummary(
        created=now(), memlens_version=memlens.__version__, settings=cfg,
        data={"source": dataset.source, "fingerprint": dataset.fingerprint, "n": len(dataset),
              "image_shape": list(dataset.images.shape[1:]), "classes": list(dataset.class_names or [])},
        splits={"path": str(Path(cfg.splits).resolve()), "hash": splits.hash, "sha256": sha256_file(cfg.splits),
                "sizes": splits.sizes(), "requested": list(splits.requested)},
        model={**ref.model, "layers_exposed": n_layers, "units_total": int(sum(s.units for s in specs))},
        framework=ref.config.framework,
        recipe={k: v for k, v in ref.config.model_dump(mode="json").items() if k not in ("splits", "subsets", "seed")},
        runs=[_run_input(r) for r in f_runs + g_runs],
        augmentation={"sslmem": f"{aug_name}: {describe(aug_name)}",
                      "unitmem": f"{unit_aug_name}: {describe(unit_aug_name)} ({cfg.unitmem.views} views)"},
        subsets=subsets, layers=layers.to_dict(orient="records"), vit_blocks=vit_rows,
        units={"n": int(len(all_um)), "d_prime": list(cfg.unitmem.subsets), "d_prime_size": len(dprime_order),
               "mean": float(np.nanmean(all_um)) if len(dprime_order) >= 2 else None,
               "median": float(np.nanmedian(all_um)) if len(dprime_order) >= 2 else None,
               "frac_above_half": float(np.mean(all_um > 0.5)) if len(dprime_order) >= 2 else None,
               "max": float(np.nanmax(all_um)) if len(dprime_order) >= 2 else None,
               "classmem_mean": float(units["classmem"].mean()) if has_labels else None,
               "top_least_k": k_top},
        top_units=top_units, top_points=top_points, requested_points=requested_points,
        tests=[t.to_dict() for t in tests],
        consistency={"layers": cons_layers, "seeds": cons_seeds},
        timings={"load": round(t_loaded - t_start, 3), "pass": round(t_pass - t_loaded, 3),
                 "unit_pass": round(t_units - t_pass, 3), "top_least_pass": round(t_topleast - t_units, 3),
                 "stats": round(t_stats - t_topleast, 3), "total": round(time.perf_counter() - t_start, 3),
                 "images_forwarded": float(forwards)})
    tests_df = pd.DataFrame([t.to_dict() for t in tests],
                            columns=["name", "hypothesis", "statistic", "p_value", "effect_size", "method", "n_a",
                                     "n_b", "p_holm"])
    return AuditResult(summary, points, layers, units, tests_df)


def _run_input(run: LoadedRun) -> dict:
    rec = run.record
    d = rec.dp or {}
    return {"path": str(run.path.resolve()), "side": run.side, "seed": rec.config.seed, "status": rec.status,
            "run_json_sha256": sha256_file(run.path / RUN_FILE), "model_sha256": sha256_file(run.path / MODEL_FILE),
            "epsilon": d.get("epsilon_spent"), "delta": d.get("delta"), "noise_multiplier": d.get("noise_multiplier"),
            "sample_rate": d.get("sample_rate"), "steps": d.get("steps_taken"), "max_grad_norm": d.get("max_grad_norm"),
            "accountant": d.get("accountant"), "poisson": d.get("poisson"),
            "probe_accuracy": (rec.probe or {}).get("accuracy"), "train_points": rec.train_points,
            "wall_seconds": rec.wall_seconds}


def write_audit(result: AuditResult, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write audit.json and the four CSV tables into ``out_dir`` as one atomic step.

    Everything is written into a temporary sibling directory which then replaces ``out_dir``,
    so readers never see a half-written audit.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise MemlensError(f"{out} already holds {'an audit' if (out / AUDIT_FILE).exists() else 'other files'}; "
                           f"pass --force to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name in ("points", "layers", "units", "tests"):
            atomic_write_text(tmp / f"{name}.csv", getattr(result, name).to_csv(index=False, float_format="%.6g"))
        atomic_write_text(tmp / AUDIT_FILE, dumps(result.summary) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
