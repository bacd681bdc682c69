
from conftest import restamp, run

from memlens.dp.sweep import sweep_runs
from memlens.train import read_run


def _write_sweep(tmp_path, epsilons="[inf, 8]", extra=""):
    assert run("split", "--source", "digits", "--sizes", "S_S=300,S_C=40,S_I=40,S_E=40", "--out",
               tmp_path / "s.json")[0] == 0
    path = tmp_path / "sweep.yaml"
    path.write_text(f"""
train:
  framework: mae
  splits: {tmp_path / 's.json'}
  model: {{arch: vit_micro, depth: 1, embed_dim: 32}}
  mae: {{decoder_dim: 32}}
  epochs: 1
  batch_size: 64
epsilons: {epsilons}
{extra}""")
    return path


def test_sweep_layout_resume_and_privacy(tmp_path):
    cfg = _write_sweep(tmp_path, extra="extra_seeds: [7]")
    code, out, err = run("sweep", cfg, "--out", tmp_path / "sw")
    assert code == 0, err
    names = sorted(r.name for r in sweep_runs(tmp_path / "sw"))
    assert names == sorted(f"eps-{e}/{s}" for e in ("inf", "8") for s in ("f", "g", "f-seed7", "g-seed7"))
    f8 = read_run(tmp_path / "sw" / "eps-8" / "f")
    assert f8.config.subsets == "f" and f8.config.dp.epsilon == 8 and f8.dp["epsilon_spent"] <= 8
    assert read_run(tmp_path / "sw" / "eps-inf" / "g-seed7").config.seed == 7
    assert read_run(tmp_path / "sw" / "eps-inf" / "g").dp is None
    # an interrupted run is resumed, finished ones are skipped
    rec_path = tmp_path / "sw" / "eps-8" / "g" / "run.json"
    restamp(rec_path, lambda rec: rec.update(status="interrupted"), drop_files=("model.safetensors",))
    (tmp_path / "sw" / "eps-8" / "g" / "model.safetensors").unlink()
    code, out, err = run("sweep", cfg, "--out", tmp_path / "sw")
    assert code == 0, err
    assert "eps-8/g: resuming" in out and "eps-inf/f: skipped (finished)" in out
    assert read_run(tmp_path / "sw" / "eps-8" / "g").status == "complete"

    code, out, _ = run("privacy", tmp_path / "sw" / "eps-8" / "f")
    assert code == 0 and "-differentially private with respect to each of its 340 training images" in out
    code, out, _ = run("privacy", tmp_path / "sw" / "eps-inf" / "f")
    assert code == 0 and "without differential privacy" in out


def test_changed_sweep_needs_force(tmp_path):
    cfg = _write_sweep(tmp_path, epsilons="[inf]")
    assert run("sweep", cfg, "--out", tmp_path / "sw")[0] == 0
    cfg.write_text(cfg.read_text().replace("epsilons: [inf]", "epsilons: [inf, 20]"))
    code, _, err = run("sweep", cfg, "--out", tmp_path / "sw")
    assert code == 2 and "different config; pass --force" in err
    assert run("sweep", cfg, "--out", tmp_path / "sw", "--force")[0] == 0


def test_sweep_refuses_a_directory_of_other_files(tmp_path):
    cfg = _write_sweep(tmp_path, epsilons="[inf]")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    code, _, err = run("sweep", cfg, "--out", tmp_path / "busy")
    assert code == 2 and "already holds other files; pass --force" in err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"


def test_dp_bad_input_exit_codes(tmp_path):
    base = ["train", "--out", tmp_path / "r", "--subsets", "all", "--epochs", "1", "--arch", "vit_micro"]
    code, _, err = run(*base, "--dp-epsilon", "8", "--dp-delta", "0.001")
    assert code == 2 and "not below 1/N = 1/1797" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(*base, "--framework", "simclr", "--dp-epsilon", "8")
    assert code == 2 and "cannot be trained with DP-SGD: SimCLR does not decompose" in err
    code, _, err = run(*base, "--dp-epsilon", "0")
    assert code == 2 and "dp.epsilon: Input should be greater than 0" in err
    cfg = tmp_path / "t.yaml"
    cfg.write_text("framework: mae\nsubsets: all\nepochs: 3\nbatch_size: 128\ndp: {epsilon: 8}\n")
    code, out, err = run("privacy", "--config", cfg)
    assert code == 0, err
    assert out.startswith("this config gives epsilon = ") and "at delta = 5.56e-05" in out and "42 steps" in out
    code, out, err = run("privacy", "--config", cfg, "--dp-noise-multiplier", "0.5")
    assert code == 0 and "training will stop there" in out
    code, _, err = run("privacy")
    assert code == 2 and "either a run directory or --config" in err


def test_runs_trained_side_by_side_equal_one_at_a_time(tmp_path):
    """``--jobs 2`` trains the runs in two spawned processes: the weights of one at a time; a DP pair's
    shared secret (created by whichever member starts first) is gone when both have finished."""
    import torch
    from safetensors.torch import load_file

    two = _write_sweep(tmp_path, epsilons="[inf, 8]", extra="references: {k: 2}")
    code, out, err = run("sweep", two, "--out", tmp_path / "two", "--jobs", "2")
    assert code == 0, err
    assert out.count(": done") == 4 and "eps-8/ref-01: training" in out
    for i in range(2):
        ref = tmp_path / "two" / "eps-inf" / f"ref-{i:02d}"
        # one at a time, in this process: the same recipe and seed
        rec = read_run(ref)
        assert run("train", "--config", _config_file(tmp_path, rec.config, i), "--out", tmp_path / f"one-{i}")[0] == 0
        a, b = load_file(ref / "model.safetensors"), load_file(tmp_path / f"one-{i}" / "model.safetensors")
        # to float rounding: a worker has its share of the threads, which can change a reduction's order
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a), i
        assert read_run(tmp_path / "two" / "eps-8" / f"ref-{i:02d}").status == "complete"
    assert not list((tmp_path / "two").rglob(".memlens-dp-secret-*"))
    code, _, err = run("sweep", two, "--out", tmp_path / "two", "--jobs", "0")
    assert code == 2 and "--jobs" in err


def _config_file(tmp_path, config, i):
    import yaml

    path = tmp_path / f"ref-{i}.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_defaults=True)))
    return path
