"""Bad input and faults: each a one-line error with exit code 2 (or a clear record), nothing half-written."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch.nn as nn
from conftest import run, small_train_config
from safetensors.torch import save_file

import memlens
from memlens.config import SplitConfig, SplitSizes, TrainConfig
from memlens.data import make_splits
from memlens.dp.training import train_encoder
from memlens.errors import MemlensError


@pytest.fixture(scope="module")
def splits(tmp_path_factory, digits):
    root = tmp_path_factory.mktemp("faults")
    make_splits(digits, SplitConfig(sizes=SplitSizes(S_S=60, S_C=20, S_I=20, S_E=20), seed=1)).save(root / "s.json")
    return root / "s.json"


class Boom(nn.Module):
    def forward(self, x):
        return x * float("nan")


class Net(nn.Module):
    """A tiny conv net whose 'boom' layer turns every activation into NaN."""

    def __init__(self, bad: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.boom = Boom() if bad else nn.Identity()
        self.act2 = nn.ReLU()

    def forward(self, x):
        return self.act2(self.boom(self.act(self.conv(x))))


def test_nan_activations_name_the_layer(splits, digits):
    with pytest.raises(MemlensError, match=r"layer 'act2' produced NaN or inf activations"):
        memlens.audit_encoders(f=Net(), g=Net(), splits=splits, dataset=digits, input_size=8, mean=[0.3], std=[0.3],
                      views=2, max_per_subset=4, bootstrap=100)


def test_nan_weights_are_refused_naming_the_tensor(splits, digits, tmp_path):
    net = Net(bad=False)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["conv.weight"][0, 0, 0, 0] = math.inf
    save_file(state, str(tmp_path / "w.safetensors"))
    spec = {"model": "py:test_faults:Net", "kwargs": {"bad": False}, "weights": str(tmp_path / "w.safetensors"),
            "input_size": 8, "mean": [0.3], "std": [0.3]}
    with pytest.raises(MemlensError, match=r"tensor 'conv.weight' holds 1 NaN/inf value\(s\)"):
        memlens.audit_encoders(f=spec, g=spec, splits=splits, dataset=digits)


def test_a_diverged_run_is_marked_failed_with_a_hint_that_works(tmp_path, digits):
    cfg = small_train_config(epochs=3, optim={"name": "sgd", "lr": 1e12, "warmup_epochs": 0})
    with pytest.raises(MemlensError, match=r"training diverged at epoch \d .*lower optim.lr"):
        train_encoder(cfg, tmp_path / "run", dataset=digits)
    rec = json.loads((tmp_path / "run" / "run.json").read_text())
    assert rec["status"] == "failed" and "start again with --force" in rec["message"]
    code, _, err = run("train", "--out", tmp_path / "run", "--resume")
    assert code == 2 and "failed" in err and "--force" in err and len(err.strip().splitlines()) == 1
    # the hint works: --force with a sane learning rate trains
    cfg_ok = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"lr": 1e-3})})
    assert train_encoder(cfg_ok, tmp_path / "run", force=True, dataset=digits).record.status == "complete"


def test_refused_commands_leave_no_folder(tmp_path, splits):
    code, _, err = run("train", "--out", tmp_path / "never", "--framework", "simclr", "--dp-epsilon", "8",
                       "--splits", splits, "--epochs", "1")
    assert code == 2 and "cannot be trained with DP-SGD" in err and not (tmp_path / "never").exists()
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"train: {{framework: simclr, splits: {splits}, model: {{arch: resnet9}}, epochs: 1}}\n"
                     f"epsilons: [inf, 8]\n")
    code, _, err = run("sweep", sweep, "--out", tmp_path / "sw")
    # refused before the non-private pair trains, naming the run
    assert code == 2 and "eps-8/f: framework 'simclr' cannot be trained with DP-SGD" in err
    assert not (tmp_path / "sw").exists()
    sweep.write_text(f"train: {{framework: mae, splits: {splits}, epochs: 1, batch_size: 16}}\nepsilons: [inf, 8]\n"
                     f"dp: {{delta: 0.5}}\n")
    code, _, err = run("sweep", sweep, "--out", tmp_path / "sw")
    assert code == 2 and "delta" in err and "1/N" in err and not (tmp_path / "sw").exists()


def test_single_class_data_warns(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "one.npz", x=rng.integers(0, 255, (40, 8, 8, 1), dtype=np.uint8), y=np.zeros(40, int))
    cfg = TrainConfig.model_validate({"framework": "supervised", "subsets": "all", "epochs": 1, "batch_size": 16,
                                      "data": {"source": "npz", "path": str(tmp_path / "one.npz")},
                                      "model": {"arch": "vit_micro", "depth": 1, "embed_dim": 16, "num_heads": 2}})
    (tmp_path / "c.yaml").write_text(json.dumps(cfg.model_dump(mode="json")))
    code, out, _ = run("train", "--config", tmp_path / "c.yaml", "--out", tmp_path / "run")
    assert code == 0 and "warning: the training images all have one class" in out


def test_edited_weights_and_other_data_are_refused(tmp_path, splits, digits):
    cfg = small_train_config(epochs=1, splits=str(splits), subsets="f")
    train_encoder(cfg, tmp_path / "f", dataset=digits)
    train_encoder(cfg.model_copy(update={"subsets": "g"}), tmp_path / "g", dataset=digits)
    # the audit names the run and both data when the images differ
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "o.npz", x=rng.integers(0, 255, (200, 8, 8, 1), dtype=np.uint8))
    code, _, err = run("audit", "--f", tmp_path / "f", "--g", tmp_path / "g", "--splits", splits, "--data",
                       tmp_path / "o.npz", "--out", tmp_path / "a")
    assert code == 2 and f"run {tmp_path / 'f'}" in err and "was trained on other data than the audit's" in err
    assert "npz o.npz" in err and not (tmp_path / "a").exists()
    weights = tmp_path / "f" / "model.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(str(weights))
    first = next(iter(tensors))
    tensors[first] = tensors[first] + 1e-3
    save_file(tensors, str(weights))
    code, _, err = run("audit", "--f", tmp_path / "f", "--g", tmp_path / "g", "--splits", splits, "--out",
                       tmp_path / "a")
    assert code == 2 and "model.safetensors was modified or replaced after run.json recorded it" in err


def test_interrupted_run_and_sweep_name_a_hint_that_exists(tmp_path, monkeypatch, splits):
    import memlens.dp.sweep as sweep_mod
    import memlens.pipeline as pipeline_mod

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_mod, "run_sweep", interrupt)
    monkeypatch.setattr(pipeline_mod, "run_pipeline", interrupt)
    (tmp_path / "s.yaml").write_text(f"train: {{framework: mae, splits: {splits}, epochs: 1}}\nepsilons: [inf]\n")
    code, _, err = run("sweep", tmp_path / "s.yaml", "--out", tmp_path / "sw")
    assert code == 130 and "re-run the same command to continue" in err and "--resume" not in err
    (tmp_path / "p.yaml").write_text("train: {framework: mae, epochs: 1}\n")
    code, _, err = run("run", tmp_path / "p.yaml", "--out", tmp_path / "p")
    assert code == 130 and "re-run the same command to continue" in err and "--resume" not in err


def test_report_respects_the_cache_dir(tmp_path, monkeypatch):
    """A folder source decoded for the report's thumbnails is cached under MEMLENS_CACHE_DIR only."""
    from conftest import write_png_folder

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    write_png_folder(tmp_path / "imgs", {f"train/{c}/{i}.png": None for c in "ab" for i in range(40)})
    code, _, err = run("split", "--source", "folder", "--path", tmp_path / "imgs", "--sizes",
                       "S_S=40,S_C=10,S_I=10,S_E=10", "--out", tmp_path / "s.json")
    assert code == 0, err
    base = {"framework": "mae", "data": {"source": "folder", "path": str(tmp_path / "imgs")},
            "splits": str(tmp_path / "s.json"), "epochs": 1, "batch_size": 16,
            "model": {"arch": "vit_micro", "depth": 1, "embed_dim": 16, "num_heads": 2}, "mae": {"decoder_dim": 16}}
    for side in ("f", "g"):
        train_encoder(TrainConfig.model_validate({**base, "subsets": side}), tmp_path / side,
                      cache_dir=tmp_path / "cache")
    assert run("audit", "--f", tmp_path / "f", "--g", tmp_path / "g", "--splits", tmp_path / "s.json", "--views",
               "2", "--out", tmp_path / "a")[0] == 0
    assert run("report", tmp_path / "a", "--out", tmp_path / "r.pdf")[0] == 0
    assert not (home / ".cache" / "memlens").exists()  # (fontconfig and matplotlib keep their own caches)
    cache = Path(tmp_path / "cache")
    assert list(cache.glob("index-files-*.npz")) and list(cache.glob("decoded-*.npy"))


def test_batch_larger_than_the_data_and_errors_name_the_users_file(tmp_path):
    code, _, err = run("train", "--out", tmp_path / "run", "--source", "digits", "--subsets", "all", "--epochs", "1",
                       "--arch", "vit_micro", "--batch-size", "100000")
    assert code == 2 and "batch_size 100000 exceeds the" in err and not (tmp_path / "run").exists()
    from PIL import Image

    (tmp_path / "img").mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
    (tmp_path / "img" / "bad.png").write_bytes(b"not an image")
    (tmp_path / "f.txt").write_text("img/0.png\nimg/1.png\nimg/bad.png\n")
    (tmp_path / "g.txt").write_text("img/2.png\nimg/3.png\n")
    code, _, err = run("split", "--members-f", tmp_path / "f.txt", "--members-g", tmp_path / "g.txt", "--out",
                       tmp_path / "s.json")
    # the checks ran on a temporary copy of the manifest; the message names the file the user will have
    assert code == 2 and "s.manifest.csv: 1 unreadable" in err and ".tmp" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "f.txt", "g.txt", "img"]  # nothing written
