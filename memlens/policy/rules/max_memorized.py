"""max_memorized: at most this many (or this share of the) candidates memorized at the policy's false
discovery rate: the Benjamini-Hochberg list of the audit's per-image p-values, read from the q-values it
stored (:meth:`memlens.audit.results.Audit.memorized_at`)."""

from __future__ import annotations

from pydantic import Field, model_validator

from memlens.policy.context import PolicyModel, RuleContext, RuleResult

NAME = "max_memorized"


class MemorizedLimit(PolicyModel):
    max_count: int | None = Field(None, ge=0, description="largest allowed number of images memorized at the FDR")
    max_fraction: float | None = Field(None, ge=0, le=1, description="largest allowed share of the candidates")

    @model_validator(mode="after")
    def _one(self) -> "MemorizedLimit":
        if self.max_count is None and self.max_fraction is None:
            raise ValueError("give max_count and/or max_fraction")
        return self


SETTING = (MemorizedLimit | None, Field(
    None, description="images memorized at the policy's FDR (Benjamini-Hochberg on the per-image p-values): at "
                      "most this many, or this share of the candidates"))


def check(ctx: RuleContext, limit: MemorizedLimit) -> list[RuleResult]:
    audit, fdr = ctx.audit, ctx.fdr
    thr = " and ".join(x for x in (f"<= {limit.max_count}" if limit.max_count is not None else "",
                                   f"<= {limit.max_fraction:.1%}" if limit.max_fraction is not None else "") if x)
    threshold = f"{thr} at FDR {fdr:g}"
    if audit.list_withheld:
        return [ctx.result(NAME, threshold, "not measured", False, f"the at-risk list was withheld: "
                                                                   f"{audit.list_withheld}")]
    found = audit.memorized_at(fdr)
    if found is None:
        return [ctx.result(NAME, threshold, "not measured", False,
                           "the audit has no per-image p-values (re-run it with this memlens)")]
    ids, family = found
    frac = len(ids) / family if family else 0.0
    ok = (limit.max_count is None or len(ids) <= limit.max_count) and (
        limit.max_fraction is None or frac <= limit.max_fraction)
    counted = audit.summary.inference.training_randomness_counted is not False
    note = "" if counted else " (one encoder pair: training randomness not counted)"
    return [ctx.result(NAME, threshold, f"{len(ids)} of {family} ({frac:.1%}){note}", ok,
                       "" if ok else f"memorized at FDR {fdr:g}: {', '.join(ids[:5])}" + (" ..." if len(ids) > 5
                                                                                           else ""))]
