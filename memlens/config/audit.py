"""Audit settings: which encoders, which points, and how memorization and privacy are measured."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from memlens.config.base import Strict, Subset, _count, check_augmentation
from memlens.config.data import DataConfig

# ----------------------------------------------------------------------------- audits


class UnitMemSettings(Strict):
    subsets: list[Subset] = Field(["S_C"], min_length=1, description="D': the points UnitMem is measured on")
    augment: str | None = Field(None, description="default: the SSLMem views; 'none' = unaugmented (Fig. 5)")
    views: int | None = Field(None, ge=1, description="augmentations per point (Eq. 5); default: the SSLMem views")
    rest: Literal["mean", "median"] = "mean"
    signed: Literal["exclude", "abs", "shift"] = Field(
        "exclude", description="signed layers (attention, residual stream, norms...): exclude them from UnitMem "
                               "(default: units are neurons after a non-linearity, as in the paper), or measure "
                               "|activation| (abs) or the response above the least-responding point (shift)")
    min_activation: float = Field(
        0.01, ge=0, description="activation floor: a unit whose largest mean response mu_max is below it is not "
                                "ranked (UnitMem left empty, no responsible image)")
    permutations: int = Field(
        200, ge=0, description="the units' null: each unit's UnitMem on the images its encoder trained on, ranked "
                               "among the same unit's UnitMem on as many images drawn from members and non-members "
                               "(0: no null, no unit flagged)")
    alpha: float = Field(0.05, gt=0, lt=1, description="a unit is flagged when its null p-value is at most alpha: on "
                                                       "an encoder that memorized nothing, about alpha of the units")

    _augment = field_validator("augment")(lambda v: check_augmentation(v))


class DeclaredDP(Strict):
    """A DP guarantee stated for an encoder memlens did not train (recorded as declared, not checked)."""

    epsilon: float = Field(..., gt=0)
    delta: float = Field(..., gt=0, lt=1)
    accountant: str | None = None


class EncoderSpec(Strict):
    """An encoder to audit: a memlens run directory, ``timm:<model_name>`` or ``py:<module>:<factory>``."""

    model: str = Field(..., description="run directory, timm:<model_name> or py:<module.path>:<callable>")
    weights: str | None = Field(None, description=".safetensors (preferred) or .pt/.pth holding only tensors; 'none': "
                                                  "audit the random initialisation on purpose (failed by the gate "
                                                  "unless the policy allows it)")
    kwargs: dict[str, Any] = Field({}, description="keyword arguments of timm.create_model or of the factory")
    key_prefix: str | None = Field(None, description="select and strip this prefix of the (flattened, dotted) "
                                                     "checkpoint keys, e.g. 'state_dict.module.'")
    strict: bool = Field(True, description="refuse missing or unexpected keys")
    representation: str | None = Field(None, description="pooled, cls, mean, features, output or layer:<name>")
    input_size: int | None = Field(None, ge=4, le=4096, description="input side; default: timm's data config")
    mean: list[float] | None = None
    std: list[float] | None = None
    dp: DeclaredDP | None = Field(None, description="a DP guarantee the encoder was trained with (declared)")
    name: str | None = Field(None, description="label in reports")
    reference: int | None = Field(None, ge=0, description="which reference of the design (memlens design) this "
                                                          "encoder trained on: the list ref-NN.txt it followed")

    @field_validator("representation")
    @classmethod
    def _rep(cls, v: str | None) -> str | None:
        if v is not None and v not in REPRESENTATIONS and not (v.startswith("layer:") and len(v) > 6):
            raise ValueError(f"unknown representation '{v}'; valid: {', '.join(REPRESENTATIONS)}, layer:<name>")
        return v

    @property
    def kind(self) -> Literal["run", "timm", "py", "module"]:  # noqa: D401
        for prefix in ("timm", "py", "module"):
            if self.model.startswith(prefix + ":"):
                return prefix  # type: ignore[return-value]
        return "run"

    def label(self) -> str:
        return self.name or (self.model if self.kind != "run" else Path(self.model).name)


REPRESENTATIONS = ("pooled", "cls", "mean", "features", "output")


def encoder_spec(v: Any) -> Any:
    """A string is shorthand for ``{model: <string>}``."""
    return {"model": v} if isinstance(v, str) else v


class PrivacySettings(Strict):
    """How canary and membership scores become empirical privacy figures (memlens.audit.privacy)."""

    confidence: float = Field(0.95, gt=0.5, lt=1, description="1 - beta of the epsilon lower bound and intervals")
    method: Literal["fdp", "one-run"] = Field("fdp", description="fdp: Gaussian f-DP one-run bound (Mahloujifar et "
                                                                 "al.); one-run: Steinke et al.'s bound")
    strategy: str = Field("grid", description="how many to guess: grid (fixed fractions, Bonferroni), bonferroni "
                                              "(every threshold), split, or top:<k>")
    delta: float | None = Field(None, gt=0, lt=1, description="delta of the bound; default: the f encoders' DP "
                                                              "delta, else 1/(10 N)")
    bootstrap: int = Field(1000, ge=0)
    mae_masks: int = Field(4, ge=1, description="fixed masks per image for MAE reconstruction scores")
    primary: str = Field(
        "auto", description="the membership score the AUC rules, TPR rules and the epsilon bound use, named before "
                            "seeing results. auto: with references, on the loss where the objective has one, "
                            "else the alignment, by RMIA below 16 references per target and LiRA from 16; "
                            "with f and g, the loss against g, else SSLMem")
    lira_variance: Literal["auto", "controls", "global", "per_example"] = Field(
        "auto", description="LiRA's Gaussian widths: controls (the target's own spread around the references' means "
                            "on control images: includes the seed variance between the target and its references), "
                            "global (one per side, pooled over the references: Carlini et al.'s choice with few "
                            "references) or per example; auto: controls when there are 10 control images of each "
                            "kind, else global below 16 references per side")
    rmia_gamma: float = Field(1.0, gt=0, description="RMIA's likelihood-ratio threshold against population points")
    rmia_a: float | Literal["auto"] = Field(
        "auto", description="RMIA's offline correction a (Pr(x) = ((1 + a) Pr_out(x) + 1 - a) / 2); auto: fitted on "
                            "the references, each in turn the target of the others (Zarifzadeh et al., ICML 2024)")

    @field_validator("rmia_a")
    @classmethod
    def _rmia_a(cls, v: float | str) -> float | str:
        if v != "auto" and not 0 <= float(v) <= 1:
            raise ValueError("rmia_a must be in [0, 1] or 'auto'")
        return v

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, v: str) -> str:
        if v in ("grid", "bonferroni", "split") or (v.startswith("top:") and v[4:].isdigit() and int(v[4:]) > 0):
            return v
        raise ValueError(f"unknown strategy '{v}'; valid: grid, bonferroni, split, top:<k>")


class CanaryConfig(Strict):
    """A canary set to make (``memlens canaries``, or a pipeline's ``canaries:`` section)."""

    m: int = Field(200, ge=2, description="number of canaries")
    kinds: list[Literal["natural", "synthetic", "marked"]] = Field(["natural"], min_length=1)
    seed: int = 0
    p_include: float = Field(0.5, gt=0, lt=1, description="probability that a canary joins f's training data")


class ReliabilitySettings(Strict):
    target: float = Field(0.9, gt=0, lt=1, description="split-half (Spearman-Brown) reliability the report asks for")
    max_views: int = Field(64, ge=4, description="budget of views per point for views: auto")
    bootstrap: int = Field(200, ge=0, description="bootstrap replicates over views for the top-k stability")


class InferenceSettings(Strict):
    """Per-image memorization with uncertainty (memlens.audit.inference)."""

    fdr: float = Field(0.1, gt=0, lt=1, description="the at-risk list: images memorized at this false discovery rate "
                                                     "(Benjamini-Hochberg)")
    moderated: bool = Field(True, description="shrink each image's variance across encoders towards the typical one "
                                              "(Smyth's moderated t): the statistic ranked from two pairs on")
    null: Literal["controls", "model"] = Field(
        "controls", description="p-values of the at-risk list: controls = each image's statistic ranked among the "
                                "control images' (S_S, S_E: same membership in every encoder) under the same "
                                "labelling, valid with one pair and free of per-encoder offsets; model = the "
                                "moderated t's own t-distribution (not calibrated on controls: for comparison only)")


class AuditConfig(Strict):
    """``memlens audit``: which encoders, which points, and how to measure."""

    f: list[EncoderSpec] = Field([], description="encoders trained on S_S + S_C")
    g: list[EncoderSpec] = Field([], description="encoders trained on S_S + S_I")
    references: list[EncoderSpec] = Field([], description="reference runs of a K-reference design (instead of f and "
                                                          "g)")
    target: EncoderSpec | None = Field(None, description="the encoder to be released (a memlens run, or timm:/py: "
                                                         "with its weights): its per-image membership scores, "
                                                         "calibrated by the references")
    design: str | None = Field(None, description="the reference design (memlens design) that references trained "
                                                 "outside memlens followed: its directory or design.json")
    target_subsets: list[Subset] = Field(["S_S", "S_C", "S_I"], min_length=1,
                                         description="what a target trained outside memlens trained on (a memlens "
                                                     "run's own record says it)")
    splits: str
    data: DataConfig | None = Field(None, description="the images (default: the runs' data, or the data recorded "
                                                      "with the splits)")
    augment: str | None = Field(None, description="augmentation set of the views; default: the runs' training set "
                                                  "(mae for encoders memlens did not train)")
    views: int | Literal["auto"] = Field(10, description="augmented views per point (2K); 'auto' adds views until "
                                                         "the ranking reliability target is met")
    pairing: Literal["all", "disjoint"] = Field(
        "all", description="all: alignment over all pairs of a point's views (a U-statistic, same forward passes); "
                           "disjoint: K = views/2 disjoint pairs (the papers' estimator)")
    distance: Literal["l2", "l1", "cosine", "angular"] = "l2"
    representation: str | None = Field(None, description="default for every encoder: features for memlens runs, "
                                                         "pooled for timm, output for py:")
    layers: list[str] | None = Field(None, description="shell globs on module paths; default: discovered layers")
    reliability: ReliabilitySettings = ReliabilitySettings()
    canaries: str | None = Field(None, description="canary set directory; default: the one the f runs trained "
                                                   "with")
    privacy: PrivacySettings = PrivacySettings()
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    workers: int | Literal["auto"] = Field("auto", description="DataLoader workers decoding images (auto: 0 for data "
                                                               "in memory, else up to 4 within this process's "
                                                               "share of the cores)")
    threads: int | Literal["auto"] = Field("auto", description="intra-op threads (auto: the process's share of the "
                                                               "cores minus its workers)")
    subsets: list[Subset] = Field(["S_C", "S_S", "S_I", "S_E"], min_length=1)
    max_per_subset: int | None = Field(None, ge=2, description="score at most this many (random) points per subset")
    unitmem: UnitMemSettings = UnitMemSettings()
    top_k: int = Field(50, ge=1, description="size of the Top / Least memorized groups")
    ranking_k: int = Field(100, ge=1, description="k of the top-k ranking overlaps")
    batch_points: int = Field(64, ge=1, description="points per forward batch")
    bootstrap: int = Field(2000, ge=100)
    confidence: float = Field(0.95, gt=0.5, lt=1)
    alpha: float = Field(0.01, gt=0, lt=1, description="significance level reported with the tests")
    inference: InferenceSettings = InferenceSettings()
    seed: int = 0

    _augment = field_validator("augment")(lambda v: check_augmentation(v))
    _counts = field_validator("workers", "threads")(lambda v: _count(v))
    _encoder_lists = field_validator("f", "g", "references", mode="before")(
        lambda v: [encoder_spec(x) for x in v] if isinstance(v, list) else v)
    _target_spec = field_validator("target", mode="before")(lambda v: encoder_spec(v))

    @field_validator("views")
    @classmethod
    def _views(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 2:
            raise ValueError("views must be at least 2 (one pair)")
        return v

    @field_validator("representation")
    @classmethod
    def _rep(cls, v: str | None) -> str | None:
        return EncoderSpec._rep(v)

    @model_validator(mode="after")
    def _scored(self) -> "AuditConfig":
        if self.references and (self.f or self.g):
            raise ValueError("give references, or f and g, not both")
        if not self.references and not (self.f and self.g):
            raise ValueError("give the encoders: f and g (at least one each), or references")
        if self.references and len(self.references) < 2:
            raise ValueError("references need at least 2 encoders")
        if self.target is not None and not self.references:
            raise ValueError("target needs references (they calibrate its membership scores)")
        if self.pairing == "disjoint" and isinstance(self.views, int) and self.views % 2:
            raise ValueError(f"pairing: disjoint needs an even number of views, got {self.views}")
        if "S_C" not in self.subsets:
            raise ValueError("subsets must include S_C (the candidates)")
        missing = [s for s in self.unitmem.subsets if s not in self.subsets]
        if missing:
            raise ValueError(f"unitmem.subsets {missing} are not among the scored subsets")
        return self

