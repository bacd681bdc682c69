"""Per-sample gradient clipping in one backward pass ("book-keeping" ghost clipping).

DP-SGD needs, for every example b in a batch, its gradient g_b, its norm ||g_b||, and the
clipped sum sum_b min(1, C / ||g_b||) g_b. Opacus's hook mode materialises every g_b (memory
B x parameters); its ghost mode avoids that but runs the backward pass twice. This engine does
one forward and one backward pass and never materialises g_b for linear layers:

1. During capture the parameters are frozen, so autograd computes only activation gradients
   (the weight gradients of an ordinary backward pass are never computed). Forward hooks keep
   each layer's input a and register a hook on its output for the gradient g of the summed
   per-example losses.
2. Per-example squared norms come from a and g layer by layer. For a linear map over T tokens,
   ||G_b||_F^2 = sum_{t,s} (a_bt . a_bs)(g_bt . g_bs) (the "ghost norm", Goodfellow 2015; Li et
   al. 2022), costing T^2 (in + out) per example instead of T in out; the cheaper of the two
   forms is used per layer.
3. With c_b = min(1, C / (||g_b|| + 1e-6)) (Opacus's rule), each weight gradient is a single
   matrix product: grad W = sum_b c_b sum_t g_bt a_bt^T = (c * g)^T a.

Supported layers (every trainable parameter must sit in one): Linear (timm's fused qkv
included), Conv2d (groups=1; timm's patch embedding), LayerNorm, timm's LayerScale, memlens's
token modules (PosEmbed, ClsToken, MaskToken), and *token parameters held directly by a module*
(timm's ``cls_token``, ``pos_embed``, ``reg_token``: any parameter of shape (1, ...) that the
module broadcasts over the batch). For those, capture swaps in a per-example copy of shape
(B, ...) for the duration of the forward and backward pass, whose gradient is the per-example
gradient. Anything else (BatchNorm, grouped convolutions, in-place LayerScale) is refused with
the layer's name. Noise, averaging and the optimizer step are left to Opacus's
``DPOptimizerFastGradientClipping``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from memlens.errors import MemlensError
from memlens.models.vit import ClsToken, MaskToken, PosEmbed

TOKEN_MODULES = (PosEmbed, ClsToken, MaskToken)


def _layer_scale() -> tuple[type, ...]:
    try:
        from timm.layers import LayerScale

        return (LayerScale,)
    except ImportError:  # pragma: no cover
        return ()


LAYER_SCALE = _layer_scale()
SUPPORTED = (nn.Linear, nn.Conv2d, nn.LayerNorm) + TOKEN_MODULES + LAYER_SCALE


def _token_like(p: torch.Tensor) -> bool:
    return p.dim() >= 2 and p.shape[0] == 1


def _linear_view(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, in) inputs and (B, T, out) output gradients of a linear map (a conv is one over patches)."""
    b = g.shape[0]
    if isinstance(module, nn.Conv2d):
        k, stride = module.kernel_size, module.stride
        if k == stride and module.padding in ((0, 0), "valid") and module.dilation == (1, 1):
            # Non-overlapping patches (ViT patch embedding): a reshape, no im2col.
            c, h, w = a.shape[1:]
            cols = a.reshape(b, c, h // k[0], k[0], w // k[1], k[1]).permute(0, 2, 4, 1, 3, 5)
            cols = cols.reshape(b, (h // k[0]) * (w // k[1]), c * k[0] * k[1])
        else:
            cols = F.unfold(a, k, dilation=module.dilation, padding=module.padding, stride=stride).transpose(1, 2)
        return cols, g.reshape(b, g.shape[1], -1).transpose(1, 2)
    return a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])


class GhostClipper:
    """Per-example gradient norms and clipped gradient sums for ``model``, one backward pass.

    Usage::

        clipper = GhostClipper(model)
        with clipper.capture():
            per_example_loss = model.losses(...)       # shape [B]
            per_example_loss.sum().backward()
        norms = clipper.norms()                         # [B]
        clipper.accumulate_clipped(max_grad_norm=1.0)   # writes p.grad
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers: list[tuple[str, nn.Module]] = []
        # (module path, module, parameter name, parameter): token parameters held directly
        self.expanded: list[tuple[str, nn.Module, str, nn.Parameter]] = []
        for name, module in model.named_modules():
            own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if isinstance(module, SUPPORTED):
                if isinstance(module, nn.Conv2d) and module.groups != 1:
                    raise MemlensError(f"DP-SGD does not support grouped convolution '{name}'")
                if LAYER_SCALE and isinstance(module, LAYER_SCALE) and getattr(module, "inplace", False):
                    raise MemlensError(f"DP-SGD does not support in-place LayerScale '{name}'; build the model with "
                                       f"inplace=False")
                self.layers.append((name, module))
            elif all(_token_like(p) for _, p in own):
                self.expanded += [(name, module, pname, p) for pname, p in own]
            else:
                bad = next(pn for pn, p in own if not _token_like(p))
                kind = type(module).__name__
                why = (" (BatchNorm mixes the examples of a batch, so per-example gradients do not exist)"
                       if isinstance(module, nn.modules.batchnorm._BatchNorm) else "")
                raise MemlensError(f"DP-SGD cannot compute per-sample gradients of layer '{name or 'model'}' "
                                   f"({kind}, parameter '{bad}'){why}; supported: Linear, Conv2d, LayerNorm, "
                                   f"LayerScale, token parameters")
        self.params = [p for _, m in self.layers for p in m.parameters(recurse=False) if p.requires_grad]
        self.params += [p for *_, p in self.expanded]
        self._records: dict[str, dict] = {}
        self._leaves: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
        self._active = False

    # ------------------------------------------------------------------ capture

    @contextmanager
    def capture(self, batch_size: int | None = None) -> Iterator[None]:
        """Freeze parameters and record layer inputs and output gradients; always restores.

        Args:
            batch_size: examples in the forward pass; needed when the model holds token
                parameters directly (they are expanded to one copy per example).
        """
        self._records = {}
        self._leaves = {}
        frozen = [p for p in self.params if p.requires_grad]
        handles = []
        swapped: list[tuple[nn.Module, dict]] = []
        try:
            for p in frozen:
                p.requires_grad_(False)
            for name, module in self.layers:
                handles.append(module.register_forward_hook(self._hook(name)))
            if self.expanded:
                if batch_size is None:
                    raise ValueError("capture(batch_size=...) is needed for models holding token parameters")
                for mod in {id(m): m for _, m, _, _ in self.expanded}.values():
                    swapped.append((mod, dict(mod._parameters)))
                for _, module, pname, p in self.expanded:
                    leaf = p.detach().expand(batch_size, *p.shape[1:]).clone().requires_grad_(True)
                    del module._parameters[pname]
                    object.__setattr__(module, pname, leaf)
                    self._leaves[id(p)] = (p, leaf)
            self._active = True
            yield
        finally:
            self._active = False
            for h in handles:
                h.remove()
            for module, params in swapped:
                for pname in params:
                    module.__dict__.pop(pname, None)
                module._parameters.clear()
                module._parameters.update(params)  # the original order: state_dict keys stay as they were
            for p in frozen:
                p.requires_grad_(True)

    def _expanded_grads(self) -> dict[nn.Parameter, torch.Tensor]:
        """Per-example gradients (B, *shape[1:]) of the token parameters held directly by modules."""
        return {p: leaf.grad for p, leaf in self._leaves.values() if leaf.grad is not None}

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor):
            if name in self._records:
                raise MemlensError(f"layer '{name}' ran twice in one forward pass; parameter sharing is not "
                                   "supported under DP-SGD")
            rec = {"inputs": inputs}
            self._records[name] = rec
            if not output.requires_grad:
                # The first layer sees data that needs no gradient: make its output a leaf so the
                # backward pass still reaches it.
                output = output.detach().requires_grad_(True)
                rec["leaf"] = True

            def grad_hook(grad: torch.Tensor) -> None:
                rec["grad"] = grad
                with torch.no_grad():
                    self._reduce(module, rec)

            output.register_hook(grad_hook)
            return output if rec.get("leaf") else None

        return hook

    # ------------------------------------------------------------------ per-layer maths

    def _records_in_order(self):
        for name, module in self.layers:
            rec = self._records.get(name)
            if rec is None or "sq" not in rec:
                continue  # the layer did not take part in this loss
            yield name, module, rec

    @staticmethod
    def _ghost_is_cheaper(t: int, d_in: int, d_out: int) -> bool:
        return t * t * (d_in + d_out) < t * d_in * d_out

    def _reduce(self, module: nn.Module, rec: dict) -> None:
        """Called as soon as a layer's output gradient arrives (during the backward pass): the
        layer's per-example squared norms, and the smallest form that later gives its clipped
        gradient. A linear map (B, T, in) -> (B, T, out) takes the cheaper of two forms: the ghost
        norm, keeping (input, output gradient) for one matrix product at the end; or per-example
        gradients (B, out, in), kept whole (cheaper means T in out <= T^2 (in + out), so they are
        also no larger than the input and output gradient, which are freed at once; e.g. MAE's
        decoder, and a ViT's layers at 224 px). Small parameters (LayerNorm, LayerScale, tokens) are
        materialised at once."""
        g = rec.pop("grad")
        inputs = rec.pop("inputs")
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            a3, g3 = _linear_view(module, inputs[0], g)
            t, d_in, d_out = a3.shape[1], a3.shape[2], g3.shape[2]
            if self._ghost_is_cheaper(t, d_in, d_out):
                sq = (torch.bmm(a3, a3.mT) * torch.bmm(g3, g3.mT)).flatten(1).sum(dim=1)
                if module.bias is not None:
                    sq = sq + g3.sum(dim=1).square().sum(dim=1)
                rec["ag"] = (a3, g3)
            else:
                # Per-example gradients cost T in out, no more than the ghost form T^2 (in + out),
                # so they are also no larger than (a, g): keep them, free (a, g) now, and the
                # clipped sum is a cheap weighted sum rather than a second weight-gradient product.
                gw = torch.bmm(g3.mT, a3)  # (B, out, in)
                per_sample = {module.weight: gw.reshape(gw.shape[0], *module.weight.shape)}
                sq = gw.square().flatten(1).sum(dim=1)
                if module.bias is not None:
                    per_sample[module.bias] = gb = g3.sum(dim=1)
                    sq = sq + gb.square().sum(dim=1)
                rec["per_sample"] = per_sample
            rec["sq"] = sq
            return
        rec["per_sample"] = per_sample = self._materialised(module, inputs, g)
        total = None
        for gs in per_sample.values():
            sq = gs.reshape(gs.shape[0], -1).square().sum(dim=1)
            total = sq if total is None else total + sq
        rec["sq"] = total

    @staticmethod
    def _materialised(module: nn.Module, inputs: tuple, g: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        """Per-example gradients of small parameters (LayerNorm, token modules): (B, *shape)."""
        if isinstance(module, nn.LayerNorm):
            x = inputs[0]
            xhat = F.layer_norm(x, module.normalized_shape, eps=module.eps)
            dims = tuple(range(1, x.dim() - len(module.normalized_shape)))
            out = {}
            if module.weight is not None:
                out[module.weight] = (g * xhat).sum(dim=dims) if dims else g * xhat
            if module.bias is not None:
                out[module.bias] = g.sum(dim=dims) if dims else g
            return out
        if LAYER_SCALE and isinstance(module, LAYER_SCALE):  # y = x * gamma over (B, ..., D)
            x = inputs[0]
            return {module.gamma: (g * x).reshape(x.shape[0], -1, x.shape[-1]).sum(dim=1)}
        return type(module).per_sample_grads(module, inputs, g)

    # ------------------------------------------------------------------ public

    def batch_size(self) -> int:
        for _, _, rec in self._records_in_order():
            return rec["sq"].shape[0]
        return 0

    @torch.no_grad()
    def norms(self) -> torch.Tensor:
        """Per-example gradient norms over all parameters, shape [B]."""
        total = None
        for _, _, rec in self._records_in_order():
            total = rec["sq"] if total is None else total + rec["sq"]
        for gs in self._expanded_grads().values():
            sq = gs.reshape(gs.shape[0], -1).square().sum(dim=1)
            total = sq if total is None else total + sq
        if total is None:
            raise MemlensError("the loss did not depend on any trainable layer")
        return total.clamp_min(0).sqrt()

    def per_sample_grads(self) -> dict[nn.Parameter, torch.Tensor]:
        """Materialised per-example gradients (B, *shape) of every parameter: for tests and audits
        of the engine, not used in training."""
        out: dict[nn.Parameter, torch.Tensor] = {}
        for _, module, rec in self._records_in_order():
            if "ag" in rec:
                a3, g3 = rec["ag"]
                out[module.weight] = torch.einsum("bto,bti->boi", g3, a3).reshape(g3.shape[0], *module.weight.shape)
                if module.bias is not None:
                    out[module.bias] = g3.sum(dim=1)
            else:
                out.update(rec["per_sample"])
        out.update({p: gs.unsqueeze(1) for p, gs in self._expanded_grads().items()})  # (B, 1, ...) = (B, *shape)
        return out

    @torch.no_grad()
    def accumulate_clipped(self, *, max_grad_norm: float, coef: torch.Tensor | None = None) -> torch.Tensor:
        """Add sum_b c_b g_b to every ``p.grad`` (c_b = min(1, C / (||g_b|| + 1e-6)) unless ``coef`` is
        given) and return the per-example norms (None when ``coef`` was given)."""
        norms = None
        if coef is None:
            norms = self.norms()
            coef = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for name, module, rec in list(self._records_in_order()):
            if "ag" in rec:
                a3, g3 = rec.pop("ag")
                # Scale whichever operand is smaller by the clipping coefficients.
                scale_g = g3.shape[-1] <= a3.shape[-1]
                if scale_g:
                    g3 = g3 * coef.view(-1, 1, 1)
                else:
                    a3 = a3 * coef.view(-1, 1, 1)
                grads = {module.weight: (g3.reshape(-1, g3.shape[-1]).t() @ a3.reshape(-1, a3.shape[-1]))
                         .reshape(module.weight.shape)}
                if module.bias is not None:
                    grads[module.bias] = g3.sum(dim=(0, 1)) if scale_g else coef @ g3.sum(dim=1)
            else:
                grads = {p: (coef @ gs.reshape(gs.shape[0], -1)).reshape(p.shape)
                         for p, gs in rec.pop("per_sample").items()}
            del self._records[name]  # free each layer's tensors as soon as its gradient is formed
            self._add_grads(grads)
        self._add_grads({p: (coef @ gs.reshape(gs.shape[0], -1)).reshape(p.shape)
                         for p, gs in self._expanded_grads().items()})
        for p in self.params:  # a parameter this loss did not reach contributes zero
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self._records = {}
        self._leaves = {}
        return norms

    @staticmethod
    def _add_grads(grads: dict[nn.Parameter, torch.Tensor]) -> None:
        for p, grad in grads.items():
            if p.grad is None:
                p.grad = grad  # a fresh tensor: nothing else refers to it
            else:
                p.grad.add_(grad)

    def zero_fill(self) -> None:
        """Give every parameter a zero gradient (an empty Poisson batch: the step is pure noise)."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self._records = {}
        self._leaves = {}
