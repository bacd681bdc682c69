"""empirical_within_claimed: an empirical epsilon lower bound above the accountant's epsilon means the
DP training does not deliver its guarantee (a bug in clipping, sampling, noise or accounting)."""

from __future__ import annotations

from pydantic import Field

from memlens.policy.context import RuleContext, RuleResult

NAME = "empirical_within_claimed"
SETTING = (bool, Field(False, description="an empirical epsilon lower bound above the accountant's epsilon is a DP "
                                          "bug: always fail"))


def check(ctx: RuleContext, setting: bool) -> list[RuleResult]:
    privacy = ctx.audit.summary.privacy or {}
    bound = privacy.get("epsilon_lower_bound")
    if bound is None or privacy.get("claimed_epsilon") is None:
        return []
    claimed = float(privacy["claimed_epsilon"])
    ok = bound["epsilon"] <= claimed
    return [ctx.result(NAME, f"empirical <= claimed epsilon ({claimed:.3g})", f"{bound['epsilon']:.3f}", ok,
                       "" if ok else "the empirical lower bound exceeds the accountant's epsilon: the DP training does "
                                     "not deliver its guarantee (a bug in clipping, sampling, noise or accounting)")]
