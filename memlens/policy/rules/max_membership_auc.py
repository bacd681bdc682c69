"""max_membership_auc: membership inference may not tell training images from others better than this
AUC (the primary score on the canaries, else on natural members against non-members)."""

from __future__ import annotations

from pydantic import Field

from memlens.policy.context import RuleContext, RuleResult

NAME = "max_membership_auc"
SETTING = (float | None, Field(None, ge=0, le=1, description="largest allowed membership-inference AUC "
                                                             "(canaries, else natural S_C vs S_E)"))


def check(ctx: RuleContext, limit: float) -> list[RuleResult]:
    found = ctx.audit.membership()
    if found is None:
        return [ctx.result(NAME, f"<= {limit:g}", "no membership scores", False,
                           "the audit has neither canaries nor S_C and S_E points")]
    where, metrics = found
    return [ctx.result(NAME, f"<= {limit:g}", f"{metrics['auc']:.3f} ({where})", metrics["auc"] <= limit)]
