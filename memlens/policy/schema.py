"""Policy files: the thresholds an encoder must meet before release (``memlens gate``).

A policy is YAML validated by this versioned schema; unknown keys and wrong types are errors
naming the key. Every rule is optional; a rule that is absent is not checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, create_model, model_validator

from memlens.config import load_yaml
from memlens.policy.context import PolicyModel
from memlens.policy.registry import RULES

Score = Literal["sslmem", "sslmem_sym_norm", "sslmem_range_norm"]


class _RulesBase(PolicyModel):
    """The ``rules:`` section: one optional key per rule of :data:`memlens.policy.registry.RULES`."""

    unknown_word: ClassVar[str] = "rule"


# One field per registered rule with a setting, in the gate's order: a rule module declares its own.
Rules = create_model("Rules", __base__=_RulesBase, __module__=__name__,
                     **{name: rule.setting for name, rule in RULES.items() if rule.setting is not None})


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
