"""Training objectives: MAE, SimCLR, SimSiam, DINO and supervised cross-entropy.

Each objective is an ``nn.Module`` holding the encoder (``.encoder``) and whatever heads the
method trains, and computes its loss from a batch of uint8 images:

* :attr:`Objective.per_sample` is True when the loss is a sum of independent per-example
  terms; only those objectives can be trained with DP-SGD.
* :meth:`Objective.losses` returns the loss, shape [B] for per-sample objectives and a scalar
  for the others. All randomness (augmentation, masking) comes from the draws passed in: one
  random stream per example (:class:`memlens.rng.RowStreams`), so an example is augmented and
  masked the same way whatever batch, or process, it is in.
* Under ``torch.distributed`` the objectives whose loss couples the examples of a batch gather
  what they need from every process (SimCLR's negatives, DINO's centre), so the loss of a batch
  split across processes is the loss of the whole batch.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed.nn.functional as dnn
import torch.nn as nn
import torch.nn.functional as F

from memlens import distributed as D
from memlens.config import TrainConfig
from memlens.data.augment import Augmenter
from memlens.errors import MemlensError
from memlens.models.vit import MAEDecoder, patchify
from memlens.rng import Draws, as_draws


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


class Objective(nn.Module):
    per_sample: bool = False
    #: augmented views of each example per step (the augmenter calls of :meth:`losses`)
    views_per_example: int = 1

    def __init__(self, encoder: nn.Module, augmenter: Augmenter):
        super().__init__()
        self.encoder = encoder
        self.augmenter = augmenter

    def losses(self, images: torch.Tensor, labels: torch.Tensor | None, draws: Draws) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None, draws: Draws) -> torch.Tensor:
        # DistributedDataParallel synchronises gradients of what runs through forward().
        return self.losses(images, labels, draws)

    def after_step(self, progress: float) -> None:
        """Called after every optimizer step with the fraction of training done (0..1]."""

    def why_not_dp(self) -> str | None:
        """Why this objective cannot be trained with DP-SGD (None when it can)."""
        if not self.per_sample:
            return f"{type(self).__name__} does not decompose into per-example losses"
        if _has_batchnorm(self):
            return ("the model uses BatchNorm, which mixes examples of a batch in training mode, so "
                    "per-example gradients are undefined; use a ViT encoder under DP")
        return None


class MAE(Objective):
    """Masked autoencoding (He et al. 2022): reconstruct the pixels of masked patches.

    The per-example loss is the mean squared error over that example's masked patches,
    on per-patch normalised pixels when ``norm_pix_loss`` is set. Shape [B].
    """

    per_sample = True

    def __init__(self, encoder: nn.Module, augmenter: Augmenter, cfg: TrainConfig, in_chans: int):
        super().__init__(encoder, augmenter)
        if not hasattr(encoder, "forward_tokens"):
            raise MemlensError("framework 'mae' needs a ViT architecture (vit_tiny, vit_mini, vit_micro or a timm ViT "
                               "such as timm:vit_tiny_patch16_224)")
        m = cfg.mae
        if m.decoder_dim % m.decoder_heads:
            raise MemlensError(f"mae.decoder_dim {m.decoder_dim} is not divisible by "
                               f"mae.decoder_heads {m.decoder_heads}")
        self.decoder = MAEDecoder(num_patches=encoder.num_patches, patch_size=encoder.patch_size, in_chans=in_chans,
                                  embed_dim=encoder.embed_dim, dim=m.decoder_dim, depth=m.decoder_depth,
                                  num_heads=m.decoder_heads)
        self.mask_ratio = m.mask_ratio
        self.norm_pix = m.norm_pix_loss

    def losses(self, images, labels, draws):
        d = as_draws(draws, len(images), images.device)
        x = self.augmenter(images, d)
        return self.losses_on_views(x, d)

    def losses_on_views(self, x: torch.Tensor, draws: Draws | torch.Generator | None,
                        mask_noise: torch.Tensor | None = None) -> torch.Tensor:
        """Per-example loss [B] on already augmented, normalised views (B, C, H, W); the mask of each
        example comes from its own draws (or ``mask_noise``, (B, N) scores)."""
        if mask_noise is None:
            mask_noise = as_draws(draws, len(x), x.device).rand(self.encoder.num_patches)
        latent, mask, ids_restore = self.encoder.forward_tokens(x, mask_ratio=self.mask_ratio, generator=None,
                                                                mask_noise=mask_noise)
        pred = self.decoder(latent, ids_restore)
        target = patchify(x.detach(), self.encoder.patch_size)
        if self.norm_pix:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = (pred - target).pow(2).mean(dim=-1)
        return (per_patch * mask).sum(dim=1) / mask.sum(dim=1)


def _mlp(dims: list[int], *, bn: bool, last_bn: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k in range(len(dims) - 1):
        last = k == len(dims) - 2
        layers.append(nn.Linear(dims[k], dims[k + 1], bias=not (bn and (not last or last_bn))))
        if bn and (not last or last_bn):
            layers.append(nn.BatchNorm1d(dims[k + 1], affine=not last))
        if not last:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class SimCLR(Objective):
    """Contrastive learning with the NT-Xent loss over 2B views (Chen et al. 2020)."""

    views_per_example = 2

    def __init__(self, encoder, augmenter, cfg: TrainConfig):
        super().__init__(encoder, augmenter)
        c = cfg.simclr
        self.projector = _mlp([encoder.feature_dim, c.proj_hidden, c.proj_dim], bn=True)
        self.temperature = c.temperature

    def losses(self, images, labels, draws):
        b = len(images)
        d = as_draws(draws, b, images.device)
        views = torch.cat([self.augmenter(images, d), self.augmenter(images, d)])
        z = F.normalize(self.projector(self.encoder.head_features(self.encoder(views))), dim=1)
        z1, z2 = z[:b], z[b:]
        if D.active():
            # Negatives from every process (gradients flow back to each process's own examples),

            z1_all, z2_all = torch.cat(dnn.all_gather(z1)), torch.cat(dnn.all_gather(z2))
            offset = D.rank() * b
        else:
            z1_all, z2_all, offset = z1, z2, 0
        n = len(z1_all)
        candidates = torch.cat([z1_all, z2_all])  # (2n, d)
        anchors = torch.cat([z1, z2])  # (2b, d): this process's views
        sim = anchors @ candidates.t() / self.temperature
        own = torch.cat([torch.arange(offset, offset + b), torch.arange(n + offset, n + offset + b)]).to(z.device)
        sim[torch.arange(2 * b, device=z.device), own] = float("-inf")  # an anchor is not its own negative
        targets = torch.cat([own[b:], own[:b]])  # view 1 of x matches view 2 of x, and back
        return F.cross_entropy(sim, targets)


class SimSiam(Objective):
    """Non-contrastive Siamese learning with a predictor and stop-gradient (Chen & He 2021)."""

    views_per_example = 2

    def __init__(self, encoder, augmenter, cfg: TrainConfig):
        super().__init__(encoder, augmenter)
        c = cfg.simsiam
        d = encoder.feature_dim
        self.projector = _mlp([d, c.proj_dim, c.proj_dim, c.proj_dim], bn=True, last_bn=True)
        self.predictor = _mlp([c.proj_dim, c.pred_hidden, c.proj_dim], bn=True)

    def losses(self, images, labels, draws):
        b = len(images)
        d = as_draws(draws, b, images.device)
        views = torch.cat([self.augmenter(images, d), self.augmenter(images, d)])
        z = self.projector(self.encoder.head_features(self.encoder(views)))
        p = self.predictor(z)
        z1, z2 = z[:b].detach(), z[b:].detach()
        p1, p2 = p[:b], p[b:]
        return -(F.cosine_similarity(p1, z2, dim=1).mean() + F.cosine_similarity(p2, z1, dim=1).mean()) / 2


class DINOHead(nn.Module):
    def __init__(self, d_in: int, hidden: int, bottleneck: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, bottleneck))
        self.last = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        # DINO's norm_last_layer: the weight-norm gain is fixed at 1, otherwise the student can
        # shrink its logits towards a uniform output and teacher and student collapse together.
        g = self.last.parametrizations.weight.original0
        g.data.fill_(1.0)
        g.requires_grad_(False)

    def forward(self, x):
        return self.last(F.normalize(self.mlp(x), dim=-1))


class DINO(Objective):
    """Self-distillation with a momentum teacher and output centering (Caron et al. 2021).

    Two global views; the student matches the sharpened, centred teacher on the other view.
    The teacher follows the student by EMA with a cosine schedule from ``momentum`` to 1. The
    saved encoder is the student's (the network the data directly trained).
    """

    views_per_example = 2

    def __init__(self, encoder, augmenter, cfg: TrainConfig):
        super().__init__(encoder, augmenter)
        c = cfg.dino
        self.head = DINOHead(encoder.feature_dim, c.hidden, c.bottleneck, c.out_dim)
        self.teacher_encoder = copy.deepcopy(encoder)
        self.teacher_head = copy.deepcopy(self.head)
        for p in list(self.teacher_encoder.parameters()) + list(self.teacher_head.parameters()):
            p.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, c.out_dim))
        # The centre starts from the first batch's mean teacher output instead of zero, so early
        # losses are not flattered by an uncentred teacher (the loss is comparable from step one).
        self.register_buffer("center_ready", torch.zeros((), dtype=torch.bool))
        self.cfg = c

    def trainable_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("teacher_")]

    def losses(self, images, labels, draws):
        b = len(images)
        d = as_draws(draws, b, images.device)
        views = torch.cat([self.augmenter(images, d), self.augmenter(images, d)])
        s = self.head(self.encoder.head_features(self.encoder(views))) / self.cfg.student_temp
        with torch.no_grad():
            self.teacher_encoder.train(self.training)
            t_out = self.teacher_head(self.teacher_encoder.head_features(self.teacher_encoder(views)))
            batch_mean = t_out.mean(dim=0, keepdim=True)
            if D.active():  # the centre follows the whole batch, on every process alike
                batch_mean = D.all_reduce_(batch_mean.clone(), "sum") / D.world_size()
            if self.training and not self.center_ready:
                self.center.copy_(batch_mean)
                self.center_ready.fill_(True)
            t = F.softmax((t_out - self.center) / self.cfg.teacher_temp, dim=-1)
        log_s = F.log_softmax(s, dim=-1)
        loss = (-(t[b:] * log_s[:b]).sum(-1).mean() - (t[:b] * log_s[b:]).sum(-1).mean()) / 2
        if self.training:
            with torch.no_grad():
                m = self.cfg.center_momentum
                self.center.mul_(m).add_(batch_mean, alpha=1 - m)
        return loss

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        m = 1 - (1 - self.cfg.momentum) * (math.cos(math.pi * min(progress, 1.0)) + 1) / 2
        for ps, pt in zip(list(self.encoder.parameters()) + list(self.head.parameters()),
                          list(self.teacher_encoder.parameters()) + list(self.teacher_head.parameters()),
                          strict=True):
            pt.mul_(m).add_(ps.detach(), alpha=1 - m)


class Supervised(Objective):
    """Cross-entropy through a linear classifier on the pooled features; the encoder is the network
    without its classifier (localizing paper, Section 5.1). Per-example loss, shape [B]."""

    per_sample = True

    def __init__(self, encoder, augmenter, cfg: TrainConfig, num_classes: int):
        super().__init__(encoder, augmenter)
        self.classifier = nn.Linear(encoder.feature_dim, num_classes)

    def losses(self, images, labels, draws):
        if labels is None:
            raise MemlensError("framework 'supervised' needs labelled data")
        x = self.augmenter(images, as_draws(draws, len(images), images.device))
        logits = self.classifier(self.encoder.head_features(self.encoder(x)))
        return F.cross_entropy(logits, labels, reduction="none")


def build_objective(cfg: TrainConfig, encoder: nn.Module, augmenter: Augmenter, *, in_chans: int,
                    num_classes: int | None) -> Objective:
    fw = cfg.framework
    if fw == "mae":
        return MAE(encoder, augmenter, cfg, in_chans)
    if fw == "simclr":
        return SimCLR(encoder, augmenter, cfg)
    if fw == "simsiam":
        return SimSiam(encoder, augmenter, cfg)
    if fw == "dino":
        return DINO(encoder, augmenter, cfg)
    if num_classes is None:
        raise MemlensError("framework 'supervised' needs labelled data; this source has no labels")
    return Supervised(encoder, augmenter, cfg, num_classes)
