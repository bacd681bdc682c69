"""Run directories: ``run.json`` (the record), ``model.safetensors`` (the encoder) and the
per-epoch ``checkpoint.safetensors`` used by ``--resume``.

Weights are stored only as safetensors and metadata only as JSON: nothing memlens reads back is
ever unpickled.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any, Literal

import timm
import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save

from memlens.config import TrainConfig, format_validation_error
from memlens.data import Augmenter
from memlens.errors import MemlensError
from memlens.integrity import file_digests, stamp, verify
from memlens.io import atomic_write_bytes, read_json, sha256_file, write_json
from memlens.models import build_encoder
from memlens.train.objectives import build_objective
from memlens.version import __version__

RUN_FILE = "run.json"
MODEL_FILE = "model.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
HEADS_FILE = "heads.safetensors"


class RunRecord(BaseModel):
    """Everything a run directory says about itself (``run.json``)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    version: Literal[1] = 1
    status: Literal["running", "interrupted", "complete", "stopped_budget", "failed"]
    config: TrainConfig
    data: dict[str, Any]
    splits: dict[str, Any] | None
    train_points: int
    model: dict[str, Any]
    history: list[dict[str, Any]] = []
    epochs_done: int = 0
    images_per_s: float | None = None
    wall_seconds: float = 0.0
    averaged_epochs: int | None = None  # the final weights average this many epochs' (optim.average_epochs)
    versions: dict[str, str]
    environment: dict[str, Any] = {}
    warnings: list[str] = []
    model_sha256: str | None = None
    canaries: dict[str, Any] | None = None
    reference: dict[str, Any] | None = None
    dp: dict[str, Any] | None = None
    probe: dict[str, Any] | None = None
    message: str | None = None
    created: str
    updated: str
    integrity: dict[str, Any] | None = None  # memlens.integrity: digests of the record and its files

    @property
    def side(self) -> str | None:
        return self.splits.get("side") if self.splits else None


def versions() -> dict[str, str]:
    # opacus, torchvision: optional or slow to import, loaded only on this path
    import opacus
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "opacus": opacus.__version__, "memlens": __version__}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def read_run(run_dir: str | Path) -> RunRecord:
    """Read and verify a run record: its own digest, the files it recorded (the weights, the heads) and
    its signature when it has one.

    Raises:
        MemlensError: a missing, unreadable or edited record, or files replaced since.
    """

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MemlensError(f"run directory not found: {run_dir}")
    raw = read_json(run_dir / RUN_FILE, what="run record")
    if not isinstance(raw, dict):
        raise MemlensError(f"{run_dir / RUN_FILE} is not a memlens run record")
    verify(raw, run_dir / RUN_FILE)
    try:
        return RunRecord.model_validate(raw)
    except ValidationError as exc:
        raise MemlensError(format_validation_error(exc, source=str(run_dir / RUN_FILE))) from None


def write_run(run_dir: str | Path, record: RunRecord, *, sign_key=None) -> None:
    """Write run.json with its integrity block (the record's digest and its weights' and heads')."""

    run_dir = Path(run_dir)
    record.updated = now()
    doc = stamp(record.model_dump(mode="json"), files=file_digests(run_dir, [MODEL_FILE, HEADS_FILE]),
                sign_key=sign_key)
    record.integrity = doc["integrity"]
    write_json(run_dir / RUN_FILE, doc)


# ----------------------------------------------------------------------------- weights


def save_weights(path: str | Path, module: nn.Module, *, metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata or {}))


def save_heads(path: str | Path, objective: nn.Module) -> None:
    """What the objective trained besides the encoder (MAE's decoder, projection heads): the
    audit's MAE reconstruction scores need the decoder."""
    tensors = {k: v.detach().contiguous().clone() for k, v in objective.state_dict().items()
               if not k.startswith("encoder.")}
    if tensors:
        atomic_write_bytes(path, save(tensors, metadata={"format": "memlens-heads-1"}))


def load_objective(run_dir: str | Path) -> nn.Module:
    """A finished run's whole objective (encoder and heads), in eval mode, for scores that need the
    heads (MAE's reconstruction loss)."""

    run_dir = Path(run_dir)
    encoder = load_encoder(run_dir)
    rec = encoder.record
    if not (run_dir / HEADS_FILE).is_file():
        raise MemlensError(f"run {run_dir} has no {HEADS_FILE} (trained by an older memlens)")
    mean, std = rec.data["normalize"]["mean"], rec.data["normalize"]["std"]
    classes = rec.data.get("classes")
    obj = build_objective(rec.config, encoder, Augmenter(rec.config.augmentation, mean=mean, std=std),
                          in_chans=rec.data["channels"], num_classes=len(classes) if classes else None)
    heads = load_file(str(run_dir / HEADS_FILE))
    missing = [k for k in obj.state_dict() if not k.startswith("encoder.") and k not in heads]
    if missing:
        raise MemlensError(f"{run_dir / HEADS_FILE} does not match the run's objective (missing {missing[0]})")
    obj.load_state_dict({**{f"encoder.{k}": v for k, v in encoder.state_dict().items()}, **heads}, strict=False)
    return obj.eval()


