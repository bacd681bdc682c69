"""From the passes' results to the audit's tables and ``audit.json``.

* the points table: per-image alignments, SSLMem (raw, range-normalised, symmetric SSLMem'), the
  per-image inference (interval, p, FDR q, at risk), losses, ranks and, with a target, its
  calibrated membership scores;
* the layers and units tables: LayerMem / ΔLayerMem (localizing paper, Eq. 3-4) from the per-layer
  alignments of the points with an in- and an out-encoder, UnitMem and ClassMem (Eq. 5-8,
  Appendix D.2) of the units encoder, UnitMem of the most vs the least memorized (Table 11);
* the tests: the SSLMem paper's subset comparisons (f and g), or per pool subset "memorized more
  than 0" (references), Holm-corrected; ranking consistency between layers and encoder pairs;
* the summary (:class:`~memlens.audit.results.AuditSummary`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps

from memlens import distributed as D
from memlens.audit import nulls
from memlens.audit.design import RECIPE_IGNORED
from memlens.audit.inference import pair_differences
from memlens.audit.layermem import delta_layermem, layermem, vit_block_table
from memlens.audit.results import AuditResult, AuditSummary
from memlens.audit.signals import signals_table
from memlens.audit.sslmem import in_out_means, range_normalize, sslmem, symmetric_normalize
from memlens.audit.state import Estimates, Findings, Measured, Setup
from memlens.audit.stats import (
    bootstrap_ci,
    holm,
    mann_whitney,
    ranking_consistency,
    sslmem_tests,
    welch,
)
from memlens.audit.unitmem import NONE, unitmem
from memlens.config import SUBSETS
from memlens.data.augment import describe
from memlens.device import describe_device
from memlens.io import sha256_file
from memlens.rng import derive_seed
from memlens.train.run import versions
from memlens.version import __version__


def assemble(s: Setup, m: Measured, est: Estimates, found: Findings, *, t_start: float) -> AuditResult:
    """The audit's tables (points, layers, units, tests, canaries, signals) and its record, from what the
    passes measured."""
    t = time.perf_counter()
    points = points_table(s, m.align, m.losses, est, m.topk_freq, found.attacks)
    layers, units, tests_extra, prime, lm = layers_units(s, m.scoring, m.unit_acc, m.class_acc, m.groups, m.unit_null,
                                                         est)
    tests, consistency, subsets = statistics(s, points, prime, tests_extra, m.align, est)
    s.timings["stats"] = time.perf_counter() - t
    summary = summary_of(s, m, est, found, points=points, layers=layers, units=units, tests=tests,
                         consistency=consistency, subsets=subsets, lm=lm, t_start=t_start)
    tests_df = pd.DataFrame([x.to_dict() for x in tests],
                            columns=["name", "hypothesis", "statistic", "p_value", "effect_size", "method", "n_a",
                                     "n_b", "p_holm"])
    return AuditResult(summary, points, layers, units, tests_df, canaries=found.canary_table, notes=list(s.warnings),
                       signals=_signals(s, est, m.align, m.losses, m.scoring))


def _signals(s, est, align: np.ndarray, losses: np.ndarray | None, res: dict) -> pd.DataFrame:
    """Every encoder's score of every point, with the membership (memlens.audit.signals)."""
    design, pts = s.design, s.points
    where = s.ctx.layer_points
    layers = {sp.name: np.where(where[None, :], res["layer"][:, li, :], np.nan) for li, sp in enumerate(s.ctx.specs)}
    controls = est.controls if est.controls is not None else np.zeros(len(pts), bool)
    return signals_table(labels=design.labels(), roles=design.roles, ids=pts.ids, subset_of=pts.subset_of,
                         member=design.member, controls=controls, align=align, losses=losses, layers=layers)


# ----------------------------------------------------------------------------- points


