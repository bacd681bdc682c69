"""weights_loaded: every encoder was audited with its trained weights; one at its random initialisation
says nothing about a trained model (the policy's ``allow_random_init: true`` lets it pass)."""

from __future__ import annotations

from memlens.policy.context import RuleContext, RuleResult

NAME = "weights_loaded"
SETTING = None  # always applied; the policy's top-level allow_random_init turns it off


def check(ctx: RuleContext, setting: None) -> list[RuleResult]:
    random_init = [e.label for e in ctx.audit.summary.encoders if e.weights == "random-init"]
    if not random_init or ctx.allow_random_init:
        return []
    return [ctx.result(NAME, "every encoder audited with its trained weights", f"random init: {', '.join(random_init)}",
                       False, "an encoder at its random initialisation says nothing about a trained model; give its "
                              "weights (or set allow_random_init: true in the policy)")]
