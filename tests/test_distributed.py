"""torchrun with two Gloo processes on the CPU against one process: audits, DDP training, DP-SGD."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import run
from safetensors.torch import load_file
from scipy import stats

from memlens.config import SplitConfig, SplitSizes
from memlens.data import make_splits

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}


def torchrun(*args, n=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def single(*args):
    """One process: a memlens command in this process (no second interpreter to start), a script in a subprocess."""
    if args[:2] == ("-m", "memlens"):
        code, _, err = run(*args[2:])
        assert code == 0, err[-3000:]
        return None
    r = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, digits):
    root = tmp_path_factory.mktemp("dist")
    make_splits(digits, SplitConfig(sizes=SplitSizes(S_S=160, S_C=40, S_I=40, S_E=40), seed=1)).save(root / "s.json")
    base = {"framework": "mae", "data": {"source": "digits"}, "splits": str(root / "s.json"), "epochs": 2,
            "batch_size": 32, "model": {"arch": "vit_micro", "depth": 2, "embed_dim": 32},
            "mae": {"decoder_dim": 32}, "optim": {"lr": 0.002, "warmup_epochs": 0.5}}
    return root, base


def _write(root, name, cfg):
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _weights(run):
    return load_file(str(Path(run) / "model.safetensors"))


def _init_weights(base):
    from memlens.models import build_encoder
    from memlens.rng import derive_seed

    torch.manual_seed(derive_seed(base.get("seed", 0), "init"))
    m = base["model"]
    enc = build_encoder(m["arch"], image_size=8, in_chans=1, depth=m.get("depth"), embed_dim=m.get("embed_dim"))
    return enc.state_dict()


def test_ddp_training_equals_single_process(recipe, tmp_path):
    root, base = recipe
    cfg = _write(tmp_path, "mae", {**base, "subsets": "f"})
    single("-m", "memlens", "train", "--config", cfg, "--out", tmp_path / "one")
    torchrun("-m", "memlens", "train", "--config", cfg, "--out", tmp_path / "two")
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert set(a) == set(b)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    rec = json.loads((tmp_path / "two" / "run.json").read_text())
    assert rec["environment"]["world_size"] == 2 and rec["environment"]["backend"] == "gloo"
    # float rounding (gradients summed in another order, amplified by Adam's normalisation) is
    # orders of magnitude below what training changed
    moved = max((a[k] - v).abs().max().item() for k, v in _init_weights(base).items())
    assert worst < 1e-4 and moved > 100 * worst, (worst, moved)


def test_distributed_dp_training_equals_single_process(recipe, tmp_path):
    root, base = recipe
    # a fixed noise multiplier (calibration is tested elsewhere and would only add waiting here)
    cfg = _write(tmp_path, "dp", {**base, "subsets": "f", "dp": {"epsilon": 50.0, "noise_multiplier": 1.2,
                                                                  "physical_batch_size": 7, "reproducible": True}})
    single("-m", "memlens", "train", "--config", cfg, "--out", tmp_path / "one")
    torchrun("-m", "memlens", "train", "--config", cfg, "--out", tmp_path / "two")
    r1 = json.loads((tmp_path / "one" / "run.json").read_text())["dp"]
    r2 = json.loads((tmp_path / "two" / "run.json").read_text())["dp"]
    # identical accounting: same sample rate, sigma, steps, epsilon
    for key in ("sample_rate", "noise_multiplier", "steps_taken", "epsilon_spent", "accountant_history",
                "expected_batch_size"):
        assert r1[key] == r2[key], key
    assert r2["world_size"] == 2 and "equals that of a single-process run" in r2["distributed_accounting"]
    # the same Poisson batches, the same per-example clipping, the same noise (drawn once, by
    # process 0): the same weights up to float rounding
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4, worst


def test_distributed_dp_step_clipped_sum_and_noise(tmp_path):
    single(HERE / "distributed_worker.py", "clipped_sum", tmp_path / "one")
    torchrun(HERE / "distributed_worker.py", "clipped_sum,noise,secret", tmp_path / "two")
    assert (tmp_path / "two" / "secret.txt").read_text() == "same"  # one secret key, the same batches everywhere
    # noise off: the released gradient is the clipped sum over the whole batch, as in one process
    a, b = load_file(str(tmp_path / "one" / "grads.safetensors")), load_file(str(tmp_path / "two" /
                                                                                  "grads.safetensors"))
    assert set(a) == set(b) and len(a) > 10
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-7), k
    assert max(a[k].abs().max().item() for k in a) > 0
    # noise on, gradients zero on both processes: what is released is the noise, drawn once
    z = load_file(str(tmp_path / "two" / "noise.safetensors"))["noise"].double().numpy().ravel()
    sigma_c = 1.5 * 2.0
    n = len(z)
    var = float(np.mean(z ** 2))
    # chi-square interval for the variance of n zero-mean Gaussian draws
    lo, hi = stats.chi2.ppf([0.0005, 0.9995], n) / n
    assert lo * sigma_c ** 2 <= var <= hi * sigma_c ** 2, (var, sigma_c ** 2)
    assert not lo * 2 * sigma_c ** 2 <= var  # noise once per process would double the variance
    assert abs(float(np.mean(z))) < 4 * sigma_c / np.sqrt(n)


def test_sharded_audit_equals_single_process(recipe, tmp_path, digits):
    from memlens.config import TrainConfig
    from memlens.dp.training import train_encoder

    root, base = recipe
    for side in ("f", "g"):
        train_encoder(TrainConfig.model_validate({**base, "epochs": 1, "subsets": side}), tmp_path / side,
                      dataset=digits)
    args = ["-m", "memlens", "audit", "--f", tmp_path / "f", "--g", tmp_path / "g", "--splits", root / "s.json",
            "--views", "4", "--max-per-subset", "30"]
    single(*args, "--out", tmp_path / "a1", "--batch-points", "16")
    torchrun(*args, "--out", tmp_path / "a2", "--batch-points", "5")
    for table, key, cols in (("points", "id", ["align_f", "align_g", "sslmem"]),
                             ("units", ["layer", "unit"], ["unitmem", "mu_max", "mu_rest", "classmem"])):
        t1 = pd.read_csv(tmp_path / "a1" / f"{table}.csv").set_index(key)
        t2 = pd.read_csv(tmp_path / "a2" / f"{table}.csv").set_index(key).loc[t1.index]
        for c in cols:
            assert np.allclose(t1[c], t2[c], atol=1e-5, equal_nan=True), (table, c)
    p1 = pd.read_csv(tmp_path / "a1" / "points.csv")
    p2 = pd.read_csv(tmp_path / "a2" / "points.csv")
    assert p1["rank"].tolist() == p2["rank"].tolist()
    u1, u2 = (pd.read_csv(tmp_path / a / "units.csv") for a in ("a1", "a2"))
    assert u1["argmax_id"].fillna("").tolist() == u2["argmax_id"].fillna("").tolist()
    summary = json.loads((tmp_path / "a2" / "audit.json").read_text())
    assert summary["environment"]["world_size"] == 2


def test_a_run_resumes_with_another_world_size(recipe, tmp_path, digits):
    """Interrupted after one epoch in one process, resumed by two: the weights of an uninterrupted run."""
    from memlens.config import TrainConfig
    from memlens.dp.training import train_encoder

    root, base = recipe
    cfg = TrainConfig.model_validate({**base, "subsets": "f"})
    train_encoder(cfg, tmp_path / "straight", dataset=digits)

    def stop(info):
        if info.epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_encoder(cfg, tmp_path / "cut", dataset=digits, on_epoch=stop)
    torchrun("-m", "memlens", "train", "--out", tmp_path / "cut", "--resume")
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "cut")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    rec = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert rec["status"] == "complete" and rec["environment"]["world_size"] == 2 and rec["epochs_done"] == 2


def test_sharded_audit_over_tar_shards_equals_single_process(tmp_path):
    """Images of their own sizes in WebDataset-style shards: two processes index a share of the shards
    each (a fresh cache), read only their points, and give the single process's audit."""
    from memlens.config import DataConfig, TrainConfig
    from memlens.data import load
    from memlens.dp.training import train_encoder
    from tests.conftest import write_jpeg_folder
    from tests.data.test_lazy_data import _to_shards

    rels = write_jpeg_folder(tmp_path / "imgs", 44, seed=5)
    pattern = _to_shards(tmp_path / "imgs", rels, tmp_path / "shards", per_shard=11)
    data = DataConfig(source="shards", path=pattern)
    make_splits(load(data), SplitConfig(sizes=SplitSizes(S_S=16, S_C=8, S_I=8, S_E=8), seed=2)).save(
        tmp_path / "s.json")
    base = {"framework": "mae", "data": data.model_dump(), "splits": str(tmp_path / "s.json"), "epochs": 1,
            "batch_size": 8, "augment": "mae", "mae": {"decoder_dim": 16},
            "model": {"arch": "vit_micro", "depth": 1, "embed_dim": 16, "num_heads": 2, "input_size": 16}}
    for side in ("f", "g"):
        train_encoder(TrainConfig.model_validate({**base, "subsets": side}), tmp_path / side)
    args = ["-m", "memlens", "audit", "--f", tmp_path / "f", "--g", tmp_path / "g", "--splits", tmp_path / "s.json",
            "--views", "4", "--workers", "0"]
    single(*args, "--out", tmp_path / "a1", "--batch-points", "16")
    env = {**_env(), "MEMLENS_CACHE_DIR": str(tmp_path / "fresh-cache")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *map(str, args), "--out", str(tmp_path / "a2"), "--batch-points", "5"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert list((tmp_path / "fresh-cache").glob("index-shards-*.npz"))  # built by the two processes
    p1 = pd.read_csv(tmp_path / "a1" / "points.csv").set_index("id")
    p2 = pd.read_csv(tmp_path / "a2" / "points.csv").set_index("id").loc[p1.index]
    for c in ("align_f", "align_g", "sslmem", "loss_f", "loss_g"):
        assert np.allclose(p1[c], p2[c], atol=1e-5), c
    assert len(p1) == 40


def test_reference_audit_in_two_processes_equals_one(recipe, tmp_path, digits):
    """K = 4 references: two processes score half the points each; the per-image inference, the FDR
    list and the privacy attacks come out as in one process."""
    from memlens.config import TrainConfig
    from memlens.dp.training import train_encoder

    root, base = recipe
    for i in range(4):
        cfg = {**base, "epochs": 1, "seed": i // 2, "reference": {"index": i, "k": 4}}
        train_encoder(TrainConfig.model_validate(cfg), tmp_path / f"ref-{i}", dataset=digits)
    args = ["-m", "memlens", "audit", "--references", str(tmp_path / "ref-*"), "--splits", root / "s.json",
            "--views", "4", "--max-per-subset", "24"]
    single(*args, "--out", tmp_path / "a1", "--batch-points", "16")
    torchrun(*args, "--out", tmp_path / "a2", "--batch-points", "5")
    p1 = pd.read_csv(tmp_path / "a1" / "points.csv").set_index("id")
    p2 = pd.read_csv(tmp_path / "a2" / "points.csv").set_index("id").loc[p1.index]
    for c in ("align_in", "align_out", "sslmem", "mem_se", "mem_p", "mem_q", "loss_in"):
        assert np.allclose(p1[c], p2[c], atol=1e-5, equal_nan=True), c
    assert p1["at_risk"].tolist() == p2["at_risk"].tolist() and p1["candidate"].sum() == 48
    s1, s2 = (json.loads((tmp_path / a / "audit.json").read_text()) for a in ("a1", "a2"))
    assert s1["design"]["pairs"] == s2["design"]["pairs"] == 2
    assert s1["privacy"]["natural"]["metrics"]["lira_loss"]["auc"] == pytest.approx(
        s2["privacy"]["natural"]["metrics"]["lira_loss"]["auc"], abs=1e-6)