def points_table(s, align: np.ndarray, losses: np.ndarray | None, est, freq: np.ndarray, attacks) -> pd.DataFrame:
    """One row per natural point (see the module docstring)."""
    design, pts, ds = s.design, s.points, s.dataset
    n = pts.n_nat
    per = est.per_image
    labels = ds.labels
    rows = pts.rows[:n]
    table = {"id": pts.ids[:n], "subset": pts.subset_of[:n],
             "label": [ds.class_names[labels[r]] if labels is not None else "" for r in rows],
             "candidate": s.eligible[:n]}
    if design.kind == "fg":
        f = [i for i, r in enumerate(design.roles) if r == "f"]
        g = [i for i, r in enumerate(design.roles) if r == "g"]
        a_in, a_out = align[f].mean(0)[:n], align[g].mean(0)[:n]  # f is "in" for the candidates
        table.update(align_f=a_in, align_g=a_out)
    else:
        # the raw alignments (the estimator works on scores centred on the controls)
        a_in, a_out = (x[:n] for x in in_out_means(align[design.scored], design.member[design.scored]))
        table.update(align_in=a_in, align_out=a_out)
    raw = sslmem(a_in, a_out)
    defined = np.isfinite(raw)
    norm = np.full(n, np.nan)
    norm[defined] = range_normalize(raw[defined])
    table.update(sslmem=raw, sslmem_range_norm=norm, sslmem_sym_norm=symmetric_normalize(a_in, a_out))
    elig = s.eligible[:n]
    # mem: the offset-free estimate (out - in of scores centred on the control images), with its
    # interval, the controls' null p-value behind the list, and the moderated t's own p (p_model)
    for col, values in (("mem", per.mem), ("mem_se", per.se), ("mem_ci_low", per.ci_low),
                        ("mem_ci_high", per.ci_high), ("mem_p", per.p), ("mem_q", per.q),
                        ("mem_p_model", per.p_model)):
        table[col] = np.where(elig, values[:n], np.nan)
    table["at_risk"] = per.at_risk[:n]
    table["control"] = (est.controls if est.controls is not None else np.zeros(len(pts), bool))[:n]
    if losses is not None:
        if design.kind == "fg":
            table.update(loss_f=losses[f].mean(0)[:n], loss_g=losses[g].mean(0)[:n])
        else:
            m = design.member[design.scored][:, :n]
            lo = losses[design.scored][:, :n]
            with np.errstate(invalid="ignore"):
                table.update(loss_in=(lo * m).sum(0) / m.sum(0), loss_out=(lo * ~m).sum(0) / (~m).sum(0))
    lp = est.loss_per_image
    if lp is not None:
        # the same in/out estimator on the training loss (higher out than in: memorized)
        for col, values in (("lossmem", lp.mem), ("lossmem_se", lp.se), ("lossmem_ci_low", lp.ci_low),
                            ("lossmem_ci_high", lp.ci_high), ("lossmem_p", lp.p), ("lossmem_q", lp.q),
                            ("lossmem_p_model", lp.p_model)):
            table[col] = np.where(elig, values[:n], np.nan)
        table["lossmem_at_risk"] = lp.at_risk[:n]
    out = pd.DataFrame(table)
    out["rank"] = out.groupby("subset")["sslmem"].rank(ascending=False, method="first", na_option="bottom")
    out["rank"] = out["rank"].fillna(0).astype(int)
    out["requested"] = out["id"].isin(set(s.splits.requested))
    out["topk_freq"] = freq[:n]
    if design.target is not None:
        _target_columns(out, design, attacks[0], align, losses, n)
    return out


def _target_columns(out: pd.DataFrame, design, attack, align, losses, n: int) -> None:
    """The release candidate's membership (from its record) and its calibrated scores per image."""
    t = design.target
    out["target_member"] = design.member[t][:n]
    out["target_align"] = align[t][:n]
    if losses is not None:
        out["target_loss"] = losses[t][:n]
    for k, v in attack.scores.items():
        out[f"target_{k}"] = v[:n]


# ----------------------------------------------------------------------------- layers and units


