"""The versioned schema of ``audit.json`` and the reader used by reports and the gate."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

from memlens.audit.signals import SIGNALS_FILE, write_signals
from memlens.audit.stats import Consistency, TestResult
from memlens.config import AuditConfig, format_validation_error
from memlens.errors import MemlensError
from memlens.integrity import read_verified, stamp, verify
from memlens.io import atomic_write_text, directory_mode, dumps, read_json, sha256_bytes, sha256_file

AUDIT_FILE = "audit.json"
TABLES = ("points", "layers", "units", "tests")


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class EncoderInput(Model):
    """One audited encoder, where it came from, and its privacy facts."""

    label: str
    side: Literal["f", "g", "ref", "target"]
    source: str = Field(..., description="run, timm, py or module")
    spec: str | None = None
    path: str | None = None
    seed: int | None = None
    status: str | None = None
    weights_sha256: str | None = None
    run_json_sha256: str | None = None
    run_signed_by: str | None = None  # the public key that signed the run record (verified when read)
    representation: str
    input_size: int
    parameters: int
    epsilon: float | None = None
    delta: float | None = None
    dp_declared: bool = False
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int | None = None
    max_grad_norm: float | None = None
    accountant: str | None = None
    poisson: bool | None = None
    coupling: str | None = None
    dp_randomness: str | None = None  # "secret" or "reproducible" (memlens runs under DP)
    weights: str | None = None  # "loaded", or "random-init" (allowed explicitly, failed by the gate)
    probe_accuracy: float | None = None
    train_points: int | None = None
    wall_seconds: float | None = None
    load: dict[str, Any] | None = None
    reference: int | None = None


class Record(BaseModel):
    """A block of audit.json's findings: typed fields for what memlens writes, any other key kept (a
    newer memlens's audit stays readable here). Written back with the keys it was given only, so a
    record reads and writes unchanged; readable as a mapping too (``facts["family"]``, ``.get``) for
    code written against audit.json's dictionaries."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    @model_serializer(mode="wrap")
    def _as_given(self, handler):
        data = handler(self)
        return {k: v for k, v in data.items() if k in self.model_fields_set or k in (self.model_extra or {})}

    def __getitem__(self, key: str) -> Any:
        if key in type(self).model_fields or key in (self.model_extra or {}):
            return getattr(self, key)
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        value = getattr(self, key, None) if key in type(self).model_fields else (self.model_extra or {}).get(key)
        return default if value is None else value

    def __contains__(self, key: str) -> bool:
        return key in self.model_fields_set or key in (self.model_extra or {})


class Uniformity(Record):
    """How uniform null p-values are (:func:`memlens.audit.nulls.uniformity`)."""

    n: int
    below_05: float
    below_01: float | None = None
    ks_p: float | None = None
    excess_p: float | None = None
    interval_05: list[float] = []


class SelfCheck(Uniformity):
    """The null's self-check on the controls: those in every encoder against those in none."""

    null_at_risk: int = 0
    passed: bool


class NullFacts(Record):
    """Where the per-image p-values come from: the control images' null (``controls``) or the model's."""

    method: Literal["controls", "model"]
    controls: int = 0
    in_every_encoder: int | None = None
    in_no_encoder: int | None = None
    labellings: int | None = None
    statistic: str | None = None
    smallest_p: float | None = None
    can_list: bool | None = None
    listable_from: int | None = None
    model_check: Uniformity | None = None
    self_check: SelfCheck | None = None
    self_check_note: str | None = None
    withheld: str | None = None  # why the list was withheld (the self-check failed)


class InferenceFacts(Record):
    """Per-image inference (:func:`memlens.audit.inference.per_image`): the design of the estimate, its
    null, and the list at the FDR."""

    pairs: int = 0
    encoders: int | None = None
    paired: bool | None = None
    residual_df: float | None = None
    fdr: float | None = None
    confidence: float | None = None
    interval_counts_training: bool | None = None
    prior_df: float | None = None
    prior_var: float | None = None
    null: NullFacts | None = None
    training_randomness_counted: bool | None = None
    family: int | None = None  # images in the FDR family
    at_risk: int | None = None  # images listed at the FDR
    method: str | None = None  # the estimate and its p-value in words


