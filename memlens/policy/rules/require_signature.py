"""require_signature: only audits signed by the trusted key (``memlens audit --sign-key``), of run
records signed by it too (they carry the DP guarantee and the membership the verdict rests on)."""

from __future__ import annotations

from pydantic import Field, model_validator

from memlens.errors import MemlensError
from memlens.integrity import parse_public_key, public_key_text, signed_by
from memlens.policy.context import PolicyModel, RuleContext, RuleResult

NAME = "require_signature"


class RequireSignature(PolicyModel):
    public_key: str = Field(..., description="Ed25519 public key of the trusted audit job (base64 of 32 bytes, or "
                                             "PEM text or file)")

    @model_validator(mode="after")
    def _key(self) -> "RequireSignature":
        try:
            parse_public_key(self.public_key)
        except MemlensError as exc:
            raise ValueError(str(exc)) from None
        return self


SETTING = (RequireSignature | None, Field(
    None, description="accept only audits signed by this key (memlens audit --sign-key), of run records signed by it "
                      "too"))


def check(ctx: RuleContext, setting: RequireSignature) -> list[RuleResult]:
    summary = ctx.audit.summary
    block = summary.integrity or {}
    sig = block.get("signature")
    want = public_key_text(parse_public_key(setting.public_key))
    ok = signed_by(block, setting.public_key)  # the signature itself was verified when the audit was read
    observed = "unsigned" if not sig else ("signed by the trusted key" if ok else
                                           f"signed by another key ({sig.get('public_key', '?')[:12]}...)")
    out = [ctx.result(NAME, f"signed by {want[:12]}...", observed, ok,
                      "" if ok else "only audits signed by the trusted job (memlens audit --sign-key) pass this "
                                    "policy")]
    runs = [e for e in summary.encoders if e.source == "run"]
    unsigned = [e.label for e in runs if e.run_signed_by != want]
    if runs:
        out.append(ctx.result(f"{NAME}[runs]", f"every run record signed by {want[:12]}...",
                              "all signed" if not unsigned else f"not signed by it: {', '.join(unsigned[:5])}",
                              not unsigned, "" if not unsigned else
                              "run records carry the DP guarantee and the membership the audit relied on; sign them "
                              "in the trusted training job (memlens train/run --sign-key)"))
    return out
