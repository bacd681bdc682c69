"""max_point_score: no single candidate may score above the limit."""

from __future__ import annotations

from pydantic import Field

from memlens.policy.context import RuleContext, RuleResult, fmt

NAME = "max_point_score"
SETTING = (float | None, Field(None, description="largest allowed score of any single candidate"))


def check(ctx: RuleContext, limit: float) -> list[RuleResult]:
    cand = ctx.audit.candidates()
    scores = cand[ctx.score].to_numpy(dtype=float)
    top = float(scores.max()) if len(scores) else float("nan")
    worst = cand.sort_values(ctx.score).iloc[-1]["id"] if len(scores) else ""
    return [ctx.result(NAME, f"<= {limit:g}", fmt(top), top <= limit, f"highest: {worst}")]
