"""require_calibrated_null: the audit's per-image p-values were calibrated on control images and passed
their self-check, for every measure it lists images on (alignment; the training loss where it has one).

Control images have the same membership in every scored encoder (S_S: in all, S_E: in none), so
whatever separates the two kinds is not memorization; the self-check ranks one kind against the other
and fails when small p-values are in excess (:mod:`memlens.audit.nulls`). A privacy reviewer acts on
the list only if it passed: an audit whose null was not checked on controls (too few of them, or the
model's own p-values) or failed the check fails this rule, whatever the list says.
"""

from __future__ import annotations

from pydantic import Field

from memlens.audit.results import InferenceFacts
from memlens.policy.context import RuleContext, RuleResult

NAME = "require_calibrated_null"
SETTING = (bool, Field(False, description="the per-image p-values must be calibrated on control images and pass "
                                          "their self-check (alignment, and the training loss where measured)"))


def _measures(ctx: RuleContext) -> list[tuple[str, InferenceFacts]]:
    summary = ctx.audit.summary
    loss = summary.loss_memorization
    return [("alignment", summary.inference)] + ([("loss", loss.inference)] if loss is not None else [])


def _verdict(name: str, facts: InferenceFacts) -> tuple[bool, str, str]:
    """(passed, observed, why not) of one measure's null."""
    null = facts.null
    if null is None or null.method != "controls":
        return False, f"{name}: model p-values", f"{name}: the p-values were not checked on control images"
    check = null.self_check
    if check is None:
        return False, f"{name}: not checkable", f"{name}: {null.self_check_note or 'no self-check'}"
    lo, hi = check.interval_05
    observed = f"{name}: {check.below_05:.1%} of {check.n} below 0.05 ({lo:.1%}-{hi:.1%})"
    return check.passed, observed, "" if check.passed else f"{name}: {null.withheld or 'failed'}"


def check(ctx: RuleContext, setting: bool) -> list[RuleResult]:
    verdicts = [_verdict(name, facts) for name, facts in _measures(ctx)]
    ok = all(v[0] for v in verdicts)
    return [ctx.result(NAME, "null self-check passed on the control images", "; ".join(v[1] for v in verdicts), ok,
                       "; ".join(v[2] for v in verdicts if v[2]))]
