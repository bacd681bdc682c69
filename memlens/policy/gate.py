"""Evaluate a policy against audits: one row per rule and audit, pass or fail, and the gate's outputs
(JUnit XML for CI, Markdown for a job summary). The rules themselves are in :mod:`memlens.policy.rules`."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from memlens.audit.results import Audit
from memlens.io import atomic_write_bytes, atomic_write_text
from memlens.policy.context import RuleContext, RuleResult
from memlens.policy.registry import RULES
from memlens.policy.schema import Policy


@dataclass
class GateResult:
    policy: str
    results: list[RuleResult]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def verdicts(self) -> dict[str, bool]:
        """Pass/fail per audit, in the order the audits were given."""
        out: dict[str, bool] = {}
        for r in self.results:
            out[r.audit] = out.get(r.audit, True) and r.passed
        return out


def evaluate(policy: Policy, audits: list[Audit], *, controls: list[Audit] | None = None,
             baseline: Audit | None = None, weights_sha256: list[str] | None = None) -> GateResult:
    """Check every audit against every rule of the policy (:data:`memlens.policy.registry.RULES`, in
    its order).

    Args:
        controls: more audits that may serve as positive controls for ``require_power`` (the
            audits themselves are searched first).
        baseline: the previous release's audit, for the policy's ``baseline.max_increase`` rules.
        weights_sha256: the weights being released (``memlens gate --weights``, or the policy's
            ``require_weights``): an audit passes only if it audited one of them as the released encoder.

    Raises:
        MemlensError: a baseline of other data or splits.
    """
    pool = list(audits) + list(controls or [])
    rows: list[RuleResult] = []
    for audit in audits:
        ctx = RuleContext(audit=audit, score=policy.score, alpha=policy.alpha, fdr=policy.fdr,
                          allow_random_init=policy.allow_random_init, pool=pool, baseline=baseline,
                          baseline_settings=policy.baseline, pins=list(weights_sha256 or []))
        for name, rule in RULES.items():
            setting = getattr(policy.rules, name, None)
            if rule.applies(setting):
                rows += rule.check(ctx, setting)
    return GateResult(policy.name, rows)


def to_junit(result: GateResult, path: str | Path) -> None:
    suite = ET.Element("testsuite", name=f"memlens gate: {result.policy}", tests=str(len(result.results)),
                       failures=str(sum(not r.passed for r in result.results)))
    for r in result.results:
        case = ET.SubElement(suite, "testcase", classname=r.audit, name=r.rule)
        if not r.passed:
            fail = ET.SubElement(case, "failure", message=f"observed {r.observed}, required {r.threshold}")
            fail.text = r.detail or f"{r.rule}: observed {r.observed}, required {r.threshold}"
        else:
            ET.SubElement(case, "system-out").text = f"observed {r.observed}, required {r.threshold}"
    data = ET.tostring(ET.ElementTree(suite).getroot(), encoding="utf-8", xml_declaration=True)
    atomic_write_bytes(path, data)


def _md(text: str) -> str:
    """A table cell that reads right both rendered and as plain text (a job summary, a terminal):
    pipes escaped, and markup-like angle brackets escaped with a backslash instead of HTML entities."""
    text = str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
    text = text.replace("<=", "≤").replace(">=", "≥")
    return text.replace("<", "\\<").replace(">", "\\>")


def to_markdown(result: GateResult) -> str:
    verdict = "PASSED" if result.passed else "FAILED"
    lines = [f"### memlens gate: {verdict} (policy `{_md(result.policy)}`)", ""]
    verdicts = result.verdicts()
    if len(verdicts) > 1:
        lines += [f"- {_md(a)}: {'passed' if ok else '**FAILED**'}" for a, ok in verdicts.items()] + [""]
    lines += ["| audit | rule | threshold | observed | result |", "| --- | --- | --- | --- | --- |"]
    for r in result.results:
        lines.append(f"| {_md(r.audit)} | {_md(r.rule)} | {_md(r.threshold)} | {_md(r.observed)} | "
                     f"{'pass' if r.passed else '**FAIL**'} |")
    fails = [r for r in result.results if not r.passed and r.detail]
    if fails:
        lines += [""] + [f"- {_md(r.audit)}, {_md(r.rule)}: {_md(r.detail)}" for r in fails]
    return "\n".join(lines) + "\n"


def write_markdown(result: GateResult, path: str | Path) -> None:
    atomic_write_text(path, to_markdown(result))
