"""Encoders people bring: timm models, importable factories, and their weight files.

Weights are read from ``.safetensors`` (preferred) or from ``.pt``/``.pth``/``.bin`` files with
``torch.load(weights_only=True)``: a checkpoint that would need pickle to load is refused, never
unpickled. Nested checkpoints (``{"state_dict": {"module.blocks.0...": ...}}``) are flattened to
dotted keys ("state_dict.module.blocks.0...") and ``key_prefix`` selects and strips the part that
belongs to the encoder, e.g. ``key_prefix: "state_dict.module."``; keys outside the prefix are
ignored and counted. Missing and unexpected keys are reported, and refused unless
``strict: false``. Weights holding NaN or inf are refused, naming the tensor.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from memlens.errors import MemlensError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")


def timm_model(name: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)``; nothing is downloaded.

    Raises:
        MemlensError: unknown model name (with close matches) or kwargs the model rejects.
    """
    # timm: optional or slow to import, loaded only on this path
    import timm

    kwargs = dict(kwargs or {})
    if kwargs.pop("pretrained", False):
        raise MemlensError("pretrained weights are not downloaded; pass the weights file instead (weights: ...)")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
        raise MemlensError(f"unknown timm model '{name}'" + (f"; close matches: {', '.join(close)}" if close else
                                                               "; see timm.list_models()"))
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise MemlensError(f"timm could not build '{name}' with {kwargs}: {str(exc).splitlines()[0]}") from None


