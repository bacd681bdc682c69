"""Policy files: the thresholds an encoder must meet before release (``memlens gate``).

A policy is YAML validated by this versioned schema; unknown keys and wrong types are errors
naming the key. Every rule is optional; a rule that is absent is not checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from memlens.config import Strict, load_yaml

Score = Literal["sslmem", "sslmem_sym_norm", "sslmem_range_norm"]


class FractionAbove(Strict):
    score: float = Field(..., description="a candidate counts when its score exceeds this")
    fraction: float = Field(..., ge=0, le=1, description="largest allowed share of such candidates")


class UnitLimit(Strict):
    any: float | None = Field(None, ge=0, le=1, description="largest allowed UnitMem of any unit")
    per_layer: dict[str, float] = Field({}, description="largest allowed UnitMem per layer (module path)")


class UnitsAbove(Strict):
    level: float = Field(0.5, ge=0, le=1)
    fraction: float = Field(..., ge=0, le=1, description="largest allowed share of units with UnitMem above level")


class RequireDP(Strict):
    max_epsilon: float = Field(..., gt=0, description="every audited f encoder must be DP with at most this epsilon")
    max_delta: float | None = Field(None, gt=0, lt=1)


class Rules(Strict):
    max_mean_candidate_score: float | None = Field(None, description="largest allowed mean score of S_C")
    max_fraction_candidates_above: FractionAbove | None = None
    max_point_score: float | None = Field(None, description="largest allowed score of any single candidate")
    max_unitmem: UnitLimit | None = None
    max_fraction_units_above: UnitsAbove | None = None
    require_dp: RequireDP | None = None
    require_signal: bool = Field(
        True, description="the S_C > S_S test must be significant (Holm-corrected, Welch) for the audit to count: "
                          "an audit that detects nothing is not evidence of safety")


class Policy(Strict):
    version: Literal[1] = 1
    name: str = "policy"
    description: str = ""
    score: Score = Field("sslmem_sym_norm", description="which SSLMem the candidate thresholds apply to")
    alpha: float = Field(0.01, gt=0, lt=1, description="significance level of require_signal")
    rules: Rules

    @model_validator(mode="after")
    def _something(self) -> "Policy":
        if not self.rules.model_dump(exclude_none=True, exclude_defaults=True) and not self.rules.require_signal:
            raise ValueError("the policy has no rules")
        return self


def load_policy(path: str | Path) -> Policy:
    return load_yaml(Policy, path)
