"""Compliance reports: jinja2 templates rendered to HTML and, with WeasyPrint, to PDF.

The report is built from audit directories only (plus, for thumbnails, the training data the
runs name). Everything taken from data (ids, labels, class names, file names) goes through
jinja2's autoescaping; charts are SVG generated here.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from memlens.audit.results import Audit, calibration_sentence, read_audit, skipped_sentence, units_sentence
from memlens.config import DataConfig, validate
from memlens.data.canaries import load_canaries
from memlens.errors import MemlensError
from memlens.integrity import read_verified
from memlens.io import atomic_write_bytes, atomic_write_text, read_json
from memlens.policy.baseline import compare
from memlens.policy.gate import GateResult, evaluate
from memlens.policy.schema import Policy
from memlens.reports import charts
from memlens.version import __version__

TEST_NAMES = {"C>S": "S_C > S_S", "C>E": "S_C > S_E", "S>I": "S_S > S_I", "E>I": "S_E > S_I",
              "C>ctrl": "S_C > controls", "I<ctrl": "S_I < controls", "I>ctrl": "S_I > controls (references)",
              "S>ctrl": "S_S > controls (references)", "C>ctrl[loss]": "S_C > controls, training loss",
              "I>ctrl[loss]": "S_I > controls, training loss", "S>ctrl[loss]": "S_S > controls, training loss",
              "C>0": "S_C > 0 (earlier audits)",
              "I<0": "S_I < 0 (earlier audits)", "S=0": "S_S = 0 (earlier audits)"}


@dataclass
class ReportResult:
    pdf: Path | None
    html: Path | None
    pages: int | None
    gate: GateResult | None


def _number(x: Any, digits: int = 3, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return "inf" if isinstance(x, float) and math.isinf(x) else "n/a"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _p(p: float | None) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "n/a"
    return "< 1e-300" if p == 0 else (f"{p:.2g}" if p < 0.001 else f"{p:.3f}")


def _audit_data(audit: Audit, cache_dir: str | Path | None):
    """The audit's images, found the way the audit found them (None when they are not reachable)."""
    # torch: loaded where this runs, so importing memlens.reports.render stays light
    from memlens.data import load

    s = audit.summary
    try:
        if s.settings.data is not None:
            return load(s.settings.data, cache_dir=cache_dir)
        run = next((r for r in s.encoders if r.source == "run" and r.path), None)
        if run is not None:
            # the run record's data section only: reading it through memlens.train would import the encoders
            record = read_verified(Path(run.path) / "run.json", what="run record")
            return load(validate(DataConfig, record.get("config", {}).get("data", {}), source="run data"),
                        cache_dir=cache_dir)
        raw = read_json(s.splits["path"], what="splits file")
        if isinstance(raw, dict) and raw.get("data"):
            return load(validate(DataConfig, raw["data"], source="splits data"), cache_dir=cache_dir)
    except MemlensError:
        return None
    return None


def _thumbnails(audit: Audit, ids: list[str], *, redact: bool, cache_dir: str | Path | None = None,
                dataset=None) -> dict[str, str | None]:
    """PNG data URIs of the given training images (None where unavailable or redacted)."""
    if redact or not ids:
        return {i: None for i in ids}

    ds = dataset if dataset is not None else _audit_data(audit, cache_dir)
    if ds is None:
        return {i: None for i in ids}
    if ds.fingerprint != audit.summary.data["fingerprint"]:
        return {i: None for i in ids}
    out = {}
    index = set(ds.ids)
    for i in ids:
        if i not in index:
            out[i] = None
            continue
        try:
            out[i] = _thumbnail(ds.pixels.read(int(ds.indices([i])[0])))
        except Exception:  # noqa: BLE001 - an image unreadable now only loses its thumbnail
            out[i] = None
    return out


