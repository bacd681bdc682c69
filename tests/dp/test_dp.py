import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from opacus.accountants import PRVAccountant, RDPAccountant
from safetensors.torch import load_file

from memlens.config import DPConfig, TrainConfig
from memlens.data import Augmenter
from memlens.dp.accounting import default_delta, privacy_plan
from memlens.dp.ghost_clipping import GhostClipper
from memlens.dp.optimizer import FusedDPOptimizer
from memlens.dp.training import train_encoder
from memlens.errors import MemlensError
from memlens.models import build_encoder
from memlens.train import read_run
from memlens.train.objectives import build_objective


def _mae(seed=0, **mae):
    torch.manual_seed(seed)
    enc = build_encoder("vit_micro", image_size=8, in_chans=1, depth=2, embed_dim=32)
    cfg = TrainConfig.model_validate({"framework": "mae", "mae": {"decoder_dim": 32, "mask_ratio": 0.5, **mae}})
    return build_objective(cfg, enc, Augmenter("none", mean=[0.3], std=[0.3]), in_chans=1, num_classes=None).train()


def _loop_grads(obj, x, noise):
    """Per-example gradients from one ordinary backward pass per example."""
    params = [p for p in obj.parameters() if p.requires_grad]
    out = []
    for b in range(len(x)):
        obj.zero_grad(set_to_none=True)
        obj.losses_on_views(x[b:b + 1], None, noise[b:b + 1]).sum().backward()
        out.append({p: p.grad.detach().clone() for p in params})
    return params, out


@pytest.fixture
def batch(digits):
    g = torch.Generator().manual_seed(0)
    x = (torch.from_numpy(digits.images[:6]).permute(0, 3, 1, 2).float() / 255 - 0.3) / 0.3
    return x, torch.rand(6, 16, generator=g)


def test_per_sample_gradients_equal_single_example_backward(batch):
    x, noise = batch
    obj = _mae()
    params, loop = _loop_grads(obj, x, noise)
    clipper = GhostClipper(obj)
    with clipper.capture():
        obj.losses_on_views(x, None, noise).sum().backward()
    ours = clipper.per_sample_grads()
    assert set(ours) == set(params)  # every trainable parameter, token modules included
    # relative to each gradient's scale: float32 sums in another order differ in the last bits
    worst = max(((ours[p][b] - loop[b][p]).abs().max() / loop[b][p].abs().max().clamp_min(1.0)).item()
                for p in params for b in range(6))
    assert worst <= 1e-5
    # per-example norms, by the ghost identity and by materialising, match the loop's
    loop_norms = torch.stack([torch.sqrt(sum(loop[b][p].pow(2).sum() for p in params)) for b in range(6)])
    assert torch.allclose(clipper.norms(), loop_norms, rtol=1e-5, atol=1e-6)
    for ghost in (True, False):
        clipper._ghost_is_cheaper = lambda t, i, o, ghost=ghost: ghost
        with clipper.capture():
            obj.losses_on_views(x, None, noise).sum().backward()
        assert torch.allclose(clipper.norms(), loop_norms, rtol=1e-5, atol=1e-6)


def test_opacus_hook_mode_agrees(batch):
    from opacus.grad_sample import GradSampleModule

    from memlens.dp.step import register_opacus_samplers as _register_opacus_samplers

    x, noise = batch
    obj = _mae()
    params, loop = _loop_grads(obj, x, noise)
    _register_opacus_samplers()
    gsm = GradSampleModule(obj, batch_first=True, loss_reduction="sum", strict=False)
    obj.zero_grad(set_to_none=True)
    obj.losses_on_views(x, None, noise).sum().backward()
    worst = max(((p.grad_sample[b] - loop[b][p]).abs().max() / loop[b][p].abs().max().clamp_min(1.0)).item()
                for p in params for b in range(6))
    assert worst <= 1e-5
    gsm._close()


def test_conv_and_linear_layers_of_any_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), nn.LayerNorm(64),
                          nn.Linear(64, 5))
    x = torch.randn(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    loss = lambda out: nn.functional.cross_entropy(out, y, reduction="none")  # noqa: E731
    loop = []
    for b in range(4):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[b:b + 1]), y[b:b + 1]).backward()
        loop.append({p: p.grad.clone() for p in model.parameters()})
    model.zero_grad(set_to_none=True)
    clipper = GhostClipper(model)
    with clipper.capture():
        loss(model(x)).sum().backward()
    ours = clipper.per_sample_grads()
    assert max((ours[p][b] - loop[b][p]).abs().max().item() for p in model.parameters() for b in range(4)) <= 1e-5
    clipper.accumulate_clipped(max_grad_norm=0.5)
    expected = sum(loop[b][p] * min(1.0, 0.5 / (torch.sqrt(sum(loop[b][q].pow(2).sum() for q in model.parameters()))
                                              .item() + 1e-6)) for b in range(4) for p in [model[4].weight])
    assert torch.allclose(model[4].weight.grad, expected, atol=1e-6)


