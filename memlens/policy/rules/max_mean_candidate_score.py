"""max_mean_candidate_score: the candidates' mean score (the policy's ``score``) may not exceed the limit."""

from __future__ import annotations

from pydantic import Field

from memlens.policy.context import RuleContext, RuleResult, fmt

NAME = "max_mean_candidate_score"
SETTING = (float | None, Field(None, description="largest allowed mean score of S_C"))


def check(ctx: RuleContext, limit: float) -> list[RuleResult]:
    scores = ctx.audit.candidates()[ctx.score].to_numpy(dtype=float)
    mean = float(scores.mean()) if len(scores) else float("nan")
    return [ctx.result(NAME, f"<= {limit:g} ({ctx.score})", f"{fmt(mean)} (mean over {ctx.audit.candidate_words()})",
                       mean <= limit)]
