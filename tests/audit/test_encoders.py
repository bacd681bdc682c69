"""Auditing encoders memlens did not train: timm models and factories with their weight files,
plain nn.Modules, through the CLI, the YAML and the Python API; devices and precision."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import yaml
from conftest import run
from safetensors.torch import save_file
from scipy.stats import mannwhitneyu

import memlens
from memlens.config import DataConfig, SplitConfig, SplitSizes
from memlens.data import make_splits
from memlens.dp.training import train_encoder
from memlens.errors import MemlensError

VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 0}
SETTINGS = {"views": 4, "max_per_subset": 12, "bootstrap": 100, "reliability": {"bootstrap": 20}}



@pytest.fixture(scope="module")
def bundle(tmp_path_factory, digits):
    """Splits of the digits and random-init timm models saved to safetensors (a ViT and a ResNet18)."""
    root = tmp_path_factory.mktemp("enc")
    splits = make_splits(digits, SplitConfig(sizes=SplitSizes(S_S=60, S_C=20, S_I=20, S_E=20), seed=4))
    splits.data = DataConfig(source="digits")  # as memlens split records it: the audit finds the images
    splits.save(root / "s.json")
    for k, side in enumerate(("f", "g")):
        torch.manual_seed(k)
        vit = timm.create_model("vit_tiny_patch16_224", **VIT)
        save_file({n: t.contiguous() for n, t in vit.state_dict().items()}, str(root / f"vit_{side}.safetensors"))
        torch.manual_seed(10 + k)
        rn = timm.create_model("resnet18", num_classes=0)
        save_file({n: t.contiguous() for n, t in rn.state_dict().items()}, str(root / f"rn_{side}.safetensors"))
    return root


def _vit_spec(root, side, **extra):
    return {"model": "timm:vit_tiny_patch16_224", "weights": str(root / f"vit_{side}.safetensors"), "kwargs": VIT,
            **extra}


def test_cli_yaml_and_api_give_identical_audits(bundle, digits, tmp_path):
    root = bundle
    # Python API
    api = memlens.audit_encoders(f=_vit_spec(root, "f"), g=_vit_spec(root, "g"), splits=root / "s.json", dataset=digits,
                        **SETTINGS)
    # YAML
    cfg = {"f": [_vit_spec(root, "f")], "g": [_vit_spec(root, "g")], "splits": str(root / "s.json"), **SETTINGS}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(cfg))
    code, out, err = run("audit", "--config", tmp_path / "a.yaml", "--out", tmp_path / "yaml")
    assert code == 0, err
    # flags
    code, out, err = run("audit", "--f", "timm:vit_tiny_patch16_224", "--f-weights", root / "vit_f.safetensors",
                         "--g", "timm:vit_tiny_patch16_224", "--g-weights", root / "vit_g.safetensors",
                         "--model-kwargs", json.dumps(VIT), "--splits", root / "s.json", "--views", "4",
                         "--max-per-subset", "12", "--out", tmp_path / "cli", "--device", "cpu")
    assert code == 0, err
    for d in ("yaml", "cli"):
        pts = pd.read_csv(tmp_path / d / "points.csv")
        assert np.allclose(pts["sslmem"], api.points["sslmem"], atol=1e-7), d
        units = pd.read_csv(tmp_path / d / "units.csv")
        assert np.allclose(units["unitmem"], api.units["unitmem"], atol=1e-6, equal_nan=True), d
    s = api.summary
    assert s.model["representation"] == "pooled" and s.model["input_size"] == 32  # timm's own default, real size
    assert [r.weights_sha256 for r in s.encoders][0] is not None and s.encoders[0].load["missing"] == []
    assert set(api.layers["layer"]) >= {"blocks.0.attn", "blocks.0.norm2", "blocks.0.mlp.act", "blocks.1", "norm"}
    assert set(api.units["layer"]) == {"blocks.0.mlp.act", "blocks.1.mlp.act"}  # units: MLP neurons after GELU
    assert s.vit_blocks and len(s.vit_blocks) == 2 and s.environment["device"] == "cpu"
    # the API result saves exactly what report and gate read
    api.save(tmp_path / "api")
    assert run("gate", tmp_path / "api", "--policy", Path(__file__).parents[2] / "policies" / "default.yaml")[0] \
        in (0, 1)


def test_timm_resnet_layers_and_layer_globs(bundle, digits):
    root = bundle
    spec = lambda side: {"model": "timm:resnet18", "weights": str(root / f"rn_{side}.safetensors"),  # noqa: E731
                         "kwargs": {"num_classes": 0}, "input_size": 32}
    res = memlens.audit_encoders(f=spec("f"), g=spec("g"), splits=root / "s.json", dataset=digits,
                        layers=["layer4.*.act*", "layer4"], **SETTINGS)
    assert list(res.layers["layer"]) == ["layer4.0.act1", "layer4.0.act2", "layer4.1.act1", "layer4.1.act2", "layer4"]
    assert (res.layers.set_index("layer").loc["layer4.0.act1", "units"]) == 512
    code, out, _ = run("layers", "timm:resnet18", "--model-kwargs", '{"num_classes": 0}', "--input-size", "32")
    assert code == 0 and "act1" in out and "layer1.0.act1" in out and "unit layers" in out
    code, out, _ = run("layers", "timm:vit_tiny_patch16_224", "--model-kwargs", json.dumps(VIT))
    assert code == 0 and "blocks.1.mlp.act" in out and "256" in out and "yes (gelu)" in out


def test_memlens_run_and_its_export_audit_identically(tmp_path, digits, bundle):
    root = bundle
    recipe = {"framework": "mae", "epochs": 1, "batch_size": 64, "splits": str(root / "s.json"),
              "model": {"arch": "vit_micro", "depth": 2, "embed_dim": 32}, "mae": {"decoder_dim": 32}}
    from memlens.config import TrainConfig

    for side in ("f", "g"):
        train_encoder(TrainConfig.model_validate({**recipe, "subsets": side}), tmp_path / side, dataset=digits)
    as_runs = memlens.audit_encoders(f=str(tmp_path / "f"), g=str(tmp_path / "g"), splits=root / "s.json",
                                     dataset=digits, **SETTINGS)
    specs = {}
    for side in ("f", "g"):
        code, out, err = run("export", tmp_path / side, "--to", tmp_path / f"{side}.safetensors")
        assert code == 0, err
        specs[side] = json.loads(out.splitlines()[-1])
    as_timm = memlens.audit_encoders(f=specs["f"], g=specs["g"], splits=root / "s.json", dataset=digits, augment="mae",
                            **SETTINGS)
    assert np.array_equal(as_runs.points["sslmem"].to_numpy(), as_timm.points["sslmem"].to_numpy())
    # a py: factory with the run's own weights: memlens's ResNet9 builder
    rn = {**recipe, "framework": "simclr", "model": {"arch": "resnet9"}}
    for side in ("f", "g"):
        train_encoder(TrainConfig.model_validate({**rn, "subsets": side}), tmp_path / f"r{side}", dataset=digits)
    a = memlens.audit_encoders(f=str(tmp_path / "rf"), g=str(tmp_path / "rg"), splits=root / "s.json", dataset=digits,
                      **SETTINGS)
    norm = json.loads((tmp_path / "rf" / "run.json").read_text())["data"]["normalize"]

    def py(side):
        return {"model": "py:memlens.models:build_encoder", "kwargs": {"arch": "resnet9", "image_size": 8,
                                                                         "in_chans": 1},
                "weights": str(tmp_path / f"r{side}" / "model.safetensors"), "representation": "features",
                "input_size": 8, "mean": norm["mean"], "std": norm["std"]}

    b = memlens.audit_encoders(f=py("f"), g=py("g"), splits=root / "s.json", dataset=digits, augment="normal",
                               **SETTINGS)
    assert np.array_equal(a.points["sslmem"].to_numpy(), b.points["sslmem"].to_numpy())


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.act = torch.nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x))


def test_plain_modules_through_the_api(bundle, digits):
    torch.manual_seed(0)
    f, g = Tiny(), Tiny()
    res = memlens.audit_encoders(f=f, g=g, splits=bundle / "s.json", dataset=digits, input_size=8, mean=[0.3],
                                 std=[0.3], **SETTINGS)
    assert list(res.layers["layer"]) == ["act"] and res.summary.encoders[0].source == "module"
    assert res.summary.model["representation"] == "output"


def test_bad_specs_are_one_line_errors(bundle, tmp_path):
    root = bundle
    base = ["audit", "--splits", root / "s.json", "--out", tmp_path / "x", "--allow-random-init"]
    code, _, err = run(*base, "--f", "timm:vit_tiny_patch16_2244", "--g", "timm:vit_tiny_patch16_224")
    assert code == 2 and "unknown timm model 'vit_tiny_patch16_2244'; close matches: vit_tiny_patch16_224" in err
    # a checkpoint that needs pickle is refused, never unpickled
    torch.save({"model": Tiny()}, tmp_path / "pickled.pth")
    code, _, err = run(*base, "--f", "py:test_encoders:Tiny", "--f-weights", tmp_path / "pickled.pth", "--g",
                       "py:test_encoders:Tiny")
    assert code == 2 and "only pickle can load; memlens never unpickles" in err
    # a .pth of plain tensors loads; nested keys need the documented key_prefix
    torch.save({"state_dict": {f"module.{k}": v for k, v in Tiny().state_dict().items()}}, tmp_path / "nested.pth")
    code, _, err = run(*base, "--f", "py:test_encoders:Tiny", "--f-weights", tmp_path / "nested.pth", "--g",
                       "py:test_encoders:Tiny")
    assert code == 2 and "2 missing" in err and "2 unexpected" in err
    assert "match with --key-prefix 'state_dict.module.'" in err
    code, _, err = run(*base, "--f", "py:test_encoders:Tiny", "--f-weights", tmp_path / "nested.pth",
                       "--key-prefix", "state_dict.module.", "--g", "py:test_encoders:Tiny", "--views", "2",
                       "--max-per-subset", "4", "--input-size", "8", "--mean", "0.3", "--std", "0.3", "--data",
                       tmp_path / "none.npz")
    assert code == 2 and "npz file not found" in err
    code, _, err = run(*base, "--f", "py:memlens.nothing:x", "--g", "py:test_encoders:Tiny")
    assert code == 2 and "cannot import 'memlens.nothing'" in err
    code, _, err = run(*base, "--f", str(root), "--g", str(root), "--device", "cuda")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert ("CUDA is not available" in err) if not torch.cuda.is_available() else True
    with pytest.raises(MemlensError, match="give its input_size"):
        memlens.audit_encoders(f=Tiny(), g=Tiny(), splits=root / "s.json")


def test_bf16_stays_close_to_fp32(bundle, digits):
    root = bundle
    a = memlens.audit_encoders(f=_vit_spec(root, "f"), g=_vit_spec(root, "g"), splits=root / "s.json", dataset=digits,
                      **SETTINGS)
    b = memlens.audit_encoders(f=_vit_spec(root, "f"), g=_vit_spec(root, "g"), splits=root / "s.json", dataset=digits,
                      precision="bf16", **SETTINGS)
    # bf16 forwards (8 mantissa bits) with fp32/fp64 metrics: alignment within 2% of its scale
    scale = np.abs(a.points["align_f"]).mean()
    assert np.abs(a.points["align_f"] - b.points["align_f"]).max() < 0.02 * scale
    assert b.summary.environment["precision"] == "bf16"


@pytest.mark.slow
def test_planted_outliers_rank_first_through_a_timm_model(tmp_path):
    """A timm conv net trained by memlens with SimCLR on synthetic data, f with planted atypical images,
    audited as external timm: specs from its weight files: the planted images rank in the top decile."""
    from memlens.config import DataConfig, SyntheticConfig, TrainConfig
    from memlens.data import load

    data = DataConfig(source="synthetic", synthetic=SyntheticConfig(n=200, n_test=60, image_size=16, outliers=10,
                                                                    seed=1))
    ds = load(data)
    planted = ds.meta["outlier_ids"]
    (tmp_path / "ask.txt").write_text("\n".join(planted) + "\n")
    splits = make_splits(ds, SplitConfig(sizes=SplitSizes(S_S=120, S_C=40, S_I=40, S_E=60),
                                         candidates_file=str(tmp_path / "ask.txt"), seed=0))
    splits.data = data
    splits.save(tmp_path / "s.json")
    recipe = {"framework": "simclr", "data": data.model_dump(), "splits": str(tmp_path / "s.json"),
              "model": {"arch": "timm:test_resnet"}, "augment": "mae", "epochs": 40, "batch_size": 64,
              "optim": {"lr": 0.003}}
    # two f seeds: SSLMem's expectation over the encoders trained with the candidates
    for side, seed in (("f", 0), ("f1", 1), ("g", 0)):
        train_encoder(TrainConfig.model_validate({**recipe, "subsets": side[0], "seed": seed}), tmp_path / side,
                      dataset=ds)
    norm = json.loads((tmp_path / "f" / "run.json").read_text())["data"]["normalize"]
    spec = lambda side: {"model": "timm:test_resnet", "kwargs": {"num_classes": 0},  # noqa: E731
                         "weights": str(tmp_path / side / "model.safetensors"), "input_size": 16,
                         "representation": "features", **norm}
    res = memlens.audit_encoders(f=[spec("f"), spec("f1")], g=spec("g"), splits=tmp_path / "s.json", augment="mae",
                        views=10)
    order = res.points.sort_values("sslmem", ascending=False)["id"].tolist()
    ranks = sorted(order.index(p) + 1 for p in planted)
    is_planted = res.points["id"].isin(planted)
    # Tail ranks of the ten move by tens of places between machines (float summation order in a
    # 40-epoch CPU training), so the claim is statistical: the planted images head the ranking and
    # their scores stochastically dominate the rest (chance: AUC 0.5, ~0.2 planted in the top five).
    mw = mannwhitneyu(res.points.loc[is_planted, "sslmem"], res.points.loc[~is_planted, "sslmem"],
                      alternative="greater")
    auc = mw.statistic / (is_planted.sum() * (~is_planted).sum())
    assert sum(r <= 5 for r in ranks) >= 4 and auc >= 0.9 and mw.pvalue < 1e-5, (ranks, auc, mw.pvalue)
    assert {r.source for r in res.summary.encoders} == {"timm"}