def _thumbnail(img: np.ndarray, side: int = 64) -> str:
    """A PNG data URI at most ``side`` px on its longer side, aspect kept (tiny images enlarged
    without smoothing, so their pixels stay visible)."""
    # PIL: optional or slow to import, loaded only on this path
    from PIL import Image

    img = img[..., 0] if img.shape[-1] == 1 else img
    pil = Image.fromarray(np.ascontiguousarray(img))
    scale = side / max(pil.size)
    size = (max(1, round(pil.size[0] * scale)), max(1, round(pil.size[1] * scale)))
    pil = pil.resize(size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _probe(audit: Audit) -> float | None:
    accs = [r.probe_accuracy for r in audit.summary.attacked if r.probe_accuracy is not None]
    return float(np.mean(accs)) if accs else None


def _audit_context(audit: Audit, policy: Policy | None, *, redact: bool, top_k: int,
                   cache_dir: str | Path | None = None) -> dict[str, Any]:
    s = audit.summary
    layers = audit.layers
    cand = audit.candidates()
    score = policy.score if policy else "sslmem_sym_norm"
    threshold = (policy.rules.max_fraction_candidates_above.score
                 if policy and policy.rules.max_fraction_candidates_above else 0.2)
    frac_above = float((cand[score] > threshold).mean()) if len(cand) else float("nan")
    sc = s.subsets.get("S_C")
    welch = audit.natural_signal_test()
    signal = welch is not None and welch.p_holm is not None and not math.isnan(welch.p_holm) and welch.p_holm < 0.01
    best_layer = layers.sort_values("layermem", ascending=False).iloc[0] if len(layers) else None
    f_runs = s.attacked
    eps = s.dp_epsilon
    private = eps is not None
    fdr = policy.fdr if policy else (s.inference or {}).get("fdr", 0.1)
    found = audit.memorized_at(fdr)
    at_risk_ids = found[0] if found else []
    listed = at_risk_ids[:top_k] if at_risk_ids else []
    top = (cand.set_index("id").loc[listed].reset_index() if listed else
           cand.sort_values("sslmem", ascending=False).head(top_k))
    thumbs = _thumbnails(audit, top["id"].tolist() + [p["id"] for p in s.requested_points], redact=redact,
                         cache_dir=cache_dir)
    unit_frac = s.units.get("frac_above_half")
    recipe = s.recipe
    priv = _privacy_context(audit, redact=redact, cache_dir=cache_dir)
    rel = s.reliability or {}
    rel_enc = s.reliability_encoders or {"reliability": None}
    inf = s.inference or {}
    design = s.design or {"kind": "fg"}
    main_tests = [t for t in s.tests if t.name in TEST_NAMES]
    layer_rows = _layer_rows(audit)
    top_units = s.top_units[:15]
    consistency = _layer_consistency(s)
    order = [r["layer"] for r in layer_rows]
    words = [
        _candidates_sentence(sc),
        _signal_sentence(welch, signal, design),
        calibration_sentence(inf, "SSLMem"),
        _list_sentence(inf, found, at_risk_ids, fdr, design),
        _loss_sentence(s.loss_memorization or {}),
        f"{frac_above:.1%} of the candidates score above {threshold:g} ({score}).",
        (f"The layer with the highest LayerMem is {best_layer['layer']} ({_number(best_layer['layermem'], 3)})."
         if best_layer is not None else ""),
        units_sentence(s.units),
        skipped_sentence(s.data),
        _dp_sentence(f_runs, eps),
        _random_init_sentence(s),
        priv.get("sentence", ""),
        _reliability_sentence(rel, rel_enc),
    ]
    return {
        "name": audit.path.name, "label": audit.label(), "path": str(audit.path), "sha256": audit.sha256,
        "s": s, "words": _lead(words), "signal": signal, "private": private,
        "signal_test": TEST_NAMES.get(welch.name, welch.name) if welch is not None else "no test",
        "epsilon_label": "inf" if not private else f"{eps:.3g}", "epsilon": math.inf if not private else eps,
        "frac_above": frac_above, "threshold": threshold, "score": score,
        "sc": sc, "best_layer": best_layer.to_dict() if best_layer is not None else None,
        "unit_frac": unit_frac, "probe": _probe(audit),
        "subsets": [(name, NAMES_LONG[name], st) for name, st in s.subsets.items()],
        "tests": main_tests, "test_names": TEST_NAMES,
        "top": [{**r, "thumb": thumbs.get(r["id"])} for r in top.to_dict(orient="records")],
        "requested": [{**r, "thumb": thumbs.get(r["id"])} for r in s.requested_points],
        "layer_rows": layer_rows, "vit_blocks": s.vit_blocks, "top_units": top_units,
        "consistency": consistency, "seed_consistency": s.consistency.get("seeds", []),
        "f_runs": f_runs, "g_runs": [r for r in s.runs if r.side == "g"], "recipe": recipe,
        "privacy": priv, "reliability": rel, "reliability_encoders": rel_enc, "inference": inf, "design": design,
        "loss": s.loss_memorization,
        "fdr": fdr, "at_risk_count": len(at_risk_ids), "family": found[1] if found else None,
        "calibration": calibration_sentence(inf, "SSLMem"),
        "listed_at_risk": bool(listed),
        "set_aside": [(r["layer"], r.get("units_silent"), r.get("units")) for r in layer_rows
                      if r.get("units_measured") and r.get("units_silent")],
        "charts": _charts(audit, order),
        "redact": redact,
    }


def _charts(audit: Audit, order: list[str]) -> dict[str, Markup | None]:
    """The audit's SVG charts: SSLMem per subset, LayerMem per layer, UnitMem per layer (in order)."""
    units = audit.units
    return {"sslmem": Markup(charts.sslmem_distributions(audit.points)),
            "layermem": Markup(charts.layermem_chart(audit.layers)),
            "unitmem": Markup(charts.unitmem_boxes(units, order)),
            "unit_vs_class": Markup(charts.unit_vs_class(units)) if units["classmem"].notna().any() else None}


def _layer_rows(audit: Audit) -> list[dict]:
    """layers.csv's rows with the p-value of each layer's Top > Least UnitMem test (Table 11)."""
    tests = {t.name[len("unitmem_top>least["):-1]: t for t in audit.summary.tests
             if t.name.startswith("unitmem_top>least")}
    return [{**row.to_dict(), "tt_p": _p(tests[row["layer"]].p_value) if row["layer"] in tests else "n/a"}
            for _, row in audit.layers.iterrows()]


def _layer_consistency(s) -> list:
    """Table 3 of the localizing paper: adjacent ranking layers, and the first against the last."""
    cons = s.consistency.get("layers", [])
    rank_layers = list(dict.fromkeys([c.a for c in cons] + [c.b for c in cons]))
    pos = {n: i for i, n in enumerate(rank_layers)}
    out = [c for c in cons if abs(pos[c.a] - pos[c.b]) == 1]
    return out + [c for c in cons if rank_layers and {c.a, c.b} == {rank_layers[0], rank_layers[-1]}
                  and len(rank_layers) > 2]


def _signal_sentence(welch, signal: bool, design: dict) -> str:
    contrast = ("images shared by both encoders (S_C > S_S" if design.get("kind") != "references"
                else "the control images (the candidates' memorization above the controls', offset-free")
    if signal:
        return (f"The candidates are significantly more memorized than {contrast}, p = {_p(welch.p_holm)}, "
                f"Holm-corrected): the audit detects memorization.")
    return (f"The candidates are not significantly more memorized than {contrast}, "
            f"p = {_p(welch.p_holm if welch else None)}): this audit does not detect memorization, "
            "which is not the same as showing there is none.")


def _loss_sentence(lm: dict) -> str:
    """The training loss's memorized list, when the loss was measured with training randomness counted."""
    if not lm.get("inference", {}).get("training_randomness_counted"):
        return ""
    withheld = (lm["inference"].get("null") or {}).get("withheld")
    return f"By the training loss ({lm['loss']}): " + (
        f"no at-risk list ({withheld})." if withheld else
        f"{lm['inference']['at_risk']} of {lm['inference']['family']} images memorized at the same false "
        f"discovery rate, calibrated the same way.")


def _dp_sentence(f_runs, eps: float | None) -> str:
    if eps is None:
        return "The encoder was trained without differential privacy (epsilon = infinity)."
    how = (" (declared, not checked by memlens)." if any(r.dp_declared for r in f_runs) else
           "; WARNING: with reproducible randomness (dp.reproducible: true), so the guarantee holds only while the "
           "run records stay private (their seed regenerates the noise and the sampling)."
           if any(r.dp_randomness == "reproducible" for r in f_runs) else
           ", its noise and sampling drawn from secret randomness.")
    return f"The encoder was trained with differential privacy: ({_number(eps, 2)}, {f_runs[0].delta:.2g})-DP" + how


def _random_init_sentence(s) -> str:
    labels = [e.label for e in s.encoders if e.weights == "random-init"]
    if not labels:
        return ""
    return ("WARNING: " + ", ".join(labels) + " audited at its random initialisation (weights: none): these numbers "
            "say nothing about a trained model.")


def _relative(path: str | None, base: str | Path) -> str:
    """A recorded path shown relative to the audit directory (the digests beside it carry identity; an
    absolute path would print the auditor's machine layout into a report that leaves it)."""

    if not path:
        return ""
    p = Path(path)
    if not p.is_absolute():
        return str(p)
    try:
        return os.path.relpath(p, Path(base).resolve())
    except ValueError:  # another drive
        return p.name


def _candidates_sentence(sc) -> str:
    """The candidates' mean memorization: offset-free first, then SSLMem as the paper defines it."""
    if sc is None:
        return ""
    paper = (f"SSLMem as the paper defines it {_number(sc.mean, 4, True)} (95% CI {_number(sc.ci_low, 4, True)} to "
             f"{_number(sc.ci_high, 4, True)}; symmetric normalised {_number(sc.mean_sym_norm, 3, True)})")
    if sc.mem_mean is None:
        return f"Candidate images (S_C, {sc.n} images the encoder was trained on): mean {paper}."
    return (f"Candidate images (S_C, {sc.n} images the encoder was trained on): mean memorization "
            f"{_number(sc.mem_mean, 4, True)} above the control images' (95% CI {_number(sc.mem_ci_low, 4, True)} to "
            f"{_number(sc.mem_ci_high, 4, True)}; offset-free: each encoder's scores centred on the controls); "
            f"{paper}, which also moves with any encoder's overall offset.")


def _list_sentence(inf: dict, found, at_risk_ids: list, fdr: float, design: dict) -> str:
    null = inf.get("null") or {}
    if null.get("withheld"):
        return f"No at-risk list: {null['withheld']}."
    if not found:
        return ""
    how = (f"each image ranked among {null['controls']} control images scored under its own in/out labelling"
           if null.get("method") == "controls" else "the model's p-values, not calibrated on controls")
    return (f"{len(at_risk_ids)} of {found[1]} images are memorized at a false discovery rate of {fdr:g} "
            f"(per-image tests over {_design_words(design)}, {how}, Benjamini-Hochberg).")


def _design_words(design: dict) -> str:
    if design.get("kind") == "references":
        return f"{design.get('encoders')} reference encoders ({design.get('pairs')} pairs)"
    pairs = design.get("pairs") or 0
    return f"{pairs} f/g pair{'s' if pairs != 1 else ''}" if pairs else "the f and g encoders"


def _reliability_sentence(rel: dict, enc: dict) -> str:
    """How far a reader can trust the ranking: over views, and over retrains (encoders)."""
    if rel.get("reliability") is None:
        return ""
    views = (f"split-half reliability over views {_number(rel.get('reliability'), 2)} with {rel.get('views')} views"
             + ("" if rel.get("meets_target") else
                f" (about {_number(rel.get('views_for_target'), 0)} views would reach {rel.get('target')})"))
    if enc.get("reliability") is None:
        return (f"The ranking of the candidates: {views}. Its reliability over retraining is not measured (one "
                f"encoder pair); training more reference encoders measures it.")
    need = enc.get("pairs_for_target")
    more = ("" if enc.get("meets_target") else
            f"; about {_number(2 * need, 0)} encoders would reach {enc.get('target')}" if need not in (None, math.inf)
            else "")
    return (f"The ranking of the candidates: {views}; over encoders (retraining) "
            f"{_number(enc.get('reliability'), 2)} with {enc.get('pairs')} pairs{more}.")


def _lead(words: list[str]) -> list[str]:
    """The summary bullets, the privacy findings first: the DP statement and the canaries, then the rest."""
    words = [w for w in words if w]
    lead = ("WARNING", "Canaries:", "Membership inference", "The encoder was trained")
    first = [w for w in words if w.startswith(lead)]
    return first + [w for w in words if w not in first]


def _privacy_context(audit: Audit, *, redact: bool, cache_dir: str | Path | None) -> dict[str, Any]:
    """Canary and natural membership figures of an audit, and a sentence for the summary page."""
    p = audit.summary.privacy or {}
    out: dict[str, Any] = {"available": bool(p)}
    if not p:
        return out
    primary = p.get("primary_score", "sslmem")
    out.update(primary=primary, score_names=charts.SCORE_NAMES, delta=p.get("delta"),
               claimed=p.get("claimed_epsilon"), bound=p.get("epsilon_lower_bound"),
               other=p.get("epsilon_lower_bound_other"), calibration=p.get("calibration"))
    canaries = p.get("canaries") or {}
    metrics = canaries.get("metrics") or {}
    out["canaries"] = canaries if metrics else None
    natural = (p.get("natural") or {}).get("metrics") or {}
    out["natural"] = natural or None
    if metrics:
        out["roc"] = Markup(charts.roc_chart(metrics,
                                             title=f"canaries: {canaries['n_in']} in, {canaries['n_out']} out"))
        table = audit.canaries
        col = f"score_{primary}"
        top = table[table["included"].astype(bool)].sort_values(col, ascending=False).drop_duplicates("id").head(8)
        thumbs = {} if redact else _canary_thumbnails(canaries.get("path"), top["id"].tolist())
        out["top_canaries"] = [{"id": r["id"], "kind": r["kind"], "score": r[col], "thumb": thumbs.get(r["id"])}
                               for r in top.to_dict(orient="records")]
        m = metrics[primary]
        tpr1 = m["tpr_at"][0]
        b = out["bound"] or {}
        claimed = out["claimed"]
        verdict = ""
        if b:
            if claimed is not None and b["epsilon"] > claimed:
                verdict = (f" This EXCEEDS the accountant's epsilon {claimed:.3g}: the DP training does not deliver "
                           f"its guarantee.")
            elif claimed is not None:
                verdict = f", within the accountant's epsilon {claimed:.3g}."
            else:
                verdict = " (the encoder has no formal guarantee)."
        targets = canaries.get("targets", 1) or 1
        who = (f"the {canaries['n_in']} canaries the encoder was trained on from the {canaries['n_out']} it was not"
               if targets == 1 else
               f"the canaries each encoder was trained on from those it was not ({canaries['m']} canaries, "
               f"{targets} encoders attacked in turn: {canaries['n_in']} in and {canaries['n_out']} out pairs)")
        conf = b.get("confidence_overall", b.get("confidence")) if b else None
        out["sentence"] = (
            f"Canaries: an attacker told apart {who} with AUC {m['auc']:.3f} (95% CI {m['auc_ci'][0]:.3f} to "
            f"{m['auc_ci'][1]:.3f}) and {tpr1['tpr']:.1%} true positives at {tpr1['fpr']:.0%} false positives"
            + (f"; the empirical epsilon is at least {b['epsilon']:.2f} (at {conf:.0%} confidence, delta "
               f"{b['delta']:.2g}){verdict}" if b else "."))
    elif natural.get(primary):
        m = natural[primary]
        nat = p.get("natural") or {}
        out["sentence"] = (f"Membership inference on natural images ({nat.get('members', 'members')} against "
                           f"{nat.get('non_members', 'non-members')}): AUC {m['auc']:.3f} "
                           f"(95% CI {m['auc_ci'][0]:.3f} to {m['auc_ci'][1]:.3f}); no canaries were planted, so "
                           f"no empirical epsilon.")
    return out


def _canary_thumbnails(path: str | None, ids: list[str]) -> dict[str, str]:
    if not path or not ids:
        return {}


    try:
        cset = load_canaries(path)
    except MemlensError:
        return {}
    index = {i: k for k, i in enumerate(cset.ids)}
    pixels = cset.pixels
    return {i: _thumbnail(pixels.read(index[i])) for i in ids if i in index}


NAMES_LONG = {"S_C": "candidates (trained f only)", "S_S": "shared (trained f and g)",
              "S_I": "independent (trained g only)", "S_E": "extra (trained neither)"}


def build_context(audits: list[Audit], *, policy: Policy | None = None, redact: bool = False, top_k: int = 12,
                  title: str | None = None, cache_dir: str | Path | None = None,
                  baseline: Audit | None = None) -> dict[str, Any]:
    fingerprints = {a.summary.data["fingerprint"] for a in audits}
    if len(fingerprints) > 1:
        raise MemlensError("the audits are of different data (fingerprints differ); report them separately")
    ctxs = sorted((_audit_context(a, policy, redact=redact, top_k=top_k, cache_dir=cache_dir) for a in audits),
                  key=lambda c: (-c["epsilon"], c["name"]))
    gate = evaluate(policy, audits, baseline=baseline) if policy else None
    verdicts = gate.verdicts() if gate else {}
    by_name = {a.path.name: a for a in audits}
    for c in ctxs:
        c["verdict"] = verdicts.get(c["label"])
        if gate is not None and c["verdict"] is not None:
            failed = [r for r in gate.results if r.audit == c["label"] and not r.passed]
            c["verdict_words"] = (f"The policy {'passes' if c['verdict'] else 'FAILS'} this encoder"
                                  + ("." if not failed else ": " + "; ".join(
                                      f"{r.rule} {r.observed}, required {r.threshold.replace('<=', '≤')}"
                                      for r in failed) + "."))
        c["comparison"] = None
        if baseline is not None:

            at_risk = policy.baseline.at_risk_score if policy and policy.baseline else 0.2
            c["comparison"] = compare(by_name[c["name"]], baseline, score=policy.score if policy else
                                      "sslmem_sym_norm", at_risk=at_risk).to_dict()
    comparison = None
    if len(ctxs) > 1:
        rows = [{"epsilon_label": c["epsilon_label"], "mean": c["sc"].mean, "ci_low": c["sc"].ci_low,
                 "ci_high": c["sc"].ci_high, "mean_sym_norm": c["sc"].mean_sym_norm,
                 "mem_mean": c["sc"].mem_mean, "mem_ci_low": c["sc"].mem_ci_low, "mem_ci_high": c["sc"].mem_ci_high,
                 "signal_test": c["signal_test"],
                 "unitmem_mean": c["s"].units.get("mean"), "unit_frac": c["unit_frac"],
                 "probe_accuracy": c["probe"], "signal": c["signal"], "name": c["name"],
                 "canary_auc": (c["privacy"].get("canaries") or {}).get("metrics", {}).get(
                     c["privacy"].get("primary"), {}).get("auc"),
                 "empirical": (c["privacy"].get("bound") or {}).get("epsilon"),
                 "claimed": c["epsilon"]} for c in ctxs]
        comparison = {"rows": rows, "chart": Markup(charts.epsilon_chart(rows)),
                      "claims_chart": Markup(charts.epsilon_claims_chart(
                          [{"label": c["epsilon_label"], "claimed": c["epsilon"],
                            "empirical": (c["privacy"].get("bound") or {}).get("epsilon")} for c in ctxs]))
                      if any((c["privacy"].get("bound") or {}) for c in ctxs) else None}
    first = ctxs[0]["s"]
    return {
        "title": title or f"Memorization audit: {first.model.get('arch')} "
                          f"{(first.framework or 'external').upper()} encoder",
        "date": dt.date.today().isoformat(), "created": dt.datetime.now().isoformat(timespec="seconds"),
        "audits": ctxs, "gate": gate, "policy": policy, "comparison": comparison, "redact": redact,
        "memlens_version": __version__, "fmt": _number, "p": _p, "rel": _relative,
    }


def render_html(context: dict[str, Any]) -> str:
    env = Environment(loader=PackageLoader("memlens.reports", "templates"),
                      autoescape=select_autoescape(["html", "j2"], default=True), trim_blocks=True,
                      lstrip_blocks=True)
    return env.get_template("report.html.j2").render(**context)


def render_report(audit_dirs: list[str | Path], *, out_pdf: str | Path | None, out_html: str | Path | None = None,
                  policy: Policy | None = None, redact: bool = False, title: str | None = None,
                  cache_dir: str | Path | None = None, baseline: str | Path | None = None) -> ReportResult:
    """Render the report of one or more audits (several epsilons of one dataset are compared).

    Returns:
        The paths written, the PDF page count and the policy evaluation (when a policy is given).
    """
    if not audit_dirs:
        raise MemlensError("no audit directories given")
    audits = [read_audit(p) for p in audit_dirs]
    base = read_audit(baseline) if baseline is not None else None
    ctx = build_context(audits, policy=policy, redact=redact, title=title, cache_dir=cache_dir, baseline=base)
    html = render_html(ctx)
    pages = None
    if out_html:
        atomic_write_text(out_html, html)
    if out_pdf:
        # weasyprint: loaded where this runs, so importing memlens.reports.render stays light
        from weasyprint import HTML

        doc = HTML(string=html, base_url=str(Path.cwd())).render()
        pages = len(doc.pages)
        atomic_write_bytes(out_pdf, doc.write_pdf())
    return ReportResult(Path(out_pdf) if out_pdf else None, Path(out_html) if out_html else None, pages, ctx["gate"])
