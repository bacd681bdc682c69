"""Pydantic models for every file a user writes (training, sweep, audit and pipeline YAML).

All models forbid unknown keys, so a typo in a config is an error naming the key rather than
a silently ignored setting. :func:`load_yaml` turns validation errors into a one-line
:class:`~memlens.errors.MemlensError`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from memlens.errors import MemlensError

SUBSETS = ("S_S", "S_C", "S_I", "S_E")
Subset = Literal["S_S", "S_C", "S_I", "S_E"]
FRAMEWORKS = ("mae", "simclr", "simsiam", "dino", "supervised")
Framework = Literal["mae", "simclr", "simsiam", "dino", "supervised"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def check_augmentation(name: str | None) -> str | None:
    """Field validator: None or the name of an augmentation set."""
    from memlens.data.augment import AUGMENTATIONS

    if name is not None and name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation set '{name}'; valid: {', '.join(AUGMENTATIONS)}")
    return name


def _count(v: int | str) -> int | str:
    """Field validator of workers/threads: 'auto' or a count (threads at least 1)."""
    if isinstance(v, int) and v < 0:
        raise ValueError("must be 'auto' or a number >= 0")
    return v


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
        from memlens.models import ARCHS

        if v.startswith("timm:"):
            import difflib

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
    noise_seed: int | Literal["random"] | None = Field(
        None, description="seed of the noise generator. Default: derived from the run seed, so a rerun gives the "
                          "same model. 'random': drawn from the OS and never written to run.json (the noise stays "
                          "secret even from whoever reads the run record).")

    @field_validator("epsilon")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("epsilon must be finite under DP; omit the dp section for a non-private run")
        return v


DEFAULT_AUGMENT = {"mae": "mae", "simclr": "normal", "simsiam": "normal", "dino": "normal", "supervised": "weak"}


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


# ----------------------------------------------------------------------------- loading

M = TypeVar("M", bound=BaseModel)


def _model_at(model: type[BaseModel] | None, path: tuple) -> type[BaseModel] | None:
    """The pydantic model that holds the field at ``path`` (through nested models, lists and dicts)."""
    import typing

    def models_in(tp) -> list[type[BaseModel]]:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            return [tp]
        out = []
        for arg in typing.get_args(tp):
            out += models_in(arg)
        return out

    current = model
    for part in path:
        if current is None:
            return None
        if isinstance(part, int) or part not in current.model_fields:
            continue  # a list index or a dict key: stay with the element type found below
        found = models_in(current.model_fields[part].annotation)
        current = found[0] if found else None
    return current


def yaml_lines(text: str) -> dict[tuple, int]:
    """Line numbers (1-based) of every key and list item of a YAML document, by key path."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    lines: dict[tuple, int] = {}

    def walk(node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                p = path + (key.value,)
                lines[p] = key.start_mark.line + 1
                walk(value, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[path + (i,)] = item.start_mark.line + 1
                walk(item, path + (i,))

    if root is not None:
        walk(root, ())
    return lines


def format_validation_error(exc: ValidationError, *, source: str, model: type[BaseModel] | None = None,
                            lines: dict[tuple, int] | None = None) -> str:
    """Every problem at once, on one line: each with its key path, its YAML line where known, and a
    close match for a mistyped key."""
    import difflib

    problems = []
    for err in exc.errors():
        loc = tuple(p for p in err.get("loc", ()) if p not in ("function-after", "function-before"))
        # pydantic names union members in the path ("int", "literal['auto']"): not keys of the file
        loc = tuple(p for p in loc if not (isinstance(p, str) and (p in ("int", "float", "str", "bool", "list")
                                                                     or p.startswith(("literal[", "function")))))
        where = ".".join(str(p) for p in loc) or "(top level)"
        kind = err.get("type", "")
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        if kind == "extra_forbidden":
            parent = _model_at(model, loc[:-1]) if model else None
            word = getattr(parent, "unknown_word", "key") if parent else "key"
            msg = f"unknown {word}"
            if parent is not None and isinstance(loc[-1], str):
                fields = list(parent.model_fields)
                close = difflib.get_close_matches(loc[-1], fields, n=2, cutoff=0.6) or \
                    [f for f in fields if loc[-1].lower() in f.lower()][:2]
                if close:
                    msg += f"; did you mean {' or '.join(close)}?"
        elif kind == "missing":
            msg = "required"
        elif "input" in err and kind.startswith(("literal", "enum")):
            msg = f"{msg} (got {err['input']!r})"
        line = None
        if lines:
            for k in range(len(loc), 0, -1):
                if loc[:k] in lines:
                    line = lines[loc[:k]]
                    break
        problems.append((line or 10**9, f"{where}: {msg}" + (f" (line {line})" if line else "")))
    problems = list(dict.fromkeys(text for _, text in sorted(problems, key=lambda p: p[0])))
    if len(problems) == 1:
        return f"{source}: {problems[0]}"
    return f"{source}: {len(problems)} problems: " + "; ".join(problems)


def claim_resumable_dir(path: str | Path, *, marker: str, config: M, what: str, force: bool) -> Path:
    """Open the output directory of a resumable job (sweep, pipeline) for ``config``.

    A directory that already holds a record of the same job is resumed as is; one that holds a
    record of a different config, or files that are not ours, is refused unless ``force``
    (which starts afresh), so a rerun never mixes the outputs of two configs.

    Args:
        path: the output directory.
        marker: file name of the job record inside it (``sweep.json``, ``pipeline.json``).
        config: the validated config of the job; written to the record.
        what: name of the job in error messages.
        force: delete what is there and start again.

    Raises:
        MemlensError: the directory holds another config's output or foreign files.
    """
    from memlens.io import prepare_output_dir, read_json, write_json  # io is the lower layer

    out = Path(path)
    record = out / marker
    if not force:
        if record.is_file():
            previous = validate(type(config), read_json(record, what=f"{what} record")["config"], source=str(record))
            if previous != config:
                raise MemlensError(f"{out} holds a {what} with a different config; pass --force to start it again")
        elif out.is_dir() and any(out.iterdir()):
            raise MemlensError(f"{out} already holds other files; pass --force to overwrite it")
    prepare_output_dir(out, force=force, resume=not force, marker=marker)
    write_json(record, {"version": 1, "config": config.model_dump(mode="json")})
    return out


def validate(model: type[M], data: Any, *, source: str, lines: dict[tuple, int] | None = None) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise MemlensError(format_validation_error(exc, source=source, model=model, lines=lines)) from None


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise MemlensError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise MemlensError(f"{path}: not valid YAML{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MemlensError(f"{path}: expected a mapping of settings at the top level")
    return data


def load_yaml(model: type[M], path: str | Path, *, overrides: dict[str, Any] | None = None) -> M:
    data = read_yaml(path)
    if overrides:
        data = deep_update(data, overrides)
    return validate(model, data, source=str(path), lines=yaml_lines(Path(path).read_text(encoding="utf-8")))


def deep_update(base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    """Merge ``updates`` into a copy of ``base``; dotted keys ("dp.epsilon") address nested fields."""
    out = dict(base)
    for key, value in updates.items():
        head, _, rest = key.partition(".")
        if rest:
            sub = out.get(head)
            out[head] = deep_update(sub if isinstance(sub, dict) else {}, {rest: value})
        elif isinstance(value, dict) and isinstance(out.get(head), dict):
            out[head] = deep_update(out[head], value)
        else:
            out[head] = value
    return out


class SplitFile(Strict):
    """``memlens split --config split.yaml``: the data and how to cut it."""

    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()


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


def parse_epsilon(v: Any) -> float:
    if isinstance(v, str) and v.strip().lower() in ("inf", "infinity", "+inf", "none", "non-private"):
        return math.inf
    try:
        eps = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"epsilon {v!r} is not a number or 'inf'") from None
    if not eps > 0:
        raise ValueError(f"epsilon must be positive, got {v!r}")
    return eps


def epsilon_list(v: Any) -> list[float]:
    if not isinstance(v, list):
        v = [v]
    out = [parse_epsilon(x) for x in v]
    if len(set(out)) != len(out):
        raise ValueError("epsilons are repeated")
    return out


def format_epsilon(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


class SweepConfig(Strict):
    """``memlens sweep``: train f and g with one recipe at several privacy levels."""

    train: TrainConfig
    epsilons: list[float] = Field(..., min_length=1, description="privacy levels; 'inf' = non-private")
    dp: SweepDP = SweepDP()
    extra_seeds: list[int] = Field([], description="more seeds per side (runs f-seedN, g-seedN)")

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
        return self


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

    _augment = field_validator("augment")(lambda v: check_augmentation(v))


class DeclaredDP(Strict):
    """A DP guarantee stated for an encoder memlens did not train (recorded as declared, not checked)."""

    epsilon: float = Field(..., gt=0)
    delta: float = Field(..., gt=0, lt=1)
    accountant: str | None = None


class EncoderSpec(Strict):
    """An encoder to audit: a memlens run directory, ``timm:<model_name>`` or ``py:<module>:<factory>``."""

    model: str = Field(..., description="run directory, timm:<model_name> or py:<module.path>:<callable>")
    weights: str | None = Field(None, description=".safetensors (preferred) or .pt/.pth holding only tensors")
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

    @field_validator("representation")
    @classmethod
    def _rep(cls, v: str | None) -> str | None:
        if v is not None and v not in REPRESENTATIONS and not (v.startswith("layer:") and len(v) > 6):
            raise ValueError(f"unknown representation '{v}'; valid: {', '.join(REPRESENTATIONS)}, layer:<name>")
        return v

    @property
    def kind(self) -> Literal["run", "timm", "py", "module"]:
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


class AuditConfig(Strict):
    """``memlens audit``: which encoders, which points, and how to measure."""

    f: list[EncoderSpec] = Field(..., min_length=1, description="encoders trained on S_S + S_C")
    g: list[EncoderSpec] = Field(..., min_length=1, description="encoders trained on S_S + S_I")
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
    seed: int = 0

    _augment = field_validator("augment")(lambda v: check_augmentation(v))
    _counts = field_validator("workers", "threads")(lambda v: _count(v))
    _f = field_validator("f", "g", mode="before")(lambda v: [encoder_spec(x) for x in v] if isinstance(v, list)
                                                    else v)

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
        if self.pairing == "disjoint" and isinstance(self.views, int) and self.views % 2:
            raise ValueError(f"pairing: disjoint needs an even number of views, got {self.views}")
        if "S_C" not in self.subsets:
            raise ValueError("subsets must include S_C (the candidates)")
        missing = [s for s in self.unitmem.subsets if s not in self.subsets]
        if missing:
            raise ValueError(f"unitmem.subsets {missing} are not among the scored subsets")
        return self


# ----------------------------------------------------------------------------- pipeline


def _check_section(model: type[M], data: dict[str, Any], section: str) -> None:
    """Validate one free-form section of a pipeline file; a ValueError names the section's keys."""
    try:
        model.model_validate(data)
    except ValidationError as exc:
        text = format_validation_error(exc, source="", model=model).removeprefix(": ")
        raise ValueError(f"{section}." + text.replace("; ", f"; {section}.") if ": " in text else text) from None


class ReportSettings(Strict):
    title: str | None = None
    redact: bool = Field(False, description="replace image thumbnails by placeholders")
    html: bool = True


class PipelineConfig(Strict):
    """``memlens run``: split, train f and g per epsilon, probe, audit, report and gate."""

    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    train: dict[str, Any] = Field(..., description="the training recipe (TrainConfig fields, without data, "
                                                   "splits, subsets and dp)")
    epsilons: list[float] = Field(["inf"], min_length=1)
    dp: SweepDP = SweepDP()
    extra_seeds: list[int] = []
    audit: dict[str, Any] = Field({}, description="audit settings (AuditConfig fields, without f, g and splits)")
    canaries: CanaryConfig | None = Field(None, description="plant canaries in f's training data")
    probe: bool = True
    policy: str | None = Field(None, description="policy file for the gate (and the report's verdict)")
    report: ReportSettings = ReportSettings()

    @field_validator("epsilons", mode="before")
    @classmethod
    def _eps(cls, v: Any) -> list[float]:
        return epsilon_list(v)

    @model_validator(mode="after")
    def _parts(self) -> "PipelineConfig":
        for key in ("data", "splits", "subsets", "dp", "canaries"):
            if key in self.train:
                raise ValueError(f"train.{key} is set by the pipeline; put it at the top level"
                                 if key in ("data", "dp", "canaries") else f"train.{key} is set by the pipeline")
        for key in ("f", "g", "splits"):
            if key in self.audit:
                raise ValueError(f"audit.{key} is set by the pipeline")
        # Check both sections now: a typo found only when the audit starts would come after
        # all the training, and fixing it then changes the config, which forces a restart.
        _check_section(TrainConfig, {**self.train, "data": self.data.model_dump(mode="json"), "splits": "-",
                                     "subsets": "f"}, "train")
        _check_section(AuditConfig, {**self.audit, "f": ["-"], "g": ["-"], "splits": "-"}, "audit")
        return self

    def train_config(self, splits_path: str, canaries_path: str | None = None) -> TrainConfig:
        return validate(TrainConfig, {**self.train, "data": self.data.model_dump(mode="json"), "splits": splits_path,
                                      "subsets": "f", "canaries": canaries_path}, source="pipeline train")

    def sweep_config(self, splits_path: str, canaries_path: str | None = None) -> SweepConfig:
        return SweepConfig(train=self.train_config(splits_path, canaries_path), epsilons=self.epsilons, dp=self.dp,
                           extra_seeds=self.extra_seeds)

    def audit_config(self, *, f: list[str], g: list[str], splits_path: str) -> AuditConfig:
        return validate(AuditConfig, {**self.audit, "f": f, "g": g, "splits": splits_path}, source="pipeline audit")
