"""Policy files: the thresholds an encoder must meet before release (``memlens gate``).

A policy is YAML validated by this versioned schema; unknown keys and wrong types are errors
naming the key. Every rule is optional; a rule that is absent is not checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from memlens.config import Strict, load_yaml
from memlens.errors import MemlensError
from memlens.integrity import parse_public_key


class PolicyModel(Strict):
    # A NaN threshold would pass every comparison vacuously; inf is no threshold at all.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

Score = Literal["sslmem", "sslmem_sym_norm", "sslmem_range_norm"]


class FractionAbove(PolicyModel):
    score: float = Field(..., description="a candidate counts when its score exceeds this")
    fraction: float = Field(..., ge=0, le=1, description="largest allowed share of such candidates")


class UnitLimit(PolicyModel):
    any: float | None = Field(None, ge=0, le=1, description="largest allowed UnitMem of any unit")
    per_layer: dict[str, float] = Field({}, description="largest allowed UnitMem per layer (module path)")


class UnitsAbove(PolicyModel):
    level: float = Field(0.5, ge=0, le=1)
    fraction: float = Field(..., ge=0, le=1, description="largest allowed share of units with UnitMem above level")


class RequireDP(PolicyModel):
    max_epsilon: float = Field(..., gt=0, description="every audited f encoder must be DP with at most this epsilon")
    max_delta: float | None = Field(None, gt=0, lt=1)
    secret_randomness: bool = Field(False, description="the DP noise and sampling must be secret (not seeded from "
                                                       "the recorded run seed: dp.reproducible false)")


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


class MemorizedLimit(PolicyModel):
    max_count: int | None = Field(None, ge=0, description="largest allowed number of images memorized at the FDR")
    max_fraction: float | None = Field(None, ge=0, le=1, description="largest allowed share of the candidates")

    @model_validator(mode="after")
    def _one(self) -> "MemorizedLimit":
        if self.max_count is None and self.max_fraction is None:
            raise ValueError("give max_count and/or max_fraction")
        return self


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


class TprLimit(PolicyModel):
    fpr: float = Field(0.01, gt=0, lt=1, description="false-positive rate of the attack")
    max_tpr: float = Field(..., ge=0, le=1, description="largest allowed true-positive rate at that FPR")


class Rules(PolicyModel):
    unknown_word: ClassVar[str] = "rule"

    max_mean_candidate_score: float | None = Field(None, description="largest allowed mean score of S_C")
    max_fraction_candidates_above: FractionAbove | None = None
    max_point_score: float | None = Field(None, description="largest allowed score of any single candidate")
    max_memorized: MemorizedLimit | None = Field(
        None, description="images memorized at the policy's FDR (Benjamini-Hochberg on the per-image p-values): at "
                          "most this many, or this share of the candidates")
    max_unitmem: UnitLimit | None = None
    max_fraction_units_above: UnitsAbove | None = None
    require_dp: RequireDP | None = None
    require_signature: RequireSignature | None = Field(
        None, description="accept only audits signed by this key (memlens audit --sign-key), of run records signed "
                          "by it too")
    require_weights: RequireWeights | None = Field(
        None, description="pin the weights being released: the audit must have audited one of these files")
    require_power: bool = Field(
        False, description="the audit must have had the power to see memorization: its positive control (canaries "
                           "detected in the non-private reference of the same recipe, or in the audit itself) must be "
                           "significant at alpha; when it is, an encoder that shows no memorization passes")
    require_natural_signal: bool = Field(
        False, description="the S_C > S_S test must be significant (Holm-corrected, Welch): the encoder must "
                           "measurably memorize its own natural images (formerly require_signal)")
    max_membership_auc: float | None = Field(None, ge=0, le=1, description="largest allowed membership-inference AUC "
                                                                       "(canaries, else natural S_C vs S_E)")
    max_tpr_at_fpr: TprLimit | None = None
    max_empirical_epsilon: float | None = Field(None, ge=0, description="largest allowed empirical epsilon lower "
                                                                        "bound from the canaries")
    empirical_within_claimed: bool = Field(
        False, description="an empirical epsilon lower bound above the accountant's epsilon is a DP bug: always fail")


class Increases(PolicyModel):
    """Largest allowed increase over the baseline (the previous release's audit)."""

    mean_candidate_score: float | None = Field(None, ge=0, description="mean score of S_C")
    at_risk_count: int | None = Field(None, ge=0, description="candidates above the at-risk score")
    membership_auc: float | None = Field(None, ge=0, description="membership-inference AUC (primary score)")
    empirical_epsilon: float | None = Field(None, ge=0, description="empirical epsilon lower bound")
    top_layer_unitmem: float | None = Field(None, ge=0, description="mean UnitMem of the layer highest in the "
                                                                    "baseline")


# what `memlens gate --baseline` applies when the policy has no rules on change: a release may not make
# membership inference easier by more than 0.02 AUC, the empirical epsilon rise by more than 0.25, or the
# candidates' mean score rise by more than 0.01
DEFAULT_INCREASES = Increases(membership_auc=0.02, empirical_epsilon=0.25, mean_candidate_score=0.01)


class Baseline(PolicyModel):
    path: str | None = Field(None, description="the previous release's audit directory (--baseline overrides)")
    at_risk_score: float = Field(0.2, description="a candidate is at risk when its score exceeds this")
    max_increase: Increases = Increases()


class Policy(PolicyModel):
    version: Literal[1] = 1
    name: str = "policy"
    description: str = ""
    score: Score = Field("sslmem_sym_norm", description="which SSLMem the candidate thresholds apply to")
    alpha: float = Field(0.01, gt=0, lt=1, description="significance level of require_power and "
                                                       "require_natural_signal")
    fdr: float = Field(0.1, gt=0, lt=1, description="false discovery rate of the at-risk list (max_memorized, the "
                                                    "report's list)")
    rules: Rules
    baseline: Baseline | None = Field(None, description="rules on change against the previous release")
    allow_random_init: bool = Field(False, description="let audits of encoders at their random initialisation "
                                                       "(weights: none) pass; by default they fail")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        rules = data.get("rules") if isinstance(data, dict) else None
        for section in ("baseline", "score", "alpha", "fdr", "name"):
            if isinstance(rules, dict) and section in rules:
                raise ValueError(f"rules.{section}: {section} is a top-level setting of the policy, not a rule; move "
                                 f"it out of rules (beside rules:)")
        if isinstance(rules, dict) and "require_signal" in rules:
            raise ValueError("rules.require_signal was replaced: require_power (the audit could see memorization: its "
                             "canary positive control is significant) is what a release gate needs; the old rule is "
                             "require_natural_signal")
        return data

    @model_validator(mode="after")
    def _something(self) -> "Policy":
        changes = self.baseline is not None and self.baseline.max_increase.model_dump(exclude_none=True)
        if not self.rules.model_dump(exclude_none=True, exclude_defaults=True) and not changes:
            raise ValueError("the policy has no rules (neither rules: nor baseline.max_increase:)")
        return self


def load_policy(path: str | Path) -> Policy:
    return load_yaml(Policy, path)