class _Tokens(nn.Module):
    """Token-wise linear maps whose shapes take each of the engine's forms: per-example gradients
    with d_in > T and with d_in <= T, and the ghost norm (few tokens, wide layers)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 16), nn.Linear(16, 64)  # over T = 40 tokens
        self.c = nn.Linear(64, 64)  # over T = 4 (pooled groups of 10)

    def forward(self, x):  # (B, 40, 64) -> (B,)
        h = self.b(torch.tanh(self.a(x)))
        return self.c(h.reshape(x.shape[0], 4, 10, 64).mean(dim=2)).square().mean(dim=(1, 2))


def test_each_form_of_the_clipped_sum_equals_the_single_example_loop():
    torch.manual_seed(0)
    model, x = _Tokens(), torch.randn(5, 40, 64)
    loop = []
    for b in range(5):
        model.zero_grad()
        model(x[b:b + 1]).sum().backward()
        loop.append({p: p.grad.clone() for p in model.parameters()})
    model.zero_grad(set_to_none=True)
    clipper = GhostClipper(model)
    with clipper.capture():
        model(x).sum().backward()
    forms = {name: "ag" if "ag" in rec else "per_sample" for name, rec in clipper._records.items()}
    assert forms == {"a": "per_sample", "b": "per_sample", "c": "ag"}
    ours = clipper.per_sample_grads()
    assert max((ours[p][b] - loop[b][p]).abs().max().item() for p in model.parameters() for b in range(5)) <= 1e-5
    norms = [torch.sqrt(sum(g.square().sum() for g in lb.values())).item() for lb in loop]
    clip = float(np.median(norms))  # half the examples are clipped
    clipper.accumulate_clipped(max_grad_norm=clip)
    for p in model.parameters():
        expected = sum(loop[b][p] * min(1.0, clip / (norms[b] + 1e-6)) for b in range(5))
        assert torch.allclose(p.grad, expected, atol=1e-6, rtol=1e-5)


def test_unsupported_layers_and_batchnorm_are_refused():
    with pytest.raises(MemlensError, match="cannot compute per-sample gradients of layer '1'.*BatchNorm1d"):
        GhostClipper(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))


def _update(obj, x, noise, *, sigma, clip, expected):
    opt = torch.optim.SGD(obj.parameters(), lr=1.0)
    dpo = FusedDPOptimizer(opt, noise_multiplier=sigma, max_grad_norm=clip, expected_batch_size=expected,
                           loss_reduction="mean", generator=torch.Generator().manual_seed(3))
    before = [p.detach().clone() for p in obj.parameters()]
    clipper = GhostClipper(obj)
    dpo.zero_grad(set_to_none=True)
    with clipper.capture():
        obj.losses_on_views(x, None, noise).sum().backward()
    clipper.accumulate_clipped(max_grad_norm=clip)
    dpo.step()
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(obj.parameters(), before, strict=True)])


def test_clipped_noised_update_has_the_expected_scale(batch):
    x, noise = batch
    clip, expected = 0.05, 50.0
    # Without noise: the update is minus the sum of clipped per-example gradients over E.
    obj = _mae()
    params, loop = _loop_grads(obj, x, noise)
    clipped_sum = torch.zeros(sum(p.numel() for p in params))
    for b in range(6):
        flat = torch.cat([loop[b][p].flatten() for p in params])
        clipped_sum += flat * min(1.0, clip / (flat.norm().item() + 1e-6))
    delta0 = _update(_mae(), x, noise, sigma=0.0, clip=clip, expected=expected)
    assert torch.allclose(delta0, -clipped_sum / expected, atol=1e-7)
    # With noise: what remains has std sigma * C / E, over ~25k coordinates.
    sigma = 1.7
    delta = _update(_mae(), x, noise, sigma=sigma, clip=clip, expected=expected)
    noise_part = -(delta - delta0)
    target = sigma * clip / expected
    assert abs(noise_part.std().item() / target - 1) < 0.03
    assert abs(noise_part.mean().item()) < 0.05 * target


DP_MAE = {"framework": "mae", "subsets": "all", "batch_size": 128, "seed": 1,
          "model": {"arch": "vit_micro", "depth": 2, "embed_dim": 32}, "mae": {"decoder_dim": 32}}


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_recorded_epsilon_is_within_the_target(tmp_path, digits, accountant):
    cfg = TrainConfig.model_validate({**DP_MAE, "epochs": 2, "dp": {"epsilon": 4.0, "accountant": accountant}})
    rec = train_encoder(cfg, tmp_path / "run", dataset=digits).record
    d = rec.dp
    assert rec.status == "complete" and d["steps_taken"] == d["planned_steps"] == 2 * int(1797 / 128)
    assert 0.9 * 4.0 <= d["epsilon_spent"] <= 4.0
    assert d["delta"] == pytest.approx(default_delta(1797)) and d["delta"] < 1 / 1797
    assert [h["epsilon"] for h in rec.history][-1] == pytest.approx(d["epsilon_spent"], abs=1e-4)
    assert rec.history[0]["epsilon"] < rec.history[1]["epsilon"]
    # an independent accountant, fed only sigma, q and the step count, agrees
    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    for _ in range(d["steps_taken"]):
        acc.step(noise_multiplier=d["noise_multiplier"], sample_rate=d["sample_rate"])
    assert acc.get_epsilon(delta=d["delta"]) == pytest.approx(d["epsilon_spent"], rel=1e-3)


def test_epsilon_is_computed_on_a_cadence_and_exactly_at_the_end(tmp_path, digits):
    # 27 epochs: epsilon on every second epoch (about 25 rows in all) and on the last one
    cfg = TrainConfig.model_validate({**DP_MAE, "epochs": 27, "batch_size": 600, "dp": {"epsilon": 4.0}})
    rec = train_encoder(cfg, tmp_path / "run", dataset=digits).record
    shown = [h["epoch"] for h in rec.history if "epsilon" in h]
    assert shown == list(range(2, 27, 2)) + [27]
    d = rec.dp
    assert d["epsilon_steps"] == d["steps_taken"] == rec.history[-1]["steps"]
    assert d["epsilon_spent"] == pytest.approx(rec.history[-1]["epsilon"], abs=1e-4)
    eps = [h["epsilon"] for h in rec.history if "epsilon" in h]
    assert eps == sorted(eps) and eps[-1] <= 4.0


def test_memoised_rdp_changes_no_epsilon(monkeypatch):
    """memlens caches Opacus's one-step RDP per (q, sigma, order); the uncached function gives the
    same RDP and PRV epsilons."""
    from opacus.accountants.analysis import rdp

    settings = [(1.1, 0.01, 500), (3.78, 0.2, 1200), (0.8, 0.05, 30)]
    cached = []
    for sigma, q, steps in settings:
        for acc in (PRVAccountant(), RDPAccountant()):
            acc.history = [(sigma, q, steps)]
            cached.append(acc.get_epsilon(delta=1e-5))
    assert hasattr(rdp._compute_rdp, "cache_info")
    monkeypatch.setattr(rdp, "_compute_rdp", rdp._compute_rdp.uncached)
    plain = []
    for sigma, q, steps in settings:
        for acc in (PRVAccountant(), RDPAccountant()):
            acc.history = [(sigma, q, steps)]
            plain.append(acc.get_epsilon(delta=1e-5))
    assert cached == plain


def test_resume_restores_the_accountant(tmp_path, digits):
    cfg = TrainConfig.model_validate({**DP_MAE, "epochs": 3, "dp": {"epsilon": 6.0, "reproducible": True}})
    straight = train_encoder(cfg, tmp_path / "a", dataset=digits).record

    def stop(info):
        if info.epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_encoder(cfg, tmp_path / "b", dataset=digits, on_epoch=stop)
    assert read_run(tmp_path / "b").dp["steps_taken"] == 2 * int(1797 / 128)
    resumed = train_encoder(None, tmp_path / "b", resume=True, dataset=digits).record
    assert resumed.dp["epsilon_spent"] == straight.dp["epsilon_spent"]
    assert resumed.dp["accountant_history"] == straight.dp["accountant_history"]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_stops_at_the_budget(tmp_path, digits):
    cfg = TrainConfig.model_validate({**DP_MAE, "epochs": 4, "dp": {"epsilon": 3.0, "noise_multiplier": 0.8}})
    p = privacy_plan(cfg.dp, n=1797, batch_size=128, epochs=4)
    assert p.max_steps < p.planned_steps
    rec = train_encoder(cfg, tmp_path / "run", dataset=digits).record
    assert rec.status == "stopped_budget" and "privacy budget reached" in rec.message
    assert rec.dp["steps_taken"] == p.max_steps and rec.dp["epsilon_spent"] <= 3.0
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_planning_rules():
    p = privacy_plan(DPConfig(epsilon=8), n=1000, batch_size=100, epochs=5)
    assert p.sample_rate == 0.1 and p.planned_steps == 50 and p.calibrated and p.planned_epsilon <= 8
    assert "epsilon = " in p.sentence() and "delta = 0.0001" in p.sentence()
    with pytest.raises(MemlensError, match=r"not below 1/N = 1/1000"):
        privacy_plan(DPConfig(epsilon=8, delta=0.001), n=1000, batch_size=100, epochs=5)
    with pytest.raises(MemlensError, match="epsilon must be finite"):
        from memlens.config import validate

        validate(DPConfig, {"epsilon": math.inf}, source="dp")


def test_non_per_sample_objectives_are_refused(tmp_path, digits):
    cfg = TrainConfig.model_validate({**DP_MAE, "framework": "simclr", "dp": {"epsilon": 8}})
    with pytest.raises(MemlensError, match="framework 'simclr' cannot be trained with DP-SGD: SimCLR does not "
                                           "decompose into per-example losses"):
        train_encoder(cfg, tmp_path / "run", dataset=digits)
    cfg = TrainConfig.model_validate({**DP_MAE, "framework": "supervised", "model": {"arch": "resnet9"},
                                      "dp": {"epsilon": 8}})
    with pytest.raises(MemlensError, match="BatchNorm"):
        train_encoder(cfg, tmp_path / "run2", dataset=digits)
    sup = TrainConfig.model_validate({**DP_MAE, "framework": "supervised", "epochs": 1, "dp": {"epsilon": 8}})
    assert train_encoder(sup, tmp_path / "run3", dataset=digits).record.dp["epsilon_spent"] <= 8


def test_timm_vit_per_example_gradients_equal_single_example_backward():
    """A timm ViT (cls_token and pos_embed held by the model, LayerScale, fused qkv, patch-embed conv)
    under the ghost engine: per-example gradients and norms equal one backward pass per example."""
    from memlens.models.vit import timm_vit

    torch.manual_seed(0)
    enc = timm_vit("vit_tiny_patch16_224", image_size=16, in_chans=3, patch_size=4, embed_dim=32, depth=2,
                   num_heads=2, init_values=0.1)
    cfg = TrainConfig.model_validate({"framework": "mae", "mae": {"decoder_dim": 32, "mask_ratio": 0.5}})
    obj = build_objective(cfg, enc, Augmenter("none", mean=[0.5] * 3, std=[0.5] * 3), in_chans=3,
                          num_classes=None).train()
    keys = list(obj.state_dict())
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(5, 3, 16, 16, generator=g), torch.rand(5, 16, generator=g)
    params, loop = _loop_grads(obj, x, noise)
    clipper = GhostClipper(obj)
    assert sorted((name, pname) for name, _, pname, _ in clipper.expanded) == [("encoder", "cls_token"),
                                                                            ("encoder", "pos_embed")]
    with clipper.capture(batch_size=5):
        obj.losses_on_views(x, None, noise).sum().backward()
    ours = clipper.per_sample_grads()
    assert set(ours) == set(params)
    assert {id(enc.cls_token), id(enc.pos_embed)} <= {id(p) for p in ours}
    for p in params:
        for b in range(5):
            ref = loop[b][p]
            assert (ours[p][b] - ref).abs().max() <= 1e-4 * ref.abs().max().clamp_min(1e-6), p.shape
    loop_norms = torch.stack([torch.sqrt(sum(loop[b][p].pow(2).sum() for p in params)) for b in range(5)])
    assert torch.allclose(clipper.norms(), loop_norms, rtol=1e-4)
    # the clipped sum equals sum_b min(1, C / ||g_b||) g_b of the loop
    obj.zero_grad(set_to_none=True)
    clipper.accumulate_clipped(max_grad_norm=0.05)
    coef = (0.05 / (loop_norms + 1e-6)).clamp(max=1.0)
    for p in params:
        ref = sum(coef[b] * loop[b][p] for b in range(5))
        assert torch.allclose(p.grad, ref, rtol=1e-4, atol=1e-7)
    assert list(obj.state_dict()) == keys and isinstance(enc.cls_token, nn.Parameter)  # restored after capture


def test_dp_refuses_batchnorm_naming_the_layer():
    enc = build_encoder("resnet9", image_size=8, in_chans=1)
    with pytest.raises(MemlensError, match=r"layer 'conv1.bn' \(BatchNorm2d, parameter 'weight'\) \(BatchNorm mixes"):
        GhostClipper(enc)
