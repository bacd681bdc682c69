"""require_dp: the released encoders are (epsilon, delta)-DP within the limits (a declared guarantee
counts, marked declared), optionally with secret noise and sampling."""

from __future__ import annotations

import math

from pydantic import Field

from memlens.policy.context import PolicyModel, RuleContext, RuleResult

NAME = "require_dp"


class RequireDP(PolicyModel):
    max_epsilon: float = Field(..., gt=0, description="every audited f encoder must be DP with at most this epsilon")
    max_delta: float | None = Field(None, gt=0, lt=1)
    secret_randomness: bool = Field(False, description="the DP noise and sampling must be secret (not seeded from "
                                                       "the recorded run seed: dp.reproducible false)")


SETTING = (RequireDP | None, None)


def _randomness(runs, private: bool, limit: RequireDP) -> tuple[bool, str]:
    """(ok, why not) of the secret-randomness part."""
    if not (limit.secret_randomness and private):
        return True, ""
    if any(run.dp_declared for run in runs):
        return False, "a declared guarantee says nothing of how its noise was drawn"
    replayable = [run.label for run in runs if run.dp_randomness != "secret" and not run.dp_declared]
    if replayable:
        return False, (f"{', '.join(replayable)}: DP noise and sampling seeded from the recorded run seed "
                       f"(dp.reproducible: true), so whoever holds the run record can replay them")
    return True, ""


def check(ctx: RuleContext, limit: RequireDP) -> list[RuleResult]:
    runs = ctx.audit.summary.attacked
    eps, deltas = [run.epsilon for run in runs], [run.delta for run in runs]
    private = all(e is not None for e in eps)
    worst = max(eps) if private else math.inf
    ok = private and worst <= limit.max_epsilon
    threshold = f"DP, epsilon <= {limit.max_epsilon:g}"
    if limit.max_delta is not None:
        threshold += f", delta <= {limit.max_delta:g}"
        ok = ok and max(deltas) <= limit.max_delta
    if limit.secret_randomness and private:
        threshold += ", secret randomness"
    secret, detail = _randomness(runs, private, limit)
    declared = any(run.dp_declared for run in runs)
    observed = "not private" if not private else (f"epsilon {worst:.3g}, delta {max(deltas):.3g}"
                                                 + (" (declared)" if declared else ""))
    return [ctx.result(NAME, threshold, observed, ok and secret, detail)]