def load_weights(module: nn.Module, path: str | Path, *, what: str) -> None:
    path = Path(path)
    if not path.is_file():
        raise MemlensError(f"{what} not found: {path}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise MemlensError(f"{path} is not a readable safetensors file: {exc}") from None
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or extra or wrong:
        detail = (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra else
                  f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}, expected {tuple(expected[wrong[0]].shape)}")
        raise MemlensError(f"{path} does not match the architecture in its run config ({detail})")
    module.load_state_dict(state)


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | Path, *, objective: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], extra: dict[str, torch.Tensor] | None = None) -> None:
    """One file holding the objective's weights, the optimizer state and the loop state (JSON in
    the safetensors metadata), written atomically: a crash leaves the previous epoch's file.
    ``extra`` tensors (a weight average) are stored under their own names."""
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v.detach().contiguous().clone()
                                        for k, v in objective.state_dict().items()}
    tensors.update({k: v.detach().contiguous().clone() for k, v in (extra or {}).items()})
    opt = optimizer.state_dict()
    scalars: dict[str, Any] = {}
    for pid, pstate in opt["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value.detach().contiguous().clone()
            else:
                scalars[f"{pid}.{key}"] = value
    meta = {"state": state, "param_groups": opt["param_groups"], "optim_scalars": scalars}
    # 0600: a DP run's checkpoint holds its secret noise key until training ends
    atomic_write_bytes(path, save(tensors, metadata={"memlens": json.dumps(meta)}), mode=0o600)


def load_checkpoint(path: str | Path, *, objective: nn.Module, optimizer: torch.optim.Optimizer,
                    device: torch.device | str = "cpu") -> dict[str, Any]:
    path = Path(path)
    try:
        raw = path.read_bytes()
        tensors = {k: v.to(device) for k, v in st_load(raw).items()}
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})["memlens"])
    except (OSError, SafetensorError, KeyError, ValueError) as exc:
        raise MemlensError(f"checkpoint {path} is unreadable ({exc}); start again with --force") from None
    model_state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    try:
        objective.load_state_dict(model_state)
    except RuntimeError as exc:
        raise MemlensError(f"checkpoint {path} does not match the run config: {str(exc).splitlines()[0]}") from None
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = value
    for key, value in meta["optim_scalars"].items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    return {**meta["state"], "extra": {k: v for k, v in tensors.items() if not k.startswith(("model.", "optim."))}}


# ----------------------------------------------------------------------------- loading encoders


def build_from_record(record: RunRecord) -> nn.Module:

    m = record.config.model
    return build_encoder(m.arch, image_size=record.data["image_size"], in_chans=record.data["channels"],
                         patch_size=m.patch_size, embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
                         mlp_ratio=m.mlp_ratio)


def load_encoder(run_dir: str | Path, *, require_complete: bool = True) -> nn.Module:
    """The trained encoder of a run, in eval mode.

    The returned module offers ``representation(x)`` (B, D) for alignment, ``forward_features``,
    ``probe_features`` and ``layer_specs()``; its input is images normalised with
    ``encoder.normalization`` = (mean, std) of the run's data.
    """
    run_dir = Path(run_dir)
    record = read_run(run_dir)
    if require_complete and record.status not in ("complete", "stopped_budget"):
        hint = ("it failed: " + (record.message or "see run.json")) if record.status == "failed" else \
            "resume it with memlens train --resume"
        raise MemlensError(f"run {run_dir} is not finished (status: {record.status}); {hint}")
    encoder = build_from_record(record)
    if record.model_sha256 is not None:

        if (run_dir / MODEL_FILE).is_file() and sha256_file(run_dir / MODEL_FILE) != record.model_sha256:
            raise MemlensError(f"{run_dir / MODEL_FILE} is not the file this run wrote (its sha256 differs from the "
                               f"one in {RUN_FILE}); the weights were replaced or edited")
    load_weights(encoder, run_dir / MODEL_FILE, what="model weights")
    encoder.normalization = (record.data["normalize"]["mean"], record.data["normalize"]["std"])
    encoder.record = record
    return encoder.eval()
