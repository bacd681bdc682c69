"""The gate's rules by name, in the order the gate applies them (as Opacus maps accountant names to
accountant classes). The policy schema's ``rules:`` section is built from this table
(:mod:`memlens.policy.schema`), so a policy can name exactly the rules listed here."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

from memlens.policy.context import RuleContext, RuleResult
from memlens.policy.rules import (
    baseline,
    empirical_within_claimed,
    max_empirical_epsilon,
    max_fraction_candidates_above,
    max_fraction_units_above,
    max_mean_candidate_score,
    max_membership_auc,
    max_memorized,
    max_point_score,
    max_tpr_at_fpr,
    max_unitmem,
    require_calibrated_null,
    require_dp,
    require_natural_signal,
    require_power,
    require_signature,
    require_weights,
    weights_loaded,
)


@dataclass(frozen=True)
class Rule:
    """A gate rule: its name, its setting under ``rules:`` (a pydantic field, None for a rule configured
    elsewhere) and the check that turns an audit into verdict rows."""

    name: str
    setting: tuple[Any, Any] | None
    check: Callable[[RuleContext, Any], list[RuleResult]]
    always: bool = False  # applied even when the policy leaves its setting unset

    def applies(self, value: Any) -> bool:
        return self.always or self.setting is None or (value is not None and value is not False)


def _rule(module: ModuleType) -> Rule:
    return Rule(module.NAME, module.SETTING, module.check, getattr(module, "ALWAYS", False))


RULES: dict[str, Rule] = {r.name: r for r in map(_rule, (
    require_weights,
    weights_loaded,
    require_power,
    require_natural_signal,
    max_membership_auc,
    max_tpr_at_fpr,
    max_empirical_epsilon,
    empirical_within_claimed,
    max_mean_candidate_score,
    max_fraction_candidates_above,
    max_point_score,
    max_memorized,
    require_calibrated_null,
    max_unitmem,
    max_fraction_units_above,
    require_dp,
    require_signature,
    baseline,
))}