class EncoderReliabilityFacts(Record):
    """How reliable the per-image ranking is over retraining (pairs of encoders)."""

    pairs: int
    split_half_r: float | None = None
    reliability: float | None = None
    target: float | None = None
    at_risk_overlap: float | None = None
    top10_overlap: float | None = None
    pairs_for_target: float | None = None
    views_for_target: float | None = None
    components: dict[str, float] | None = None
    meets_target: bool | None = None


class LossMemorization(Record):
    """Per-image memorization by the training loss (MAE reconstruction, cross-entropy)."""

    loss: str
    inference: InferenceFacts
    reliability_encoders: EncoderReliabilityFacts | None = None
    at_risk_points: list[dict[str, Any]] = []


class ViewReliability(Record):
    """How reliable the per-image ranking is over the views' randomness (split-half, Spearman-Brown)."""

    views: int
    pairing: str | None = None
    n_points: int | None = None
    split_half_r: float | None = None
    reliability: float | None = None
    target: float | None = None
    views_for_target: float | None = None
    top_k: int | None = None
    topk_overlap_mean: float | None = None
    topk_overlap_ci: list[float] | None = None
    bootstrap: int | None = None
    stable_fraction: float | None = None
    history: list[dict[str, Any]] = []
    meets_target: bool | None = None


class UnitNullFacts(Record):
    """The units' permutation null (:func:`memlens.audit.unitmem.unitmem_null_p`)."""

    method: str
    members: int
    non_members: int
    permutations: int
    alpha: float


class UnitFacts(Record):
    """UnitMem over the units encoder's ranked units, and how many beat their own null."""

    n: int | None = None
    ranked: int | None = None
    set_aside: dict[str, int] = {}
    min_activation: float | None = None
    signed: str | None = None
    d_prime: list[str] = []
    d_prime_size: int | None = None
    mean: float | None = None
    median: float | None = None
    frac_above_half: float | None = None
    max: float | None = None
    classmem_mean: float | None = None
    top_least_k: int | None = None
    null: UnitNullFacts | None = None
    tested: int | None = None
    flagged: int | None = None
    frac_flagged: float | None = None
    chance_interval: list[float] | None = None
    excess_p: float | None = None


class ViewFacts(Record):
    count: int
    pairing: str
    auto: bool = False
    pairs_per_point: int | None = None


class TprAt(Record):
    """The attack's true-positive rate at one false-positive rate, read off the ROC with ties."""

    fpr: float
    tpr: float
    ci_low: float | None = None
    ci_high: float | None = None
    threshold: float | None = None
    resolvable: bool = True
    note: str = ""


class AttackMetrics(Record):
    """One membership score's attack: AUC with its interval, TPR at low FPR, the ROC, Mann-Whitney p."""

    score: str
    n_in: int
    n_out: int
    auc: float
    auc_ci: list[float] = []
    tpr_at: list[TprAt] = []
    roc_fpr: list[float] = []
    roc_tpr: list[float] = []
    mann_whitney_p: float | None = None


class MembershipFacts(Record):
    """Membership inference on natural images: who counts as member and non-member, each score's attack."""

    members: str | None = None
    non_members: str | None = None
    metrics: dict[str, AttackMetrics] = {}


class CanaryFacts(Record):
    """The canary set the audit scored, its digests, and each score's attack on it."""

    path: str | None = None
    sha256: str | None = None
    m: int | None = None
    membership_sha256: str | None = None
    set_file_sha256: str | None = None
    kinds: list[str] = []
    n_in: int | None = None
    n_out: int | None = None
    targets: int | None = None
    metrics: dict[str, AttackMetrics] = {}


