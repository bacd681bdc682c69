"""require_power: the audit could have seen memorization. Its positive control (canaries detected in
the non-private encoder of the same recipe: the audit itself, or the sweep's epsilon-inf audit of the
same data, splits and canaries) must be significant at the policy's alpha (one-sided Mann-Whitney)."""

from __future__ import annotations

from pydantic import Field

from memlens.audit.results import Audit
from memlens.policy.context import RuleContext, RuleResult, fmt

NAME = "require_power"
SETTING = (bool, Field(
    False, description="the audit must have had the power to see memorization: its positive control (canaries "
                       "detected in the non-private reference of the same recipe, or in the audit itself) must be "
                       "significant at alpha; when it is, an encoder that shows no memorization passes"))


def positive_control(audit: Audit, pool: list[Audit]) -> Audit | None:
    """The audit itself when it is non-private with canaries, else a non-private audit with canaries of
    the same data, splits and canary set."""
    if audit.summary.dp_epsilon is None and (audit.canary_facts() or {}).get("metrics"):
        return audit
    mine = audit.canary_facts()
    for other in pool:
        theirs = other.canary_facts()
        if (other is not audit and other.summary.dp_epsilon is None and theirs and theirs.get("metrics")
                and other.summary.data["fingerprint"] == audit.summary.data["fingerprint"]
                and other.summary.splits["hash"] == audit.summary.splits["hash"]
                and (mine is None or mine.get("sha256") == theirs.get("sha256"))):
            return other
    return None


def check(ctx: RuleContext, setting: bool) -> list[RuleResult]:
    control = positive_control(ctx.audit, ctx.pool)
    if control is None:
        return [ctx.result(NAME, f"positive control significant at {ctx.alpha:g}", "no positive control", False,
                           "the audit cannot show it could see memorization: plant canaries (canaries:) and audit the "
                           "non-private reference of the same recipe (epsilon inf) alongside it")]
    _, metrics = control.membership("canaries")
    p = metrics["mann_whitney_p"]
    ok = p < ctx.alpha
    where = "this audit" if control is ctx.audit else control.path.name
    return [ctx.result(NAME, f"canaries detected (one-sided Mann-Whitney p below {ctx.alpha:g})",
                       f"AUC {metrics['auc']:.3f}, p = {fmt(p, 3)} ({where})", ok,
                       "" if ok else f"the positive control ({where}: canaries in the non-private encoder) was not "
                                     f"detected, so this audit had no power to see memorization")]
