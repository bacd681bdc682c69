"""What an encoder exposes to hooks: its layers, their kind and their units.

Units (localizing paper, Section 5: "an activation map from a convolutional layer (single-layer
output channel) or an individual neuron within a fully connected layer") are measured where the
paper measures them: after the non-linearity. A layer's ``unit_kind`` says what its outputs are:

* ``activation``: outputs of a ReLU-family non-linearity (ReLU, ReLU6, LeakyReLU with a small
  slope is *not* one), >= 0. UnitMem's selectivity index (Eq. 8) is defined for these.
* ``gelu``: outputs of GELU / SiLU / Mish, which are >= -0.28 and whose small negative lobe
  means "inactive". Rule: every activation is clamped at 0 *before* averaging over positions,
  tokens and views, so the negative lobe counts as no response (it is bounded and carries no
  selectivity), and mu stays >= 0 as Eq. 8 requires.
* ``other``: signed outputs (attention projections, the residual stream, block outputs, norms,
  MLP outputs, residual additions). Available to LayerMem always and to UnitMem only on request,
  with an explicit normalisation (:mod:`memlens.audit.unitmem`); never silently clamped.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch
import torch.nn as nn

from memlens.errors import MemlensError

Layout = Literal["channels_first", "channels_last", "tokens", "flat"]
UnitKind = Literal["activation", "gelu", "other"]
Tap = Literal["output", "input"]

ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Sigmoid, nn.Softplus)
GELU_LIKE: tuple[type[nn.Module], ...] = (nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish)


def unit_kind_of(module: nn.Module) -> UnitKind:
    if isinstance(module, nn.Hardtanh) and not isinstance(module, nn.ReLU6):
        return "other"  # Hardtanh is signed unless it is ReLU6
    if isinstance(module, ACTIVATIONS):
        return "activation"
    if isinstance(module, GELU_LIKE):
        return "gelu"
    try:  # timm's own GELU / QuickGELU wrappers
        # timm: optional or slow to import, loaded only on this path
        from timm.layers.activations import GELU, GELUTanh, QuickGELU

        if isinstance(module, (GELU, GELUTanh, QuickGELU)):
            return "gelu"
    except ImportError:  # pragma: no cover - older timm
        pass
    return "other"


@dataclass(frozen=True)
class LayerSpec:
    """A hookable layer.

    Attributes:
        name: module path from ``named_modules()``; used verbatim in every output file.
        kind: what the layer is (conv, residual, block, attention, resblock_attn, mlp_hidden,
            mlp, output, stage, activation, module).
        units: number of units (channels of a conv map, neurons of a token layer).
        layout: ``channels_first`` (B, C, H, W), ``channels_last`` (B, H, W, C), ``tokens``
            (B, T, D) or ``flat`` (B, D).
        depth: position of the layer in the forward order (0 = first).
        block: the ViT block or ResNet stage the layer belongs to (for per-block tables).
        prev: the layer whose LayerMem this layer's ΔLayerMem subtracts (None for the first).
            For conv nets the previous layer in forward order (localizing paper, Eq. 4 and
            Table 1); for ViTs the residual stream the sub-block reads (Table 10:
            ΔLM^ATT_N = LM^ATT_N - ResBlock^FC_{N-1}, ΔLM^FC_N = LM^FC_N - ResBlock^ATT_N,
            ΔBlockMem_N = ResBlock^FC_N - ResBlock^FC_{N-1}).
        unit_kind: see the module docstring.
        tap: ``output`` (the module's output) or ``input`` (its first input: how the residual
            stream after a timm block's attention, the input of ``norm2``, is reached).
    """

    name: str
    kind: str
    units: int
    layout: Layout
    depth: int
    block: int
    prev: str | None = None
    unit_kind: UnitKind = "other"
    tap: Tap = "output"

    @property
    def is_unit_layer(self) -> bool:
        """Whether UnitMem measures this layer by default (units after a non-linearity)."""
        return self.unit_kind in ("activation", "gelu")

    def unit_activations(self, out: torch.Tensor, *, signed: str = "exclude") -> torch.Tensor:
        """Per-unit activation of each input, shape (B, units), float32.

        Conv maps are averaged over the spatial positions and token layers over all tokens,
        CLS included (localizing paper, Appendix B, "Details on Computing UnitMem"). GELU-like
        outputs are clamped at 0 first (module docstring); for ``other`` layers ``signed``
        chooses what is averaged: ``abs`` the magnitude |a|, ``raw`` the signed value (the
        caller normalises, e.g. by shifting).
        """
        x = out.float()
        if self.unit_kind == "gelu":
            x = x.clamp_min(0.0)
        elif self.unit_kind == "other" and signed == "abs":
            x = x.abs()
        if self.layout == "channels_first":
            return x.flatten(2).mean(dim=2)
        if self.layout == "channels_last":
            return x.flatten(1, -2).mean(dim=1)
        if self.layout == "tokens":
            return x.mean(dim=1)
        return x.flatten(1)

    def to_dict(self) -> dict:
        return asdict(self)


def layout_of(shape: tuple[int, ...], module: nn.Module | None = None) -> Layout:
    """Guess a layer output's layout from its shape (B, ...).

    4-d maps are channels-first unless the module is a Linear (or the spatial dims are clearly
    dims 1 and 2: shape[1] == shape[2] != shape[3]), which is how ConvNeXt-style blocks run
    their MLPs on (B, H, W, C) maps.
    """
    if len(shape) == 2:
        return "flat"
    if len(shape) == 3:
        return "tokens"
    if len(shape) == 4:
        if isinstance(module, nn.Linear) or (shape[1] == shape[2] and shape[2] != shape[3]):
            return "channels_last"
        return "channels_first"
    raise MemlensError(f"layer output of shape {tuple(shape)} is not a (B, C, H, W), (B, T, D) or (B, D) tensor")


def units_of(shape: tuple[int, ...], layout: Layout) -> int:
    if layout == "channels_first":
        return int(shape[1])
    if layout == "flat":
        return int(shape[1])
    return int(shape[-1])


def _first_tensor(x):
    if torch.is_tensor(x):
        return x
    if isinstance(x, (tuple, list)) and x and torch.is_tensor(x[0]):
        return x[0]
    return None


def trace_shapes(model: nn.Module, example: torch.Tensor, names: list[str], *, taps: dict[str, Tap] | None = None,
                 forward=None) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """Run one forward pass with hooks on ``names``; return them in the order they fired and
    their output (or input, for ``tap: input``) shapes. Modules that never run are dropped."""
    modules = dict(model.named_modules())
    order: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    taps = taps or {}
    handles = []

    def make(name: str):
        def hook(module, inputs, output=None):
            t = _first_tensor(inputs if taps.get(name) == "input" else output)
            if t is not None and name not in shapes:
                order.append(name)
                shapes[name] = tuple(t.shape)
        return hook

    try:
        for name in names:
            m = modules[name]
            if taps.get(name) == "input":
                handles.append(m.register_forward_pre_hook(make(name)))
            else:
                handles.append(m.register_forward_hook(make(name)))
        with torch.no_grad():
            (forward or model)(example)
    finally:
        for h in handles:
            h.remove()
    return order, shapes


def select_layers(specs: list[LayerSpec], model: nn.Module, patterns: list[str] | None, *,
                  example: torch.Tensor, forward=None) -> list[LayerSpec]:
    """Keep the discovered layers matching ``patterns`` (shell globs on module paths), adding any
    other module of ``model`` they match (its kind inferred from its type). No patterns: all."""
    if not patterns:
        return specs
    known = {s.name: s for s in specs}
    names = [n for n, _ in model.named_modules() if n]
    matched = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:

        close = difflib.get_close_matches(unmatched[0], names, n=3)
        raise MemlensError(f"layer pattern '{unmatched[0]}' matches no module"
                           + (f"; close: {', '.join(close)}" if close else ""))
    extra = [n for n in matched if n not in known]
    modules = dict(model.named_modules())
    order, shapes = trace_shapes(model, example, list(dict.fromkeys(list(known) + extra)), forward=forward,
                                 taps={s.name: s.tap for s in specs})
    out: list[LayerSpec] = []
    for name in order:
        if name not in matched:
            continue
        if name in known:
            out.append(known[name])
            continue
        module = modules[name]
        layout = layout_of(shapes[name], module)
        out.append(LayerSpec(name=name, kind="activation" if unit_kind_of(module) != "other" else "module",
                             units=units_of(shapes[name], layout), layout=layout, depth=0, block=0,
                             unit_kind=unit_kind_of(module)))
    if not out:
        raise MemlensError(f"layer patterns {patterns} match no layer that runs in the forward pass")
    # Depth and prev follow the forward order of the selection (a conv net's Eq. 4 neighbour).
    result, prev = [], None
    for i, s in enumerate(out):
        keep_prev = s.prev if s.prev in {o.name for o in out} else prev
        result.append(replace(s, depth=i, prev=keep_prev if i else None))
        prev = s.name
    return result


def discover_layers(model: nn.Module, example: torch.Tensor, *, forward=None) -> list[LayerSpec]:
    """The layers an audit hooks on a model memlens did not build.

    * timm VisionTransformer-like models (``blocks`` with ``attn``, ``mlp`` and ``norm2``): per
      block the attention output, the residual stream after attention (input of ``norm2``), the
      MLP hidden activation (``mlp.act``, the units), the MLP output and the block output, then
      the final ``norm`` (localizing paper, Table 10).
    * Everything else: every non-linearity module (ReLU, GELU, ...; the units of conv nets and
      MLPs) and, for timm models, the stages named by ``feature_info``; in forward order, each
      ΔLayerMem taken against the previous layer.
    """
    modules = dict(model.named_modules())
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) and all(
            hasattr(b, "attn") and hasattr(b, "mlp") and hasattr(b, "norm2") for b in blocks):
        return _vit_layers(model, example, forward=forward)
    names = [n for n, m in modules.items() if n and unit_kind_of(m) != "other"]
    stages = []
    for info in getattr(model, "feature_info", None) or []:
        name = info.get("module") if isinstance(info, dict) else None
        if name and name in modules and name not in names:
            stages.append(name)
    if not names and not stages:
        raise MemlensError(f"found no activation modules in {type(model).__name__} to hook; name the layers to "
                           f"audit with 'layers' (shell globs on module paths, see 'memlens layers')")
    order, shapes = trace_shapes(model, example, names + stages, forward=forward)
    specs: list[LayerSpec] = []
    block = 0
    for name in order:
        m = modules[name]
        layout = layout_of(shapes[name], m)
        kind = "stage" if name in stages else "activation"
        if name in stages:
            block += 1
        specs.append(LayerSpec(name=name, kind=kind, units=units_of(shapes[name], layout), layout=layout,
                               depth=len(specs), block=block, prev=specs[-1].name if specs else None,
                               unit_kind="other" if name in stages else unit_kind_of(m)))
    return specs


def _vit_layers(model: nn.Module, example: torch.Tensor, *, forward=None) -> list[LayerSpec]:
    specs: list[LayerSpec] = []
    names, taps = [], {}
    for i, blk in enumerate(model.blocks):
        names += [f"blocks.{i}.attn", f"blocks.{i}.norm2", f"blocks.{i}.mlp.act", f"blocks.{i}.mlp", f"blocks.{i}"]
        taps[f"blocks.{i}.norm2"] = "input"
        if not hasattr(blk.mlp, "act"):
            raise MemlensError(f"block {i}'s MLP has no 'act' module to measure units on; name the layers with "
                               f"'layers'")
    if hasattr(model, "norm") and isinstance(model.norm, nn.Module):
        names.append("norm")
    _, shapes = trace_shapes(model, example, names, taps=taps, forward=forward)
    modules = dict(model.named_modules())
    for i in range(len(model.blocks)):
        stream = f"blocks.{i - 1}" if i else None
        for name, kind, prev in ((f"blocks.{i}.attn", "attention", stream),
                                 (f"blocks.{i}.norm2", "resblock_attn", stream),
                                 (f"blocks.{i}.mlp.act", "mlp_hidden", f"blocks.{i}.norm2"),
                                 (f"blocks.{i}.mlp", "mlp", f"blocks.{i}.norm2"),
                                 (f"blocks.{i}", "block", stream)):
            if name not in shapes:
                raise MemlensError(f"layer {name} did not run in the forward pass")
            layout = layout_of(shapes[name], modules[name])
            specs.append(LayerSpec(name=name, kind=kind, units=units_of(shapes[name], layout), layout=layout,
                                   depth=len(specs), block=i, prev=prev,
                                   unit_kind=unit_kind_of(modules[name]) if kind == "mlp_hidden" else "other",
                                   tap="input" if kind == "resblock_attn" else "output"))
    if "norm" in shapes and not isinstance(model.norm, nn.Identity):
        last = len(model.blocks) - 1
        layout = layout_of(shapes["norm"])
        specs.append(LayerSpec(name="norm", kind="output", units=units_of(shapes["norm"], layout), layout=layout,
                               depth=len(specs), block=last, prev=f"blocks.{last}"))
    return specs
