"""Empirical privacy of an audit's encoders: membership scores on canaries and natural images, their
metrics, and the one-run epsilon lower bound (the metrics themselves: :mod:`memlens.audit.privacy`).

**Who is attacked.**

* f and g: f is the target, g the reference (the classic design; the canaries' membership is
  ``membership.json``). f and g of one seed may share their randomness (``coupling: shared``);
  the report says so, since a reference that shares the target's noise knows more than an
  attacker would.
* references without a target: every reference is the target in turn, attacked with the
  references of the *other* pairs only (its own pair shares its seed, so its noise), as LiRA's
  evaluation treats each shadow model as a target (Carlini et al. 2022, Section V). Scores of
  all targets are pooled for the ROC curve; the epsilon lower bound is computed for each target
  at confidence 1 - beta / T (Bonferroni) and the largest is reported.
* a named target (``target``, the release candidate): attacked with all references.

**Scores** (higher = "member"). f/g: ``sslmem`` (align_g - align_f), ``neg_align_f``, and for
per-example objectives ``loss_ref`` (loss_g - loss_f) and ``neg_loss_f``. References:
``neg_align`` (- the target's alignment), ``align_ref`` (the references' mean alignment minus
the target's), ``lira_align`` and ``rmia_align`` (:mod:`memlens.audit.mia` on minus the
alignment), and the same four on the loss. The score the gate and the epsilon bound use is named
before the results are seen (``privacy.primary``; ``auto``: on the loss where the objective has
one, else on the alignment, RMIA below 16 references per target and LiRA from 16 on; f/g:
``loss_ref``, else ``sslmem``), never chosen afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from memlens.audit import mia, nulls
from memlens.audit.design import Design, Points
from memlens.audit.privacy import epsilon_lower_bound, membership_metrics
from memlens.errors import MemlensError
from memlens.io import sha256_file
from memlens.rng import derive_seed

FG_SCORES = {"sslmem": "align_g - align_f (reference g)", "neg_align_f": "-align_f (f alone)",
             "loss_ref": "{loss} on g - on f (reference g)", "neg_loss_f": "-{loss} on f (f alone)"}
REF_SCORES = {"neg_align": "-alignment of the target (no reference)",
              "align_ref": "mean alignment of the references - the target's",
              "lira_align": "LiRA on -alignment (Gaussian fits of the references, online where in-references exist)",
              "rmia_align": "RMIA on -alignment (likelihood ratio against population images)",
              "neg_loss": "-{loss} of the target (no reference)", "loss_ref": "mean {loss} of the references - the "
                                                                          "target's",
              "lira_loss": "LiRA on -{loss}", "rmia_loss": "RMIA on -{loss}"}

# from this many references per target, ``primary: auto`` takes LiRA rather than RMIA
LIRA_MIN_REFERENCES = 16


@dataclass
class Attack:
    """One target attacked: its index, its references, the scores of every point and its membership.

    ``offline``: the same scores with LiRA and RMIA offline for every image, for comparisons between
    images with in-references and images without (a release candidate's training images against
    images no encoder saw)."""

    target: int
    refs: list[int]
    scores: dict[str, np.ndarray]
    member: np.ndarray
    offline: dict[str, np.ndarray] | None = None
    calibration: dict | None = None  # RMIA's a per statistic, LiRA's widths and where they came from


def primary_score(design: Design, settings, has_loss: bool, attacks: list[Attack]) -> str:
    """The pre-registered score (``privacy.primary``), checked to exist for this design."""
    names = list(attacks[0].scores) if attacks else []
    if settings.primary != "auto":
        if settings.primary not in names:
            raise MemlensError(f"privacy.primary '{settings.primary}' is not a score of this audit; valid: "
                               f"{', '.join(names)}")
        return settings.primary
    if design.kind == "fg":
        return "loss_ref" if has_loss else "sslmem"
    stat = "loss" if has_loss else "align"
    n_refs = min(len(a.refs) for a in attacks)
    if n_refs < 2:
        return f"{stat}_ref"
    # Which attack is strongest depends on how many references calibrate it, decided here from the design,
    # never from the results: LiRA's per-side Gaussian fits need many references (Carlini et al. use 64 and
    # more), RMIA is built to work with few (Zarifzadeh et al., ICML 2024). Measured on the demo's recipe
    # (benchmarks/references.py): RMIA >= LiRA on canaries at 2 and 6 references per target.
    return f"lira_{stat}" if n_refs >= LIRA_MIN_REFERENCES else f"rmia_{stat}"


def attacks(design: Design, points: Points, align: np.ndarray, losses: np.ndarray | None, settings) -> list[Attack]:
    """Every (target, references) attack of the design with its scores on every point."""
    member = design.member
    if design.kind == "fg":
        f, g = [i for i, r in enumerate(design.roles) if r == "f"], [i for i, r in enumerate(design.roles) if r == "g"]
        af, ag = align[f].mean(0), align[g].mean(0)
        scores = {"sslmem": ag - af, "neg_align_f": -af}
        if losses is not None:
            lf, lg = losses[f].mean(0), losses[g].mean(0)
            scores.update(loss_ref=lg - lf, neg_loss_f=-lf)
        return [Attack(f[0], g, scores, member[f[0]])]
    scored = design.scored
    if design.target is not None:
        targets = [(design.target, scored)]
    else:
        pair_of = {e: j for j, pr in enumerate(design.pairs) for e in pr}
        # references of the other pairs only; with one pair, its partner (coupled: said in the report)
        targets = [(t, [r for r in scored if pair_of[r] != pair_of[t]] or [r for r in scored if r != t])
                   for t in scored]
    natural = ~points.is_canary
    controls = nulls.control_images(member[scored], natural)
    # the tuning split is a fixed function of the design: nothing is chosen on the results being reported
    calib = {name: _calibration(stat, member, scored, natural, settings, seed=derive_seed(0, "rmia-a", name) % 2**32)
             for stat, name in ((align, "align"), (losses, "loss")) if stat is not None}
    out = []
    for t, refs in targets:
        population = np.flatnonzero(~member[t] & natural)
        scores, offline, widths = {}, {}, {}
        for stat, name in ((align, "align"), (losses, "loss")):
            if stat is None:
                continue
            w = mia.control_widths(-stat[t], -stat[refs], member[refs], member[t], controls) \
                if settings.lira_variance in ("auto", "controls") else None
            if w is None and settings.lira_variance == "controls":
                raise MemlensError("privacy.lira_variance: controls needs at least 10 control images in every "
                                   "encoder (S_S) and 10 in none (S_E) beside the pool")
            kw = dict(settings=settings, name=name, a=calib[name], widths=w)
            scores.update(_scores(stat, t, refs, member, population, online=True, **kw))
            offline.update(_scores(stat, t, refs, member, population, online=False, **kw))
            widths[name] = {"source": "controls" if w is not None else settings.lira_variance,
                            **({"sigma_in": w[0], "sigma_out": w[1], "offset": w[2]} if w is not None else {})}
        out.append(Attack(t, refs, scores, member[t], offline, calibration={"rmia_a": calib, "lira_widths": widths}))
    return out


def _calibration(stat: np.ndarray, member: np.ndarray, scored: list[int], natural: np.ndarray, settings, *,
                 seed: int) -> float:
    """RMIA's a for one statistic: the setting, else fitted on the scored encoders (each the target of the others)."""
    if settings.rmia_a != "auto":
        return float(settings.rmia_a)
    a = mia.tune_rmia_a(-stat[scored], member[scored], natural, seed=seed)
    return 0.3 if a is None else a  # the paper's default when nothing can be fitted


