"""max_fraction_units_above: at most this share of the ranked units may have UnitMem above a level and
beat their own permutation null (selective units alone are not memorization: a random network's are
selective too)."""

from __future__ import annotations

from pydantic import Field

from memlens.policy.context import PolicyModel, RuleContext, RuleResult

NAME = "max_fraction_units_above"


class UnitsAbove(PolicyModel):
    level: float = Field(0.5, ge=0, le=1)
    fraction: float = Field(..., ge=0, le=1, description="largest allowed share of units with UnitMem above level")


SETTING = (UnitsAbove | None, None)


def check(ctx: RuleContext, limit: UnitsAbove) -> list[RuleResult]:
    ranked = ctx.audit.units.dropna(subset=["unitmem"])
    above = ranked["unitmem"] > limit.level
    nulled = "flagged" in ranked.columns
    if nulled:  # units beating their own null, not merely selective ones
        above &= ranked["flagged"].astype(bool)
    frac = float(above.mean()) if len(ranked) else 0.0
    return [ctx.result(NAME, f"<= {limit.fraction:.1%} above {limit.level:g}" + (" and above their null" if nulled
                                                                                  else ""),
                       f"{frac:.1%}", frac <= limit.fraction)]