class EpsilonBound(Record):
    """An empirical epsilon lower bound from the canaries (:mod:`memlens.audit.privacy`)."""

    method: str
    epsilon: float
    confidence: float
    delta: float | None = None
    strategy: str | None = None
    m: int | None = None
    guesses: int | None = None
    correct: int | None = None
    thresholds_tried: int | None = None
    target: int | None = None
    targets: int | None = None
    confidence_overall: float | None = None


class PrivacyFindings(Record):
    """Empirical privacy: the membership scores, their attacks on natural images and canaries, the epsilon
    lower bound against the accountant's epsilon."""

    primary_score: str | None = None
    delta: float | None = None
    confidence: float | None = None
    claimed_epsilon: float | None = None
    claimed_delta: float | None = None
    design: str | None = None
    targets: list[str] = []
    references_per_target: list[int] = []
    coupled_reference: bool | None = None
    scores: dict[str, str] = {}
    calibration: dict[str, Any] = {}
    natural: MembershipFacts | None = None
    epsilon_lower_bound: EpsilonBound | None = None
    epsilon_lower_bound_other: EpsilonBound | None = None
    canaries: CanaryFacts | None = None


class SubsetStats(Model):
    n: int
    mean: float
    std: float
    median: float
    ci_low: float
    ci_high: float
    mean_range_norm: float
    mean_sym_norm: float
    mean_align_f: float
    mean_align_g: float
    # offset-free: the subset's mean memorization minus the control images' (same labellings), with the
    # Welch interval of that difference (None for subsets without a contrast, e.g. S_S and S_E)
    mem_mean: float | None = None
    mem_ci_low: float | None = None
    mem_ci_high: float | None = None


class LayerRow(Model):
    layer: str
    kind: str
    depth: int
    block: int
    units: int
    unit_kind: str
    layermem: float
    delta_layermem: float | None
    layermem_top: float
    layermem_least: float
    delta_layermem_top: float | None
    units_measured: bool
    units_ranked: int | None = None
    units_silent: int | None = None
    unitmem_mean: float | None = None
    unitmem_median: float | None = None
    unitmem_max: float | None = None
    frac_units_above_half: float | None = None
    classmem_mean: float | None = None
    unitmem_top_mean: float | None = None
    unitmem_least_mean: float | None = None
    frac_units_flagged: float | None = None  # units above their own null (memlens.audit.unitmem.unitmem_null_p)
    layermem_excess: float | None = None  # offset-free: candidates' centred out - in minus the controls'
    layermem_z: float | None = None  # the same in units of the controls' spread
    layermem_p: float | None = None  # one-sided Welch, candidates above controls
    layermem_p_holm: float | None = None


class TopUnit(Model):
    layer: str
    unit: int
    unitmem: float
    mu_max: float
    active_frac: float
    argmax_id: str


class TableInfo(Model):
    sha256: str
    rows: int