def _scores(stat: np.ndarray, t: int, refs: list[int], member: np.ndarray, population: np.ndarray, *, settings,
            name: str, online: bool, a: float, widths) -> dict[str, np.ndarray]:
    s_t, s_r, m_r = -stat[t], -stat[refs], member[refs]
    out = {f"neg_{name}": s_t, f"{name}_ref": stat[refs].mean(0) - stat[t]}
    if len(refs) >= 2:
        variance = settings.lira_variance if settings.lira_variance != "controls" else "auto"
        out[f"lira_{name}"] = mia.lira(s_t, s_r, m_r, variance=variance, online=online, widths=widths)
        out[f"rmia_{name}"] = mia.rmia(s_t, s_r, m_r, population, gamma=settings.rmia_gamma, a=a, online=online)
    return out


def membership_findings(design: Design, points: Points, align: np.ndarray, losses: np.ndarray | None, *, cset, settings,
             loss_name: str | None, claimed: dict, n_train: int, seed: int,
             coupled: bool) -> tuple[pd.DataFrame | None, dict, list[Attack]]:
    """The canary table, the privacy summary of audit.json and the attacks (for per-image columns)."""
    atk = attacks(design, points, align, losses, settings)
    primary = primary_score(design, settings, losses is not None, atk)
    names = FG_SCORES if design.kind == "fg" else REF_SCORES
    delta = settings.delta or claimed.get("delta") or 1.0 / (10 * n_train)
    out: dict = {"primary_score": primary, "delta": delta, "confidence": settings.confidence,
                 "claimed_epsilon": claimed.get("epsilon"), "claimed_delta": claimed.get("delta"),
                 "design": design.kind, "targets": [design.encoders[a.target].label for a in atk],
                 "references_per_target": [len(a.refs) for a in atk],
                 "coupled_reference": bool(coupled and design.kind == "fg") or bool(
                     design.kind == "references" and design.target is None and len(design.pairs) < 2),
                 "scores": {k: v.format(loss=loss_name or "loss") for k, v in names.items() if k in atk[0].scores}}
    if atk[0].calibration is not None:
        out["calibration"] = {"rmia_a": atk[0].calibration["rmia_a"],
                              "lira_widths": [a.calibration["lira_widths"] for a in atk]}
    nat = ~points.is_canary
    natural = _natural(design, points, atk, nat)
    if natural is not None:
        ins, outs, what = natural
        out["natural"] = {"members": what[0], "non_members": what[1],
                          "metrics": {k: membership_metrics(ins[k], outs[k], score=k, bootstrap=settings.bootstrap,
                                                            confidence=settings.confidence, seed=seed).to_dict()
                                      for k in ins}}
    if cset is None:
        return None, out, atk
    can = np.flatnonzero(points.is_canary)
    table = _canary_table(design, points, atk, can, cset)
    metrics = {}
    labels = np.concatenate([a.member[can] for a in atk])
    if labels.any() and (~labels).any():
        for k in atk[0].scores:
            s = np.concatenate([a.scores[k][can] for a in atk])
            metrics[k] = membership_metrics(s[labels], s[~labels], score=k, bootstrap=settings.bootstrap,
                                            confidence=settings.confidence, seed=seed).to_dict()
        out["epsilon_lower_bound"], out["epsilon_lower_bound_other"] = _bounds(atk, can, primary, delta, settings,
                                                                               seed)

    out["canaries"] = {"path": str(cset.path), "sha256": cset.manifest.sha256, "m": len(cset),
                       "membership_sha256": sha256_file(cset.path / "membership.json"),
                       "set_file_sha256": sha256_file(cset.path / "canaries.json"),
                       "kinds": cset.manifest.kinds, "n_in": int(labels.sum()), "n_out": int((~labels).sum()),
                       "targets": len(atk), "metrics": metrics}
    return table, out, atk


