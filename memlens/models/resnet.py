"""Convolutional encoders: ResNet9 (localizing paper, Table 8) and a CIFAR-stem ResNet18.

Every ReLU is its own module, so each conv layer's post-ReLU output has a module path a hook can
use (torchvision's ResNet reuses one ReLU module twice per block, which hooks cannot tell apart).
The representation used for alignment is the final feature map flattened, (B, C * h * w), as
the SSLMem paper does for ResNet50 (Appendix A: 49 x 2048).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from memlens.models.layers import LayerSpec


class ConvBlock(nn.Module):
    """3x3 conv -> BatchNorm -> ReLU (-> 2x2 max-pool)."""

    def __init__(self, c_in: int, c_out: int, *, pool: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU(inplace=False)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.bn(self.conv(x))))


class ConvEncoder(nn.Module):
    family = "resnet"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).flatten(1)

    @staticmethod
    def head_features(fmap: torch.Tensor) -> torch.Tensor:
        return fmap.mean(dim=(2, 3))

    probe_features = head_features


class ResNet9(ConvEncoder):
    """Eight conv layers 32-64-64-64-128-256-256-256 with two residual connections.

    Layout (localizing paper, Tables 8 and 18): conv1+pool, conv2-0+pool, [conv2-1, conv2-2]
    + residual ("Res2"), conv3+pool, conv4-0+pool, [conv4-1, conv4-2] + residual ("Res6").
    A 2x2 pool is skipped where the map is already 1 pixel wide (small inputs such as 8x8 digits).
    """

    WIDTHS = (32, 64, 64, 64, 128, 256, 256, 256)

    def __init__(self, *, in_chans: int, img_size: int, width_mult: float = 1.0):
        super().__init__()
        w = [max(8, int(round(c * width_mult))) for c in self.WIDTHS]
        size = img_size

        def pool() -> bool:
            nonlocal size
            if size >= 2:
                size //= 2
                return True
            return False

        self.conv1 = ConvBlock(in_chans, w[0], pool=pool())
        self.conv2_0 = ConvBlock(w[0], w[1], pool=pool())
        self.conv2_1 = ConvBlock(w[1], w[2])
        self.conv2_2 = ConvBlock(w[2], w[3])
        self.res2 = nn.Identity()
        self.conv3 = ConvBlock(w[3], w[4], pool=pool())
        self.conv4_0 = ConvBlock(w[4], w[5], pool=pool())
        self.conv4_1 = ConvBlock(w[5], w[6])
        self.conv4_2 = ConvBlock(w[6], w[7])
        self.res6 = nn.Identity()
        self.feature_dim = w[7]
        self.out_size = size

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2_0(self.conv1(x))
        x = self.res2(x + self.conv2_2(self.conv2_1(x)))
        x = self.conv4_0(self.conv3(x))
        return self.res6(x + self.conv4_2(self.conv4_1(x)))

    def layer_specs(self) -> list[LayerSpec]:
        order = [("conv1.act", "conv", 0), ("conv2_0.act", "conv", 1), ("conv2_1.act", "conv", 2),
                 ("conv2_2.act", "conv", 3), ("res2", "residual", 3), ("conv3.act", "conv", 4),
                 ("conv4_0.act", "conv", 5), ("conv4_1.act", "conv", 6), ("conv4_2.act", "conv", 7),
                 ("res6", "residual", 7)]
        modules = dict(self.named_modules())
        specs = []
        for name, kind, block in order:
            units = modules[name.removesuffix(".act")].conv.out_channels if name.endswith(".act") \
                else self.conv4_2.conv.out_channels if name == "res6" else self.conv2_2.conv.out_channels
            # Residual additions are sums of post-ReLU maps: measured by LayerMem (Table 1's Res2 and
            # Res6), while the units are the eight conv layers' channels (Fig. 3).
            specs.append(LayerSpec(name=name, kind=kind, units=units, layout="channels_first",
                                   depth=len(specs), block=block, prev=specs[-1].name if specs else None,
                                   unit_kind="activation" if kind == "conv" else "other"))
        return specs


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act2 = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(ConvEncoder):
    """ResNet18 with the CIFAR stem (3x3 conv, no max-pool), BasicBlocks [2, 2, 2, 2]."""

    def __init__(self, *, in_chans: int, img_size: int, width_mult: float = 1.0):
        super().__init__()
        widths = [max(8, int(round(c * width_mult))) for c in (64, 128, 256, 512)]
        self.stem = nn.Sequential()
        self.stem.conv = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.stem.bn = nn.BatchNorm2d(widths[0])
        self.stem.act = nn.ReLU()
        c_in = widths[0]
        size = img_size
        for k, c in enumerate(widths):
            stride = 1 if k == 0 or size < 2 else 2
            size = size if stride == 1 else (size + 1) // 2
            setattr(self, f"layer{k + 1}", nn.Sequential(BasicBlock(c_in, c, stride), BasicBlock(c, c, 1)))
            c_in = c
        self.feature_dim = widths[-1]
        self.out_size = size

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for k in range(1, 5):
            x = getattr(self, f"layer{k}")(x)
        return x

    def layer_specs(self) -> list[LayerSpec]:
        specs = [LayerSpec(name="stem.act", kind="conv", units=self.stem.conv.out_channels,
                           layout="channels_first", depth=0, block=0, unit_kind="activation")]
        for k in range(1, 5):
            for j, block in enumerate(getattr(self, f"layer{k}")):
                for act, kind in (("act1", "conv"), ("act2", "block")):
                    specs.append(LayerSpec(name=f"layer{k}.{j}.{act}", kind=kind, units=block.conv1.out_channels,
                                           layout="channels_first", depth=len(specs), block=k, prev=specs[-1].name,
                                           unit_kind="activation"))
        return specs
