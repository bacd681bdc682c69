"""The audit in a few lines of plain text: what ``memlens audit`` prints when it has written one."""

from __future__ import annotations

from pathlib import Path

from memlens.audit.results import AuditSummary, calibration_sentence, skipped_sentence


def audit_lines(s: AuditSummary, out: Path) -> list[str]:
    """Where the audit went and its headline findings: subsets, calibration and the memorized list,
    the ranking's reliability over views and over encoders, the tests."""
    lines = [f"wrote {out} ({s.timings['total']:.1f} s, {int(s.timings['images_forwarded']):,} images forwarded, "
             f"{s.views['count']} views per point, {s.environment['device']})"]
    lines += [f"  {name}: mean SSLMem {st.mean:+.4f} (95% CI {st.ci_low:+.4f} .. {st.ci_high:+.4f}, n={st.n})"
              for name, st in s.subsets.items()]
    if skipped_sentence(s.data):
        lines.append(f"  {skipped_sentence(s.data)}")
    lines += _memorized_lines(s.inference or {}) + _reliability_lines(s)
    main_tests = [t for t in s.tests if t.method in ("welch_t", "one_sample_t") and not t.name.startswith("unitmem")]
    lines.append("  tests: " + ", ".join(f"{t.name} p={t.p_holm:.2g}" for t in main_tests if t.p_holm is not None))
    return lines


def _memorized_lines(inf: dict) -> list[str]:
    if not inf.get("family"):
        return []
    withheld = (inf.get("null") or {}).get("withheld")
    return [f"  {calibration_sentence(inf, 'SSLMem')}",
            f"  no at-risk list: {withheld}" if withheld else
            f"  memorized at FDR {inf['fdr']:g}: {inf['at_risk']} of {inf['family']} images"
            + ("" if inf.get("training_randomness_counted") else
               " (one encoder pair, no controls: training randomness not counted)")]


def _reliability_lines(s: AuditSummary) -> list[str]:
    out = []
    rel = s.reliability or {}
    if rel.get("reliability") is not None:
        out.append(f"  ranking reliability over views (split-half, Spearman-Brown): {rel['reliability']:.2f}"
                   + ("" if rel.get("meets_target") else f" (below {rel['target']:g}; about "
                      f"{rel['views_for_target']:.0f} views would reach it: --views auto)"))
    enc = s.reliability_encoders or {}
    if enc.get("reliability") is not None:
        more = "" if enc.get("meets_target") else (
            f" (below {enc['target']:g}: about {2 * enc['pairs_for_target']:.0f} encoders would reach it)"
            if enc.get("pairs_for_target") not in (None, float("inf")) else f" (below {enc['target']:g})")
        out.append(f"  ranking reliability over encoders ({enc['pairs']} pairs): {enc['reliability']:.2f}{more}")
    return out
