"""The Python API: audit encoders held in memory or named by path, in one call."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch.nn as nn

from memlens.audit.encoders import from_module
from memlens.audit.engine import run_audit
from memlens.audit.results import AuditResult, write_audit
from memlens.config import AuditConfig, DataConfig, EncoderSpec, validate
from memlens.errors import MemlensError


def data_config_for_path(path: str | Path) -> DataConfig:
    """The data source a path names: a folder or .tar/.tar.gz, an .npz, or a manifest .csv."""
    p = Path(path)
    suffix = "".join(p.suffixes[-2:]) if p.name.endswith(".tar.gz") else p.suffix.lower()
    if suffix == ".npz":
        return DataConfig(source="npz", path=str(p))
    if suffix == ".csv":
        return DataConfig(source="manifest", path=str(p))
    if p.is_dir() or suffix in (".tar", ".tar.gz", ".tgz"):
        return DataConfig(source="folder", path=str(p))
    if not p.exists():
        raise MemlensError(f"data not found: {p}")
    raise MemlensError(f"{p}: not a folder, .tar/.tar.gz archive, .npz or manifest .csv")


def _specs(side: str, value: Any, *, input_size: int | None, mean, std) -> tuple[list[Any], list[Any] | None]:
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise MemlensError(f"{side}: no encoder given")
    specs, objects, any_module = [], [], False
    for k, item in enumerate(items):
        if isinstance(item, nn.Module):

            any_module = True
            label = f"{side}{k}" if len(items) > 1 else side
            specs.append(EncoderSpec(model=f"module:{type(item).__name__}", name=label))
            objects.append(from_module(item, input_size=input_size, mean=mean, std=std, label=label))
        else:
            spec = item if isinstance(item, EncoderSpec) else validate(
                EncoderSpec, {"model": str(item)} if isinstance(item, (str, Path)) else item, source=f"{side}[{k}]")
            specs.append(spec)
            objects.append(spec)
    return specs, objects if any_module else None


def _plain_specs(side: str, value: Any) -> list[EncoderSpec]:
    """Specs of encoders named by path or mapping (references and targets: no in-memory modules)."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise MemlensError(f"{side}: no encoder given")
    out = []
    for k, item in enumerate(items):
        if isinstance(item, nn.Module):
            raise MemlensError(f"{side}[{k}]: give references and targets as run directories or specs with weights")
        out.append(item if isinstance(item, EncoderSpec) else validate(
            EncoderSpec, {"model": str(item)} if isinstance(item, (str, Path)) else item, source=f"{side}[{k}]"))
    return out


def audit_encoders(f: Any = None, g: Any = None, splits: str | Path | None = None, *,
                   references: Sequence[Any] | None = None, target: Any = None, design: str | Path | None = None,
                   data: str | Path | DataConfig | None = None, out: str | Path | None = None, force: bool = False,
                   input_size: int | None = None, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None, dataset=None, progress=None, **settings: Any) -> AuditResult:
    """Audit encoders f (trained with the candidates S_C) against g (trained without them), or K
    reference encoders (and a target, the encoder to be released).

    Args:
        f, g: one encoder or a list (several seeds): memlens run directories, ``"timm:<name>"``,
            ``"py:<module>:<factory>"``, :class:`~memlens.config.EncoderSpec` mappings such as
            ``{"model": "timm:resnet18", "weights": "f.safetensors"}``, or ``nn.Module`` objects.
        references: instead of f and g, the K encoders of a reference design: memlens runs, or specs
            of encoders trained elsewhere on the design's lists (their order, or each spec's
            ``reference``), with ``design``.
        target: the encoder to be released (a run or a spec with its weights).
        design: the design (``memlens design``) that references trained elsewhere followed.
        splits: the splits.json naming S_S, S_C, S_I, S_E.
        data: the images (folder, archive, .npz, manifest .csv or a DataConfig); default: the
            runs' data or the data recorded with the splits.
        out: also write the audit directory (what ``memlens report`` and ``memlens gate`` read).
        force: overwrite ``out``.
        input_size, mean, std: input of ``nn.Module`` encoders that are not timm models.
        **settings: any :class:`~memlens.config.AuditConfig` field (views, pairing, device,
            precision, layers, representation, augment, seed, ...).

    Returns:
        :class:`~memlens.audit.results.AuditResult` with pandas tables ``points``, ``layers``,
        ``units``, ``tests`` and ``.save(dir)``.

    Raises:
        MemlensError: bad settings or inputs (the message names the problem).
    """

    if splits is None:
        raise MemlensError("splits: the splits.json naming S_S, S_C, S_I, S_E is needed")
    if references is not None:
        if f is not None or g is not None:
            raise MemlensError("give f and g, or references, not both")
        enc: dict[str, Any] = {"references": [s.model_dump() for s in _plain_specs("references", references)],
                               "target": _plain_specs("target", target)[0].model_dump() if target is not None
                               else None, "design": str(design) if design is not None else None}
        f_obj = g_obj = None
    else:
        if f is None or g is None:
            raise MemlensError("give f and g (or references)")
        f_specs, f_obj = _specs("f", f, input_size=input_size, mean=mean, std=std)
        g_specs, g_obj = _specs("g", g, input_size=input_size, mean=mean, std=std)
        enc = {"f": [s.model_dump() for s in f_specs], "g": [s.model_dump() for s in g_specs]}
    if isinstance(data, (str, Path)):
        data = data_config_for_path(data)
    cfg = validate(AuditConfig, {**settings, **enc, "splits": str(splits),
                                 "data": data.model_dump() if data is not None else None}, source="audit settings")
    if out is not None and Path(out).exists() and any(Path(out).iterdir()) and not force:
        raise MemlensError(f"{out} already holds files; pass force=True to overwrite it")
    result = run_audit(cfg, dataset=dataset, f=f_obj, g=g_obj, progress=progress)
    if out is not None:
        write_audit(result, out, force=force)
    return result
