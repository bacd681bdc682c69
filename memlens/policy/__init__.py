"""Policies and the release gate."""

from memlens.policy.gate import GateResult, evaluate, to_junit, to_markdown
from memlens.policy.schema import Policy, load_policy

__all__ = ["GateResult", "Policy", "evaluate", "load_policy", "to_junit", "to_markdown"]
