"""Training settings: the recipe of an encoder (objective, model, optimiser, DP-SGD, data reading)."""

from __future__ import annotations

import difflib
import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from memlens.config.base import Framework, Strict, Subset, _count, check_augmentation
from memlens.config.data import DataConfig

# ----------------------------------------------------------------------------- training


class ModelConfig(Strict):
    arch: str = "vit_micro"
    input_size: int | None = Field(None, ge=4, le=1024, description="side of the encoder's square input; default: "
                                                                   "the data's size when all images share one "
                                                                   "square size, else timm's default (224)")
    patch_size: int | None = Field(None, ge=1)
    embed_dim: int | None = Field(None, ge=8)
    depth: int | None = Field(None, ge=1)
    num_heads: int | None = Field(None, ge=1)
    mlp_ratio: float | None = Field(None, gt=0)

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str) -> str:
        # torch and timm: only a config that names an architecture pays for them, not gate or report
        from memlens.models import ARCHS

        if v.startswith("timm:"):
            # timm: loaded where this runs, so importing memlens.config.train stays light
            import timm

            if not timm.is_model(v[5:]):
                close = difflib.get_close_matches(v[5:], timm.list_models(), n=3)
                raise ValueError(f"unknown timm model '{v[5:]}'" + (f"; close: {', '.join(close)}" if close else ""))
            return v
        if v not in ARCHS:
            raise ValueError(f"unknown architecture '{v}'; valid: {', '.join(ARCHS)}, or timm:<model name> such as "
                             f"timm:vit_tiny_patch16_224")
        return v


class OptimConfig(Strict):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    warmup_epochs: float = Field(1.0, ge=0)
    min_lr: float = Field(0.0, ge=0)
    average_epochs: int = Field(0, ge=0, description="final weights: the mean of the weights at the end of each of "
                                                     "the last N epochs (stochastic weight averaging; 0: the last "
                                                     "weights)")


class MAEConfig(Strict):
    mask_ratio: float = Field(0.75, gt=0, lt=1)
    decoder_dim: int = Field(64, ge=8)
    decoder_depth: int = Field(1, ge=1)
    decoder_heads: int = Field(2, ge=1)
    norm_pix_loss: bool = True


class SimCLRConfig(Strict):
    temperature: float = Field(0.5, gt=0)
    proj_hidden: int = Field(256, ge=8)
    proj_dim: int = Field(64, ge=8)


class SimSiamConfig(Strict):
    proj_dim: int = Field(256, ge=8)
    pred_hidden: int = Field(64, ge=8)


class DINOConfig(Strict):
    out_dim: int = Field(256, ge=8)
    hidden: int = Field(256, ge=8)
    bottleneck: int = Field(64, ge=8)
    teacher_temp: float = Field(0.04, gt=0)
    student_temp: float = Field(0.1, gt=0)
    center_momentum: float = Field(0.9, ge=0, lt=1)
    momentum: float = Field(0.996, ge=0, le=1)


MAX_EPSILON = 100.0  # the largest epsilon memlens calibrates noise for


class DPConfig(Strict):
    """DP-SGD settings (only the MAE and supervised objectives are per-sample and allowed)."""

    epsilon: float = Field(..., gt=0, description="target epsilon; training never spends more")
    delta: float | None = Field(None, gt=0, lt=1, description="default: 1 / (10 N), below 1/N")
    max_grad_norm: float = Field(1.0, gt=0)
    accountant: Literal["prv", "rdp"] = "prv"
    noise_multiplier: float | None = Field(
        None, gt=0, description="fixed sigma; by default calibrated to reach epsilon over the planned steps")
    physical_batch_size: int | None = Field(None, ge=1, description="largest batch in memory at once")
    poisson: bool = True
    grad_mode: Literal["ghost-bk", "opacus-hooks"] = Field(
        "ghost-bk", description="ghost-bk: memlens's one-pass ghost clipping (fast); opacus-hooks: Opacus's "
                                "per-sample gradients (reference)")
    coupling: Literal["shared", "independent"] = Field(
        "shared", description="shared: f and g of one seed draw the same DP noise (and the same initialisation, "
                              "order and augmentations), which keeps each expectation unbiased and lowers the "
                              "variance of f - g; independent: each side draws its own noise")
    reproducible: bool = Field(
        False, description="false (default): the noise and the Poisson sampling come from a secret key drawn from "
                           "the OS and re-keyed every step, never recorded (DP's assumption); true: seeded from the "
                           "run seed, so a rerun gives the same model, and the guarantee holds only while the run "
                           "record stays private (recorded, and said by the report, card and memlens privacy)")
    noise_seed: int | Literal["random"] | None = Field(
        None, description="with reproducible: true, the seed of the noise (default: derived from the run seed); "
                          "'random' is the default secret randomness")

    @model_validator(mode="after")
    def _randomness(self) -> "DPConfig":
        if isinstance(self.noise_seed, int) and not self.reproducible:
            raise ValueError("noise_seed makes the noise replayable by whoever reads it; it needs reproducible: true")
        if self.noise_seed == "random" and self.reproducible:
            raise ValueError("noise_seed: random contradicts reproducible: true")
        return self

    @field_validator("epsilon")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("epsilon must be finite under DP; omit the dp section for a non-private run")
        if v > MAX_EPSILON:
            # the accountants cannot calibrate such noise (PRV overflows and exhausts memory), and a bound of
            # e^100 on the likelihood ratio protects nothing a reviewer could name
            raise ValueError(f"epsilon {v:g} is above {MAX_EPSILON:g}, more than the accountant can calibrate and no "
                             f"guarantee a reviewer can use; choose epsilon <= {MAX_EPSILON:g}, or omit the dp "
                             f"section for a non-private run")
        return v


