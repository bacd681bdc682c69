"""The encoders an audit measures: memlens runs, timm models, factories and plain modules.

Every encoder, wherever it comes from, is wrapped in an :class:`AuditEncoder` that knows

* how to turn a batch of views in [0, 1] into the encoder's input (its own mean and std, from
  the run record, timm's data config or the spec);
* what its *representation* is, the output SSLMem aligns (``representation``):

  - ``features``: the whole output of ``forward_features`` (all tokens of a ViT, the whole final
    map of a conv net), flattened: the SSLMem paper's choice (Appendix A), and the default for
    memlens runs;
  - ``pooled``: timm's ``forward_head(forward_features(x), pre_logits=True)``, i.e. the pooled
    feature a downstream head reads (default for timm models); for other modules the output
    averaged over positions or tokens;
  - ``cls``: the class token of ``forward_features``; ``mean``: the mean of the patch tokens;
  - ``output``: ``module(x)`` flattened (default for ``py:`` factories and plain modules);
  - ``layer:<name>``: the output of one named module, flattened;

* which layers LayerMem and UnitMem hook (:mod:`memlens.models.layers`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from memlens.config import EncoderSpec
from memlens.data.augment import EvalTransform
from memlens.errors import MemlensError
from memlens.io import sha256_file
from memlens.models.external import factory_model, finite_parameters, load_into, timm_data_config, timm_model
from memlens.models.layers import LayerSpec, discover_layers, select_layers
from memlens.train.run import MODEL_FILE, RUN_FILE, load_encoder

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class AuditEncoder:
    """An encoder ready to be audited (see the module docstring).

    Attributes:
        module: the model, in eval mode, on its device.
        representation: what SSLMem aligns.
        input_size, in_chans: the input the module takes.
        mean, std: its input normalisation (per channel, [0, 1] units).
        label: a short name for tables.
        source: ``run``, ``timm``, ``py`` or ``module``.
        info: provenance recorded in audit.json (spec, weights hash, load report, DP...).
        record: the run record of a memlens run (None otherwise).
        eval_transform: how an image of any size becomes the un-augmented input (timm's eval
            transform: crop_pct, crop_mode, interpolation; a memlens run's recorded one).
    """

    module: nn.Module
    representation: str
    input_size: int
    in_chans: int
    mean: list[float]
    std: list[float]
    label: str
    source: str
    info: dict[str, Any] = field(default_factory=dict)
    record: Any = None
    specs: list[LayerSpec] = field(default_factory=list)
    eval_transform: EvalTransform | None = None

    def __post_init__(self) -> None:
        if self.eval_transform is None:
            self.eval_transform = EvalTransform(self.input_size)

    # ------------------------------------------------------------------ forward

    @property
    def device(self) -> torch.device:
        for p in self.module.parameters():
            return p.device
        for b in self.module.buffers():
            return b.device
        return torch.device("cpu")

    def prepare(self, views: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) views in [0, 1] -> the module's normalised input (grey images are
        repeated to three channels for RGB models)."""
        if views.shape[1] != self.in_chans:
            if views.shape[1] == 1 and self.in_chans == 3:
                views = views.expand(-1, 3, -1, -1)
            else:
                raise MemlensError(f"encoder {self.label} takes {self.in_chans}-channel images; the data has "
                                   f"{views.shape[1]}")
        mean = torch.tensor(self.mean, dtype=views.dtype, device=views.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=views.dtype, device=views.device).view(1, -1, 1, 1)
        return (views - mean) / std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        return m.forward_features(x) if hasattr(m, "forward_features") else m(x)

    def represent(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input (B, C, S, S) -> representation (B, D), float32."""
        rep = self.representation
        m = self.module
        if rep == "output":
            out = m(x)
        elif rep.startswith("layer:"):
            with self._capture(rep[6:]) as box:
                self.features(x) if hasattr(m, "forward_features") else m(x)
            out = box["out"]
        else:
            feats = self.features(x)
            if rep == "features":
                out = feats
            elif rep == "pooled":
                if hasattr(m, "forward_head"):
                    out = m.forward_head(feats, pre_logits=True)
                elif hasattr(m, "head_features"):
                    out = m.head_features(feats)
                else:
                    out = feats.flatten(2).mean(dim=2) if feats.dim() == 4 else \
                        feats.mean(dim=1) if feats.dim() == 3 else feats
            elif rep in ("cls", "mean"):
                if feats.dim() != 3:
                    raise MemlensError(f"representation '{rep}' needs token outputs (B, T, D); encoder "
                                       f"{self.label} gives shape {tuple(feats.shape)}")
                prefix = int(getattr(m, "num_prefix_tokens", 1))
                out = feats[:, 0] if rep == "cls" else feats[:, prefix:].mean(dim=1)
            else:  # pragma: no cover - validated by the config
                raise MemlensError(f"unknown representation '{rep}'")
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.flatten(1).float()

    @contextmanager
    def _capture(self, name: str) -> Iterator[dict]:
        modules = dict(self.module.named_modules())
        if name not in modules:
            raise MemlensError(f"representation layer '{name}' is not a module of encoder {self.label}")
        box: dict = {}
        handle = modules[name].register_forward_hook(lambda _m, _i, out: box.__setitem__("out", out))
        try:
            yield box
        finally:
            handle.remove()

    def example(self, n: int = 2) -> torch.Tensor:
        return torch.zeros(n, self.in_chans, self.input_size, self.input_size, device=self.device)

    def discover(self, patterns: list[str] | None = None) -> list[LayerSpec]:
        """The layers to hook: the model's own list (memlens encoders) or discovered, then filtered."""
        with torch.no_grad():
            if hasattr(self.module, "layer_specs"):
                specs = self.module.layer_specs()
            else:
                specs = discover_layers(self.module, self.example(), forward=self.represent)
            self.specs = select_layers(specs, self.module, patterns, example=self.example(), forward=self.represent)
        return self.specs

    @property
    def family(self) -> str:
        fam = getattr(self.module, "family", None)
        if fam:
            return fam
        return "vit" if any(s.kind == "resblock_attn" for s in self.specs) else "conv" if any(
            s.layout == "channels_first" for s in self.specs) else "other"

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "source": self.source, "representation": self.representation,
                "input_size": self.input_size, "in_chans": self.in_chans, "mean": self.mean, "std": self.std,
                "parameters": sum(p.numel() for p in self.module.parameters()), **self.info}


# ----------------------------------------------------------------------------- resolving specs


def _default_rep(source: str) -> str:
    return {"run": "features", "timm": "pooled"}.get(source, "output")


def from_module(module: nn.Module, *, input_size: int | None = None, in_chans: int | None = None,
                mean: list[float] | None = None, std: list[float] | None = None, representation: str | None = None,
                label: str = "module", source: str = "module", info: dict | None = None) -> AuditEncoder:
    """Wrap any ``nn.Module`` (the Python API's entry point for encoders of one's own).

    Input size, channels, mean and std come from the arguments, else timm's data config, else
    ImageNet's statistics at the size given.
    """
    cfg = timm_data_config(module) or {}
    size = input_size or cfg.get("input_size")
    if size is None:
        raise MemlensError(f"encoder {label}: give its input_size (it is not a timm model with a data config)")
    chans = in_chans or _guess_in_chans(module) or cfg.get("in_chans") or 3
    mean = mean or cfg.get("mean") or (IMAGENET_MEAN if chans == 3 else [0.5] * chans)
    std = std or cfg.get("std") or (IMAGENET_STD if chans == 3 else [0.5] * chans)
    if len(mean) != chans or len(std) != chans:
        raise MemlensError(f"encoder {label}: mean and std need {chans} values (one per input channel)")
    finite_parameters(module, where=f"encoder {label}")
    evaluation = EvalTransform(int(size), crop_pct=float(cfg.get("crop_pct") or 1.0),
                               crop_mode=cfg.get("crop_mode") if cfg.get("crop_mode") == "squash" else "center",
                               interpolation="bicubic" if cfg.get("interpolation") == "bicubic" else "bilinear")
    return AuditEncoder(module=module.eval(), representation=representation or _default_rep(source),
                        input_size=int(size), in_chans=int(chans), mean=list(mean), std=list(std), label=label,
                        source=source, info=dict(info or {}), eval_transform=evaluation)


def _guess_in_chans(module: nn.Module) -> int | None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


def resolve(spec: EncoderSpec | nn.Module | str | AuditEncoder, *, default_rep: str | None = None,
            device: torch.device | None = None, side: str = "") -> AuditEncoder:
    """Load one encoder of an audit and move it to ``device``.

    Args:
        side: the encoder's role in the audit ("f", "g", "reference", "target"), for messages.

    Raises:
        MemlensError: unreadable run, unknown model, bad weights (see :mod:`memlens.models.external`),
            or a timm:/py: encoder without weights (unless ``weights: none`` asks for its random
            initialisation on purpose).
    """
    if isinstance(spec, AuditEncoder):
        enc = spec
    elif isinstance(spec, nn.Module):
        enc = from_module(spec, representation=default_rep)
    else:
        if isinstance(spec, (str, Path)):
            spec = EncoderSpec(model=str(spec))
        enc = _from_spec(spec, default_rep, side)
    if device is not None:
        enc.module.to(device)
    return enc


def _from_spec(spec: EncoderSpec, default_rep: str | None, side: str = "") -> AuditEncoder:
    rep = spec.representation or default_rep
    if spec.kind == "run":

        if spec.weights or spec.kwargs or spec.key_prefix:
            raise MemlensError(f"{spec.model} is a memlens run directory: weights, kwargs and key_prefix apply to "
                               f"timm: and py: encoders only")
        path = Path(spec.model)
        module = load_encoder(path)
        rec = module.record
        finite_parameters(module, where=f"run {path}")
        sig = (rec.integrity or {}).get("signature") or {}  # verified when the record was read
        info = {"spec": spec.model, "path": str(path.resolve()), "weights_sha256": sha256_file(path / MODEL_FILE),
                "run_json_sha256": sha256_file(path / RUN_FILE), "run_signed_by": sig.get("public_key")}
        evaluation = EvalTransform(rec.data["image_size"], **(rec.data.get("eval_transform") or {}))
        return AuditEncoder(module=module, representation=rep or "features", input_size=rec.data["image_size"],
                            in_chans=rec.data["channels"], mean=rec.data["normalize"]["mean"],
                            std=rec.data["normalize"]["std"], label=spec.name or path.name, source="run",
                            info=info, record=rec, eval_transform=evaluation)
    if spec.kind == "module":
        raise MemlensError(f"'{spec.model}' stands for a Python object: pass the nn.Module itself to "
                           f"memlens.audit_encoders()")
    if spec.kind == "timm":
        module = timm_model(spec.model[5:], spec.kwargs)
    else:
        module = factory_model(spec.model[3:], spec.kwargs)
    info: dict[str, Any] = {"spec": spec.model, "kwargs": spec.kwargs}
    if spec.weights is None:
        who = f"{side} encoder {spec.label()}" if side else f"encoder {spec.label()}"
        named = f" ({spec.model})" if spec.label() != spec.model else ""
        raise MemlensError(f"{who}{named} has no weights: it would be audited at its random initialisation, "
                           f"which says nothing about a trained model; give its weights file (--{side or 'f'}-weights "
                           f"on the command line, weights: in YAML), or weights: none / --allow-random-init to audit "
                           f"the initialisation on purpose")
    if spec.weights == "none":
        info.update(weights=None, weights_sha256=None, random_init=True,
                    note="weights: none: the model's own random initialisation, asked for explicitly")
    else:
        report = load_into(module, spec.weights, key_prefix=spec.key_prefix, strict=spec.strict)
        info.update(weights=str(Path(spec.weights).resolve()), weights_sha256=sha256_file(spec.weights),
                    load=report.to_dict(), key_prefix=spec.key_prefix)
    if spec.dp is not None:
        info["declared_dp"] = spec.dp.model_dump()
    return from_module(module, input_size=spec.input_size, mean=spec.mean, std=spec.std, representation=rep,
                       label=spec.label(), source=spec.kind, info=info)
