"""require_natural_signal: the encoder measurably memorizes its own natural images: S_C above S_S
(Welch, Holm-corrected) under f and g, the candidates above the control images under references."""

from __future__ import annotations

import math

from pydantic import Field

from memlens.policy.context import RuleContext, RuleResult, fmt

NAME = "require_natural_signal"
SETTING = (bool, Field(
    False, description="the S_C > S_S test must be significant (Holm-corrected, Welch): the encoder must "
                       "measurably memorize its own natural images (formerly require_signal)"))


def check(ctx: RuleContext, setting: bool) -> list[RuleResult]:
    welch = ctx.audit.natural_signal_test()
    p = welch.p_holm if welch is not None else None
    ok = p is not None and not math.isnan(p) and p < ctx.alpha
    what = "S_C > S_S" if welch is None or welch.name == "C>S" else "S_C memorization > controls'"
    return [ctx.result(NAME, f"{what} significant at {ctx.alpha:g}", f"p = {fmt(p, 3)} (Holm)", ok,
                       "" if ok else "no significant memorization of the encoder's own natural images")]