class AuditSummary(Model):
    version: Literal[3] = 3
    kind: Literal["memlens-audit"] = "memlens-audit"
    created: str
    memlens_version: str
    settings: AuditConfig
    environment: dict[str, Any]
    data: dict[str, Any]
    splits: dict[str, Any]
    model: dict[str, Any]
    framework: str | None
    recipe: dict[str, Any] | None
    encoders: list[EncoderInput]
    design: dict[str, Any] = {}
    augmentation: dict[str, str]
    views: ViewFacts
    reliability: ViewReliability | None
    reliability_encoders: EncoderReliabilityFacts | None = None
    inference: InferenceFacts = InferenceFacts()
    loss_memorization: LossMemorization | None = None
    subsets: dict[str, SubsetStats]
    layers: list[LayerRow]
    vit_blocks: list[dict[str, Any]] | None = None
    units: UnitFacts
    top_units: list[TopUnit]
    top_points: list[dict[str, Any]]
    at_risk_points: list[dict[str, Any]] = []
    requested_points: list[dict[str, Any]]
    tests: list[TestResult]
    consistency: dict[str, list[Consistency]]
    privacy: PrivacyFindings | None = None
    warnings: list[str] = []
    timings: dict[str, float]
    tables: dict[str, TableInfo] = {}
    signals: dict[str, Any] | None = None  # signals.parquet: file, sha256, rows, columns (memlens.audit.signals)
    integrity: dict[str, Any] | None = None  # memlens.integrity: digests of the record and its tables

    @property
    def runs(self) -> list[EncoderInput]:
        return self.encoders

    @property
    def attacked(self) -> list[EncoderInput]:
        """The encoders the audit is about: the target, else f, else the references."""
        for side in ("target", "f", "ref"):
            found = [r for r in self.encoders if r.side == side]
            if found:
                return found
        return []

    @property
    def dp_epsilon(self) -> float | None:
        eps = [r.epsilon for r in self.attacked]
        return None if not eps or any(e is None for e in eps) else max(eps)


class Audit:
    """An audit directory read back: the summary and its tables (``canaries`` is None without canaries).

    ``sha256`` is the file's, ``digest`` the record's canonical digest (what a signature signs)."""

    def __init__(self, path: Path, summary: AuditSummary, tables: dict[str, pd.DataFrame], sha256: str):
        self.path, self.summary, self.sha256 = path, summary, sha256
        self.digest = (summary.integrity or {}).get("sha256")
        self.points, self.layers, self.units, self.tests = (tables[t] for t in TABLES)
        self.canaries: pd.DataFrame | None = tables.get("canaries")

    # ------------------------------------------------------------- the questions gate, report and card ask

    def label(self) -> str:
        """The audit's name and privacy level, as gate rows, the report and the card name it."""
        eps = self.summary.dp_epsilon
        return f"{self.path.name} (epsilon {'inf' if eps is None else f'{eps:.3g}'})"

    def candidates(self) -> pd.DataFrame:
        """The rows of the images whose memorization is judged: the candidates (S_C) under f and g, the
        pool images (with in- and out-encoders) under references."""
        pts = self.points
        if "candidate" in pts.columns:
            return pts[pts["candidate"].astype(bool)]
        return pts[pts["subset"] == "S_C"]

    def candidate_words(self) -> str:
        """What :meth:`candidates` holds, named: S_C under f and g, the pool under references."""
        n = len(self.candidates())
        return f"the {n} pool images (S_C and S_I)" if (self.summary.design or {}).get("kind") == "references" else \
            f"the {n} S_C candidates"

    @property
    def list_withheld(self) -> str | None:
        """Why the at-risk list was withheld (the null failed its self-check on the controls), else None."""
        null = self.summary.inference.null
        return null.withheld if null is not None else None

    def memorized_at(self, fdr: float) -> tuple[list[str], int] | None:
        """Ids of the candidates memorized at ``fdr``, most significant first, and the family size; None
        when the audit has no per-image q-values.

        Reads the Benjamini-Hochberg q-values the audit stored (``mem_q``, over the candidates with a
        p-value): the list at level q is {q_i <= q} whatever level the audit itself listed at. A list
        withheld by the self-check is empty."""
        cand = self.candidates()
        if "mem_q" not in cand.columns:
            return None
        has_p = cand["mem_p"].notna()
        if self.list_withheld:
            return [], int(has_p.sum())
        if not has_p.any():
            return None
        q = cand.loc[has_p, "mem_q"].to_numpy(float)
        hit = q <= fdr
        ids = cand.loc[has_p, "id"].to_numpy()[hit]
        return [str(i) for i in ids[np.argsort(q[hit], kind="stable")]], int(has_p.sum())

    def natural_signal_test(self) -> TestResult | None:
        """The offset-free test of memorization of natural images: S_C > S_S (Welch) under f and g; under
        references, the candidates' memorization above the control images' (Welch)."""
        tests = self.summary.tests
        found = next((t for t in tests if t.name == "C>S" and t.method == "welch_t"), None)
        return found or next((t for t in tests if t.name == "C>ctrl" and t.method == "welch_t"), None)

    def membership(self, basis: str | None = None) -> tuple[str, dict] | None:
        """(where, metrics) of the primary membership score: on the canaries when there are, else on the
        natural members and non-members (``basis`` "canaries" or "natural" asks for one)."""
        p = self.summary.privacy or {}
        primary = p.get("primary_score", "sslmem")
        canary = (p.get("canaries") or {}).get("metrics") or {}
        if primary in canary and basis in (None, "canaries"):
            return f"canaries, {primary}", canary[primary]
        natural = p.get("natural") or {}
        if primary in (natural.get("metrics") or {}) and basis in (None, "natural"):
            return (f"{natural.get('members', 'S_C')} vs {natural.get('non_members', 'S_E')}, {primary}",
                    natural["metrics"][primary])
        return None

    def canary_facts(self) -> dict | None:
        """The canaries' block of the privacy findings (None without canaries)."""
        return ((self.summary.privacy or {}).get("canaries") or {}) or None

    def signals(self) -> pd.DataFrame:
        """Every encoder's score of every point (signals.parquet, :mod:`memlens.audit.signals`), verified
        against the sha256 audit.json recorded.

        Raises:
            MemlensError: no signals file, or one that changed since the audit.
        """
        info = self.summary.signals
        path = self.path / SIGNALS_FILE
        if info is None or not path.is_file():
            raise MemlensError(f"{self.path} has no {SIGNALS_FILE} (audits before memlens saved signals); re-run the "
                               f"audit")
        if sha256_file(path) != info["sha256"]:
            raise MemlensError(f"{path} was modified after the audit wrote it (sha256 differs from audit.json)")
        return pd.read_parquet(path)


