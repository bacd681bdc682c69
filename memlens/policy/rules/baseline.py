"""baseline.<metric>: a release may not memorize more than the previous one by more than the policy's
``baseline.max_increase`` (mean candidate score, at-risk count, membership AUC, empirical epsilon, the
top layer's UnitMem); applied when the gate is given a baseline audit."""

from __future__ import annotations

from memlens.policy.baseline import compare
from memlens.policy.context import RuleContext, RuleResult, fmt

NAME = "baseline"
SETTING = None  # the policy's top-level baseline: section, not a key under rules:


def _row(ctx: RuleContext, metric: dict, limit: float, newly: list[dict]) -> RuleResult:
    rule = f"baseline.{metric['metric']}"
    if metric["change"] is None:
        return ctx.result(rule, f"increase <= {limit:g}", "not measured in both audits", False,
                          f"{metric['name']}: the baseline or this audit lacks it")
    ok = metric["change"] <= limit + 1e-12
    named = metric["name"] if metric["metric"] in ("membership_auc", "empirical_epsilon") else ""
    why = (f"{metric['name']} rose by {metric['change']:+.4g} since the previous release"
           + (f"; newly at risk: {', '.join(p['id'] for p in newly[:5])}"
              if metric["metric"] == "at_risk_count" and newly else ""))
    return ctx.result(rule, f"increase <= {limit:g}",
                      f"{fmt(metric['baseline'])} -> {fmt(metric['current'])} ({metric['change']:+.4g})", ok,
                      named if ok else why)


def check(ctx: RuleContext, setting: None) -> list[RuleResult]:
    if ctx.baseline is None or ctx.baseline_settings is None:
        return []
    cmp = compare(ctx.audit, ctx.baseline, score=ctx.score, at_risk=ctx.baseline_settings.at_risk_score)
    limits = ctx.baseline_settings.max_increase.model_dump(exclude_none=True)
    return [_row(ctx, m, limits[m["metric"]], cmp.newly_at_risk) for m in cmp.metrics if m["metric"] in limits]
