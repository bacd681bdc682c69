"""max_empirical_epsilon: the epsilon lower bound the canaries give (one-run audit, at the audit's
confidence) may not exceed the limit."""

from __future__ import annotations

from pydantic import Field

from memlens.policy.context import RuleContext, RuleResult

NAME = "max_empirical_epsilon"
SETTING = (float | None, Field(None, ge=0, description="largest allowed empirical epsilon lower bound from the "
                                                       "canaries"))


def check(ctx: RuleContext, limit: float) -> list[RuleResult]:
    bound = (ctx.audit.summary.privacy or {}).get("epsilon_lower_bound")
    if bound is None:
        return [ctx.result(NAME, f"<= {limit:g}", "no canaries", False,
                           "an empirical epsilon needs canaries (canaries: in the pipeline or training config)")]
    ok = bound["epsilon"] <= limit
    return [ctx.result(NAME, f"<= {limit:g}", f"{bound['epsilon']:.3f} ({bound['method']}, "
                       f"{bound.get('confidence_overall', bound['confidence']):.0%})", ok,
                       "" if ok else "the canaries leak more than the policy allows")]
