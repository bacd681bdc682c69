import json

import pytest
import torch
from safetensors.torch import load_file

from memlens.config import SplitConfig, SplitSizes, TrainConfig
from memlens.data import make_splits
from memlens.errors import MemlensError
from memlens.train import load_encoder, read_run, train_loop
from memlens.train.probe import probe_run
from tests.conftest import restamp, small_train_config

MICRO_VIT = {"arch": "vit_micro", "depth": 2, "embed_dim": 32}
CASES = {
    "mae": {"model": MICRO_VIT, "mae": {"decoder_dim": 32}},
    "simclr": {"model": MICRO_VIT, "augment": "mae"},
    "simsiam": {"model": {"arch": "resnet9"}, "augment": "mae"},
    "dino": {"model": {"arch": "resnet9"}, "augment": "mae", "dino": {"out_dim": 64, "momentum": 0.99},
             "optim": {"lr": 5e-4}},
    "supervised": {"model": {"arch": "resnet9"}, "augment": "mae"},
}


@pytest.fixture(scope="module")
def small_splits(tmp_path_factory, digits):
    path = tmp_path_factory.mktemp("splits") / "splits.json"
    make_splits(digits, SplitConfig(sizes=SplitSizes(S_S=400, S_C=50, S_I=50, S_E=50))).save(path)
    return str(path)


@pytest.mark.parametrize("framework", list(CASES))
def test_each_framework_learns(framework, small_splits, tmp_path):
    cfg = TrainConfig.model_validate({"framework": framework, "splits": small_splits, "subsets": "f",
                                      "epochs": 5, "batch_size": 32, **CASES[framework]})
    result = train_loop(cfg, tmp_path / "run")
    losses = [h["loss"] for h in result.record.history]
    assert losses[-1] < losses[0], losses
    rec = read_run(tmp_path / "run")
    assert rec.status == "complete" and rec.train_points == 450 and rec.splits["side"] == "f"
    assert rec.images_per_s > 0 and rec.versions["timm"] and rec.data["fingerprint"]
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


def _interrupt_after(epoch):
    def hook(info):
        if info.epoch == epoch:
            raise KeyboardInterrupt
    return hook


@pytest.mark.parametrize("framework", ["mae", "dino"])
def test_resume_gives_the_same_weights(framework, small_splits, tmp_path):
    cfg = TrainConfig.model_validate({"framework": framework, "splits": small_splits, "subsets": "g",
                                      "epochs": 3, "batch_size": 64, **CASES[framework]})
    train_loop(cfg, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        train_loop(cfg, tmp_path / "cut", on_epoch=_interrupt_after(2))
    # Ctrl-C keeps the last complete checkpoint and marks the run
    assert read_run(tmp_path / "cut").status == "interrupted"
    assert (tmp_path / "cut" / "checkpoint.safetensors").is_file()
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    with pytest.raises(MemlensError, match="not finished"):
        load_encoder(tmp_path / "cut")
    train_loop(None, tmp_path / "cut", resume=True)
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    hist_a = [h["loss"] for h in read_run(tmp_path / "straight").history]
    hist_b = [h["loss"] for h in read_run(tmp_path / "cut").history]
    assert hist_a == hist_b


def test_load_encoder_round_trip_and_probe(tmp_path, digits):
    cfg = small_train_config(epochs=3)
    result = train_loop(cfg, tmp_path / "run", dataset=digits)
    enc = load_encoder(tmp_path / "run")
    assert not enc.training
    x = torch.randn(5, 1, 8, 8)
    again = load_encoder(tmp_path / "run")
    assert torch.equal(enc.representation(x), again.representation(x))
    assert enc.representation(x).shape == (5, result.record.model["representation_dim"])
    assert enc.normalization == (result.record.data["normalize"]["mean"], result.record.data["normalize"]["std"])
    r = probe_run(tmp_path / "run", dataset=digits)
    assert r.accuracy > 0.3  # ten classes: chance is 0.1
    assert read_run(tmp_path / "run").probe["accuracy"] == r.accuracy


def test_existing_run_needs_force(tmp_path, digits):
    cfg = small_train_config(epochs=1)
    train_loop(cfg, tmp_path / "run", dataset=digits)
    with pytest.raises(MemlensError, match="already holds a previous output; pass --force"):
        train_loop(cfg, tmp_path / "run", dataset=digits)
    train_loop(cfg, tmp_path / "run", force=True, dataset=digits)
    # resuming a finished run does nothing
    assert train_loop(None, tmp_path / "run", resume=True).record.status == "complete"


def test_checkpoint_that_does_not_match_its_config(tmp_path, digits):
    train_loop(small_train_config(epochs=1), tmp_path / "run", dataset=digits)
    # an edit is refused by the record's digest; behind it, a consistent-looking record whose weights do
    # not fit its architecture is refused too
    path = tmp_path / "run" / "run.json"
    rec = json.loads(path.read_text())
    rec["config"]["model"]["embed_dim"] = 48
    path.write_text(json.dumps(rec))
    with pytest.raises(MemlensError, match="run.json was modified after memlens wrote it"):
        load_encoder(tmp_path / "run")
    restamp(path, lambda doc: doc["config"]["model"].update(embed_dim=48))
    with pytest.raises(MemlensError, match="does not match the architecture in its run config"):
        load_encoder(tmp_path / "run")


def test_sides_need_splits(digits, tmp_path):
    with pytest.raises(MemlensError, match="needs a splits file"):
        train_loop(small_train_config(subsets="f"), tmp_path / "run", dataset=digits)


def test_supervised_needs_labels(tmp_path):
    cfg = small_train_config(framework="supervised", model={"arch": "resnet9"},
                             data={"source": "npz", "path": str(tmp_path / "d.npz")})
    import numpy as np

    np.savez(tmp_path / "d.npz", x=np.zeros((20, 8, 8), np.uint8))
    with pytest.raises(MemlensError, match="needs labelled data"):
        train_loop(cfg, tmp_path / "run")


def test_average_of_the_last_epochs_is_their_mean_and_resumes(small_splits, tmp_path):
    """optim.average_epochs: 2 ends with the mean of the weights after epochs 2 and 3 (read from an
    interrupted run's checkpoint and from a plain run), also across an interruption."""
    from safetensors import safe_open

    base = {"framework": "mae", "splits": small_splits, "subsets": "g", "epochs": 3, "batch_size": 64,
            **CASES["mae"]}
    plain = TrainConfig.model_validate(base)
    averaged = TrainConfig.model_validate({**base, "optim": {"average_epochs": 2}})
    train_loop(plain, tmp_path / "plain")  # the weights after epoch 3
    with pytest.raises(KeyboardInterrupt):
        train_loop(averaged, tmp_path / "avg", on_epoch=_interrupt_after(2))
    with safe_open(str(tmp_path / "avg" / "checkpoint.safetensors"), framework="pt") as fh:
        after2 = {k.removeprefix("model.encoder."): fh.get_tensor(k) for k in fh.keys()
                  if k.startswith("model.encoder.")}
        assert any(k.startswith("average.") for k in fh.keys())
    rec = train_loop(None, tmp_path / "avg", resume=True).record
    assert rec.averaged_epochs == 2
    last, avg = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "avg" / "model.safetensors")
    assert avg.keys() == last.keys() and set(after2) >= set(avg)
    for k in avg:
        if avg[k].is_floating_point():
            torch.testing.assert_close(avg[k], (after2[k].double() + last[k].double()).div(2).to(avg[k].dtype))
    assert not all(torch.equal(avg[k], last[k]) for k in avg)
