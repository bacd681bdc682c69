"""Data and splits settings: where the images come from and how they are cut into S_S/S_C/S_I/S_E."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from memlens.config.base import Strict

# ----------------------------------------------------------------------------- data


class SyntheticConfig(Strict):
    """Generated images: class prototypes plus optional planted atypical points."""

    n: int = Field(600, ge=8, description="training images")
    n_test: int = Field(0, ge=0, description="images in a separate test part (0: none)")
    image_size: int = Field(16, ge=4, le=256)
    channels: Literal[1, 3] = 3
    classes: int = Field(4, ge=1, le=1000)
    outliers: int = Field(0, ge=0, description="atypical points planted in the training part")
    seed: int = 0

    @model_validator(mode="after")
    def _fits(self) -> "SyntheticConfig":
        if self.outliers >= self.n:
            raise ValueError(f"outliers ({self.outliers}) must be fewer than n ({self.n})")
        return self


class DataConfig(Strict):
    """Where the images come from and how they are read (memlens.data.sources)."""

    source: Literal["digits", "synthetic", "folder", "npz", "manifest", "shards", "hf", "parquet"] = "digits"
    path: str | None = Field(None, description="folder or .tar/.tar.gz, shard pattern (train-{0000..0127}.tar), "
                                               "datasets directory (save_to_disk), parquet file/dir/glob, .npz, or "
                                               "manifest .csv (path[,label][,subset])")
    test_path: str | None = Field(None, description="shards and parquet: the files of the test part")
    resize: int | None = Field(None, ge=4, le=1024, description="squash every image to resize x resize (an explicit "
                                                               "choice; by default images keep their own size)")
    cache: Literal["auto", "decoded", "none"] = Field(
        "auto", description="decoded: keep the decoded pixels of images of one square size in one memory-mapped "
                            "file (for small images read many times); auto: when they fit in 4 GiB; none: decode "
                            "on every read")
    on_bad_image: Literal["fail", "skip"] = Field(
        "fail", description="a corrupt or truncated image: fail naming it, or skip it (recorded in run.json and "
                            "audit.json)")
    image_column: str | None = Field(None, description="hf/parquet: the image column; shards: the image member's "
                                                       "extension (default: jpg, png, ...)")
    label_column: str | None = Field(None, description="hf/parquet: the label column (default: ClassLabel / label)")
    id_column: str | None = Field(None, description="hf/parquet: the id column (default: id, else <part>/<row>)")
    synthetic: SyntheticConfig = SyntheticConfig()

    @model_validator(mode="after")
    def _needs_path(self) -> "DataConfig":
        if self.source not in ("digits", "synthetic") and not self.path:
            raise ValueError(f"source '{self.source}' needs a path")
        if self.test_path and self.source not in ("shards", "parquet"):
            raise ValueError(f"test_path is for sources shards and parquet, not '{self.source}'")
        columns = [k for k in ("label_column", "id_column") if getattr(self, k)]
        if self.image_column and self.source not in ("hf", "parquet", "shards"):
            columns.append("image_column")
        if columns and self.source not in ("hf", "parquet"):
            raise ValueError(f"{', '.join(columns)} apply to sources hf and parquet, not '{self.source}'")
        return self

    @property
    def lazy(self) -> bool:
        """Whether images are decoded from files while a job runs."""
        return self.source not in ("digits", "synthetic", "npz")


# ----------------------------------------------------------------------------- splits


class SplitSizes(Strict):
    S_S: int | None = Field(None, ge=1)
    S_C: int | None = Field(None, ge=1)
    S_I: int | None = Field(None, ge=1)
    S_E: int | None = Field(None, ge=1)


class SplitConfig(Strict):
    """How to cut a dataset into the papers' four subsets.

    By default S_S/S_C/S_I take 80/10/10 % of the training part and |S_E| = |S_C| comes from
    the test part (or, without one, is set aside from the training part first).
    """

    seed: int = 0
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    sizes: SplitSizes | None = None
    candidates_file: str | None = Field(None, description="file of ids (one per line) that must be candidates")
    fill_candidates: bool = Field(True, description="top S_C up with random points beside the requested ids")

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(x <= 0 for x in v) or sum(v) > 1.0 + 1e-9:
            raise ValueError("fractions must be positive and sum to at most 1")
        return v



class SplitFile(Strict):
    """``memlens split --config split.yaml``: the data and how to cut it."""

    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()