def layers_units(s, res, unit_acc, class_acc, groups, unit_null=None, est=None):
    """The layers and units tables, Table 11's tests, per-layer SSLMem' and LayerMem."""
    specs = s.ctx.specs
    names = [sp.name for sp in specs]
    design = s.design
    pts = np.flatnonzero(s.ctx.layer_points & ~s.controls)  # the paper's LayerMem: the candidates'
    offset_free = _layer_null(s, res, est) if est is not None else {}
    member = design.member[design.scored][:, pts]
    layer = res["layer"][design.scored][:, :, pts]  # (E, L, m)
    l_in, l_out = in_out_means(layer, member)  # (L, m)
    prime = symmetric_normalize(l_in, l_out)  # (L, m) SSLMem' per layer
    where = {p: j for j, p in enumerate(pts)}
    top_idx = [where[p] for p in groups["top"] if p in where]
    least_idx = [where[p] for p in groups["least"] if p in where]

    def mean_over(idx):  # LayerMem (localizing paper, Eq. 3) over the images idx
        return {name: layermem(l_in[li, idx], l_out[li, idx]) for li, name in enumerate(names)}

    lm, lm_top, lm_least = mean_over(list(range(len(pts)))), mean_over(top_idx), mean_over(least_idx)
    prev = {sp.name: sp.prev for sp in specs}
    delta, delta_top = delta_layermem(lm, prev), delta_layermem(lm_top, prev)
    dprime_ids = [s.points.ids[p] for p in np.flatnonzero(s.ctx.dprime_pos >= 0)]
    d_size = len(dprime_ids)
    unit_rows, layer_rows, tests_extra = [], [], []
    for sp in specs:
        row = {"layer": sp.name, "kind": sp.kind, "depth": sp.depth, "block": sp.block, "units": sp.units,
               "unit_kind": sp.unit_kind, "layermem": lm[sp.name], "delta_layermem": delta[sp.name],
               "layermem_top": lm_top[sp.name], "layermem_least": lm_least[sp.name],
               "delta_layermem_top": delta_top[sp.name], "units_measured": sp.name in s.ctx.unit_layers,
               **offset_free.get(sp.name, {})}
        if sp.name in s.ctx.unit_layers and d_size >= 2:
            row.update(_unit_rows(s, sp, unit_acc, class_acc, groups, dprime_ids, d_size, unit_rows, tests_extra))
        layer_rows.append(row)
    units = pd.DataFrame(unit_rows, columns=["layer", "unit", "unitmem", "mu_max", "mu_rest", "argmax_id",
                                             "active_frac", "classmem"])
    _flag_units(units, unit_null)
    if unit_null is not None:
        for row in layer_rows:
            sel = units[(units["layer"] == row["layer"]) & units["unitmem_p"].notna()]
            row["frac_units_flagged"] = float(sel["flagged"].mean()) if len(sel) else None
    layers = pd.DataFrame(layer_rows)
    layers.attrs["rows"] = layer_rows  # the summary keeps each layer's own fields (no NaN fill-ins)
    return layers, units, tests_extra, prime, lm


def _layer_null(s, res, est) -> dict[str, dict]:
    """Offset-free LayerMem per layer: the candidates' out - in layer alignment (each encoder's layer centred
    on the control images) against the control images' under the same labellings, in units of the controls'
    spread, with a one-sided Welch test, Holm across layers.

    The localizing paper's LayerMem (Eq. 3) averages SSLMem' = (out - in) / (out + in) per layer; an
    encoder whose layer aligns every image better moves it for every image. Centring removes such a shift
    exactly, and the controls' spread (shift-free) puts the layers on one scale.
    """
    per = est.per_image
    if per.control_member is None or not s.controls.any():
        return {}
    design = s.design
    cand = np.flatnonzero(s.ctx.layer_points & ~s.controls & s.eligible)
    ctrl = np.flatnonzero(s.controls)
    member = per.control_member  # (E_scored, n): the controls relabelled as pool images
    out, ps = {}, []
    for li, sp in enumerate(s.ctx.specs):
        values = nulls.centre_on_controls(res["layer"][design.scored][:, li, :], s.controls)
        m_in, m_out = in_out_means(values, member)
        d = m_out - m_in
        dc, dn = d[cand], d[ctrl]
        spread = float(np.std(dn, ddof=1)) if len(dn) > 1 else float("nan")
        test = welch(dc, dn, alternative="greater", name="", hypothesis="")
        out[sp.name] = {"layermem_excess": float(np.mean(dc) - np.mean(dn)) if len(dc) else None,
                        "layermem_z": float((np.mean(dc) - np.mean(dn)) / spread) if spread > 0 else None,
                        "layermem_p": test.p_value}
        ps.append(test.p_value)
    for name, p in zip(out, holm(ps), strict=True):
        out[name]["layermem_p_holm"] = p
    return out


