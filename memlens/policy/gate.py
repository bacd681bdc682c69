"""Evaluate a policy against audits: one row per rule and audit, pass or fail."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from memlens.audit.results import Audit
from memlens.errors import MemlensError
from memlens.integrity import parse_public_key, public_key_text, signed_by
from memlens.io import atomic_write_bytes, atomic_write_text
from memlens.policy.schema import Policy


@dataclass
class RuleResult:
    audit: str
    rule: str
    threshold: str
    observed: str
    passed: bool
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GateResult:
    policy: str
    results: list[RuleResult]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def verdicts(self) -> dict[str, bool]:
        """Pass/fail per audit, in the order the audits were given."""
        out: dict[str, bool] = {}
        for r in self.results:
            out[r.audit] = out.get(r.audit, True) and r.passed
        return out


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}g}"


def candidates(audit: Audit):
    """The rows of the images whose memorization the candidate rules judge: the candidates (S_C)
    under f and g, the pool images (with in- and out-encoders) under references."""
    pts = audit.points
    if "candidate" in pts.columns:
        return pts[pts["candidate"].astype(bool)]
    return pts[pts["subset"] == "S_C"]


def _candidate_words(audit: Audit) -> str:
    """What the candidate rules judge, named: S_C under f and g, the pool under references."""
    n = len(candidates(audit))
    return f"the {n} pool images (S_C and S_I)" if (audit.summary.design or {}).get("kind") == "references" else \
        f"the {n} S_C candidates"


def natural_signal_test(audit: Audit):
    """The test behind require_natural_signal: S_C > S_S (Welch) under f and g; under references,
    the candidates' memorization above the control images' (Welch): both offset-free."""
    tests = audit.summary.tests
    found = next((t for t in tests if t.name == "C>S" and t.method == "welch_t"), None)
    return found or next((t for t in tests if t.name == "C>ctrl" and t.method == "welch_t"), None)


def audit_label(audit: Audit) -> str:
    eps = audit.summary.dp_epsilon
    return f"{audit.path.name} (epsilon {'inf' if eps is None else f'{eps:.3g}'})"


def _control(audit: Audit, pool: list[Audit]) -> Audit | None:
    """The positive control of an audit: the audit itself when it is non-private with canaries, else a
    non-private audit with canaries of the same data, splits and canary set (the sweep's eps-inf)."""
    def canaries(a: Audit) -> dict | None:
        return ((a.summary.privacy or {}).get("canaries") or {}) or None

    if audit.summary.dp_epsilon is None and canaries(audit) and canaries(audit).get("metrics"):
        return audit
    mine = canaries(audit)
    for other in pool:
        theirs = canaries(other)
        if (other is not audit and other.summary.dp_epsilon is None and theirs and theirs.get("metrics")
                and other.summary.data["fingerprint"] == audit.summary.data["fingerprint"]
                and other.summary.splits["hash"] == audit.summary.splits["hash"]
                and (mine is None or mine.get("sha256") == theirs.get("sha256"))):
            return other
    return None


def _membership(audit: Audit, basis: str | None = None) -> tuple[str, dict] | None:
    """(where, metrics) of the audit's primary membership score: canaries when there are, else natural
    (``basis`` "canaries" or "natural" asks for one)."""
    p = audit.summary.privacy or {}
    primary = p.get("primary_score", "sslmem")
    canary = (p.get("canaries") or {}).get("metrics") or {}
    if primary in canary and basis in (None, "canaries"):
        return f"canaries, {primary}", canary[primary]
    natural = (p.get("natural") or {}).get("metrics") or {}
    if primary in natural and basis in (None, "natural"):
        nat = p.get("natural") or {}
        return f"{nat.get('members', 'S_C')} vs {nat.get('non_members', 'S_E')}, {primary}", natural[primary]
    return None


def comparable_basis(audit: Audit, baseline: Audit) -> str | None:
    """The membership figures two audits can be compared on: their canaries when both planted the same
    set with the same primary score, else their natural images when both measured them alike, else
    none (one audit's canary AUC is no baseline for another's natural AUC)."""
    pa, pb = audit.summary.privacy or {}, baseline.summary.privacy or {}
    if pa.get("primary_score") != pb.get("primary_score"):
        return None
    ca, cb = (pa.get("canaries") or {}), (pb.get("canaries") or {})
    if ca.get("metrics") and cb.get("metrics") and ca.get("sha256") == cb.get("sha256"):
        return "canaries"
    na, nb = (pa.get("natural") or {}), (pb.get("natural") or {})
    if na.get("metrics") and nb.get("metrics") and (na.get("members"), na.get("non_members")) == (
            nb.get("members"), nb.get("non_members")):
        return "natural"
    return None


@dataclass
class Comparison:
    """An audit beside the previous release's (the gate's baseline)."""

    baseline: str
    metrics: list[dict]
    newly_at_risk: list[dict]
    at_risk_score: float

    def to_dict(self) -> dict:
        return asdict(self)


def check_baseline(audit: Audit, baseline: Audit) -> None:
    """Refuse a baseline that audited other data or other splits (its numbers are not comparable).

    Raises:
        MemlensError: naming both audits and what differs.
    """

    a, b = audit.summary, baseline.summary
    if a.data["fingerprint"] != b.data["fingerprint"]:
        raise MemlensError(f"baseline {baseline.path} audited other data (fingerprint {b.data['fingerprint'][:12]}, "
                           f"{audit.path} has {a.data['fingerprint'][:12]}); a baseline must audit the same images")
    if a.splits["hash"] != b.splits["hash"]:
        raise MemlensError(f"baseline {baseline.path} used other splits (hash {b.splits['hash'][:12]}, {audit.path} "
                           f"has {a.splits['hash'][:12]}); a baseline must score the same subsets")


def _release_metrics(audit: Audit, score: str, at_risk: float, top_layer: str | None,
                     basis: str | None) -> dict[str, float | None]:
    cand = candidates(audit)
    mm = _membership(audit, basis) if basis else None
    bound = (audit.summary.privacy or {}).get("epsilon_lower_bound") if basis == "canaries" else None
    unit = None
    if top_layer is not None:
        sel = audit.units[audit.units["layer"] == top_layer]["unitmem"].dropna()
        unit = float(sel.mean()) if len(sel) else None
    return {"mean_candidate_score": float(cand[score].mean()) if len(cand) else None,
            "at_risk_count": float((cand[score] > at_risk).sum()),
            "membership_auc": mm[1]["auc"] if mm else None,
            "empirical_epsilon": bound["epsilon"] if bound else None,
            "top_layer_unitmem": unit}


def compare(audit: Audit, baseline: Audit, *, score: str = "sslmem_sym_norm", at_risk: float = 0.2) -> Comparison:
    """The release metrics of an audit and its baseline side by side, and the newly at-risk points."""
    check_baseline(audit, baseline)
    ranked = baseline.units.dropna(subset=["unitmem"])
    top_layer = ranked.groupby("layer")["unitmem"].mean().idxmax() if len(ranked) else None
    basis = comparable_basis(audit, baseline)
    now = _release_metrics(audit, score, at_risk, top_layer, basis)
    before = _release_metrics(baseline, score, at_risk, top_layer, basis)
    on = {"canaries": " (the same canaries)", "natural": " (natural images)"}.get(basis, " (not comparable: other "
                                                                                         "canaries or scores)")
    names = {"mean_candidate_score": f"mean {score} of S_C", "at_risk_count": f"candidates above {at_risk:g}",
             "membership_auc": f"membership AUC{on}", "empirical_epsilon": f"empirical epsilon lower bound{on}",
             "top_layer_unitmem": f"mean UnitMem of {top_layer}"}
    metrics = [{"metric": k, "name": names[k], "baseline": before[k], "current": now[k],
                "change": None if before[k] is None or now[k] is None else now[k] - before[k]} for k in names]
    now_c, before_c = candidates(audit), candidates(baseline)
    c_now = now_c[now_c[score] > at_risk]
    c_before = set(before_c[before_c[score] > at_risk]["id"])
    newly = [{"id": r["id"], "label": r["label"], "score": float(r[score])}
             for _, r in c_now.sort_values(score, ascending=False).iterrows() if r["id"] not in c_before]
    return Comparison(baseline=str(baseline.path), metrics=metrics, newly_at_risk=newly, at_risk_score=at_risk)


def evaluate(policy: Policy, audits: list[Audit], *, controls: list[Audit] | None = None,
             baseline: Audit | None = None, weights_sha256: list[str] | None = None) -> GateResult:
    """Check every audit against every rule of the policy.

    Args:
        controls: more audits that may serve as positive controls for ``require_power`` (the
            audits themselves are searched first).
        baseline: the previous release's audit, for the policy's ``baseline.max_increase`` rules.
        weights_sha256: the weights being released (``memlens gate --weights``, or the policy's
            ``require_weights``): an audit passes only if it audited one of them as the released encoder.

    Raises:
        MemlensError: a baseline of other data or splits.
    """
    rows: list[RuleResult] = []
    r = policy.rules
    pool = list(audits) + list(controls or [])
    for audit in audits:
        name = audit_label(audit)
        s = audit.summary
        cand = candidates(audit)[policy.score].to_numpy(dtype=float)
        units = audit.units
        priv = s.privacy or {}

        def add(rule: str, threshold: str, observed: str, ok: bool, detail: str = "", name: str = name) -> None:
            rows.append(RuleResult(name, rule, threshold, observed, bool(ok), detail))

        pins = list(weights_sha256 or []) + (list(r.require_weights.sha256) if r.require_weights else [])
        if pins:
            _weights_rule(add, audit, pins)
        random_init = [e.label for e in s.encoders if e.weights == "random-init"]
        if random_init and not policy.allow_random_init:
            add("weights_loaded", "every encoder audited with its trained weights", f"random init: "
                f"{', '.join(random_init)}", False, "an encoder at its random initialisation says nothing about a "
                "trained model; give its weights (or set allow_random_init: true in the policy)")
        if r.require_power:
            ctrl = _control(audit, pool)
            if ctrl is None:
                add("require_power", f"positive control significant at {policy.alpha:g}", "no positive control",
                    False, "the audit cannot show it could see memorization: plant canaries (canaries:) and audit "
                           "the non-private reference of the same recipe (epsilon inf) alongside it")
            else:
                cp = ctrl.summary.privacy
                prim = cp["primary_score"]
                m = cp["canaries"]["metrics"][prim]
                p = m["mann_whitney_p"]
                ok = p < policy.alpha
                where = "this audit" if ctrl is audit else ctrl.path.name
                add("require_power", f"canaries detected (one-sided Mann-Whitney p below {policy.alpha:g})",
                    f"AUC {m['auc']:.3f}, p = {_fmt(p, 3)} ({where})", ok,
                    "" if ok else f"the positive control ({where}: canaries in the non-private encoder) was not "
                                  f"detected, so this audit had no power to see memorization")
        if r.require_natural_signal:
            welch = natural_signal_test(audit)
            p = welch.p_holm if welch is not None else None
            ok = p is not None and not math.isnan(p) and p < policy.alpha
            what = "S_C > S_S" if welch is None or welch.name == "C>S" else "S_C memorization > controls'"
            add("require_natural_signal", f"{what} significant at {policy.alpha:g}", f"p = {_fmt(p, 3)} (Holm)",
                ok, "" if ok else "no significant memorization of the encoder's own natural images")
        if r.max_membership_auc is not None or r.max_tpr_at_fpr is not None:
            mm = _membership(audit)
            if r.max_membership_auc is not None:
                if mm is None:
                    add("max_membership_auc", f"<= {r.max_membership_auc:g}", "no membership scores", False,
                        "the audit has neither canaries nor S_C and S_E points")
                else:
                    add("max_membership_auc", f"<= {r.max_membership_auc:g}",
                        f"{mm[1]['auc']:.3f} ({mm[0]})", mm[1]["auc"] <= r.max_membership_auc)
            if r.max_tpr_at_fpr is not None and mm is not None:
                lim = r.max_tpr_at_fpr
                t = next((x for x in mm[1]["tpr_at"] if abs(x["fpr"] - lim.fpr) < 1e-12), None)
                if t is None:
                    add("max_tpr_at_fpr", f"TPR <= {lim.max_tpr:.1%} at FPR {lim.fpr:g}", "not measured", False,
                        f"the audit reports TPR at FPR {', '.join(str(x['fpr']) for x in mm[1]['tpr_at'])} only")
                else:
                    add("max_tpr_at_fpr", f"TPR <= {lim.max_tpr:.1%} at FPR {lim.fpr:g}",
                        f"{t['tpr']:.1%} ({mm[0]})" + ("" if t["resolvable"] else " [too few non-members]"),
                        t["tpr"] <= lim.max_tpr, t.get("note", ""))
        bound = priv.get("epsilon_lower_bound")
        if r.max_empirical_epsilon is not None:
            if bound is None:
                add("max_empirical_epsilon", f"<= {r.max_empirical_epsilon:g}", "no canaries", False,
                    "an empirical epsilon needs canaries (canaries: in the pipeline or training config)")
            else:
                add("max_empirical_epsilon", f"<= {r.max_empirical_epsilon:g}",
                    f"{bound['epsilon']:.3f} ({bound['method']}, "
                    f"{bound.get('confidence_overall', bound['confidence']):.0%})",
                    bound["epsilon"] <= r.max_empirical_epsilon,
                    "" if bound["epsilon"] <= r.max_empirical_epsilon else
                    "the canaries leak more than the policy allows")
        if r.empirical_within_claimed and bound is not None and priv.get("claimed_epsilon") is not None:
            claimed = float(priv["claimed_epsilon"])
            ok = bound["epsilon"] <= claimed
            add("empirical_within_claimed", f"empirical <= claimed epsilon ({claimed:.3g})",
                f"{bound['epsilon']:.3f}", ok,
                "" if ok else "the empirical lower bound exceeds the accountant's epsilon: the DP training does not "
                              "deliver its guarantee (a bug in clipping, sampling, noise or accounting)")
        if r.max_mean_candidate_score is not None:
            m = float(np.mean(cand)) if len(cand) else float("nan")
            add("max_mean_candidate_score", f"<= {r.max_mean_candidate_score:g} ({policy.score})",
                f"{_fmt(m)} (mean over {_candidate_words(audit)})", m <= r.max_mean_candidate_score)
        if r.max_fraction_candidates_above is not None:
            rule = r.max_fraction_candidates_above
            frac = float(np.mean(cand > rule.score)) if len(cand) else float("nan")
            add("max_fraction_candidates_above", f"<= {rule.fraction:.1%} above {rule.score:g}", f"{frac:.1%}",
                frac <= rule.fraction)
        if r.max_point_score is not None:
            top = float(np.max(cand)) if len(cand) else float("nan")
            worst = candidates(audit).sort_values(policy.score).iloc[-1]["id"] if len(cand) else ""
            add("max_point_score", f"<= {r.max_point_score:g}", _fmt(top), top <= r.max_point_score,
                f"highest: {worst}")
        if r.max_memorized is not None:
            _memorized_rule(add, audit, r.max_memorized, policy.fdr)
        ranked = units["unitmem"].dropna()
        if r.max_unitmem is not None:
            if r.max_unitmem.any is not None:
                top = float(ranked.max()) if len(ranked) else float("nan")
                add("max_unitmem.any", f"<= {r.max_unitmem.any:g}", _fmt(top), not top > r.max_unitmem.any)
            for layer, limit in r.max_unitmem.per_layer.items():
                sel = units[units["layer"] == layer]["unitmem"].dropna()
                if layer not in set(audit.layers["layer"]):
                    add(f"max_unitmem[{layer}]", f"<= {limit:g}", "layer not found", False,
                        f"the audited encoder has no layer '{layer}'")
                elif sel.empty:
                    add(f"max_unitmem[{layer}]", f"<= {limit:g}", "no ranked units", True,
                        "the layer's units are not measured or all below the activation floor")
                else:
                    add(f"max_unitmem[{layer}]", f"<= {limit:g}", _fmt(float(sel.max())), float(sel.max()) <= limit)
        if r.max_fraction_units_above is not None:
            rule = r.max_fraction_units_above
            ranked_units = units.dropna(subset=["unitmem"])
            above = ranked_units["unitmem"] > rule.level
            if "flagged" in ranked_units.columns:  # units beating their own null, not merely selective ones
                above &= ranked_units["flagged"].astype(bool)
            frac = float(above.mean()) if len(ranked_units) else 0.0
            add("max_fraction_units_above", f"<= {rule.fraction:.1%} above {rule.level:g}"
                + (" and above their null" if "flagged" in ranked_units.columns else ""), f"{frac:.1%}",
                frac <= rule.fraction)
        if r.require_dp is not None:
            eps = [run.epsilon for run in s.attacked]
            deltas = [run.delta for run in s.attacked]
            private = all(e is not None for e in eps)
            worst = max(eps) if private else math.inf
            ok = private and worst <= r.require_dp.max_epsilon
            thr = f"DP, epsilon <= {r.require_dp.max_epsilon:g}"
            if r.require_dp.max_delta is not None:
                thr += f", delta <= {r.require_dp.max_delta:g}"
                ok = ok and max(d for d in deltas) <= r.require_dp.max_delta
            declared = any(run.dp_declared for run in s.attacked)
            detail = ""
            if r.require_dp.secret_randomness and private:
                thr += ", secret randomness"
                replayable = [run.label for run in s.attacked if run.dp_randomness != "secret" and not run.dp_declared]
                if replayable:
                    ok = False
                    detail = (f"{', '.join(replayable)}: DP noise and sampling seeded from the recorded run seed "
                              f"(dp.reproducible: true), so whoever holds the run record can replay them")
                if declared:
                    ok = False
                    detail = "a declared guarantee says nothing of how its noise was drawn"
            add("require_dp", thr, "not private" if not private else
                f"epsilon {worst:.3g}, delta {max(deltas):.3g}" + (" (declared)" if declared else ""), ok, detail)
        if r.require_signature is not None:
            _signature_rule(add, audit, r.require_signature.public_key)
        if baseline is not None and policy.baseline is not None:
            cmp = compare(audit, baseline, score=policy.score, at_risk=policy.baseline.at_risk_score)
            limits = policy.baseline.max_increase.model_dump(exclude_none=True)
            for m in cmp.metrics:
                if m["metric"] not in limits:
                    continue
                limit = limits[m["metric"]]
                if m["change"] is None:
                    add(f"baseline.{m['metric']}", f"increase <= {limit:g}", "not measured in both audits", False,
                        f"{m['name']}: the baseline or this audit lacks it")
                    continue
                ok = m["change"] <= limit + 1e-12
                add(f"baseline.{m['metric']}", f"increase <= {limit:g}",
                    f"{_fmt(m['baseline'])} -> {_fmt(m['current'])} ({m['change']:+.4g})", ok,
                    (m["name"] if m["metric"] in ("membership_auc", "empirical_epsilon") else "") if ok else
                    f"{m['name']} rose by {m['change']:+.4g} since the previous release"
                                  + (f"; newly at risk: {', '.join(p['id'] for p in cmp.newly_at_risk[:5])}"
                                     if m["metric"] == "at_risk_count" and cmp.newly_at_risk else ""))
    return GateResult(policy.name, rows)


def memorized_at(audit: Audit, fdr: float) -> tuple[list[str], int] | None:
    """Ids of the candidates memorized at ``fdr`` (Benjamini-Hochberg over their per-image p-values,
    most significant first), and the family size; None when the audit has no per-image p-values."""

    cand = candidates(audit)
    if "mem_p" not in cand.columns:
        return None
    if ((audit.summary.inference or {}).get("null") or {}).get("withheld"):
        return [], int(cand["mem_p"].notna().sum())  # the null failed its self-check: nothing is listed
    ok = cand["mem_p"].notna()
    if not ok.any():
        return None
    p = cand.loc[ok, "mem_p"].to_numpy(float)
    q = stats.false_discovery_control(p, method="bh")
    hit = q <= fdr
    ids = cand.loc[ok, "id"].to_numpy()[hit]
    return [str(i) for i in ids[np.argsort(q[hit], kind="stable")]], int(ok.sum())


def _signature_rule(add, audit: Audit, public_key: str) -> None:

    block = audit.summary.integrity or {}
    sig = block.get("signature")
    want = public_key_text(parse_public_key(public_key))
    ok = signed_by(block, public_key)  # the signature itself was verified when the audit was read
    observed = "unsigned" if not sig else ("signed by the trusted key" if ok else
                                           f"signed by another key ({sig.get('public_key', '?')[:12]}...)")
    add("require_signature", f"signed by {want[:12]}...", observed, ok,
        "" if ok else "only audits signed by the trusted job (memlens audit --sign-key) pass this policy")
    # the run records the audit read: their DP facts and membership are what the verdict rests on
    runs = [e for e in audit.summary.encoders if e.source == "run"]
    unsigned = [e.label for e in runs if e.run_signed_by != want]
    if runs:
        add("require_signature[runs]", f"every run record signed by {want[:12]}...",
            "all signed" if not unsigned else f"not signed by it: {', '.join(unsigned[:5])}", not unsigned,
            "" if not unsigned else "run records carry the DP guarantee and the membership the audit relied on; sign "
                                    "them in the trusted training job (memlens train/run --sign-key)")


def _weights_rule(add, audit: Audit, pins: list[str]) -> None:
    """The audit must be of the weights being released: its released encoder (the target, else f, else the
    references) has one of the pinned sha256."""
    released = audit.summary.attacked
    have = {e.weights_sha256 for e in released if e.weights_sha256}
    ok = bool(have & set(pins))
    add("require_weights", f"audited weights sha256 {', '.join(p[:12] for p in pins)}...",
        ", ".join(sorted(h[:12] for h in have)) + "..." if have else "no weights recorded", ok,
        "" if ok else "this audit is of other weights than the ones being released: audit the release file")


def _memorized_rule(add, audit: Audit, limit, fdr: float) -> None:
    found = memorized_at(audit, fdr)
    thr = " and ".join(x for x in (f"<= {limit.max_count}" if limit.max_count is not None else "",
                                   f"<= {limit.max_fraction:.1%}" if limit.max_fraction is not None else "") if x)
    withheld = ((audit.summary.inference or {}).get("null") or {}).get("withheld")
    if withheld:
        add("max_memorized", f"{thr} at FDR {fdr:g}", "not measured", False, f"the at-risk list was withheld: "
            f"{withheld}")
        return
    if found is None:
        add("max_memorized", f"{thr} at FDR {fdr:g}", "not measured", False,
            "the audit has no per-image p-values (re-run it with this memlens)")
        return
    ids, family = found
    frac = len(ids) / family if family else 0.0
    ok = (limit.max_count is None or len(ids) <= limit.max_count) and (
        limit.max_fraction is None or frac <= limit.max_fraction)
    facts = audit.summary.inference or {}
    note = "" if facts.get("training_randomness_counted", True) else (
        " (one encoder pair: training randomness not counted)")
    add("max_memorized", f"{thr} at FDR {fdr:g}", f"{len(ids)} of {family} ({frac:.1%}){note}", ok,
        "" if ok else f"memorized at FDR {fdr:g}: {', '.join(ids[:5])}" + (" ..." if len(ids) > 5 else ""))


def to_junit(result: GateResult, path: str | Path) -> None:
    suite = ET.Element("testsuite", name=f"memlens gate: {result.policy}", tests=str(len(result.results)),
                       failures=str(sum(not r.passed for r in result.results)))
    for r in result.results:
        case = ET.SubElement(suite, "testcase", classname=r.audit, name=r.rule)
        if not r.passed:
            fail = ET.SubElement(case, "failure", message=f"observed {r.observed}, required {r.threshold}")
            fail.text = r.detail or f"{r.rule}: observed {r.observed}, required {r.threshold}"
        else:
            ET.SubElement(case, "system-out").text = f"observed {r.observed}, required {r.threshold}"
    data = ET.tostring(ET.ElementTree(suite).getroot(), encoding="utf-8", xml_declaration=True)
    atomic_write_bytes(path, data)


def _md(text: str) -> str:
    """A table cell that reads right both rendered and as plain text (a job summary, a terminal):
    pipes escaped, and markup-like angle brackets escaped with a backslash instead of HTML entities."""
    text = str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
    text = text.replace("<=", "≤").replace(">=", "≥")
    return text.replace("<", "\\<").replace(">", "\\>")


def to_markdown(result: GateResult) -> str:
    verdict = "PASSED" if result.passed else "FAILED"
    lines = [f"### memlens gate: {verdict} (policy `{_md(result.policy)}`)", ""]
    verdicts = result.verdicts()
    if len(verdicts) > 1:
        lines += [f"- {_md(a)}: {'passed' if ok else '**FAILED**'}" for a, ok in verdicts.items()] + [""]
    lines += ["| audit | rule | threshold | observed | result |", "| --- | --- | --- | --- | --- |"]
    for r in result.results:
        lines.append(f"| {_md(r.audit)} | {_md(r.rule)} | {_md(r.threshold)} | {_md(r.observed)} | "
                     f"{'pass' if r.passed else '**FAIL**'} |")
    fails = [r for r in result.results if not r.passed and r.detail]
    if fails:
        lines += [""] + [f"- {_md(r.audit)}, {_md(r.rule)}: {_md(r.detail)}" for r in fails]
    return "\n".join(lines) + "\n"


def write_markdown(result: GateResult, path: str | Path) -> None:
    atomic_write_text(path, to_markdown(result))
