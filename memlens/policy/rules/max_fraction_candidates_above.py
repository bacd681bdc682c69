"""max_fraction_candidates_above: at most this share of the candidates may score above a level."""

from __future__ import annotations

from pydantic import Field

from memlens.policy.context import PolicyModel, RuleContext, RuleResult

NAME = "max_fraction_candidates_above"


class FractionAbove(PolicyModel):
    score: float = Field(..., description="a candidate counts when its score exceeds this")
    fraction: float = Field(..., ge=0, le=1, description="largest allowed share of such candidates")


SETTING = (FractionAbove | None, None)


def check(ctx: RuleContext, limit: FractionAbove) -> list[RuleResult]:
    scores = ctx.audit.candidates()[ctx.score].to_numpy(dtype=float)
    frac = float((scores > limit.score).mean()) if len(scores) else float("nan")
    return [ctx.result(NAME, f"<= {limit.fraction:.1%} above {limit.score:g}", f"{frac:.1%}", frac <= limit.fraction)]