def read_audit(path: str | Path) -> Audit:
    """Read and verify an audit directory.

    Every table must have the sha256 and row count audit.json recorded for it: a truncated,
    edited or swapped table is refused, naming the file.

    Raises:
        MemlensError: missing, unreadable, out-of-date or tampered files.
    """
    path = Path(path)
    if not path.is_dir():
        raise MemlensError(f"audit directory not found: {path}")
    raw = read_json(path / AUDIT_FILE, what="audit summary")
    if not isinstance(raw, dict) or raw.get("kind") != "memlens-audit":
        raise MemlensError(f"{path / AUDIT_FILE} is not a memlens audit summary")
    if raw.get("version") != 3:
        raise MemlensError(f"{path / AUDIT_FILE} has schema version {raw.get('version')}, written by another memlens "
                           f"version; re-run memlens audit to update it")
    verify(raw, path / AUDIT_FILE)  # its own digest, its tables, its signature
    try:
        summary = AuditSummary.model_validate(raw)
    except ValidationError as exc:
        raise MemlensError(format_validation_error(exc, source=str(path / AUDIT_FILE))) from None
    tables = {}
    names = list(TABLES) + [n for n in summary.tables if n not in TABLES]
    for name in names:
        f = path / f"{name}.csv"
        if not f.is_file():
            raise MemlensError(f"{path} is missing {name}.csv")
        info = summary.tables.get(name)
        if info is None:
            raise MemlensError(f"{f} is not recorded in {AUDIT_FILE}; the audit directory was altered")
        data = f.read_bytes()
        if sha256_bytes(data) != info.sha256:
            raise MemlensError(f"{f} was modified after the audit wrote it (sha256 differs from {AUDIT_FILE}); "
                               f"re-run the audit instead of editing its tables")
        try:
            tables[name] = pd.read_csv(io.BytesIO(data), keep_default_na=True,
                                       dtype={"id": str, "argmax_id": str, "label": str})
        except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
            raise MemlensError(f"{f} is not a readable CSV table: {exc}") from None
        if len(tables[name]) != info.rows:
            raise MemlensError(f"{f} has {len(tables[name])} rows, {AUDIT_FILE} recorded {info.rows}")
    verify_inputs(summary, path)
    return Audit(path, summary, tables, sha256_file(path / AUDIT_FILE))


