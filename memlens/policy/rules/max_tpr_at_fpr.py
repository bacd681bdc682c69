"""max_tpr_at_fpr: the membership attack's true-positive rate at a low false-positive rate (the regime
LiRA argues matters) may not exceed the limit."""

from __future__ import annotations

from pydantic import Field

from memlens.policy.context import PolicyModel, RuleContext, RuleResult

NAME = "max_tpr_at_fpr"


class TprLimit(PolicyModel):
    fpr: float = Field(0.01, gt=0, lt=1, description="false-positive rate of the attack")
    max_tpr: float = Field(..., ge=0, le=1, description="largest allowed true-positive rate at that FPR")


SETTING = (TprLimit | None, None)


def check(ctx: RuleContext, limit: TprLimit) -> list[RuleResult]:
    found = ctx.audit.membership()
    if found is None:
        return []  # max_membership_auc says the audit has no membership scores
    where, metrics = found
    threshold = f"TPR <= {limit.max_tpr:.1%} at FPR {limit.fpr:g}"
    at = next((x for x in metrics["tpr_at"] if abs(x["fpr"] - limit.fpr) < 1e-12), None)
    if at is None:
        return [ctx.result(NAME, threshold, "not measured", False,
                           f"the audit reports TPR at FPR {', '.join(str(x['fpr']) for x in metrics['tpr_at'])} only")]
    return [ctx.result(NAME, threshold, f"{at['tpr']:.1%} ({where})" + ("" if at["resolvable"] else
                                                                         " [too few non-members]"),
                       at["tpr"] <= limit.max_tpr, at.get("note", ""))]
