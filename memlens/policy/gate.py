"""Evaluate a policy against audits: one row per rule and audit, pass or fail."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from memlens.audit.results import Audit
from memlens.io import atomic_write_bytes, atomic_write_text
from memlens.policy.schema import Policy


@dataclass
class RuleResult:
    audit: str
    rule: str
    threshold: str
    observed: str
    passed: bool
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


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


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}g}"


def audit_label(audit: Audit) -> str:
    eps = audit.summary.dp_epsilon
    return f"{audit.path.name} (epsilon {'inf' if eps is None else f'{eps:.3g}'})"


def evaluate(policy: Policy, audits: list[Audit]) -> GateResult:
    rows: list[RuleResult] = []
    r = policy.rules
    for audit in audits:
        name = audit_label(audit)
        s = audit.summary
        cand = audit.points[audit.points["subset"] == "S_C"][policy.score].to_numpy(dtype=float)
        units = audit.units

        def add(rule: str, threshold: str, observed: str, ok: bool, detail: str = "", name: str = name) -> None:
            rows.append(RuleResult(name, rule, threshold, observed, bool(ok), detail))

        if r.require_signal:
            welch = next((t for t in s.tests if t.name == "C>S" and t.method == "welch_t"), None)
            p = welch.p_holm if welch is not None else None
            ok = p is not None and not math.isnan(p) and p < policy.alpha
            add("require_signal", f"S_C > S_S significant at {policy.alpha:g}", f"p = {_fmt(p, 3)} (Holm)", ok,
                "" if ok else "no significant memorization signal: the audit cannot vouch for the encoder")
        if r.max_mean_candidate_score is not None:
            m = float(np.mean(cand)) if len(cand) else float("nan")
            add("max_mean_candidate_score", f"<= {r.max_mean_candidate_score:g} ({policy.score})", _fmt(m),
                m <= r.max_mean_candidate_score)
        if r.max_fraction_candidates_above is not None:
            rule = r.max_fraction_candidates_above
            frac = float(np.mean(cand > rule.score)) if len(cand) else float("nan")
            add("max_fraction_candidates_above", f"<= {rule.fraction:.1%} above {rule.score:g}", f"{frac:.1%}",
                frac <= rule.fraction)
        if r.max_point_score is not None:
            top = float(np.max(cand)) if len(cand) else float("nan")
            worst = audit.points[audit.points["subset"] == "S_C"].sort_values(policy.score).iloc[-1]["id"] \
                if len(cand) else ""
            add("max_point_score", f"<= {r.max_point_score:g}", _fmt(top), top <= r.max_point_score,
                f"highest: {worst}")
        if r.max_unitmem is not None:
            if r.max_unitmem.any is not None:
                top = float(units["unitmem"].max())
                add("max_unitmem.any", f"<= {r.max_unitmem.any:g}", _fmt(top), top <= r.max_unitmem.any)
            for layer, limit in r.max_unitmem.per_layer.items():
                sel = units[units["layer"] == layer]["unitmem"]
                if sel.empty:
                    add(f"max_unitmem[{layer}]", f"<= {limit:g}", "layer not found", False,
                        f"the audited encoder has no layer '{layer}'")
                else:
                    add(f"max_unitmem[{layer}]", f"<= {limit:g}", _fmt(float(sel.max())), float(sel.max()) <= limit)
        if r.max_fraction_units_above is not None:
            rule = r.max_fraction_units_above
            frac = float((units["unitmem"] > rule.level).mean())
            add("max_fraction_units_above", f"<= {rule.fraction:.1%} above {rule.level:g}", f"{frac:.1%}",
                frac <= rule.fraction)
        if r.require_dp is not None:
            eps = [run.epsilon for run in s.runs if run.side == "f"]
            deltas = [run.delta for run in s.runs if run.side == "f"]
            private = all(e is not None for e in eps)
            worst = max(eps) if private else math.inf
            ok = private and worst <= r.require_dp.max_epsilon
            thr = f"DP, epsilon <= {r.require_dp.max_epsilon:g}"
            if r.require_dp.max_delta is not None:
                thr += f", delta <= {r.require_dp.max_delta:g}"
                ok = ok and max(d for d in deltas) <= r.require_dp.max_delta
            add("require_dp", thr, "not private" if not private else f"epsilon {worst:.3g}, delta {max(deltas):.3g}",
                ok)
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
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def to_markdown(result: GateResult) -> str:
    verdict = "PASSED" if result.passed else "FAILED"
    lines = [f"### memlens gate: {verdict} (policy `{_md(result.policy)}`)", "",
             "| audit | rule | threshold | observed | result |", "| --- | --- | --- | --- | --- |"]
    for r in result.results:
        lines.append(f"| {_md(r.audit)} | {_md(r.rule)} | {_md(r.threshold)} | {_md(r.observed)} | "
                     f"{'pass' if r.passed else '**FAIL**'} |")
    fails = [r for r in result.results if not r.passed and r.detail]
    if fails:
        lines += [""] + [f"- {_md(r.audit)}: {_md(r.detail)}" for r in fails]
    return "\n".join(lines) + "\n"


def write_markdown(result: GateResult, path: str | Path) -> None:
    atomic_write_text(path, to_markdown(result))