def _flag_units(units: pd.DataFrame, unit_null) -> None:
    """units.csv's null columns: each unit's permutation p-value and whether it is flagged (p <= alpha)."""
    p = np.full(len(units), np.nan)
    if unit_null is not None:
        for name, values in unit_null.p.items():
            rows = np.flatnonzero((units["layer"] == name).to_numpy())
            p[rows] = values[units["unit"].to_numpy()[rows]]
    units["unitmem_p"] = p
    units["flagged"] = np.nan_to_num(p, nan=np.inf) <= (unit_null.alpha if unit_null is not None else -1.0)


def _units_null_summary(units: pd.DataFrame, unit_null) -> dict:
    """The units' flag rate beside what chance gives on an encoder that memorized nothing."""
    if unit_null is None:
        return {"null": None}

    tested = int(units["unitmem_p"].notna().sum())
    flagged = int(units["flagged"].sum())
    lo, hi = (sps.binom.ppf([0.025, 0.975], tested, unit_null.alpha) / tested) if tested else (np.nan, np.nan)
    excess = float(sps.binomtest(flagged, tested, unit_null.alpha, alternative="greater").pvalue) if tested else None
    return {"null": {"method": "permutation over members and non-members of the units encoder",
                     "members": unit_null.members, "non_members": unit_null.non_members,
                     "permutations": unit_null.permutations, "alpha": unit_null.alpha},
            "tested": tested, "flagged": flagged, "frac_flagged": flagged / tested if tested else None,
            "chance_interval": [float(lo), float(hi)], "excess_p": excess}


def _unit_rows(s, sp, unit_acc, class_acc, groups, dprime_ids, d_size, unit_rows, tests_extra) -> dict:
    cfg = s.cfg
    r = unit_acc[sp.name].result()
    cm = None
    if class_acc:
        try:
            cm = class_acc[sp.name].result().numpy()
        except ValueError:
            cm = None
    um = r.unitmem.numpy()
    ranked = ~np.isnan(um)
    for u in range(sp.units):
        arg = int(r.argmax[u])
        unit_rows.append((sp.name, u, um[u], float(r.mu_max[u]), float(r.mu_rest[u]),
                          dprime_ids[arg] if arg != NONE else "",
                          float(r.active[u]) / d_size if unit_acc[sp.name].shift == "none" else np.nan,
                          float(cm[u]) if cm is not None else np.nan))
    top_mean = least_mean = None
    mu = groups["mu"]
    if mu["top"]:
        kw = dict(rest=cfg.unitmem.rest, shift=unit_acc[sp.name].shift, min_activation=cfg.unitmem.min_activation)
        ut = unitmem(torch.from_numpy(mu["top"][sp.name]), **kw).unitmem.numpy()
        ul = unitmem(torch.from_numpy(mu["least"][sp.name]), **kw).unitmem.numpy()
        ut, ul = ut[~np.isnan(ut)], ul[~np.isnan(ul)]
        top_mean = float(ut.mean()) if len(ut) else None
        least_mean = float(ul.mean()) if len(ul) else None
        tests_extra.append(welch(ut, ul, alternative="greater", name=f"unitmem_top>least[{sp.name}]",
                                 hypothesis=f"UnitMem of layer {sp.name} is higher on the {groups['k']} most than on "
                                            f"the {groups['k']} least memorized candidates (units as samples)"))
    return dict(units_ranked=int(ranked.sum()), units_silent=int((~ranked).sum()),
                unitmem_mean=float(np.nanmean(um)) if ranked.any() else None,
                unitmem_median=float(np.nanmedian(um)) if ranked.any() else None,
                unitmem_max=float(np.nanmax(um)) if ranked.any() else None,
                frac_units_above_half=float(np.mean(um[ranked] > 0.5)) if ranked.any() else None,
                classmem_mean=float(np.nanmean(cm)) if cm is not None and np.isfinite(cm).any() else None,
                unitmem_top_mean=top_mean, unitmem_least_mean=least_mean)


# ----------------------------------------------------------------------------- statistics


