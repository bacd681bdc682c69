"""Vision transformers for small images, built on timm's ``VisionTransformer``.

Two changes to timm's model, both for DP-SGD: the class token and the position embedding live
in small leaf modules (:class:`ClsToken`, :class:`PosEmbed`; MAE's mask token in
:class:`MaskToken`) instead of being parameters of the top-level module, because per-sample
gradient engines (Opacus included) handle parameters leaf module by leaf module and otherwise
fall back to whole-model per-sample gradients. And each block gets an identity module
``res_attn`` after its first residual addition, so the attention sub-block's residual output
(ResBlock^ATT in the localizing paper's Table 10) has a module path a hook can use.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block, VisionTransformer

from memlens.errors import MemlensError
from memlens.models.external import timm_model
from memlens.models.layers import LayerSpec, discover_layers


class PosEmbed(nn.Module):
    """Learned additive position embedding, (B, T, D) -> (B, T, D)."""

    def __init__(self, num_tokens: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, num_tokens, dim))
        trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight

    @staticmethod
    def per_sample_grads(module: "PosEmbed", inputs: tuple, grad_out: torch.Tensor) -> dict:
        return {module.weight: grad_out}


class ClsToken(nn.Module):
    """Prepends a learned class token, (B, T, D) -> (B, T + 1, D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.weight.expand(x.shape[0], -1, -1), x], dim=1)

    @staticmethod
    def per_sample_grads(module: "ClsToken", inputs: tuple, grad_out: torch.Tensor) -> dict:
        return {module.weight: grad_out[:, :1]}


