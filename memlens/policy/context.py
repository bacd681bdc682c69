"""What a gate rule sees and what it returns: the audit under judgement with the policy's shared
settings (:class:`RuleContext`), and one verdict row (:class:`RuleResult`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import ConfigDict

from memlens.audit.results import Audit
from memlens.config.base import Strict


class PolicyModel(Strict):
    """A section of a policy file (a rule's settings included)."""

    # A NaN threshold would pass every comparison vacuously; inf is no threshold at all.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


@dataclass
class RuleResult:
    """One row of the gate: a rule applied to an audit."""

    audit: str
    rule: str
    threshold: str
    observed: str
    passed: bool
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RuleContext:
    """An audit and the policy-wide settings every rule may read.

    Attributes:
        audit: the audit under judgement (the typed record and its tables).
        score: the SSLMem variant the candidate thresholds apply to (policy ``score``).
        alpha: significance level of the rules that ask for a significant result (policy ``alpha``).
        fdr: false discovery rate of the memorized list (policy ``fdr``).
        allow_random_init: whether encoders at their random initialisation may pass.
        pool: the audits that may serve as positive controls (the audits, then ``--control``).
        baseline: the previous release's audit, if the gate was given one.
        baseline_settings: the policy's ``baseline`` section (:class:`memlens.policy.schema.Baseline`).
        pins: sha256 of the weights being released (``--weights`` and ``require_weights``).
    """

    audit: Audit
    score: str = "sslmem_sym_norm"
    alpha: float = 0.01
    fdr: float = 0.1
    allow_random_init: bool = False
    pool: list[Audit] = field(default_factory=list)
    baseline: Audit | None = None
    baseline_settings: Any = None
    pins: list[str] = field(default_factory=list)

    def result(self, rule: str, threshold: str, observed: str, passed: bool, detail: str = "") -> RuleResult:
        """A verdict row of this audit."""
        return RuleResult(self.audit.label(), rule, threshold, observed, bool(passed), detail)


def fmt(x: float | None, digits: int = 4) -> str:
    """A number in a gate row ("n/a" for a missing or NaN one)."""
    if x is None or (isinstance(x, float) and x != x):
        return "n/a"
    return f"{x:.{digits}g}"