def subset_tests(s, est, points: pd.DataFrame, scores: dict[str, np.ndarray]) -> list:
    """The subset tests, offset-free: the SSLMem paper's (f and g; its "above 0" read as "above the
    control images'"), or each pool subset against the controls (references)."""
    per = est.per_image
    ctrl = per.control_mem[:s.points.n_nat] if per.control_mem is not None else None
    controls = ctrl[np.isfinite(ctrl)] if ctrl is not None else np.array([])
    if s.design.kind == "fg":
        if est.controls is not None and est.controls.any():
            # f and g: SSLMem of the controls (g - f) is their difference under the candidates' labelling
            controls = points.loc[points["control"].to_numpy(), "sslmem"].to_numpy()
            controls = controls[np.isfinite(controls)]
        return sslmem_tests({**scores, **({"controls": controls} if len(controls) else {})})
    return reference_tests(_by_subset(points, "mem"), controls)


def loss_tests(est, points: pd.DataFrame, n_nat: int) -> list:
    """The same offset-free subset tests on the training loss (either design): the candidates' loss
    memorization against the control images' under the same labellings (names end in [loss])."""
    lp = est.loss_per_image
    if lp is None or lp.control_mem is None:
        return []
    ctrl = lp.control_mem[:n_nat]
    return reference_tests(_by_subset(points, "lossmem"), ctrl[np.isfinite(ctrl)], measure="loss")


def _by_subset(points: pd.DataFrame, column: str) -> dict[str, np.ndarray]:
    values, sub = points[column].to_numpy(), points["subset"].to_numpy()
    pool = {name: values[(sub == name) & np.isfinite(values)] for name in SUBSETS}
    return {k: v for k, v in pool.items() if len(v)}


def reference_tests(pool: dict[str, np.ndarray], controls: np.ndarray, *, measure: str = "alignment") -> list:
    """Each pool subset's memorization (out - in, centred on the controls) above the control images'
    under the same labellings; Welch and Mann-Whitney, Holm per method. No controls, no test."""
    out = []
    if len(controls) < 2:
        return out
    suffix = "" if measure == "alignment" else f"[{measure}]"
    for method in (welch, mann_whitney):
        family = [method(x, controls, alternative="greater", name=f"{name[2]}>ctrl{suffix}",
                         hypothesis=f"mean memorization (out - in {measure}) of {name} exceeds the control images' "
                                    f"(S_S/S_E, scored under the pool's labellings)")
                  for name, x in pool.items() if len(x) >= 2]
        for t, p in zip(family, holm([t.p_value for t in family]), strict=True):
            t.p_holm = p
        out += family
    return out


def statistics(s, points: pd.DataFrame, prime: np.ndarray, tests_extra: list, align: np.ndarray, est):
    """Tests, ranking consistency (layers, encoder pairs) and per-subset statistics."""
    cfg, design, specs = s.cfg, s.design, s.ctx.specs
    names = [sp.name for sp in specs]
    raw = points["sslmem"].to_numpy()
    sub = points["subset"].to_numpy()
    scores = {name: raw[(sub == name) & np.isfinite(raw)] for name in SUBSETS if name in cfg.subsets}
    tests = subset_tests(s, est, points, scores) + loss_tests(est, points, s.points.n_nat) + tests_extra
    ranking_layers = [sp for sp in specs if sp.kind in ("conv", "block", "stage")] or [sp for sp in specs
                                                                                     if sp.is_unit_layer]
    cons_layers = []
    for i in range(len(ranking_layers)):
        for j in range(i + 1, len(ranking_layers)):
            a, b = ranking_layers[i], ranking_layers[j]
            c = ranking_consistency(prime[names.index(a.name)], prime[names.index(b.name)], k=cfg.ranking_k,
                                    name_a=a.name, name_b=b.name)
            cons_layers.append(c.to_dict())
    cons_pairs = _pair_consistency(s, align)
    subsets = {}
    for name, x in scores.items():
        if not len(x):
            continue
        mask = (sub == name) & np.isfinite(raw)
        lo, hi = bootstrap_ci(x, confidence=cfg.confidence, n_resamples=cfg.bootstrap,
                              seed=derive_seed(cfg.seed, "bootstrap", name) % 2**32)
        a_in = points["align_f" if design.kind == "fg" else "align_in"].to_numpy()[mask]
        a_out = points["align_g" if design.kind == "fg" else "align_out"].to_numpy()[mask]
        subsets[name] = {"n": int(len(x)), "mean": float(np.mean(x)),
                         "std": float(np.std(x, ddof=1)) if len(x) > 1 else 0.0, "median": float(np.median(x)),
                         "ci_low": lo, "ci_high": hi,
                         "mean_range_norm": float(points["sslmem_range_norm"].to_numpy()[mask].mean()),
                         "mean_sym_norm": float(points["sslmem_sym_norm"].to_numpy()[mask].mean()),
                         "mean_align_f": float(a_in.mean()), "mean_align_g": float(a_out.mean()),
                         **_offset_free_mean(points, est, name, cfg.confidence)}
    return tests, {"layers": cons_layers, "seeds": cons_pairs}, subsets