class MaskToken(nn.Module):
    """Fills MAE's masked positions with a learned token and restores the patch order.

    (B, 1 + K, D) visible tokens (CLS first) and ids_restore (B, N) -> (B, 1 + N, D).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        b, n = ids_restore.shape
        visible = x.shape[1] - 1
        fill = self.weight.expand(b, n - visible, -1)
        tokens = torch.cat([x[:, 1:], fill], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        return torch.cat([x[:, :1], tokens], dim=1)

    @staticmethod
    def per_sample_grads(module: "MaskToken", inputs: tuple, grad_out: torch.Tensor) -> dict:
        x, ids_restore = inputs
        masked = (ids_restore >= x.shape[1] - 1).unsqueeze(-1).to(grad_out.dtype)
        return {module.weight: (grad_out[:, 1:] * masked).sum(dim=1, keepdim=True)}


class MemlensBlock(Block):
    """timm's pre-norm transformer block with a hook point after the attention residual."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.res_attn = nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = self.res_attn(x)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def random_masking(x: torch.Tensor, ratio: float, generator: torch.Generator | None,
                   noise: torch.Tensor | None = None):
    """MAE's per-sample random masking.

    Args:
        x: (B, N, D) patch tokens.
        ratio: fraction of patches to drop.
        generator: source of the per-sample permutations.
        noise: (B, N) scores to use instead of drawing them (the lowest are kept); lets a
            caller reproduce one example's mask outside its batch.

    Returns:
        visible tokens (B, K, D), mask (B, N) with 1 = masked, ids_restore (B, N).
    """
    b, n, d = x.shape
    keep = max(1, int(round(n * (1 - ratio))))
    if noise is None:
        noise = torch.rand(b, n, generator=generator)
    noise = noise.to(x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    visible = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).expand(-1, -1, d))
    mask = torch.ones(b, n, device=x.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return visible, mask, ids_restore


class ViTEncoder(VisionTransformer):
    """A timm ViT with leaf token modules; the encoder memlens trains and audits.

    The representation used for alignment is the whole final-layer output, all tokens
    including CLS, flattened: (B, (N + 1) * D) (SSLMem paper, Appendix A).
    """

    family = "vit"

    def __init__(self, *, img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0,
                         global_pool="", embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                         mlp_ratio=mlp_ratio, qkv_bias=True, class_token=False, pos_embed="none",
                         block_fn=MemlensBlock)
        self.cls_token = ClsToken(embed_dim)
        self.pos_embed = PosEmbed(self.patch_embed.num_patches, embed_dim)
        self.num_prefix_tokens = 1
        self.has_class_token = True
        self.patch_size = patch_size
        self.num_patches = self.patch_embed.num_patches
        self.feature_dim = embed_dim

    def forward_tokens(self, x: torch.Tensor, *, mask_ratio: float = 0.0, generator: torch.Generator | None = None,
                       mask_noise: torch.Tensor | None = None):
        """(B, C, H, W) -> tokens (B, 1 + K, D); with masking also mask and ids_restore."""
        x = self.pos_embed(self.patch_embed(x))
        mask = ids_restore = None
        if mask_ratio > 0:
            x, mask, ids_restore = random_masking(x, mask_ratio, generator, mask_noise)
        x = self.blocks(self.norm_pre(self.cls_token(x)))
        return self.norm(x), mask, ids_restore

    def forward_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        return self.forward_tokens(x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, (N + 1) * D)."""
        return self.forward_features(x).flatten(1)

    @staticmethod
    def head_features(tokens: torch.Tensor) -> torch.Tensor:
        """Mean of the final patch tokens: the input of SSL and classification heads.

        Global average pooling rather than the CLS token: on small data a ViT's CLS output is
        nearly the same for every image early in training, which stalls supervised training and
        makes DINO collapse (measured on digits); pooling avoids both (timm's ``global_pool='avg'``).
        """
        return tokens[:, 1:].mean(dim=1)

    @staticmethod
    def probe_features(tokens: torch.Tensor) -> torch.Tensor:
        """CLS token beside the mean patch token: works for CLS-trained and MAE encoders alike."""
        return torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1)

    def layer_specs(self) -> list[LayerSpec]:
        d = self.embed_dim
        hidden = self.blocks[0].mlp.fc1.out_features
        specs = []
        for i in range(len(self.blocks)):
            stream = f"blocks.{i - 1}" if i else None  # ResBlock^FC of the previous block
            for suffix, kind, units, prev in (("attn", "attention", d, stream),
                                              ("res_attn", "resblock_attn", d, stream),
                                              ("mlp.act", "mlp_hidden", hidden, f"blocks.{i}.res_attn"),
                                              ("mlp", "mlp", d, f"blocks.{i}.res_attn"),
                                              ("", "block", d, stream)):
                name = f"blocks.{i}.{suffix}" if suffix else f"blocks.{i}"
                specs.append(LayerSpec(name=name, kind=kind, units=units, layout="tokens", depth=len(specs), block=i,
                                       prev=prev, unit_kind="gelu" if kind == "mlp_hidden" else "other"))
        last = len(self.blocks) - 1
        specs.append(LayerSpec(name="norm", kind="output", units=d, layout="tokens", depth=len(specs), block=last,
                               prev=f"blocks.{last}"))
        return specs


class TimmViTMixin:
    """What memlens's objectives and audits call on a ViT, for a timm ``VisionTransformer``.

    :func:`timm_vit` builds the timm model and swaps its class for one with this mixin, so the
    parameter names stay timm's own (a run's weights load with ``timm.create_model`` and no key
    prefix) while MAE gets its masked forward pass. Parameters held directly on the model
    (``cls_token``, ``pos_embed``, ``reg_token``) are handled by the DP engine's per-sample
    expansion (:mod:`memlens.dp.ghost_clipping`).
    """

    family = "vit"

    @property
    def feature_dim(self) -> int:
        return self.embed_dim

    @property
    def patch_size(self) -> int:
        p = self.patch_embed.patch_size
        return int(p[0] if isinstance(p, (tuple, list)) else p)

    @property
    def num_patches(self) -> int:
        return int(self.patch_embed.num_patches)

    def forward_tokens(self, x: torch.Tensor, *, mask_ratio: float = 0.0, generator: torch.Generator | None = None,
                       mask_noise: torch.Tensor | None = None):
        """(B, C, H, W) -> tokens (B, prefix + K, D), with MAE's masking of the patch tokens; also
        mask and ids_restore (None without masking). Positions are added before masking."""
        if getattr(self, "dynamic_img_size", False):

            raise MemlensError("timm ViTs with dynamic_img_size are not supported for training")
        x = self.patch_embed(x)
        prefix = self.num_prefix_tokens
        pos = self.pos_embed
        if pos is not None:
            x = x + (pos if self.no_embed_class else pos[:, prefix:])
        mask = ids_restore = None
        if mask_ratio > 0:
            x, mask, ids_restore = random_masking(x, mask_ratio, generator, mask_noise)
        to_cat = []
        if self.cls_token is not None:
            to_cat.append(self.cls_token.expand(x.shape[0], -1, -1))
        if self.reg_token is not None:
            to_cat.append(self.reg_token.expand(x.shape[0], -1, -1))
        if to_cat:
            tokens = torch.cat(to_cat, dim=1)
            if pos is not None and not self.no_embed_class:
                tokens = tokens + pos[:, :prefix]
            x = torch.cat([tokens, x], dim=1)
        x = self.blocks(self.norm_pre(x))
        return self.norm(x), mask, ids_restore

    def head_features(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, self.num_prefix_tokens:].mean(dim=1)

    def probe_features(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.cat([tokens[:, 0], tokens[:, self.num_prefix_tokens:].mean(dim=1)], dim=1)

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).flatten(1)

    def layer_specs(self) -> list[LayerSpec]:

        p = next(self.parameters())
        size = self.patch_embed.img_size
        example = torch.zeros(1, self.patch_embed.proj.in_channels, int(size[0]), int(size[1]), device=p.device)
        was = self.training
        self.eval()
        try:
            return discover_layers(self, example, forward=self.forward_features)
        finally:
            self.train(was)


class TimmConvMixin:
    """What memlens's objectives call on a timm conv net (ResNets, ConvNeXt...): SimCLR, SimSiam, DINO
    and supervised training; the representation is the whole final feature map, as for memlens's
    ResNets (SSLMem paper, Appendix A)."""

    family = "conv"

    @property
    def feature_dim(self) -> int:
        return int(self.num_features)

    @staticmethod
    def head_features(fmap: torch.Tensor) -> torch.Tensor:
        return fmap.mean(dim=(2, 3)) if fmap.dim() == 4 else fmap

    probe_features = head_features

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).flatten(1)

    def layer_specs(self) -> list[LayerSpec]:

        p = next(self.parameters())
        size = getattr(self, "_memlens_image_size", 32)
        chans = getattr(self, "_memlens_in_chans", 3)
        was = self.training
        self.eval()
        try:
            return discover_layers(self, torch.zeros(1, chans, size, size, device=p.device),
                                   forward=self.forward_features)
        finally:
            self.train(was)


def timm_encoder(name: str, *, image_size: int, in_chans: int, **overrides) -> nn.Module:
    """Any timm model as a memlens training backbone: ViTs through :func:`timm_vit` (MAE included),
    other models (conv nets) with :class:`TimmConvMixin` (SimCLR, SimSiam, DINO, supervised)."""


    probe = timm_model(name, {"in_chans": in_chans, "num_classes": 0})
    if isinstance(probe, VisionTransformer):
        return timm_vit(name, image_size=image_size, in_chans=in_chans, **overrides)
    if any(v is not None for v in overrides.values()):
        raise MemlensError(f"timm:{name} is not a ViT: patch_size/embed_dim/depth/num_heads/mlp_ratio do not apply")
    probe.__class__ = type(f"Memlens{type(probe).__name__}", (TimmConvMixin, type(probe)), {})
    probe._memlens_image_size, probe._memlens_in_chans = image_size, in_chans
    return probe


def timm_vit(name: str, *, image_size: int, in_chans: int, **overrides) -> nn.Module:
    """A timm ViT (``vit_*``, ``deit*``...) built for memlens training, with :class:`TimmViTMixin`.

    ``overrides`` (patch_size, embed_dim, depth, num_heads, mlp_ratio, ...) go to
    ``timm.create_model``; the classifier is removed (num_classes=0).
    """


    kwargs = {k: v for k, v in overrides.items() if v is not None}
    model = timm_model(name, {"img_size": image_size, "in_chans": in_chans, "num_classes": 0, **kwargs})
    if not isinstance(model, VisionTransformer):
        raise MemlensError(f"timm:{name} is not a VisionTransformer; memlens trains timm ViTs (for conv nets use "
                           f"resnet9/resnet18)")
    cls = type(f"Memlens{type(model).__name__}", (TimmViTMixin, type(model)), {})
    model.__class__ = cls
    return model


class MAEDecoder(nn.Module):
    """MAE's light decoder: predicts the pixels of every patch from the visible tokens."""

    def __init__(self, *, num_patches: int, patch_size: int, in_chans: int, embed_dim: int, dim: int,
                 depth: int, num_heads: int):
        super().__init__()
        self.decoder_embed = nn.Linear(embed_dim, dim)
        self.mask_token = MaskToken(dim)
        self.decoder_pos_embed = PosEmbed(num_patches + 1, dim)
        self.decoder_blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio=4.0, qkv_bias=True)
                                              for _ in range(depth)])
        self.decoder_norm = nn.LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, patch_size * patch_size * in_chans)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """(B, 1 + K, D) latent, (B, N) ids_restore -> (B, N, patch * patch * C) predictions."""
        x = self.decoder_pos_embed(self.mask_token(self.decoder_embed(latent), ids_restore))
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x)[:, 1:]


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, patch * patch * C) in the order PatchEmbed reads patches."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def default_patch(image_size: int) -> int:
    """Eight patches per side from 16 px up (patch 4 at 32 px, as the papers' ViT-Tiny); 2 px below."""
    p = image_size // 8 if image_size >= 16 else 2
    while image_size % p:
        p -= 1
    return max(1, p)


def check_patch(image_size: int, patch: int) -> None:

    if image_size % patch:
        raise MemlensError(f"patch size {patch} does not divide the image size {image_size}")
    if math.isclose(image_size / patch, 1.0):
        raise MemlensError(f"patch size {patch} leaves a single patch per image; use a smaller patch")
