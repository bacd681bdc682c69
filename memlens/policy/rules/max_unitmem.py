"""max_unitmem: no unit (or no unit of a named layer) may single out one image of D' beyond the limit
(UnitMem, localizing paper Eq. 3)."""

from __future__ import annotations

from pydantic import Field

from memlens.policy.context import PolicyModel, RuleContext, RuleResult, fmt

NAME = "max_unitmem"


class UnitLimit(PolicyModel):
    any: float | None = Field(None, ge=0, le=1, description="largest allowed UnitMem of any unit")
    per_layer: dict[str, float] = Field({}, description="largest allowed UnitMem per layer (module path)")


SETTING = (UnitLimit | None, None)


def check(ctx: RuleContext, limit: UnitLimit) -> list[RuleResult]:
    units, out = ctx.audit.units, []
    if limit.any is not None:
        ranked = units["unitmem"].dropna()
        top = float(ranked.max()) if len(ranked) else float("nan")
        out.append(ctx.result(f"{NAME}.any", f"<= {limit.any:g}", fmt(top), not top > limit.any))
    layers = set(ctx.audit.layers["layer"])
    for layer, cap in limit.per_layer.items():
        sel = units[units["layer"] == layer]["unitmem"].dropna()
        rule = f"{NAME}[{layer}]"
        if layer not in layers:
            out.append(ctx.result(rule, f"<= {cap:g}", "layer not found", False,
                                  f"the audited encoder has no layer '{layer}'"))
        elif sel.empty:
            out.append(ctx.result(rule, f"<= {cap:g}", "no ranked units", True,
                                  "the layer's units are not measured or all below the activation floor"))
        else:
            out.append(ctx.result(rule, f"<= {cap:g}", fmt(float(sel.max())), float(sel.max()) <= cap))
    return out