def _offset_free_mean(points: pd.DataFrame, est, subset: str, confidence: float) -> dict:
    """The subset's mean offset-free memorization minus the controls' (under the pool's labellings), with
    the Welch interval of the difference: what the test against the controls measures."""

    per = est.per_image
    mem = points.loc[(points["subset"] == subset).to_numpy(), "mem"].to_numpy(float)
    mem = mem[np.isfinite(mem)]
    ctrl = per.control_mem[:len(points)] if per.control_mem is not None else np.array([])
    ctrl = ctrl[np.isfinite(ctrl)]
    if len(mem) < 2 or len(ctrl) < 2:
        return {}
    diff = float(mem.mean() - ctrl.mean())
    va, vb = mem.var(ddof=1) / len(mem), ctrl.var(ddof=1) / len(ctrl)
    se = float(np.sqrt(va + vb))
    df = (va + vb) ** 2 / (va ** 2 / (len(mem) - 1) + vb ** 2 / (len(ctrl) - 1)) if se > 0 else np.inf
    half = float(sps.t.ppf(0.5 + confidence / 2, df)) * se
    return {"mem_mean": diff, "mem_ci_low": diff - half, "mem_ci_high": diff + half}


def _pair_consistency(s, align: np.ndarray) -> list[dict]:
    """Top-k overlap and Kendall's tau between the rankings of different encoder pairs (seeds)."""
    design = s.design
    pairs = design.scored_pairs()
    idx = np.flatnonzero(s.eligible)
    if len(pairs) >= 2:
        d = pair_differences(align[design.scored], design.member[design.scored], pairs)[:, idx]
        labels = [design.encoders[design.scored[a]].label for a, _ in pairs]
    elif design.kind == "fg" and len(design.f) > 1:  # unpaired f runs: each against the mean of g
        f = [i for i, r in enumerate(design.roles) if r == "f"]
        g = [i for i, r in enumerate(design.roles) if r == "g"]
        d = align[g].mean(0)[idx] - align[f][:, idx]
        labels = [design.encoders[i].label for i in f]
    else:
        return []
    out = []
    for i in range(min(len(d), 6)):
        for j in range(i + 1, min(len(d), 6)):
            out.append(ranking_consistency(d[i], d[j], k=s.cfg.ranking_k, name_a=labels[i],
                                           name_b=labels[j]).to_dict())
    return out


# ----------------------------------------------------------------------------- summary