def read_signals(audit_dir: str | Path) -> pd.DataFrame:
    """The signals of an audit directory (:meth:`Audit.signals`), after verifying the audit."""
    return read_audit(audit_dir).signals()


def verify_inputs(summary: AuditSummary, where: Path) -> None:
    """The files an audit was computed from, wherever they are still present: every run record and its
    weights, the splits and the canary set must be the ones the audit recorded (sha256).

    Raises:
        MemlensError: naming the file that changed since the audit.
    """
    def check(path: str | Path | None, digest: str | None, what: str) -> None:
        if not path or not digest:
            return
        p = Path(path)
        if p.is_file() and sha256_file(p) != digest:
            raise MemlensError(f"{p} ({what}) changed after the audit {where} recorded it (sha256 differs); re-run "
                               f"the audit")

    for enc in summary.encoders:
        if enc.source == "run" and enc.path:
            check(Path(enc.path) / "run.json", enc.run_json_sha256, f"run record of {enc.label}")
            check(Path(enc.path) / "model.safetensors", enc.weights_sha256, f"weights of {enc.label}")
        elif enc.path:
            check(enc.path, enc.weights_sha256, f"weights of {enc.label}")
    check(summary.splits.get("path"), summary.splits.get("sha256"), "splits")
    can = (summary.privacy or {}).get("canaries") or {}
    if can.get("path"):
        check(Path(can["path"]) / "membership.json", can.get("membership_sha256"), "canary membership")
        check(Path(can["path"]) / "canaries.json", can.get("set_file_sha256"), "canary set")
        if (Path(can["path"]) / "canaries.json").is_file():  # and the images and membership the set recorded
            read_verified(Path(can["path"]) / "canaries.json", what="canary set")


# ----------------------------------------------------------------------------- the audit in memory, written


@dataclass
class AuditResult:
    """An audit in memory: the summary and pandas tables; :meth:`save` writes what ``memlens
    report`` and ``memlens gate`` read."""

    summary: AuditSummary
    points: pd.DataFrame
    layers: pd.DataFrame
    units: pd.DataFrame
    tests: pd.DataFrame
    canaries: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)
    signals: pd.DataFrame | None = None  # every encoder's score of every point (memlens.audit.signals)

    def save(self, out_dir: str | Path, *, force: bool = False, sign_key=None) -> Path:
        return write_audit(self, out_dir, force=force, sign_key=sign_key)

    def tables(self) -> dict[str, pd.DataFrame]:
        out = {"points": self.points, "layers": self.layers, "units": self.units, "tests": self.tests}
        if self.canaries is not None:
            out["canaries"] = self.canaries
        return out


