"""require_weights: the audit is of the weights being released (``memlens gate --weights`` or the policy's
pins): its released encoder (the target, else f, else the references) has one of the pinned sha256."""

from __future__ import annotations

from pydantic import Field, field_validator

from memlens.policy.context import PolicyModel, RuleContext, RuleResult

NAME = "require_weights"
ALWAYS = True  # --weights pins a file without the policy saying so


class RequireWeights(PolicyModel):
    sha256: list[str] = Field(..., min_length=1, description="sha256 of the weight files that may be released: an "
                                                             "audit passes only if it audited one of them")

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: list[str]) -> list[str]:
        bad = [x for x in v if len(x) != 64 or any(c not in "0123456789abcdef" for c in x.lower())]
        if bad:
            raise ValueError(f"not a sha256 (64 hex digits): {bad[0]!r}")
        return [x.lower() for x in v]


SETTING = (RequireWeights | None, Field(
    None, description="pin the weights being released: the audit must have audited one of these files"))


def check(ctx: RuleContext, setting: RequireWeights | None) -> list[RuleResult]:
    pins = list(ctx.pins) + (list(setting.sha256) if setting else [])
    if not pins:
        return []
    have = {e.weights_sha256 for e in ctx.audit.summary.attacked if e.weights_sha256}
    ok = bool(have & set(pins))
    return [ctx.result(NAME, f"audited weights sha256 {', '.join(p[:12] for p in pins)}...",
                       ", ".join(sorted(h[:12] for h in have)) + "..." if have else "no weights recorded", ok,
                       "" if ok else "this audit is of other weights than the ones being released: audit the release "
                                     "file")]