def summary_of(s: Setup, m: Measured, est: Estimates, found: Findings, *, points, layers, units, tests, consistency,
               subsets, lm, t_start) -> AuditSummary:
    rel, n_views, unit_views, groups = m.reliability, m.n_views, m.unit_views, m.groups
    privacy, loss_name, unit_null = found.privacy, m.loss_name, m.unit_null
    cfg, design, ds, specs = s.cfg, s.design, s.dataset, s.ctx.specs
    ranked_um = units["unitmem"].dropna().to_numpy()
    vit_rows = [r.__dict__ for r in vit_block_table(lm, specs)] if any(sp.kind == "resblock_attn" for sp in specs) \
        else None
    ref = design.encoders[0]
    rec = ref.record
    unit_layers = s.ctx.unit_layers
    set_aside = {name: int((units["layer"] == name).sum() - units.loc[units["layer"] == name, "unitmem"].notna().sum())
                 for name in unit_layers}
    cand = points[points["candidate"]]
    order = cand.sort_values("sslmem", ascending=False, kind="stable")
    at_risk = points[points["at_risk"]].sort_values(["mem_q", "sslmem"], ascending=[True, False], kind="stable")
    keep = ["id", "subset", "label", "sslmem", "sslmem_sym_norm", "mem_ci_low", "mem_ci_high", "mem_q"]
    return AuditSummary(
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), memlens_version=__version__, settings=cfg,
        environment={"device": describe_device(s.ctx.device), "precision": cfg.precision,
                     "world_size": D.world_size(), "backend": D.backend(), "versions": _versions(),
                     "resources": s.plan.to_dict()},
        data={"source": ds.source, "fingerprint": ds.fingerprint, "n": len(ds),
              "image_shape": ds.describe()["image_shape"], "sizes": ds.size_summary(),
              "read": ds.describe()["read"], "classes": list(ds.class_names or []),
              **({"skipped": ds.meta.get("skipped", []) + s.unreadable}
                 if ds.meta.get("skipped") or s.unreadable else {})},
        splits={"path": str(_resolve(cfg.splits)), "hash": s.splits.hash, "sha256": _sha(cfg.splits),
                "sizes": s.splits.sizes(), "requested": list(s.splits.requested)},
        model={"arch": rec.model["arch"] if rec is not None else ref.info.get("spec", ref.label),
               "family": ref.family, "parameters": int(sum(p.numel() for p in ref.module.parameters())),
               "representation": ref.representation, "input_size": ref.input_size,
               "layers_exposed": len(specs),
               "units_total": int(sum({sp.name: sp.units for sp in specs}[nm] for nm in unit_layers)),
               "unit_layers": len(unit_layers), "units_encoder": design.encoders[design.units_encoder].label},
        framework=rec.config.framework if rec is not None else None,
        recipe=_recipe_of(rec),
        encoders=[_encoder_input(e, r) for e, r in zip(design.encoders, design.roles, strict=True)],
        design=_design_summary(design, s),
        augmentation={"sslmem": f"{s.aug_name}: {describe(s.aug_name)}",
                      "unitmem": f"{s.unit_aug_name}: {describe(s.unit_aug_name)} ({unit_views} views)"},
        views={"count": n_views, "pairing": cfg.pairing, "auto": cfg.views == "auto",
               "pairs_per_point": n_views * (n_views - 1) // 2 if cfg.pairing == "all" else n_views // 2},
        reliability=rel.to_dict(),
        reliability_encoders=est.encoders.to_dict() if est.encoders is not None else None,
        inference={**est.per_image.facts, "method": _method_note(est.per_image.facts)},
        loss_memorization=_loss_memorization(est, points, loss_name),
        subsets=subsets, layers=layers.attrs["rows"], vit_blocks=vit_rows,
        units={"n": int(len(units)), "ranked": int(len(ranked_um)), "set_aside": set_aside,
               "min_activation": cfg.unitmem.min_activation, "signed": cfg.unitmem.signed,
               "d_prime": list(cfg.unitmem.subsets), "d_prime_size": int((s.ctx.dprime_pos >= 0).sum()),
               "mean": float(ranked_um.mean()) if len(ranked_um) else None,
               "median": float(np.median(ranked_um)) if len(ranked_um) else None,
               "frac_above_half": float(np.mean(ranked_um > 0.5)) if len(ranked_um) else None,
               "max": float(ranked_um.max()) if len(ranked_um) else None,
               "classmem_mean": float(units["classmem"].mean()) if len(units) and units["classmem"].notna().any()
               else None, "top_least_k": groups["k"], **_units_null_summary(units, unit_null)},
        top_units=_top_units(units),
        top_points=order.head(groups["k"]).to_dict(orient="records"),
        at_risk_points=at_risk[keep].to_dict(orient="records"),
        requested_points=points[points["requested"]].to_dict(orient="records"),
        tests=[x.to_dict() for x in tests], consistency=consistency, privacy=privacy,
        warnings=list(s.warnings),
        timings={**{k: round(v, 3) for k, v in s.timings.items()}, "total": round(time.perf_counter() - t_start, 3),
                 "images_forwarded": float(s.ctx.forwards)})


def _loss_memorization(est, points: pd.DataFrame, loss_name: str | None) -> dict | None:
    """Per-image memorization on the training loss: its reliability, inference facts and at-risk list."""
    lp = est.loss_per_image
    if lp is None:
        return None
    listed = points[points["lossmem_at_risk"]].sort_values(["lossmem_q", "lossmem"], ascending=[True, False],
                                                          kind="stable")
    keep = ["id", "subset", "label", "lossmem", "lossmem_ci_low", "lossmem_ci_high", "lossmem_q"]
    method = _method_note(lp.facts) if lp.facts.get("training_randomness_counted") else (
        "one encoder pair and no control images: no per-image p-value on the loss (its spread over training seeds "
        "needs two pairs, or control images scored beside the pool)")
    return {"loss": loss_name, "inference": {**lp.facts, "method": method},
            "reliability_encoders": est.loss_encoders.to_dict() if est.loss_encoders is not None else None,
            "at_risk_points": listed[keep].to_dict(orient="records")}