def _natural(design: Design, points: Points, atk: list[Attack], nat: np.ndarray):
    """(member scores, non-member scores, (who, who)) of the natural images, pooled over targets."""
    if design.kind == "fg":
        sub = points.subset_of
        members, others = (sub == "S_C") & nat, (sub == "S_E") & nat
        if not (members.any() and others.any()):
            return None
        a = atk[0]
        return ({k: v[members] for k, v in a.scores.items()}, {k: v[others] for k, v in a.scores.items()},
                ("S_C", "S_E"))
    ins: dict[str, list] = {k: [] for k in atk[0].scores}
    outs: dict[str, list] = {k: [] for k in atk[0].scores}
    scored = design.member[design.scored]
    pool = nat & scored.any(0) & (~scored).any(0)
    for a in atk:
        if design.target is not None:
            # its training images some references left out (the pool: S_S is in every reference, so
            # nothing calibrates it) against images no encoder saw; offline scores for both
            m_sel, o_sel = pool & a.member, nat & ~a.member & ~scored.any(0)
            scores = a.offline
        else:  # the pool: each image in half of the references, in or out of this target
            m_sel, o_sel = pool & a.member, pool & ~a.member
            scores = a.scores
        for k in scores:
            ins[k].append(scores[k][m_sel])
            outs[k].append(scores[k][o_sel])
    ins_c = {k: np.concatenate(v) for k, v in ins.items()}
    outs_c = {k: np.concatenate(v) for k, v in outs.items()}
    if not len(next(iter(ins_c.values()))) or not len(next(iter(outs_c.values()))):
        return None
    what = (("the target's pool images (LiRA, RMIA offline)", "images no encoder trained on")
            if design.target is not None else ("pool images in the target", "pool images out of it"))
    return ins_c, outs_c, what


def _canary_table(design: Design, points: Points, atk: list[Attack], can: np.ndarray, cset) -> pd.DataFrame:
    kind = cset.manifest.canary_kind
    frames = []
    for a in atk:
        data = {"id": [points.ids[i] for i in can], "kind": kind, "target": design.encoders[a.target].label,
                "included": a.member[can]}
        data.update({f"score_{k}": v[can] for k, v in a.scores.items()})
        frames.append(pd.DataFrame(data))
    return pd.concat(frames, ignore_index=True)


def _bounds(atk: list[Attack], can: np.ndarray, primary: str, delta: float, settings, seed: int) -> tuple[dict, dict]:
    """The primary score's epsilon lower bound: per target at 1 - beta / T, the largest reported."""
    t_count = len(atk)
    conf = 1 - (1 - settings.confidence) / t_count
    best, other_best = None, None
    for a in atk:
        s, m = a.scores[primary][can], a.member[can]
        if not (m.any() and (~m).any()):
            continue
        b = epsilon_lower_bound(s[m], s[~m], delta=delta, confidence=conf, method=settings.method,
                                strategy=settings.strategy, seed=seed).to_dict()
        o = epsilon_lower_bound(s[m], s[~m], delta=delta, confidence=conf,
                                method="one-run" if settings.method == "fdp" else "fdp", strategy=settings.strategy,
                                seed=seed).to_dict()
        if best is None or b["epsilon"] > best["epsilon"]:
            best = {**b, "target": a.target, "targets": t_count, "confidence_overall": settings.confidence}
        if other_best is None or o["epsilon"] > other_best["epsilon"]:
            other_best = {**o, "target": a.target, "targets": t_count}
    return best, other_best
