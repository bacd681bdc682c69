import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run


def one_line_error(err):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("memlens: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_split_train_probe_flow(tmp_path):
    code, out, err = run("split", "--source", "digits", "--sizes", "S_S=300,S_C=40,S_I=40,S_E=40",
                         "--out", tmp_path / "s.json")
    assert code == 0, err
    assert "S_S 300, S_C 40, S_I 40, S_E 40" in out
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"framework: mae\nsplits: {tmp_path / 's.json'}\nsubsets: f\nepochs: 1\nbatch_size: 64\n"
                   "model: {arch: vit_micro, depth: 1, embed_dim: 32}\nmae: {decoder_dim: 32}\n")
    code, out, err = run("train", "--config", cfg, "--out", tmp_path / "run")
    assert code == 0, err
    assert "run complete" in out
    code, out, err = run("probe", tmp_path / "run")
    assert code == 0 and "linear probe accuracy" in out


@pytest.mark.parametrize("args,needle", [
    (["--framework", "byol"], "'mae', 'simclr', 'simsiam', 'dino' or 'supervised' (got 'byol')"),
    (["--arch", "vgg16"], "unknown architecture 'vgg16'; valid: vit_tiny, vit_mini, vit_micro, resnet9, resnet18"),
    (["--augment", "fancy"], "unknown augmentation set 'fancy'; valid: weak, normal, strong, independent, mae, none"),
    (["--source", "folder"], "source 'folder' needs a path"),
    (["--source", "folder", "--data-path", "/no/such/dir"], "not found: /no/such/dir"),
    (["--epochs", "0"], "epochs: Input should be greater than or equal to 1"),
])
def test_bad_training_input_is_one_line_and_exit_2(tmp_path, args, needle):
    code, out, err = run("train", "--out", tmp_path / "run", "--subsets", "all", *args)
    assert code == 2
    assert needle in one_line_error(err)


def test_bad_config_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("framework: mae\nepochs: [unclosed\n")
    code, _, err = run("train", "--config", bad, "--out", tmp_path / "r")
    assert code == 2 and "not valid YAML" in one_line_error(err)
    bad.write_text("framework: mae\nepoch: 3\n")
    code, _, err = run("train", "--config", bad, "--out", tmp_path / "r")
    assert code == 2 and "epoch: unknown key" in one_line_error(err)
    code, _, err = run("train", "--config", tmp_path / "missing.yaml", "--out", tmp_path / "r")
    assert code == 2 and "config file not found" in one_line_error(err)


def test_existing_outputs_are_not_overwritten(tmp_path):
    assert run("split", "--source", "digits", "--out", tmp_path / "s.json")[0] == 0
    before = (tmp_path / "s.json").read_bytes()
    code, _, err = run("split", "--source", "digits", "--seed", "5", "--out", tmp_path / "s.json")
    assert code == 2 and "already exists; pass --force" in one_line_error(err)
    assert (tmp_path / "s.json").read_bytes() == before
    args = ["train", "--out", tmp_path / "run", "--subsets", "all", "--epochs", "1", "--arch", "vit_micro"]
    assert run(*args)[0] == 0
    code, _, err = run(*args)
    assert code == 2 and "pass --force to overwrite it or --resume" in one_line_error(err)
    assert run(*args, "--force")[0] == 0


def test_splits_of_other_data_are_refused(tmp_path):
    assert run("split", "--source", "digits", "--out", tmp_path / "s.json")[0] == 0
    code, _, err = run("train", "--out", tmp_path / "run", "--source", "synthetic", "--splits", tmp_path / "s.json")
    assert code == 2 and "was made for other data" in one_line_error(err)


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "memlens"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout


def test_split_help_names_every_source_and_option():
    from memlens.config import DataConfig

    code, out, _ = run("split", "--help")
    text = " ".join(out.split())
    sources = DataConfig.model_fields["source"].annotation.__args__
    assert code == 0 and all(src in text for src in sources) and "--test-path" in text