def _method_note(facts: dict) -> str:
    null = facts.get("null") or {}
    stat = (f"paired differences over {facts['pairs']} encoder pairs, moderated t (Smyth 2004) plus the views' "
            f"jackknife" if facts.get("interval_counts_training") else
            "the difference out - in of one encoder pair (intervals: the views' jackknife only)")
    if null.get("method") == "controls":
        return (f"per-image {stat}, on scores centred on the {null['controls']} control images (offset-free); "
                f"p-value: the image's statistic ranked among the control images' under the same labelling "
                f"(conformal, ties counted against the image); Benjamini-Hochberg at FDR {facts['fdr']:g}")
    if facts.get("interval_counts_training"):
        return f"per-image {stat}, one-sided t p-values (not calibrated on controls); Benjamini-Hochberg at FDR " \
               f"{facts['fdr']:g}"
    return ("one encoder pair, no control images: the interval and p-value cover the views only; training "
            f"randomness is not measured, so the list at FDR {facts['fdr']:g} would change with the training seed. "
            "Score S_S or S_E images beside the candidates, or audit more pairs, to count it")


def _design_summary(design, s) -> dict:
    out = {"kind": design.kind, "encoders": len(design.scored), "pairs": len(design.pairs),
           "roles": design.roles, "target": design.encoders[design.target].label if design.target is not None
           else None, "pool_images": int(s.eligible.sum())}
    if design.reference:
        out["references"] = design.reference
    return out


def _top_units(units: pd.DataFrame) -> list[dict]:
    return [{"layer": r["layer"], "unit": int(r["unit"]), "unitmem": float(r["unitmem"]),
             "mu_max": float(r["mu_max"]), "active_frac": float(r["active_frac"]), "argmax_id": r["argmax_id"]}
            for _, r in units.dropna(subset=["unitmem"]).sort_values("unitmem", ascending=False,
                                                                     kind="stable").head(20).iterrows()]


def _recipe_of(rec) -> dict | None:

    if rec is None:
        return None
    return {k: v for k, v in rec.config.model_dump(mode="json").items() if k not in RECIPE_IGNORED}


def _versions() -> dict[str, str]:

    return versions()


def _resolve(path):

    return Path(path).resolve()


def _sha(path) -> str:

    return sha256_file(path)


def _encoder_input(enc, role: str) -> dict:
    base = {"label": enc.label, "side": role, "source": enc.source, "spec": enc.info.get("spec"),
            "path": enc.info.get("path") or enc.info.get("weights"), "weights_sha256": enc.info.get("weights_sha256"),
            "run_json_sha256": enc.info.get("run_json_sha256"), "run_signed_by": enc.info.get("run_signed_by"),
            "representation": enc.representation,
            "input_size": enc.input_size, "parameters": int(sum(p.numel() for p in enc.module.parameters())),
            "load": enc.info.get("load"), "weights": "random-init" if enc.info.get("random_init") else "loaded"}
    rec = enc.record
    if rec is not None:
        d = rec.dp or {}
        base.update(seed=rec.config.seed, status=rec.status, epsilon=d.get("epsilon_spent"), delta=d.get("delta"),
                    noise_multiplier=d.get("noise_multiplier"), sample_rate=d.get("sample_rate"),
                    steps=d.get("steps_taken"), max_grad_norm=d.get("max_grad_norm"), accountant=d.get("accountant"),
                    poisson=d.get("poisson"), coupling=d.get("coupling"),
                    dp_randomness=d.get("randomness", "reproducible") if d else None,
                    probe_accuracy=(rec.probe or {}).get("accuracy"), train_points=rec.train_points,
                    wall_seconds=rec.wall_seconds, reference=(rec.reference or {}).get("index"))
    elif enc.info.get("declared_dp"):
        dp = enc.info["declared_dp"]
        base.update(epsilon=dp["epsilon"], delta=dp["delta"], accountant=dp.get("accountant"), dp_declared=True)
    return base