DEFAULT_AUGMENT = {"mae": "mae", "simclr": "normal", "simsiam": "normal", "dino": "normal", "supervised": "weak"}

PoolSubset = Literal["S_S", "S_C", "S_I"]


class ReferencesConfig(Strict):
    """K reference encoders of one recipe, each on the shared data and half of a pool
    (memlens.data.references): every pool image is in K/2 of them and out of K/2."""

    k: int = Field(..., ge=2, description="number of references (even: pairs of encoders sharing a seed)")
    design: Literal["halves"] = "halves"
    seed: int = Field(0, description="seed of the halves and of the canaries' coins")
    pool: list[PoolSubset] = Field(["S_C", "S_I"], min_length=1, description="subsets the references split in "
                                                                            "halves (add S_S to rank every "
                                                                            "training image)")

    @field_validator("k")
    @classmethod
    def _even(cls, v: int) -> int:
        if v % 2:
            raise ValueError(f"k must be even (pairs of encoders), got {v}")
        return v


class ReferenceSpec(ReferencesConfig):
    """Which reference a training run is (``memlens train --reference i --of K``)."""

    index: int = Field(..., ge=0, description="0..k-1; references 2j and 2j+1 form pair j")

    @model_validator(mode="after")
    def _inside(self) -> "ReferenceSpec":
        if self.index >= self.k:
            raise ValueError(f"reference index {self.index} is outside 0..{self.k - 1}")
        return self


class TrainConfig(Strict):
    framework: Framework = "mae"
    data: DataConfig = DataConfig()
    splits: str | None = Field(None, description="splits.json; without it the whole training part is used")
    subsets: Literal["f", "g", "all"] | list[Subset] = Field(
        "f", description="f = S_S+S_C, g = S_S+S_I, all = every training point, or an explicit list")
    model: ModelConfig = ModelConfig()
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=2)
    optim: OptimConfig = OptimConfig()
    augment: str | None = Field(None, description="augmentation set; default depends on the framework")
    seed: int = 0
    mae: MAEConfig = MAEConfig()
    simclr: SimCLRConfig = SimCLRConfig()
    simsiam: SimSiamConfig = SimSiamConfig()
    dino: DINOConfig = DINOConfig()
    dp: DPConfig | None = None
    canaries: str | None = Field(None, description="canary set directory (memlens canaries): the canaries drawn "
                                                   "in join f's training data; g never sees any")
    reference: ReferenceSpec | None = Field(None, description="train reference i of a K-reference design: its data "
                                                              "is the design's (subsets is then not used)")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="autocast of the forward passes; "
                                                                          "DP-SGD steps always run in fp32 (exact "
                                                                          "per-example norms)")
    workers: int | Literal["auto"] = Field("auto", description="DataLoader workers decoding images (auto: 0 for data "
                                                               "in memory, else up to 4 within this process's "
                                                               "share of the cores)")
    threads: int | Literal["auto"] = Field("auto", description="intra-op threads (auto: the process's share of the "
                                                               "cores minus its workers)")

    _augment = field_validator("augment")(lambda v: check_augmentation(v))
    _counts = field_validator("workers", "threads")(lambda v: _count(v))

    @property
    def augmentation(self) -> str:
        return self.augment or DEFAULT_AUGMENT[self.framework]

    @model_validator(mode="after")
    def _reference(self) -> "TrainConfig":
        if self.reference is not None:
            if not self.splits:
                raise ValueError("reference needs splits: the design splits the splits' pool")
            if self.subsets != "f":
                raise ValueError("subsets is set by reference (the design's half of the pool); leave it out")
        return self

