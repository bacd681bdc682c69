"""Jobs of several runs: epsilon sweeps and the one-command pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_serializer, field_validator, model_validator

from memlens.config.audit import AuditConfig, CanaryConfig
from memlens.config.base import Strict, epsilon_list, partial_model, validate
from memlens.config.data import DataConfig, SplitConfig
from memlens.config.train import ReferencesConfig, TrainConfig

# ----------------------------------------------------------------------------- sweeps


class SweepDP(Strict):
    """DP-SGD settings shared by every finite epsilon of a sweep."""

    delta: float | None = Field(None, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    accountant: Literal["prv", "rdp"] = "prv"
    physical_batch_size: int | None = Field(None, ge=1)
    poisson: bool = True
    grad_mode: Literal["ghost-bk", "opacus-hooks"] = "ghost-bk"
    noise_seed: int | Literal["random"] | None = None
    coupling: Literal["shared", "independent"] = "shared"
    reproducible: bool = False


class SweepConfig(Strict):
    """``memlens sweep``: train f and g with one recipe at several privacy levels."""

    train: TrainConfig
    epsilons: list[float] = Field(..., min_length=1, description="privacy levels; 'inf' = non-private")
    dp: SweepDP = SweepDP()
    extra_seeds: list[int] = Field([], description="more seeds per side (runs f-seedN, g-seedN)")
    references: ReferencesConfig | None = Field(None, description="train K references per epsilon (ref-00 ...) "
                                                                  "instead of f and g")

    @field_validator("epsilons", mode="before")
    @classmethod
    def _eps(cls, v: Any) -> list[float]:
        return epsilon_list(v)

    @model_validator(mode="after")
    def _recipe(self) -> "SweepConfig":
        if not self.train.splits:
            raise ValueError("train.splits is required: a sweep trains f on S_S+S_C and g on S_S+S_I")
        if self.train.dp is not None:
            raise ValueError("train.dp must be absent: the sweep sets DP from epsilons and dp")
        if self.train.seed in self.extra_seeds:
            raise ValueError(f"extra_seeds repeats the base seed {self.train.seed}")
        if self.references is not None and self.extra_seeds:
            raise ValueError("references and extra_seeds are two designs; give one (references: K encoders, "
                             "extra_seeds: more f/g pairs)")
        if self.train.reference is not None:
            raise ValueError("train.reference is set by the sweep's references")
        return self


# ----------------------------------------------------------------------------- pipeline


# The pipeline sets these itself: its train: and audit: sections are the configs without them.
PIPELINE_TRAIN_OWNED = {"data", "splits", "subsets", "dp", "canaries", "reference"}
PIPELINE_AUDIT_OWNED = {"f", "g", "splits", "references", "target"}
PipelineTrain = partial_model(TrainConfig, drop=PIPELINE_TRAIN_OWNED, name="PipelineTrain")
PipelineAudit = partial_model(AuditConfig, drop=PIPELINE_AUDIT_OWNED, name="PipelineAudit")


class ReportSettings(Strict):
    title: str | None = None
    redact: bool = Field(False, description="replace image thumbnails by placeholders")
    html: bool = True


class PipelineConfig(Strict):
    """``memlens run``: split, train f and g per epsilon, probe, audit, report and gate."""

    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    train: PipelineTrain = Field(..., description="the training recipe (TrainConfig fields, without data, "
                                                  "splits, subsets and dp)")
    epsilons: list[float] = Field(["inf"], min_length=1)
    dp: SweepDP = SweepDP()
    extra_seeds: list[int] = []
    references: ReferencesConfig | None = Field(None, description="K reference encoders per epsilon instead of f "
                                                                  "and g")
    audit: PipelineAudit = Field(PipelineAudit(), description="audit settings (AuditConfig fields, without f, g and "
                                                               "splits)")
    canaries: CanaryConfig | None = Field(None, description="plant canaries in f's training data")
    probe: bool = True
    policy: str | None = Field(None, description="policy file for the gate (and the report's verdict)")
    report: ReportSettings = ReportSettings()

    @field_validator("epsilons", mode="before")
    @classmethod
    def _eps(cls, v: Any) -> list[float]:
        return epsilon_list(v)

    def resolved(self, base: str | Path) -> "PipelineConfig":
        """A copy whose relative file paths (data, test data, candidates, policy) are taken relative to
        ``base``, the pipeline file's folder: a pipeline runs the same from any working directory."""
        def at(value: str | None) -> str | None:
            return str((Path(base) / value).resolve()) if value and not Path(value).is_absolute() else value

        data = self.data.model_copy(update={"path": at(self.data.path), "test_path": at(self.data.test_path)}) \
            if self.data.source not in ("digits", "synthetic") else self.data
        split = self.split.model_copy(update={"candidates_file": at(self.split.candidates_file)})
        return self.model_copy(update={"data": data, "split": split, "policy": at(self.policy)})

    @model_validator(mode="before")
    @classmethod
    def _owned(cls, data: Any) -> Any:
        """Keys of the train: and audit: sections that the pipeline sets, named as such (not "unknown")."""
        if not isinstance(data, dict):
            return data
        train, audit = data.get("train"), data.get("audit")
        for key in sorted(PIPELINE_TRAIN_OWNED & set(train if isinstance(train, dict) else ())):
            raise ValueError(f"train.{key} is set by the pipeline; put it at the top level"
                             if key in ("data", "dp", "canaries") else f"train.{key} is set by the pipeline")
        for key in sorted(PIPELINE_AUDIT_OWNED & set(audit if isinstance(audit, dict) else ())):
            raise ValueError(f"audit.{key} is set by the pipeline")
        if data.get("references") is not None and data.get("extra_seeds"):
            raise ValueError("references and extra_seeds are two designs; give one")
        return data

    @field_serializer("train", "audit")
    def _as_written(self, section: Strict) -> dict[str, Any]:
        # the record keeps what the file said: a new default in a later memlens changes no pipeline.json
        return section.model_dump(mode="json", exclude_unset=True)

    def train_config(self, splits_path: str, canaries_path: str | None = None) -> TrainConfig:
        """The full training config: the section, with the pipeline's data, splits and canaries."""
        recipe = self.train.model_dump(exclude_unset=True)
        return validate(TrainConfig, {**recipe, "data": self.data.model_dump(mode="json"), "splits": splits_path,
                                      "subsets": "f", "canaries": canaries_path}, source="pipeline train")

    def sweep_config(self, splits_path: str, canaries_path: str | None = None) -> SweepConfig:
        return SweepConfig(train=self.train_config(splits_path, canaries_path), epsilons=self.epsilons, dp=self.dp,
                           extra_seeds=self.extra_seeds, references=self.references)

    def audit_config(self, *, f: list[str] = (), g: list[str] = (), references: list[str] = (),
                     splits_path: str) -> AuditConfig:
        """The full audit config: the section, with the encoders and splits of one privacy level."""
        encoders = {"references": list(references)} if references else {"f": list(f), "g": list(g)}
        settings = self.audit.model_dump(exclude_unset=True)
        return validate(AuditConfig, {**settings, **encoders, "splits": splits_path}, source="pipeline audit")
