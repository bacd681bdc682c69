"""Augmentation sets of the localizing paper (Appendix B), applied per sample on whole batches.

The sets, with the paper's names and parameters (p = probability of applying):

* ``weak`` (SL standard): ColorJitter(0.9, 0.9, 0.9, 0.5) p=0.4, HorizontalFlip p=0.5,
  Grayscale p=0.1, RandomResizedCrop.
* ``normal`` (SSL standard): ColorJitter(0.8, 0.8, 0.8, 0.2) p=0.8, HorizontalFlip p=1.0,
  Grayscale p=0.2, RandomResizedCrop.
* ``strong``: ColorJitter(0.8, 0.8, 0.8, 0.2) p=0.9, HorizontalFlip p=1.0, Grayscale p=0.5,
  RandomResizedCrop, VerticalFlip p=1.0.
* ``independent``: GaussianBlur(sigma 0.1-5) p=0.8, Invert p=0.2, RandomResizedCrop,
  VerticalFlip p=1.0. The paper's 4x4 kernel is not valid in torchvision (kernels are odd), so
  the kernel is scaled to the image: 2 * round(size / 16) + 1, i.e. 5 at 32 px, 3 below 24 px.
* ``mae``: RandomResizedCrop(scale 0.2-1) + HorizontalFlip p=0.5 (MAE's own pipeline; its
  masking happens inside the model).
* ``none``: no augmentation.

Why not call torchvision per image: a torchvision v2 pipeline applied to a batch tensor draws
one set of random parameters for the whole batch, and per-image calls cost about 1 ms each
(measured here), which would dominate audits and small-model training. So each operation below
draws its parameters per sample from an explicit ``torch.Generator`` with torchvision's rules
(``RandomResizedCrop.get_params``, ``ColorJitter``'s factor ranges and random order) and applies
torchvision's kernels' arithmetic to the whole batch at once (crops via ``grid_sample``).
``tests/data/test_augment.py`` checks every operation against the corresponding
``torchvision.transforms.v2.functional`` kernel, and :func:`torchvision_pipeline` returns the
equivalent per-image torchvision v2 pipeline.

Colour operations run on [0, 1] pixels and normalisation comes last (the authors' code
clamped already-normalised tensors; memlens does not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from memlens.config.base import AUGMENTATIONS  # noqa: F401  (named in config: validated without torch)
from memlens.errors import MemlensError
from memlens.rng import Draws, RowStreams, as_draws


def _apply_where(x: torch.Tensor, mask: torch.Tensor, fn) -> torch.Tensor:
    """Replace the masked rows of ``x`` (in place) by ``fn(rows, their indices)``."""
    idx = mask.nonzero().flatten()
    if len(idx) == 0:
        return x
    x[idx] = fn(x[idx], idx)
    return x


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma, torchvision's weights. (B, 3, H, W) -> (B, 1, H, W)."""
    r, g, b = x.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    r = ratio.view(-1, 1, 1, 1)
    return (r * a + (1.0 - r) * b).clamp_(0.0, 1.0)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV in [0, 1]; torchvision's formula, ties resolved R > G > B.

    Per pixel, with c = max - min: hue = (b' - g') / 6 where red is largest, (2 + r' - b') / 6 where
    green is, (4 + g' - r') / 6 where blue is (x' = (max - x) / c), taken mod 1. Written with masks
    multiplied in (no ``max`` with indices, no ``where``: both several times slower on the CPU).
    """
    r, g, b = x.unbind(dim=-3)
    maxc = x.amax(dim=-3)
    cr = maxc - x.amin(dim=-3)
    div = cr + (cr == 0)  # grey pixels: any divisor, their hue terms are 0
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    is_b = ~(is_r | is_g)
    rc = (maxc - r).div_(div)
    gc = (maxc - g).div_(div)
    bc = (maxc - b).div_(div)
    h = (bc - gc).mul_(is_r) + (rc - bc).add_(2.0).mul_(is_g) + (gc - rc).add_(4.0).mul_(is_b)
    h = h.div_(6.0).add_(1.0).remainder_(1.0)
    s = cr.div_(maxc + (maxc == 0))
    return torch.stack((h, s, maxc), dim=-3)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """HSV -> RGB with the branch-free form of the same piecewise formula:
    channel(n) = v - v * s * clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6, n = 5, 3, 1."""
    h, s, v = x.unbind(dim=-3)
    h6 = h * 6.0
    vs = v * s
    out = torch.empty_like(x)
    for c, n in enumerate((5.0, 3.0, 1.0)):
        k = torch.remainder(h6 + n, 6.0)
        w = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
        torch.sub(v, vs.mul(w), out=out.select(-3, c))
    return out.clamp_(0.0, 1.0)


# ----------------------------------------------------------------------------- operations

HUE_CHUNK = 4


@dataclass(frozen=True)
class ResizedCrop:
    """torchvision RandomResizedCrop: area fraction in ``scale``, aspect ratio in ``ratio``."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    counters = 22  # numbers of the row's stream one application draws (10 areas, 10 ratios, top, left)

    def params(self, n: int, height: int, width: int, draws: Draws | torch.Generator | None) -> torch.Tensor:
        """Per-sample (top, left, h, w) following ``RandomResizedCrop.get_params``: ten tries, then a
        centre crop of the clamped aspect ratio. Returned on the CPU (small, used for indexing)."""
        d = as_draws(draws, n)
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        tries = 10
        target = area * d.uniform(self.scale[0], self.scale[1], tries).cpu()
        aspect = torch.exp(d.uniform(log_lo, log_hi, tries).cpu())
        w = torch.round(torch.sqrt(target * aspect))
        h = torch.round(torch.sqrt(target / aspect))
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
        u_top = d.rand().cpu()
        u_left = d.rand().cpu()
        # Fallback centre crop, as torchvision does when no try fits.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            fw, fh = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            fh, fw = height, int(round(height * self.ratio[1]))
        else:
            fw, fh = width, height
        rows = torch.arange(n)
        sel = first.clamp(min=0)
        hh = torch.where(first >= 0, h[rows, sel], torch.tensor(float(fh)))
        ww = torch.where(first >= 0, w[rows, sel], torch.tensor(float(fw)))
        top = torch.where(first >= 0, torch.floor(u_top * (height - hh + 1)), torch.floor((height - hh) / 2))
        left = torch.where(first >= 0, torch.floor(u_left * (width - ww + 1)), torch.floor((width - ww) / 2))
        return torch.stack([top, left, hh, ww], dim=1)

    @staticmethod
    def apply(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
        """Crop (top, left, h, w) and resize to ``size`` bilinearly, as ``resized_crop`` does.

        Sample points are those of ``interpolate(mode="bilinear", align_corners=False)`` on the
        crop, clamped to the crop so its edge pixels repeat (crop-then-resize semantics). When the
        output is at least as large as the image, a crop is only ever enlarged and antialiasing
        never applies (the output size is the model's input size, e.g. 224 px for 32 px images).
        """
        b, _, height, width = x.shape
        top, left, hh, ww = (t.view(-1, 1) for t in boxes.to(device=x.device, dtype=x.dtype).unbind(1))
        u = torch.arange(size, dtype=x.dtype, device=x.device).view(1, -1) + 0.5
        xs = torch.minimum(torch.maximum(left - 0.5 + u * ww / size, left), left + ww - 1)
        ys = torch.minimum(torch.maximum(top - 0.5 + u * hh / size, top), top + hh - 1)
        gx = (2 * xs + 1) / width - 1  # pixel coordinates -> grid_sample's [-1, 1]
        gy = (2 * ys + 1) / height - 1
        grid = torch.stack([gx.view(b, 1, size).expand(b, size, size), gy.view(b, size, 1).expand(b, size, size)], -1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def __call__(self, x, d: Draws, size: int | None = None):
        d = as_draws(d, len(x), x.device)
        return self.apply(x, self.params(len(x), x.shape[-2], x.shape[-1], d), size or x.shape[-1])


@dataclass(frozen=True)
class Flip:
    p: float
    dim: int  # -1 horizontal, -2 vertical
    counters = 1

    def __call__(self, x, d: Draws):
        d = as_draws(d, len(x), x.device)
        mask = d.rand() < self.p
        return _apply_where(x, mask, lambda sub, _: sub.flip(self.dim))


@dataclass(frozen=True)
class ColorJitter:
    """torchvision ColorJitter with per-sample factors and per-sample random order of the four
    operations, applied with probability ``p`` (RandomApply)."""

    brightness: float
    contrast: float
    saturation: float
    hue: float
    p: float = 1.0
    counters = 9  # apply?, 4 factors, 4 order keys

    def factors(self, d: Draws) -> dict[str, torch.Tensor]:
        out = {}
        for name in ("brightness", "contrast", "saturation"):
            v = getattr(self, name)
            out[name] = d.uniform(max(0.0, 1.0 - v), 1.0 + v)
        out["hue"] = d.uniform(-self.hue, self.hue)
        return out

    @staticmethod
    def op(name: str, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        if name == "brightness":
            return (x * f.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
        gray = _gray(x) if x.shape[1] == 3 else x
        if name == "contrast":
            return _blend(x, gray.mean(dim=(-3, -2, -1), keepdim=True), f)
        if x.shape[1] == 1:
            return x  # saturation and hue do nothing to one-channel images (as in torchvision/PIL)
        if name == "saturation":
            return _blend(x, gray, f)
        # a few images at a time: the dozen passes of the HSV round trip then stay in the cache
        # (2.4x faster on the CPU for 224 px batches)
        out = []
        for k in range(0, len(x), HUE_CHUNK):
            hsv = rgb_to_hsv(x[k:k + HUE_CHUNK])
            hsv[:, 0].add_(f[k:k + HUE_CHUNK].view(-1, 1, 1)).remainder_(1.0)
            out.append(hsv_to_rgb(hsv))
        return torch.cat(out) if len(out) > 1 else out[0]

    def __call__(self, x, d: Draws):
        d = as_draws(d, len(x), x.device)
        active = d.rand() < self.p
        factors = self.factors(d)
        order = torch.argsort(d.rand(4), dim=1)
        names = ("brightness", "contrast", "saturation", "hue")
        for step in range(4):
            for k, name in enumerate(names):
                mask = active & (order[:, step] == k)
                x = _apply_where(x, mask, lambda sub, idx, name=name: self.op(name, sub, factors[name][idx]))
        return x


@dataclass(frozen=True)
class Grayscale:
    p: float
    counters = 1

    def __call__(self, x, d: Draws):
        d = as_draws(d, len(x), x.device)
        mask = d.rand() < self.p
        if x.shape[1] == 1:
            return x
        return _apply_where(x, mask, lambda sub, _: _gray(sub).expand(-1, 3, -1, -1))


@dataclass(frozen=True)
class GaussianBlur:
    sigma: tuple[float, float]
    p: float
    counters = 2

    @staticmethod
    def kernel_size(size: int) -> int:
        return max(3, 2 * round(size / 16) + 1)

    @staticmethod
    def apply(x: torch.Tensor, sigma: torch.Tensor, k: int) -> torch.Tensor:
        """Separable Gaussian blur with per-sample ``sigma`` and reflect padding (torchvision's)."""
        b, c, h, w = x.shape
        half = (k - 1) * 0.5
        t = torch.linspace(-half, half, steps=k, dtype=x.dtype, device=x.device)
        pdf = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
        k1 = (pdf / pdf.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (b*c, k)
        y = F.pad(x.reshape(1, b * c, h, w), [k // 2] * 4, mode="reflect")
        y = F.conv2d(y, k1.view(b * c, 1, 1, k), groups=b * c)
        y = F.conv2d(y, k1.view(b * c, 1, k, 1), groups=b * c)
        return y.view(b, c, h, w)

    def __call__(self, x, d: Draws):
        d = as_draws(d, len(x), x.device)
        mask = d.rand() < self.p
        sigma = d.uniform(*self.sigma)
        k = self.kernel_size(x.shape[-1])
        return _apply_where(x, mask, lambda sub, idx: self.apply(sub, sigma[idx], k))


@dataclass(frozen=True)
class Invert:
    p: float
    counters = 1

    def __call__(self, x, d: Draws):
        d = as_draws(d, len(x), x.device)
        mask = d.rand() < self.p
        return _apply_where(x, mask, lambda sub, _: 1.0 - sub)


SETS: dict[str, tuple] = {
    "weak": (ColorJitter(0.9, 0.9, 0.9, 0.5, p=0.4), Flip(0.5, -1), Grayscale(0.1), ResizedCrop()),
    "normal": (ColorJitter(0.8, 0.8, 0.8, 0.2, p=0.8), Flip(1.0, -1), Grayscale(0.2), ResizedCrop()),
    "strong": (ColorJitter(0.8, 0.8, 0.8, 0.2, p=0.9), Flip(1.0, -1), Grayscale(0.5), ResizedCrop(),
               Flip(1.0, -2)),
    "independent": (GaussianBlur((0.1, 5.0), p=0.8), Invert(0.2), ResizedCrop(), Flip(1.0, -2)),
    "mae": (ResizedCrop(scale=(0.2, 1.0)), Flip(0.5, -1)),
    "none": (),
}


@dataclass(frozen=True)
class EvalTransform:
    """The un-augmented input of an encoder, for images of any size: timm's eval transform.

    ``center``: resize the shorter side to floor(size / crop_pct) (aspect kept), then a centre
    crop of size x size; ``squash``: resize to floor(size / crop_pct) square, then the centre crop.
    timm's data config gives crop_pct (e.g. 0.875, 0.9) and the interpolation.
    """

    size: int
    crop_pct: float = 1.0
    crop_mode: str = "center"
    interpolation: str = "bilinear"

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """CHW uint8 of any size -> CHW uint8 (size, size)."""
        # torchvision: optional or slow to import, loaded only on this path
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        mode = InterpolationMode.BICUBIC if self.interpolation == "bicubic" else InterpolationMode.BILINEAR
        scale = int(math.floor(self.size / self.crop_pct))
        # [scale]: the shorter side, the longer one by torchvision's own rounding (as timm's Resize)
        target = [scale, scale] if self.crop_mode == "squash" else [scale]
        if min(img.shape[-2:]) != scale or (self.crop_mode == "squash" and img.shape[-2] != img.shape[-1]):
            img = TF.resize(img, target, interpolation=mode, antialias=True)
        return TF.center_crop(img, [self.size, self.size])


@dataclass(frozen=True)
class Geometry:
    """The part of an augmentation set applied to each original image where it is read (a loader
    worker), for images of their own sizes: the set's RandomResizedCrop, or the eval transform.

    The set's flips are applied here too, on the small uint8 crop: a flip commutes with every other
    operation of the sets (pointwise colour changes, grey, invert, a symmetric blur), so where it
    runs changes nothing but the cost; each flip's coin is its own number of the stream.

    Attributes:
        size: side of the output views.
        crop: the set's crop, or None (the ``none`` set: the eval transform).
        offset: numbers of a row's stream drawn by the set's operations before the crop, in one call.
        stride: numbers one augmenter call draws (call c's crop draws at offset + c * stride).
        calls: augmenter calls per example (two views for SimCLR, SimSiam and DINO).
        eval: the eval transform.
        flips: (offset, flip) of each flip of the set.
    """

    size: int
    crop: ResizedCrop | None
    offset: int
    stride: int
    calls: int
    eval: EvalTransform
    flips: tuple = ()

    def cut(self, img: torch.Tensor, key: int | None) -> torch.Tensor:
        """One image (CHW uint8, its own size) -> (calls, C, size, size) uint8.

        The box of call c comes from the image's stream (``key``) at the position the crop draws at
        in the batched pipeline; the crop is resized with torchvision's antialiased bilinear kernel
        (the originals are usually larger than the output).
        """
        # torchvision: optional or slow to import, loaded only on this path
        from torchvision.transforms.v2 import functional as TF

        if self.crop is None:
            out = self.eval(img)
            return out.unsqueeze(0).expand(self.calls, -1, -1, -1)
        h, w = img.shape[-2:]
        views = []
        for c in range(self.calls):
            d = RowStreams([key])
            d.skip(self.offset + c * self.stride)
            top, left, hh, ww = (int(v) for v in self.crop.params(1, h, w, d)[0])
            view = TF.resized_crop(img, top, left, hh, ww, [self.size, self.size], antialias=True)
            for offset, flip in self.flips:
                coin = RowStreams([key])
                coin.skip(offset + c * self.stride)
                if bool(coin.rand()[0] < flip.p):
                    view = view.flip(flip.dim)
            views.append(view)
        return torch.stack(views)


class Cut:
    """Views whose geometry the loader applied (:class:`Geometry`): (B, calls, C, S, S).

    uint8 crops: an augmenter called on them takes the next call's views and applies the rest of
    its set (colour, flips, blur, normalisation) to the batch, drawing from each row's stream
    exactly as the batched pipeline does (the crop's numbers are skipped, having been used by the
    loader). ``finished`` float views: the loader's workers applied the whole set already (on the
    CPU, where the workers are the parallelism); the augmenter only advances the streams past them.
    """

    def __init__(self, crops: torch.Tensor, *, finished: bool = False):
        if crops.dim() != 5:
            raise ValueError(f"cut views must be (B, calls, C, S, S), got {tuple(crops.shape)}")
        self.crops = crops
        self.finished = finished
        self.call = 0

    def __len__(self) -> int:
        return self.crops.shape[0]

    @property
    def device(self) -> torch.device:
        return self.crops.device

    def to(self, device, non_blocking: bool = False) -> "Cut":
        return Cut(self.crops.to(device, non_blocking=non_blocking), finished=self.finished)

    def next_call(self) -> torch.Tensor:
        if self.call >= self.crops.shape[1]:
            raise RuntimeError(f"the loader cut {self.crops.shape[1]} view(s) per example; the objective asked for "
                               f"more")
        out = self.crops[:, self.call]
        self.call += 1
        return out


class Augmenter:
    """A named augmentation set, the output size and (optionally) the normalisation.

    Args:
        name: one of :data:`AUGMENTATIONS`.
        mean, std: per-channel normalisation in [0, 1] units, applied last. Omit both to get
            views in [0, 1] (the audit normalises per encoder, since f and g may come from
            different places).
        size: side of the output views. The crop of every set resizes to it (RandomResizedCrop at
            224 px for a 224 px model fed 32 px images); the ``none`` set resizes bilinearly.
            Default: the input size.
        eval_transform: how the ``none`` set brings images of their own sizes to ``size``
            (default: shorter side to ``size``, centre crop).
    """

    def __init__(self, name: str, *, mean: list[float] | None = None, std: list[float] | None = None,
                 size: int | None = None, eval_transform: EvalTransform | None = None):
        if name not in SETS:
            raise MemlensError(f"unknown augmentation set '{name}'; valid: {', '.join(AUGMENTATIONS)}")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        self.name = name
        self.ops = SETS[name]
        self.size = size
        self.eval_transform = eval_transform
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    @staticmethod
    def to_float(images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, C) -> float32 (B, C, H, W) in [0, 1], on the images' device."""
        return images.permute(0, 3, 1, 2).to(torch.float32).div_(255.0).contiguous()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return x
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def geometry(self, calls: int = 1) -> Geometry:
        """What the loader applies to each original image (see :class:`Geometry`)."""
        if self.size is None:
            raise ValueError("an augmenter for images of their own sizes needs an output size")
        offsets = np.cumsum([0] + [op.counters for op in self.ops])[:-1]
        crop = next(((op, int(o)) for op, o in zip(self.ops, offsets, strict=True) if isinstance(op, ResizedCrop)),
                    None)
        flips = tuple((int(o), op) for op, o in zip(self.ops, offsets, strict=True) if isinstance(op, Flip))
        return Geometry(size=self.size, crop=crop[0] if crop else None, offset=crop[1] if crop else 0,
                        stride=self.stride, calls=calls, eval=self.eval_transform or EvalTransform(self.size),
                        flips=flips if crop else ())

    @property
    def stride(self) -> int:
        """Numbers of each row's stream one call draws."""
        return sum(op.counters for op in self.ops)

    def finish_cut(self, crops: torch.Tensor, keys) -> torch.Tensor:
        """What a loader worker does for a CPU job: every call of the set on (B, calls, C, S, S)
        uint8 crops with the rows' streams (``keys``), as the objective's calls would in order.
        Returns float32 (B, calls, C, S, S)."""
        d = RowStreams(keys)
        return torch.stack([self._finish(crops[:, c], d) for c in range(crops.shape[1])], dim=1)

    def __call__(self, images: torch.Tensor | Cut, draws: Draws | torch.Generator | None) -> torch.Tensor:
        """Augment a batch, each image with its own random parameters.

        Args:
            images: uint8 tensor of shape (B, H, W, C) on any device, or a :class:`Cut` (views of
                images of their own sizes, cut by the loader).
            draws: per-row random streams (:class:`~memlens.rng.RowStreams`: each image's views
                depend only on its own key) or a generator (batch-level draws).

        Returns:
            Float32 tensor (B, C, size, size) on the images' device, normalised when the augmenter
            has a mean and std, else in [0, 1].
        """
        if isinstance(images, Cut):
            if images.finished:
                as_draws(draws, len(images), images.device).skip(self.stride)
                return images.next_call()
            return self._finish(images.next_call(), draws)
        x = self.to_float(images)
        d = as_draws(draws, len(x), x.device)
        size = self.size or x.shape[-1]
        cropped = False
        for op in self.ops:
            if isinstance(op, ResizedCrop):
                x = op(x, d, size)
                cropped = True
            else:
                x = op(x, d)
        if not cropped and x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return self.normalize(x)

    def _finish(self, crops: torch.Tensor, draws: Draws | torch.Generator | None) -> torch.Tensor:
        """The set after its geometry (crop and flips), on (B, C, S, S) uint8 views cut by the loader.

        Operations listed before the crop run after it here (the crop is applied to the original
        image, where it is read): a contrast change then blends with the crop's mean grey level
        rather than the whole image's, and a flip before the crop mirrors the box (the same
        distribution of views), as in pipelines that crop first (SimCLR's reference order).
        """
        d = as_draws(draws, len(crops), crops.device)
        x = crops.to(torch.float32).div_(255.0)
        for op in self.ops:
            if isinstance(op, (ResizedCrop, Flip)):
                d.skip(op.counters)  # applied by the loader (Geometry.cut)
            else:
                x = op(x, d)
        if self.mean is None:
            return x
        return x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))

    def views(self, images: torch.Tensor | Cut, k: int, draws: Draws | torch.Generator | None) -> torch.Tensor:
        """``k`` augmented views per image, the views of one image contiguous: (B * k, C, size, size).

        With :class:`~memlens.rng.RowStreams`, ``draws`` holds one stream per view (B * k rows). A
        :class:`Cut` already holds one row per view.
        """
        if isinstance(images, Cut):
            return self(images, draws)
        return self(images.repeat_interleave(k, dim=0), draws)

    def describe(self) -> str:
        return describe(self.name)


def describe(name: str) -> str:
    parts = []
    for op in SETS[name]:
        if isinstance(op, ColorJitter):
            parts.append(f"ColorJitter({op.brightness}, {op.contrast}, {op.saturation}, {op.hue}) p={op.p}")
        elif isinstance(op, Flip):
            parts.append(f"{'Horizontal' if op.dim == -1 else 'Vertical'}Flip p={op.p}")
        elif isinstance(op, Grayscale):
            parts.append(f"Grayscale p={op.p}")
        elif isinstance(op, ResizedCrop):
            parts.append(f"RandomResizedCrop(scale={op.scale[0]:g}-{op.scale[1]:g})")
        elif isinstance(op, GaussianBlur):
            parts.append(f"GaussianBlur(sigma={op.sigma[0]:g}-{op.sigma[1]:g}) p={op.p}")
        elif isinstance(op, Invert):
            parts.append(f"Invert p={op.p}")
    return ", ".join(parts) or "no augmentation"


def torchvision_pipeline(name: str, size: int):
    """The same set as a per-image ``torchvision.transforms.v2`` pipeline (float [0, 1] input)."""
    # torchvision: optional or slow to import, loaded only on this path
    from torchvision.transforms import v2

    out = []
    for op in SETS[name]:
        if isinstance(op, ColorJitter):
            out.append(v2.RandomApply([v2.ColorJitter(op.brightness, op.contrast, op.saturation, op.hue)], p=op.p))
        elif isinstance(op, Flip):
            out.append(v2.RandomHorizontalFlip(op.p) if op.dim == -1 else v2.RandomVerticalFlip(op.p))
        elif isinstance(op, Grayscale):
            out.append(v2.RandomGrayscale(op.p))
        elif isinstance(op, ResizedCrop):
            out.append(v2.RandomResizedCrop(size, scale=op.scale, ratio=op.ratio, antialias=True))
        elif isinstance(op, GaussianBlur):
            out.append(v2.RandomApply([v2.GaussianBlur(GaussianBlur.kernel_size(size), sigma=op.sigma)], p=op.p))
        elif isinstance(op, Invert):
            out.append(v2.RandomInvert(op.p))
    return v2.Compose(out) if out else v2.Identity()
