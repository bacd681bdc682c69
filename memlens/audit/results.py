"""The versioned schema of ``audit.json`` and the reader used by reports and the gate."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError

from memlens.audit.stats import Consistency, TestResult
from memlens.config import AuditConfig, format_validation_error
from memlens.errors import MemlensError
from memlens.io import read_json, sha256_file

AUDIT_FILE = "audit.json"
TABLES = ("points", "layers", "units", "tests")


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class RunInput(Model):
    path: str
    side: Literal["f", "g"]
    seed: int
    status: str
    run_json_sha256: str
    model_sha256: str
    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int | None = None
    max_grad_norm: float | None = None
    accountant: str | None = None
    poisson: bool | None = None
    probe_accuracy: float | None = None
    train_points: int
    wall_seconds: float


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


class LayerRow(Model):
    layer: str
    kind: str
    depth: int
    block: int
    units: int
    layermem: float
    delta_layermem: float | None
    layermem_top: float
    layermem_least: float
    delta_layermem_top: float | None
    unitmem_mean: float
    unitmem_median: float
    unitmem_max: float
    frac_units_above_half: float
    classmem_mean: float | None
    unitmem_top_mean: float | None
    unitmem_least_mean: float | None


class TopUnit(Model):
    layer: str
    unit: int
    unitmem: float
    mu_max: float
    argmax_id: str


class AuditSummary(Model):
    version: Literal[1] = 1
    kind: Literal["memlens-audit"] = "memlens-audit"
    created: str
    memlens_version: str
    settings: AuditConfig
    data: dict[str, Any]
    splits: dict[str, Any]
    model: dict[str, Any]
    framework: str
    recipe: dict[str, Any]
    runs: list[RunInput]
    augmentation: dict[str, str]
    subsets: dict[str, SubsetStats]
    layers: list[LayerRow]
    vit_blocks: list[dict[str, Any]] | None = None
    units: dict[str, Any]
    top_units: list[TopUnit]
    top_points: list[dict[str, Any]]
    requested_points: list[dict[str, Any]]
    tests: list[TestResult]
    consistency: dict[str, list[Consistency]]
    timings: dict[str, float]

    @property
    def dp_epsilon(self) -> float | None:
        eps = [r.epsilon for r in self.runs if r.side == "f"]
        return None if any(e is None for e in eps) else max(eps)


class Audit:
    """An audit directory read back: the summary and its four tables."""

    def __init__(self, path: Path, summary: AuditSummary, tables: dict[str, pd.DataFrame], sha256: str):
        self.path, self.summary, self.sha256 = path, summary, sha256
        self.points, self.layers, self.units, self.tests = (tables[t] for t in TABLES)


def read_audit(path: str | Path) -> Audit:
    path = Path(path)
    if not path.is_dir():
        raise MemlensError(f"audit directory not found: {path}")
    raw = read_json(path / AUDIT_FILE, what="audit summary")
    if not isinstance(raw, dict) or raw.get("kind") != "memlens-audit":
        raise MemlensError(f"{path / AUDIT_FILE} is not a memlens audit summary")
    try:
        summary = AuditSummary.model_validate(raw)
    except ValidationError as exc:
        raise MemlensError(format_validation_error(exc, source=str(path / AUDIT_FILE))) from None
    tables = {}
    for name in TABLES:
        f = path / f"{name}.csv"
        if not f.is_file():
            raise MemlensError(f"{path} is missing {name}.csv")
        try:
            tables[name] = pd.read_csv(f, keep_default_na=True, dtype={"id": str, "argmax_id": str})
        except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
            raise MemlensError(f"{f} is not a readable CSV table: {exc}") from None
    return Audit(path, summary, tables, sha256_file(path / AUDIT_FILE))