def factory_model(target: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Call ``module.path:callable(**kwargs)`` and check that it returns an ``nn.Module``."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise MemlensError(f"'py:{target}' must name a module and a callable: py:package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except SystemExit as exc:  # a script's sys.exit() at import would end the audit, exit 0, nothing written
        raise MemlensError(f"importing '{module_name}' for py:{target} called sys.exit({exc.code!r}); a module whose "
                           f"import exits cannot provide an encoder (guard its script part with "
                           f"if __name__ == '__main__')") from None
    except Exception as exc:  # noqa: BLE001 - any failure of the user's module at import is its problem
        raise MemlensError(f"cannot import '{module_name}' for py:{target}: {type(exc).__name__}: "
                           f"{_first_line(exc)}") from None
    fn: Any = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise MemlensError(f"'{module_name}' has no attribute '{attr}'")
        fn = getattr(fn, part)
    if not callable(fn):
        raise MemlensError(f"py:{target} is not callable")
    try:
        model = fn(**(kwargs or {}))
    except SystemExit as exc:
        raise MemlensError(f"py:{target} called sys.exit({exc.code!r}) instead of returning an encoder") from None
    except TypeError as exc:
        raise MemlensError(f"py:{target} rejected its arguments {kwargs or {}}: {_first_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - the factory's own failure, reported on one line
        raise MemlensError(f"py:{target} raised {type(exc).__name__}: {_first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise MemlensError(f"py:{target} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def _flatten(obj: Any, prefix: str = "", out: dict[str, torch.Tensor] | None = None, *, skipped: list[str]) -> dict:
    out = {} if out is None else out
    if torch.is_tensor(obj):
        out[prefix.rstrip(".")] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}{k}.", out, skipped=skipped)
    else:
        skipped.append(prefix.rstrip("."))
    return out


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a weights file, nested dicts flattened to dotted keys (on the CPU).

    Raises:
        MemlensError: missing or unreadable file, or a checkpoint that needs pickle.
    """
    path = Path(path)
    if not path.is_file():
        raise MemlensError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        # safetensors: optional or slow to import, loaded only on this path
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise MemlensError(f"{path} is not a readable safetensors file: {exc}") from None
    if path.suffix not in PICKLE_SUFFIXES:
        raise MemlensError(f"{path}: unknown weights format '{path.suffix}'; use .safetensors (or .pt/.pth holding "
                           f"only tensors)")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
        text = str(exc)
        if "weights_only" in text or "Unpickl" in type(exc).__name__ or "GLOBAL" in text:
            raise MemlensError(f"{path} holds Python objects that only pickle can load; memlens never unpickles "
                               f"files (it could run arbitrary code). Save the state dict as safetensors: "
                               f"safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')") from None
        raise MemlensError(f"{path} is not a readable PyTorch checkpoint: {text.splitlines()[0] if text else exc}") \
            from None
    skipped: list[str] = []
    flat = _flatten(obj, skipped=skipped)
    if not flat:
        raise MemlensError(f"{path} holds no tensors")
    return flat


@dataclass
class LoadReport:
    """What loading a weights file into a model did."""

    path: str
    loaded: int
    ignored_outside_prefix: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"path": self.path, "loaded": self.loaded, "ignored_outside_prefix": self.ignored_outside_prefix,
                "missing": self.missing, "unexpected": self.unexpected, "mismatched": self.mismatched}


def check_finite(tensors: dict[str, torch.Tensor], *, where: str) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise MemlensError(f"{where}: tensor '{name}' holds {bad} NaN/inf value(s); these weights cannot be "
                               f"audited")


def load_into(model: nn.Module, path: str | Path, *, key_prefix: str | None = None, strict: bool = True) -> LoadReport:
    """Load a weights file into ``model`` (see the module docstring for prefixes and strictness).

    Raises:
        MemlensError: unreadable file, NaN/inf weights, nothing under the prefix, or (strict)
            missing / unexpected / mis-shaped keys, listed.
    """
    state = read_weights(path)
    total = len(state)
    if key_prefix:
        state = {k[len(key_prefix):]: v for k, v in state.items() if k.startswith(key_prefix)}
        if not state:
            sample = ", ".join(sorted(read_weights(path))[:3])
            raise MemlensError(f"{path}: no key starts with key_prefix '{key_prefix}' (keys look like: {sample})")
    check_finite(state, where=str(path))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
                  if k in state and state[k].shape != expected[k].shape]
    report = LoadReport(str(path), loaded=len(set(state) & set(expected)) - len(mismatched),
                        ignored_outside_prefix=total - len(state), missing=missing, unexpected=unexpected,
                        mismatched=mismatched)
    if mismatched:
        raise MemlensError(f"{path}: {len(mismatched)} tensor(s) have the wrong shape, e.g. {mismatched[0]} "
                           f"(file vs model); check the model kwargs")
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        hint = ""
        best = _best_prefix(list(state), set(expected)) if unexpected and missing else None
        if best:
            hint = (f"; the file's keys match with --key-prefix '{(key_prefix or '') + best}' (key_prefix: in "
                    f"YAML)")
        raise MemlensError(f"{path} does not match the model: {'; '.join(parts)}{hint}; to load what matches, pass "
                           f"--no-strict (strict: false in YAML)")
    if report.loaded == 0:
        raise MemlensError(f"{path}: no tensor matches the model's parameters")
    with torch.no_grad():
        model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return report


def _best_prefix(keys: list[str], expected: set[str]) -> str | None:
    """The dotted prefix whose removal makes the most keys match the model's (None if none helps)."""
    candidates = set()
    for k in keys[:50]:
        parts = k.split(".")
        candidates.update(".".join(parts[:i]) + "." for i in range(1, len(parts)))
    best, hits = None, 0
    for p in sorted(candidates, key=len):
        n = sum(1 for k in keys if k.startswith(p) and k[len(p):] in expected)
        if n > hits:
            best, hits = p, n
    return best


def finite_parameters(model: nn.Module, *, where: str) -> None:
    """Refuse a model whose parameters or buffers hold NaN/inf, naming the tensor."""
    check_finite(dict(model.state_dict()), where=where)


def timm_data_config(model: nn.Module) -> dict[str, Any] | None:
    """Input size, mean and std from timm's ``resolve_model_data_config`` (None for non-timm models).

    A model built with another ``img_size`` than its pretrained config keeps its real input
    size (timm's config reports the pretrained one).
    """
    if not hasattr(model, "pretrained_cfg"):
        return None
    # timm: optional or slow to import, loaded only on this path
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    size = cfg["input_size"][-1]
    pe = getattr(model, "patch_embed", None)
    real = getattr(pe, "img_size", None)
    if real is not None:
        size = int(real[-1] if isinstance(real, (tuple, list)) else real)
    return {"input_size": int(size), "in_chans": int(cfg["input_size"][0]), "mean": [float(m) for m in cfg["mean"]],
            "std": [float(s) for s in cfg["std"]], "interpolation": cfg.get("interpolation"),
            "crop_pct": cfg.get("crop_pct"), "crop_mode": cfg.get("crop_mode")}
