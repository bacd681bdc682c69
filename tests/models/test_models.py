import pytest
import torch
import torch.nn as nn

from memlens.errors import MemlensError
from memlens.models import ARCHS, build_encoder
from memlens.models.vit import ClsToken, MaskToken, PosEmbed, patchify, random_masking

LEAF_TYPES = (nn.Linear, nn.LayerNorm, nn.Conv2d, PosEmbed, ClsToken, MaskToken)


@pytest.mark.parametrize("arch,size,chans", [("vit_micro", 8, 1), ("vit_mini", 16, 3), ("resnet9", 16, 3),
                                             ("resnet9", 8, 1), ("resnet18", 16, 3)])
def test_layers_units_and_representation(arch, size, chans):
    enc = build_encoder(arch, image_size=size, in_chans=chans).eval()
    modules = dict(enc.named_modules())
    captured = {}
    specs = enc.layer_specs()
    handles = [modules[s.name].register_forward_hook(lambda m, i, o, n=s.name: captured.__setitem__(n, o))
               for s in specs]
    x = torch.randn(3, chans, size, size)
    rep = enc.representation(x)
    for h in handles:
        h.remove()
    assert [s.depth for s in specs] == list(range(len(specs)))
    for s in specs:
        assert s.unit_activations(captured[s.name]).shape == (3, s.units), s.name
    if arch.startswith("vit"):
        # all tokens, CLS included, flattened (SSLMem paper, Appendix A)
        assert rep.shape == (3, (enc.num_patches + 1) * enc.embed_dim)
        assert torch.equal(rep, captured["norm"].flatten(1))
        assert {s.kind for s in specs} == {"attention", "resblock_attn", "mlp_hidden", "mlp", "block", "output"}
    else:
        assert torch.equal(rep, captured[specs[-1].name].flatten(1))


def test_resnet9_follows_table_8():
    enc = build_encoder("resnet9", image_size=32, in_chans=3)
    convs = [m for m in enc.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 64, 64, 128, 256, 256, 256]
    assert [c.weight.numel() + (c.bias.numel() if c.bias is not None else 0) for c in convs][1] == 18432
    assert sum(isinstance(m, nn.MaxPool2d) for m in enc.modules()) == 4
    assert enc.representation(torch.zeros(2, 3, 32, 32)).shape == (2, 256 * 2 * 2)


def test_vit_tiny_is_the_papers_model():
    enc = build_encoder("vit_tiny", image_size=32, in_chans=3)
    assert enc.patch_size == 4 and enc.num_patches == 64 and enc.embed_dim == 192 and len(enc.blocks) == 12
    assert enc.blocks[0].attn.num_heads == 3


def test_every_vit_parameter_lives_in_a_leaf_module():
    from memlens.config import TrainConfig
    from memlens.data import Augmenter
    from memlens.train.objectives import build_objective

    enc = build_encoder("vit_micro", image_size=8, in_chans=1)
    obj = build_objective(TrainConfig(framework="mae"), enc, Augmenter("none", mean=[0.5], std=[0.5]),
                          in_chans=1, num_classes=None)
    assert not list(obj.encoder.parameters(recurse=False))
    for name, module in obj.named_modules():
        if list(module.parameters(recurse=False)):
            assert isinstance(module, LEAF_TYPES), name
            assert not list(module.children()), name


def test_masking_is_per_sample_and_seeded():
    x = torch.randn(4, 16, 8)
    v1, m1, r1 = random_masking(x, 0.75, torch.Generator().manual_seed(0))
    v2, m2, r2 = random_masking(x, 0.75, torch.Generator().manual_seed(0))
    assert torch.equal(v1, v2) and torch.equal(m1, m2)
    assert v1.shape == (4, 4, 8) and (m1.sum(1) == 12).all()
    assert not all(torch.equal(m1[0], m1[k]) for k in range(1, 4))
    # the visible tokens are exactly the unmasked ones, in shuffled order
    for b in range(4):
        kept = x[b][m1[b] == 0]
        assert sorted(kept[:, 0].tolist()) == sorted(v1[b, :, 0].tolist())


def test_patchify_matches_patch_embedding_order():
    enc = build_encoder("vit_micro", image_size=8, in_chans=1, patch_size=2)
    img = torch.arange(64.0).view(1, 1, 8, 8)
    patches = patchify(img, 2)
    conv = enc.patch_embed.proj
    emb = enc.patch_embed(img)  # (1, 16, D): patch n is conv output at row n // 4, col n % 4
    expected = (patches @ conv.weight.view(conv.out_channels, -1).T) + conv.bias
    assert torch.allclose(emb, expected, atol=1e-4)


def test_bad_model_settings():
    with pytest.raises(MemlensError, match="unknown architecture 'vgg'; valid: " + ", ".join(ARCHS)):
        build_encoder("vgg", image_size=8, in_chans=1)
    with pytest.raises(MemlensError, match="does not divide"):
        build_encoder("vit_micro", image_size=8, in_chans=1, patch_size=3)
    with pytest.raises(MemlensError, match="takes no patch_size"):
        build_encoder("resnet9", image_size=8, in_chans=1, patch_size=2)
