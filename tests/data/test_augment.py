import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from memlens.data.augment import (
    AUGMENTATIONS,
    Augmenter,
    ColorJitter,
    GaussianBlur,
    Grayscale,
    ResizedCrop,
    torchvision_pipeline,
)
from memlens.errors import MemlensError


@pytest.fixture
def batch():
    return torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name,ref", [("brightness", TF.adjust_brightness), ("contrast", TF.adjust_contrast),
                                      ("saturation", TF.adjust_saturation), ("hue", TF.adjust_hue)])
def test_colour_ops_match_torchvision_kernels(batch, name, ref):
    g = torch.Generator().manual_seed(1)
    f = torch.rand(12, generator=g) - 0.5 if name == "hue" else torch.rand(12, generator=g) * 1.6 + 0.2
    ours = ColorJitter.op(name, batch.clone(), f)
    theirs = torch.stack([ref(batch[i], float(f[i])) for i in range(12)])
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_one_channel_jitter_matches_torchvision(batch):
    gray = batch[:, :1]
    f = torch.full((12,), 1.4)
    for name, ref in (("contrast", TF.adjust_contrast), ("saturation", TF.adjust_saturation)):
        ours = ColorJitter.op(name, gray.clone(), f)
        assert torch.allclose(ours, torch.stack([ref(gray[i], 1.4) for i in range(12)]), atol=1e-6)


def test_crop_resize_matches_resized_crop(batch):
    boxes = ResizedCrop().params(12, 16, 16, torch.Generator().manual_seed(2))
    ours = ResizedCrop.apply(batch.clone(), boxes, 16)
    theirs = torch.stack([TF.resized_crop(batch[i], *map(int, b), [16, 16], antialias=True)
                          for i, b in enumerate(boxes)])
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_crop_params_follow_torchvision_rules():
    boxes = ResizedCrop(scale=(0.2, 1.0)).params(4000, 32, 32, torch.Generator().manual_seed(0))
    top, left, h, w = boxes.T
    assert (h >= 1).all() and (w >= 1).all() and (top + h <= 32).all() and (left + w <= 32).all()
    area = h * w / 1024
    assert area.min() >= 0.15 and area.max() <= 1.0  # rounding lets the area dip a little under 0.2
    ratio = w / h
    assert ratio.min() > 0.6 and ratio.max() < 1.6
    assert 0.5 < area.mean() < 0.7  # mean of U(0.2, 1) is 0.6


def test_blur_and_grayscale_match_torchvision(batch):
    sigma = torch.linspace(0.1, 5.0, 12)
    ours = GaussianBlur.apply(batch.clone(), sigma, 5)
    theirs = torch.stack([TF.gaussian_blur(batch[i], [5, 5], [float(sigma[i])] * 2) for i in range(12)])
    assert torch.allclose(ours, theirs, atol=1e-5)
    ours = Grayscale(1.0)(batch.clone(), None)
    assert torch.allclose(ours, torch.stack([TF.rgb_to_grayscale(batch[i], 3) for i in range(12)]), atol=1e-6)


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_sets_are_deterministic_per_generator_and_per_sample(name):
    imgs = torch.randint(0, 255, (16, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    aug = Augmenter(name, mean=[0.5] * 3, std=[0.25] * 3)
    a = aug(imgs, torch.Generator().manual_seed(5))
    b = aug(imgs, torch.Generator().manual_seed(5))
    assert a.shape == (16, 3, 16, 16) and torch.equal(a, b)
    if name == "none":
        assert torch.allclose(a, (imgs.permute(0, 3, 1, 2) / 255 - 0.5) / 0.25)
    else:
        c = aug(imgs, torch.Generator().manual_seed(6))
        assert not torch.equal(a, c)
        # Per-sample parameters: two copies of one image get different views.
        same = aug(imgs[:1].expand(8, -1, -1, -1), torch.Generator().manual_seed(7))
        assert not all(torch.equal(same[0], same[k]) for k in range(1, 8))
    torchvision_pipeline(name, 16)(imgs[0].permute(2, 0, 1).float() / 255)


def test_views_are_contiguous_per_image():
    imgs = torch.randint(0, 255, (3, 8, 8, 1), dtype=torch.uint8)
    v = Augmenter("none", mean=[0.0], std=[1.0]).views(imgs, 4, None)
    assert v.shape == (12, 1, 8, 8)
    assert torch.equal(v[4], v[7]) and torch.allclose(v[4, 0], imgs[1, ..., 0].float() / 255)


def test_unknown_set_lists_valid_names():
    with pytest.raises(MemlensError, match="valid: weak, normal, strong, independent, mae, none"):
        Augmenter("fancy", mean=[0.5], std=[0.5])