def write_audit(result: AuditResult, out_dir: str | Path, *, force: bool = False, sign_key=None) -> Path:
    """Write audit.json and the CSV tables into ``out_dir`` as one atomic step.

    Everything is written into a temporary sibling directory which then replaces ``out_dir``,
    so readers never see a half-written audit. audit.json records each table's sha256 and row
    count and its own digest (:mod:`memlens.integrity`), which readers verify; with ``sign_key``
    (an Ed25519 private key) the digest is signed.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise MemlensError(f"{out} already holds {'an audit' if (out / AUDIT_FILE).exists() else 'other files'}; "
                           f"pass --force to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        os.chmod(tmp, directory_mode())
        infos = {}
        for name, table in result.tables().items():
            text = table.to_csv(index=False, float_format="%.6g")
            atomic_write_text(tmp / f"{name}.csv", text)
            infos[name] = {"sha256": sha256_bytes(text.encode("utf-8")), "rows": int(len(table))}
        result.summary.tables = {name: TableInfo(**info) for name, info in infos.items()}
        files = {f"{name}.csv": info["sha256"] for name, info in infos.items()}
        if result.signals is not None:
            digest = write_signals(result.signals, tmp / SIGNALS_FILE)
            result.summary.signals = {"file": SIGNALS_FILE, "sha256": digest, "rows": int(len(result.signals)),
                                      "columns": list(result.signals.columns)}
            files[SIGNALS_FILE] = digest
        doc = stamp(result.summary.model_dump(mode="json"), files=files, sign_key=sign_key)
        result.summary.integrity = doc["integrity"]
        atomic_write_text(tmp / AUDIT_FILE, dumps(doc) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ----------------------------------------------------------------------------- words (report, card, CLI)


def _pval(p: float | None) -> str:
    if p is None or p != p:
        return "n/a"
    return "< 1e-300" if p == 0 else (f"{p:.2g}" if p < 0.001 else f"{p:.3f}")


def calibration_sentence(inf: dict, measure: str) -> str:
    """The calibration self-check in words: the null's check on the control images, the model's check."""
    null = inf.get("null") or {}
    if null.get("method") != "controls":
        return (f"Calibration: the {measure} p-values are the model's own (no control images were scored), not "
                f"checked on controls.")
    check = null.get("self_check")
    model = null.get("model_check")
    model_words = (f" The moderated t alone would give {model['below_05']:.1%} of the controls p < 0.05 (KS p = "
                   f"{_pval(model['ks_p'])}); it is not what the list uses." if model else "")
    if check is None:
        return (f"Calibration on {null['controls']} control images (the same membership in every encoder): "
                f"{null.get('self_check_note', 'no self-check')}.{model_words}")
    state = "passed" if check["passed"] else "FAILED"
    return (f"Calibration self-check on {null['controls']} control images ({null['in_every_encoder']} in every "
            f"encoder, {null['in_no_encoder']} in none): {check['below_05']:.1%} of their null p-values are below "
            f"0.05 (expected {check['interval_05'][0]:.1%} to {check['interval_05'][1]:.1%}), KS p = "
            f"{_pval(check['ks_p'])}, {check['null_at_risk']} listed at the FDR: {state}.{model_words}")


def units_sentence(units: dict) -> str:
    """UnitMem in words: selectivity (UnitMem > 0.5) is not memorization; the units' null says which is."""
    frac = units.get("frac_above_half")
    if frac is None:
        return ""
    sel = (f"{frac:.1%} of the encoder's ranked units have UnitMem above 0.5 (they respond to one image of D' at "
           f"least three times more than to the others); a random network's units are that selective too")
    if not units.get("null"):
        return sel + ", and no null was computed, so this says nothing about memorization."
    lo, hi = units["chance_interval"]
    alpha = units["null"]["alpha"]
    verdict = ("more than chance: units respond to training images more than to unseen ones"
               if units.get("excess_p") is not None and units["excess_p"] < 0.01 else "no more than chance")
    return (sel + f". Against each unit's own null (its UnitMem on as many images drawn from the "
            f"{units['null']['members']} training images and {units['null']['non_members']} unseen ones), "
            f"{units['frac_flagged']:.1%} of {units['tested']} units are flagged at {alpha:g} (chance: {lo:.1%} to "
            f"{hi:.1%}): {verdict}.")


def skipped_sentence(data: dict) -> str:
    """Images the audit left out as unreadable (``on_bad_image: skip``), in words."""
    skipped = data.get("skipped") or []
    if not skipped:
        return ""
    shown = ", ".join(f"{x.get('id')} ({x.get('problem')})" for x in skipped[:5])
    return (f"{len(skipped)} image(s) were left out as unreadable (on_bad_image: skip), so nothing is said about "
            f"them: {shown}{' ...' if len(skipped) > 5 else ''}.")

