"""A "Privacy and memorization" section for a model card (Hugging Face style markdown).

Built from verified audit directories (their tables are checked against audit.json), so the card
cites the exact audit it summarises by sha256. Markdown that reads right as plain text too.
"""

from __future__ import annotations

import math
from pathlib import Path

from memlens.audit.results import Audit, calibration_sentence, read_audit, skipped_sentence, units_sentence
from memlens.io import atomic_write_text, sha256_file
from memlens.policy.gate import GateResult, evaluate
from memlens.policy.schema import Policy


def _num(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def _dp_line(audit: Audit) -> str:
    s = audit.summary
    f = s.attacked
    if not f or any(r.epsilon is None for r in f):
        return "Trained **without** differential privacy (no formal guarantee; epsilon = infinity)."
    r = max(f, key=lambda r: r.epsilon)
    how = "declared by the model's owner, not checked by memlens" if r.dp_declared else (
        f"DP-SGD, {r.accountant.upper() if r.accountant else '?'} accounting of {r.steps} steps, noise multiplier "
        f"{_num(r.noise_multiplier, 4)}, sample rate {r.sample_rate:.4g}, clipping norm {r.max_grad_norm}")
    return f"Trained with differential privacy: **({r.epsilon:.3g}, {r.delta:.2g})-DP** ({how})."


def model_card_section(audits: list[Audit], *, gate: GateResult | None = None, policy: Policy | None = None,
                       report_sha256: str | None = None) -> str:
    """The markdown section (see the module docstring)."""
    lines = ["## Privacy and memorization", ""]
    first = audits[0].summary
    lines.append(f"Audited with memlens {first.memlens_version}: per-image "
                 f"memorization (SSLMem, Wang et al. ICLR 2024), its localization to layers and units (LayerMem, "
                 f"UnitMem, Wang et al. NeurIPS 2024), membership inference and, where canaries were planted, an "
                 f"empirical epsilon lower bound (Steinke et al. 2023; Mahloujifar et al. 2024).")
    lines.append("")
    for audit in audits:
        lines += _audit_lines(audit, gate=gate, policy=policy) + [""]
    if report_sha256:
        lines += [f"Compliance report sha256: `{report_sha256}`.", ""]
    lines.append("Limitations: an audit measures memorization with the augmentations, encoders and canaries it used; "
                 "an empirical epsilon is a lower bound, the accountant's epsilon the guarantee.")
    return "\n".join(lines) + "\n"


def _audit_lines(audit: Audit, *, gate: GateResult | None, policy: Policy | None) -> list[str]:
    """One audit's bullet points: privacy, memorization, the gate's verdict and the audit's provenance."""
    s = audit.summary
    lines = [f"### {audit.label()}", "", f"- {_dp_line(audit)}"]
    lines += _privacy_lines(audit) + _memorization_lines(audit, policy)
    if gate is not None:
        verdict = gate.verdicts().get(audit.label())
        if verdict is not None:
            lines.append(f"- Release gate (policy `{gate.policy}`): **{'PASSED' if verdict else 'FAILED'}**"
                         + ("" if verdict else ": " + "; ".join(
                             f"{r.rule} ({r.observed}, required {r.threshold})" for r in gate.results
                             if r.audit == audit.label() and not r.passed)) + ".")
    sig = (s.integrity or {}).get("signature")
    lines.append(f"- Audit: `{audit.path.name}`, record digest `{audit.digest}`"
                 + (f", **signed** (Ed25519) by `{sig['public_key']}`" if sig else ", not signed")
                 + f"; audit.json sha256 `{audit.sha256}`, data fingerprint `{s.data['fingerprint'][:16]}`, "
                   f"splits hash `{s.splits['hash'][:16]}`.")
    if any(e.weights == "random-init" for e in s.encoders):
        lines.append("- **Warning**: an encoder was audited at its random initialisation (weights: none).")
    reproducible = [e.label for e in s.attacked if e.dp_randomness == "reproducible"]
    if reproducible:
        lines.append(f"- **Warning**: {', '.join(reproducible)} trained with reproducible DP randomness: the "
                     f"guarantee holds only while the run records stay private.")
    return lines


def _privacy_lines(audit: Audit) -> list[str]:
    """Canaries, the empirical epsilon and natural membership inference."""
    lines: list[str] = []
    priv = audit.summary.privacy or {}
    canaries = (priv.get("canaries") or {})
    metrics = canaries.get("metrics") or {}
    primary = priv.get("primary_score")
    if metrics and primary in metrics:
        m = metrics[primary]
        t1 = m["tpr_at"][0]
        lines.append(f"- Canaries: {canaries['m']} planted ({canaries['n_in']} trained on). Membership inference "
                     f"AUC {_num(m['auc'])} (95% CI {_num(m['auc_ci'][0])} to {_num(m['auc_ci'][1])}); TPR "
                     f"{t1['tpr']:.1%} at {t1['fpr']:.0%} FPR.")
        b = priv.get("epsilon_lower_bound")
        if b:
            claim = priv.get("claimed_epsilon")
            rel = "" if claim is None else (" (within the claimed epsilon)" if b["epsilon"] <= claim else
                                            " (**exceeds the claimed epsilon**)")
            lines.append(f"- Empirical epsilon lower bound: **{_num(b['epsilon'], 2)}** at "
                         f"{b.get('confidence_overall', b['confidence']):.0%} confidence, delta "
                         f"{b['delta']:.2g}{rel}.")
    nat = priv.get("natural") or {}
    natural = (nat.get("metrics") or {}).get(primary or "sslmem")
    if natural:
        lines.append(f"- Membership inference on natural training images ({nat.get('members', 'S_C')} vs "
                     f"{nat.get('non_members', 'S_E')}): AUC {_num(natural['auc'])}.")
    return lines


def _memorization_lines(audit: Audit, policy: Policy | None) -> list[str]:
    """The candidates' mean, the calibrated list, the ranking's reliability and the units."""
    s, lines = audit.summary, []
    sc = s.subsets.get("S_C")
    welch = audit.natural_signal_test()
    what = "S_C > S_S" if welch is None or welch.name == "C>S" else "S_C memorization > controls'"
    if sc is not None:
        lines.append(f"- Memorization of candidate training images (mean SSLMem): {sc.mean:+.4f} (95% CI "
                     f"{sc.ci_low:+.4f} to {sc.ci_high:+.4f}); {what} "
                     + ("significant" if welch and welch.p_holm is not None and welch.p_holm < 0.01 else
                        "not significant") + (f" (Holm p = {welch.p_holm:.3g})." if welch and
                                               welch.p_holm is not None else "."))
    fdr = policy.fdr if policy else (s.inference or {}).get("fdr", 0.1)
    found = audit.memorized_at(fdr)
    inf = s.inference or {}
    lines.append(f"- {calibration_sentence(inf, 'SSLMem')}")
    withheld = (inf.get("null") or {}).get("withheld")
    if withheld:
        lines.append(f"- No list of memorized images: {withheld}.")
    elif found is not None:
        counted = inf.get("training_randomness_counted")
        lines.append(f"- Images memorized at a false discovery rate of {fdr:g}: **{len(found[0])} of "
                     f"{found[1]}**" + ("." if counted else " (one encoder pair, no controls: training "
                                                           "randomness not counted)."))
    rel = s.reliability or {}
    enc = s.reliability_encoders or {}
    if rel.get("reliability") is not None:
        lines.append(f"- Per-image ranking reliability (split-half): {_num(rel['reliability'], 2)} over "
                     f"{rel['views']} views" + (f", {_num(enc['reliability'], 2)} over {enc['pairs']} encoder "
                                                f"pairs (retraining)" if enc.get("reliability") is not None
                                                else "") + ".")
    u = s.units
    if u.get("frac_above_half") is not None:
        lines.append(f"- {units_sentence(u)}")
    if skipped_sentence(s.data):
        lines.append(f"- {skipped_sentence(s.data)}")
    return lines


def write_card(audit_dirs: list[str | Path], out: str | Path | None, *, policy: Policy | None = None,
               report: str | Path | None = None) -> str:
    """Read and verify the audits, evaluate the policy, write (and return) the card section."""

    audits = [read_audit(p) for p in audit_dirs]
    gate = evaluate(policy, audits) if policy else None
    text = model_card_section(audits, gate=gate, policy=policy,
                              report_sha256=sha256_file(report) if report else None)
    if out is not None:
        atomic_write_text(out, text)
    return text
