"""The previous release as a baseline: its audit beside the current one, metric by metric, and the
images newly at risk (``memlens gate --baseline``, the report's comparison section)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from memlens.audit.results import Audit
from memlens.errors import MemlensError


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
    cand = audit.candidates()
    mm = audit.membership(basis) if basis else None
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
    now_c, before_c = audit.candidates(), baseline.candidates()
    c_now = now_c[now_c[score] > at_risk]
    c_before = set(before_c[before_c[score] > at_risk]["id"])
    newly = [{"id": r["id"], "label": r["label"], "score": float(r[score])}
             for _, r in c_now.sort_values(score, ascending=False).iterrows() if r["id"] not in c_before]
    return Comparison(baseline=str(baseline.path), metrics=metrics, newly_at_risk=newly, at_risk_score=at_risk)
