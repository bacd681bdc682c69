"""Security and integrity: secret DP randomness, verifiable and signed artefacts, and the fault sweep's holes."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from memlens.config import TrainConfig
from memlens.dp.training import train_encoder
from memlens.errors import MemlensError
from tests.conftest import run

DP = {"framework": "mae", "subsets": "all", "epochs": 2, "batch_size": 64,
      "model": {"arch": "vit_micro", "depth": 1, "embed_dim": 16, "num_heads": 2}, "mae": {"decoder_dim": 16},
      "dp": {"epsilon": 8.0, "noise_multiplier": 1.0}}


def _weights(run_dir):
    return load_file(str(Path(run_dir) / "model.safetensors"))


def _same(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _all_text(root: Path) -> str:
    """Every byte under ``root``, as text where it decodes (run records, checkpoints' metadata...)."""
    out = []
    for p in root.rglob("*"):
        if p.is_file():
            out.append(p.read_bytes().decode("latin-1"))
    return "\n".join(out)


# ----------------------------------------------------------------------------- DP randomness


def test_dp_noise_and_sampling_are_secret_by_default(tmp_path, digits, monkeypatch):
    import memlens.dp.step as step_mod
    from memlens.dp.secrets import SecretStreams

    keys = []
    real = step_mod.new_key

    def spy():
        keys.append(real())
        return keys[-1]

    monkeypatch.setattr(step_mod, "new_key", spy)
    cfg = TrainConfig.model_validate(DP)
    a = train_encoder(cfg, tmp_path / "a", dataset=digits).record
    train_encoder(cfg, tmp_path / "b", dataset=digits)
    assert not _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))  # the same config, other noise
    assert a.dp["randomness"] == "secret" and "noise_seed" not in a.dp and len(keys) == 2 and keys[0] != keys[1]
    # nothing written holds the key, nor the seeds derived from it for the first steps
    text = _all_text(tmp_path / "a")
    streams = SecretStreams(keys[0])
    assert keys[0].hex() not in text
    for purpose in ("noise", "sample"):
        for k in range(3):
            assert str(streams.seed(purpose, 0, k)) not in text
    assert not (tmp_path / "a" / "checkpoint.safetensors").exists()
    # reproducible: the old, seeded behaviour, recorded as such
    rep = TrainConfig.model_validate({**DP, "dp": {**DP["dp"], "reproducible": True}})
    train_encoder(rep, tmp_path / "c", dataset=digits)
    r = train_encoder(rep, tmp_path / "d", dataset=digits).record
    assert _same(_weights(tmp_path / "c"), _weights(tmp_path / "d")) and r.dp["randomness"] == "reproducible"
    code, out, _ = run("privacy", tmp_path / "d")
    assert code == 0 and "holds only while that record stays private" in out
    code, out, _ = run("privacy", tmp_path / "a")
    assert code == 0 and "secret randomness" in out and "WARNING" not in out


def test_interrupted_secret_run_resumes_and_forgets_its_key(tmp_path, digits):
    from safetensors import safe_open

    cfg = TrainConfig.model_validate({**DP, "epochs": 3})

    def stop(info):
        if info.epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_encoder(cfg, tmp_path / "r", dataset=digits, on_epoch=stop)
    with safe_open(str(tmp_path / "r" / "checkpoint.safetensors"), framework="pt") as fh:
        state = json.loads(fh.metadata()["memlens"])["state"]["loop"]
    key = state["secret"]
    assert len(key) == 64 and key not in (tmp_path / "r" / "run.json").read_text()
    rec = train_encoder(None, tmp_path / "r", resume=True, dataset=digits).record
    assert rec.status == "complete" and rec.epochs_done == 3
    assert not (tmp_path / "r" / "checkpoint.safetensors").exists() and key not in _all_text(tmp_path / "r")


def test_dp_keys_are_never_shared_by_accident_and_never_outlive_their_pair(tmp_path, digits):
    """Two default DP runs of one side (memlens train, twice): different noise, no secret left, no seed written.
    A sweep couples f and g: one key for both (the same key_id), a 0600 file only while the pair trains, one
    file after an interruption until the resumed pair completes, none after."""
    from memlens.config import SplitConfig, SplitSizes, SweepConfig
    from memlens.data import make_splits
    from memlens.dp.secrets import PAIR_PREFIX
    from memlens.dp.sweep import run_sweep
    from memlens.train.run import read_run

    make_splits(digits, SplitConfig(sizes=SplitSizes(S_S=400, S_C=100, S_I=100, S_E=100))).save(tmp_path / "s.json")
    base = {**DP, "splits": str(tmp_path / "s.json"), "subsets": "f"}
    for name in ("f1", "f2"):
        code, _, err = run("train", "--config", _yaml(tmp_path / f"{name}.yaml", base), "--out", tmp_path / name)
        assert code == 0, err
    assert not _same(_weights(tmp_path / "f1"), _weights(tmp_path / "f2"))
    r1, r2 = read_run(tmp_path / "f1"), read_run(tmp_path / "f2")
    assert r1.dp["coupling"] == r2.dp["coupling"] == "independent" and r1.dp["key_id"] != r2.dp["key_id"]
    assert "noise_seed" not in r1.dp and not list(tmp_path.rglob(f"{PAIR_PREFIX}*"))
    # refused for bad input: nothing written, no secret
    code, _, err = run("train", "--config", _yaml(tmp_path / "bad.yaml", {**base, "batch_size": 0}), "--out",
                       tmp_path / "bad")
    assert code == 2 and not (tmp_path / "bad").exists() and not list(tmp_path.rglob(f"{PAIR_PREFIX}*"))
    # a sweep couples its pair; interrupted during g, one secret (0600) remains for the resume
    sweep = SweepConfig.model_validate({"train": {k: v for k, v in DP.items() if k not in ("dp", "subsets")}
                                        | {"splits": str(tmp_path / "s.json"), "epochs": 2},
                                        "epsilons": [8.0], "dp": {"accountant": "rdp"}})
    seen = []

    def stop(info):
        seen.append(info)
        if len(seen) == 3:  # f's two epochs, then g's first
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, tmp_path / "sw", dataset=digits, on_epoch=stop)
    left = list((tmp_path / "sw").glob(f"{PAIR_PREFIX}*"))
    assert len(left) == 1 and oct(left[0].stat().st_mode & 0o777) == "0o600"
    ckpt = tmp_path / "sw" / "eps-8" / "g" / "checkpoint.safetensors"
    assert ckpt.is_file() and oct(ckpt.stat().st_mode & 0o777) == "0o600"  # it holds g's key until g ends
    run_sweep(sweep, tmp_path / "sw", dataset=digits)
    assert not list((tmp_path / "sw").rglob(f"{PAIR_PREFIX}*")) and not ckpt.exists()
    f, g = (read_run(tmp_path / "sw" / "eps-8" / side) for side in ("f", "g"))
    assert f.dp["coupling"] == g.dp["coupling"] == "shared" and f.dp["key_id"] == g.dp["key_id"]
    assert f.dp["key_id"] not in (r1.dp["key_id"], r2.dp["key_id"])


def _yaml(path, data):
    import yaml

    path.write_text(yaml.safe_dump(data))
    return path


# ----------------------------------------------------------------------------- provenance


def _train_pair(out, splits, canaries, digits, sign_key=None):
    """A tiny MAE f/g pair on ``splits`` with ``canaries`` planted, in ``out``/f and ``out``/g."""
    base = {"framework": "mae", "splits": str(splits), "epochs": 2, "batch_size": 32,
            "model": {"arch": "vit_micro", "depth": 1, "embed_dim": 16, "num_heads": 2}, "mae": {"decoder_dim": 16},
            "canaries": str(canaries)}
    for side in ("f", "g"):
        train_encoder(TrainConfig.model_validate({**base, "subsets": side}), out / side, dataset=digits,
                      sign_key=sign_key)


@pytest.fixture(scope="module")
def world(tmp_path_factory, digits):
    """A small f/g pair trained with canaries, its audit, and a signing key pair."""
    from memlens.config import SplitConfig, SplitSizes
    from memlens.data import make_splits
    from memlens.data.canaries import make_canaries, save_canaries

    root = tmp_path_factory.mktemp("world")
    from memlens.config import DataConfig

    splits = make_splits(digits, SplitConfig(sizes=SplitSizes(S_S=100, S_C=40, S_I=40, S_E=40), seed=2))
    splits.data = DataConfig()  # the digits: what an audit of encoders from elsewhere reads
    splits.save(root / "s.json")
    cset = make_canaries(digits, m=40, kinds=["natural"], seed=3,
                         exclude_ids=set(splits.ids("S_S", "S_C", "S_I", "S_E")))
    save_canaries(cset, root / "canaries")
    code, out, err = run("keygen", "--out", root / "key.pem")
    assert code == 0, err
    public = out.split("public key: ")[1].split()[0]
    _train_pair(root, root / "s.json", root / "canaries", digits, sign_key=root / "key.pem")  # signed run records
    args = ["audit", "--f", root / "f", "--g", root / "g", "--splits", root / "s.json", "--views", "2",
            "--max-per-subset", "20"]
    assert run(*args, "--out", root / "audit")[0] == 0
    assert run(*args, "--out", root / "signed", "--sign-key", root / "key.pem")[0] == 0
    (root / "policy.yaml").write_text("rules: {max_point_score: 0.99}\n")
    (root / "signed.yaml").write_text(f"rules: {{require_signature: {{public_key: \"{public}\"}}}}\n")
    return root, public


def _edit(path: Path) -> bytes:
    """Change one character of a file in place (a digit of a number where there is one); return the original."""
    data = path.read_bytes()
    if path.suffix in (".json", ".csv"):
        text = data.decode()
        for k in range(len(text) - 1, 0, -1):
            if text[k].isdigit() and text[k - 1].isdigit():
                new = text[:k] + str((int(text[k]) + 1) % 10) + text[k + 1:]
                path.write_text(new)
                return data
    edited = bytearray(data)
    edited[-3] ^= 0x01
    path.write_bytes(bytes(edited))
    return data


@pytest.mark.parametrize("target", ["f/run.json", "f/model.safetensors", "audit/audit.json", "audit/points.csv",
                                    "canaries/membership.json", "canaries/canaries.npz", "s.json"])
def test_any_edit_is_refused_by_gate_report_and_card(world, target):
    root, _ = world
    path = root / target
    original = _edit(path)
    try:
        for args in (("gate", root / "audit", "--policy", root / "policy.yaml"),
                     ("report", root / "audit", "--out", root / "r.pdf"),
                     ("card", root / "audit")):
            code, _, err = run(*args)
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and lines[0].startswith("memlens: error: "), (args, err)
            assert path.name in lines[0], (args, lines[0])
    finally:
        path.write_bytes(original)
    assert run("gate", root / "audit", "--policy", root / "policy.yaml")[0] == 0  # restored: verifies again
    assert not (root / "r.pdf").exists()


def test_signed_audits_verify_with_their_key_only(world, tmp_path):
    import shutil

    from memlens.integrity import generate_key

    root, public = world
    assert run("gate", root / "signed", "--policy", root / "signed.yaml")[0] == 0
    def verdict(audit, policy):
        code, _, err = run("gate", audit, "--policy", policy, "--json", tmp_path / "v.json")
        assert code in (0, 1), err
        rows = json.loads((tmp_path / "v.json").read_text())["results"]
        return code, next(r["observed"] for r in rows if r["rule"] == "require_signature")

    assert verdict(root / "audit", root / "signed.yaml") == (1, "unsigned")
    other = generate_key(tmp_path / "other.pem")
    (tmp_path / "other.yaml").write_text(f"rules: {{require_signature: {{public_key: \"{other}\"}}}}\n")
    code, observed = verdict(root / "signed", tmp_path / "other.yaml")
    assert code == 1 and observed.startswith("signed by another key")
    # a forger who edits a number and recomputes the digest cannot re-sign: the signature breaks
    from memlens.integrity import stamp

    copy = tmp_path / "forged"
    shutil.copytree(root / "signed", copy)
    doc = json.loads((copy / "audit.json").read_text())
    doc["subsets"]["S_C"]["mean"] = -1.0
    sig = doc["integrity"]["signature"]
    doc = stamp(doc, files=doc["integrity"]["files"])
    doc["integrity"]["signature"] = sig
    (copy / "audit.json").write_text(json.dumps(doc))
    code, _, err = run("gate", copy, "--policy", root / "signed.yaml")
    assert code == 2 and "signature does not verify" in err
    card = run("card", root / "signed")[1]
    assert public in card and "signed" in card
    # a signed audit of run records the trusted job did not sign (a pasted DP block, re-digested) fails
    unsigned = tmp_path / "unsigned-runs"
    _train_pair(unsigned, root / "s.json", root / "canaries", _digits())
    assert run("audit", "--f", unsigned / "f", "--g", unsigned / "g", "--splits", root / "s.json", "--views", "2",
               "--max-per-subset", "20", "--out", unsigned / "audit", "--sign-key", root / "key.pem")[0] == 0
    code, _, err = run("gate", unsigned / "audit", "--policy", root / "signed.yaml", "--json", tmp_path / "u.json")
    rows = {r["rule"]: r for r in json.loads((tmp_path / "u.json").read_text())["results"]}
    assert code == 1 and rows["require_signature"]["passed"] and not rows["require_signature[runs]"]["passed"]


def test_an_edited_run_record_is_refused_by_the_audit(world, tmp_path):
    """A non-DP run given a DP run's dp block (a naive edit) no longer passes as DP."""
    import shutil

    root, _ = world
    shutil.copytree(root / "f", tmp_path / "f")
    rec = json.loads((tmp_path / "f" / "run.json").read_text())
    rec["dp"] = {"epsilon_spent": 7.99, "delta": 1e-5}
    (tmp_path / "f" / "run.json").write_text(json.dumps(rec))
    code, _, err = run("audit", "--f", tmp_path / "f", "--g", root / "g", "--splits", root / "s.json", "--views", "2",
                       "--out", tmp_path / "a")
    assert code == 2 and "run.json was modified" in err and not (tmp_path / "a").exists()
    code, _, err = run("privacy", tmp_path / "f")
    assert code == 2 and "run.json was modified" in err


# ----------------------------------------------------------------------------- encoders and degenerate audits


def test_an_encoder_without_weights_is_refused_unless_asked_for(world, tmp_path):
    from safetensors.torch import save_file

    from memlens.models.external import timm_model

    root, _ = world
    kw = '{"img_size": 8, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2, "num_classes": 0, ' \
         '"in_chans": 1}'
    torch.manual_seed(0)
    save_file(timm_model("vit_tiny_patch16_224", json.loads(kw)).state_dict(), str(tmp_path / "g.safetensors"))
    common = ["--splits", root / "s.json", "--views", "2", "--model-kwargs", kw, "--input-size", "8",
              "--mean", "0.5", "--std", "0.5", "--max-per-subset", "10"]
    code, _, err = run("audit", "--f", "timm:vit_tiny_patch16_224", "--g", "timm:vit_tiny_patch16_224",
                       "--g-weights", tmp_path / "g.safetensors", *common, "--out", tmp_path / "a")
    assert code == 2 and "0 --f-weights for 1 timm:/py: --f encoder" in err and not (tmp_path / "a").exists()
    code, _, err = run("audit", "--f", "timm:vit_tiny_patch16_224", "--f", "timm:vit_tiny_patch16_224",
                       "--f-weights", tmp_path / "g.safetensors", "--g", "timm:vit_tiny_patch16_224",
                       "--g-weights", tmp_path / "g.safetensors", *common, "--out", tmp_path / "a")
    assert code == 2 and "1 --f-weights for 2" in err
    code, _, err = run("audit", "--f", "timm:vit_tiny_patch16_224", "--allow-random-init", "--g",
                       "timm:vit_tiny_patch16_224", "--g-weights", tmp_path / "g.safetensors", *common,
                       "--out", tmp_path / "a")
    assert code == 0, err
    code, out, _ = run("gate", tmp_path / "a", "--policy", root / "policy.yaml")
    assert code == 1 and "weights_loaded" in out and "random init" in out


def test_degenerate_audits_are_errors(world, tmp_path):
    from safetensors.torch import save_file

    from memlens.models.external import timm_model

    root, _ = world
    common = ["--splits", root / "s.json", "--views", "2", "--max-per-subset", "10"]
    kw = {"img_size": 8, "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2, "num_classes": 0,
          "in_chans": 1}
    save_file(timm_model("vit_tiny_patch16_224", kw).state_dict(), str(tmp_path / "w.safetensors"))
    copy = tmp_path / "w-copy.safetensors"
    copy.write_bytes((tmp_path / "w.safetensors").read_bytes())  # the same weights under another name
    timm = ["--model-kwargs", json.dumps(kw), "--input-size", "8", "--mean", "0.5", "--std", "0.5"]
    code, _, err = run("audit", "--f", "timm:vit_tiny_patch16_224", "--f-weights", tmp_path / "w.safetensors", "--g",
                       "timm:vit_tiny_patch16_224", "--g-weights", copy, *timm, *common, "--out", tmp_path / "a")
    assert code == 2 and "identical weights" in err and not (tmp_path / "a").exists()
    code, _, err = run("audit", "--f", root / "f", "--g", root / "g", "--augment", "none", *common,
                       "--out", tmp_path / "b")
    assert code == 2 and "all view distances are 0" in err and "Traceback" not in err
    assert len([ln for ln in err.splitlines() if ln.startswith("memlens: error:")]) == 1


# ----------------------------------------------------------------------------- the smaller holes


def _lists(tmp_path, n=30):
    from tests.conftest import write_png_folder

    paths = write_png_folder(tmp_path / "imgs", [f"{i:03d}.png" for i in range(n)], seed=4)
    (tmp_path / "f.txt").write_text("\n".join(str(p) for p in paths[:15]))
    (tmp_path / "g.txt").write_text("\n".join(str(p) for p in paths[5:20]))
    (tmp_path / "e.txt").write_text("\n".join(str(p) for p in paths[20:]))
    return paths


def test_a_refused_split_changes_nothing(tmp_path):
    paths = _lists(tmp_path)
    args = ["split", "--members-f", tmp_path / "f.txt", "--members-g", tmp_path / "g.txt", "--extra",
            tmp_path / "e.txt", "--out", tmp_path / "s.json"]
    assert run(*args)[0] == 0
    manifest, splits = (tmp_path / "s.manifest.csv").read_bytes(), (tmp_path / "s.json").read_bytes()
    # a copy of a trained image listed as never seen: refused naming both, the good files untouched
    import shutil

    shutil.copy(paths[0], tmp_path / "imgs" / "copy.png")
    (tmp_path / "e2.txt").write_text((tmp_path / "e.txt").read_text() + f"\n{tmp_path / 'imgs' / 'copy.png'}")
    code, _, err = run(*args[:5], "--extra", tmp_path / "e2.txt", "--out", tmp_path / "s.json", "--force")
    assert code == 2 and "copy.png" in err and "000.png" in err and "same image" in err
    assert (tmp_path / "s.manifest.csv").read_bytes() == manifest and (tmp_path / "s.json").read_bytes() == splits
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".s.")) == []
    # an existing manifest is not overwritten without --force, and nothing is left behind
    (tmp_path / "s.json").unlink()
    code, _, err = run(*args)
    assert code == 2 and "s.manifest.csv already exists" in err and not (tmp_path / "s.json").exists()
    assert (tmp_path / "s.manifest.csv").read_bytes() == manifest


def test_bad_lists_factories_and_policies_are_one_line(tmp_path):
    _lists(tmp_path)
    (tmp_path / "bin.txt").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0binary")
    code, _, err = run("split", "--members-f", tmp_path / "bin.txt", "--members-g", tmp_path / "g.txt", "--out",
                       tmp_path / "s.json")
    assert code == 2 and "not a text list" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "broken_mod.py").write_text("raise RuntimeError('cannot build here')\n")
    (tmp_path / "raising_mod.py").write_text("def make():\n    raise ValueError('no such backbone')\n")
    (tmp_path / "exiting_mod.py").write_text("import sys\nsys.exit(0)\n")
    (tmp_path / "exiting_factory.py").write_text("import sys\ndef make():\n    sys.exit(3)\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        for spec, want in (("py:broken_mod:make", "RuntimeError: cannot build here"),
                           ("py:raising_mod:make", "ValueError: no such backbone"),
                           ("py:exiting_mod:make", "called sys.exit(0)"),
                           ("py:exiting_factory:make", "called sys.exit(3) instead of returning an encoder")):
            code, _, err = run("layers", spec, "--input-size", "8")
            assert code == 2 and want in err and len(err.strip().splitlines()) == 1, err
    finally:
        sys.path.remove(str(tmp_path))
    (tmp_path / "p.yaml").write_text("rules:\n  max_point_score: 0.5\n  baseline: {path: old}\n")
    code, _, err = run("gate", tmp_path, "--policy", tmp_path / "p.yaml")
    assert code == 2 and "baseline is a top-level setting of the policy" in err
    # a YAML alias bomb (nine levels of nine aliases) is refused before anything expands it
    levels = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    (tmp_path / "bomb.yaml").write_text("\n".join(levels) + "\n")
    code, _, err = run("gate", tmp_path, "--policy", tmp_path / "bomb.yaml")
    assert code == 2 and "alias bomb" in err and len(err.strip().splitlines()) == 1
    # an epsilon no accountant can calibrate is refused at once (it used to exhaust memory)
    (tmp_path / "dp.yaml").write_text("framework: mae\ndata: {source: digits}\nepochs: 1\ndp: {epsilon: 1e9}\n")
    code, _, err = run("privacy", "--config", tmp_path / "dp.yaml")
    assert code == 2 and "above 100" in err and len(err.strip().splitlines()) == 1


def test_one_writer_per_output_and_unwritable_outputs_fail_first(world, tmp_path):
    from memlens.io import output_lock

    root, _ = world
    args = ["audit", "--f", root / "f", "--g", root / "g", "--splits", root / "s.json", "--views", "2",
            "--max-per-subset", "10"]
    with output_lock(tmp_path / "busy"):
        code, _, err = run(*args, "--out", tmp_path / "busy")
    assert code == 2 and "being written by another memlens" in err and not (tmp_path / "busy").exists()
    (tmp_path / "file").write_text("not a folder")
    code, _, err = run(*args, "--out", tmp_path / "file" / "audit")
    assert code == 2 and "cannot write the audit directory" in err
    # a passing gate whose JSON verdict cannot be written exits 2 before judging, never 1
    code, out, err = run("gate", root / "audit", "--policy", root / "policy.yaml", "--json",
                         tmp_path / "file" / "g.json")
    assert code == 2 and "cannot write the JSON verdict" in err and "PASSED" not in out


def test_copies_are_found_by_content_across_subsets_and_canaries(tmp_path):
    """Only the paths of copies differ: splits keep every copy of an image in one subset, canaries are
    never copies of a training image, and an audit refuses membership the copies contradict."""
    from memlens.config import DataConfig, SplitConfig, SplitSizes
    from memlens.data import load, make_splits
    from memlens.data.canaries import make_canaries
    from memlens.data.splits import check_duplicates

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (120, 8, 8, 1), dtype=np.uint8)
    x[100:110] = x[0:10]  # ten byte-identical copies under other ids
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(120, dtype=np.int64))
    ds = load(DataConfig(source="npz", path=str(tmp_path / "d.npz")))
    copies = [(ds.ids[k], ds.ids[100 + k]) for k in range(10)]
    sp = make_splits(ds, SplitConfig(sizes=SplitSizes(S_S=40, S_C=20, S_I=20, S_E=20), seed=0))
    where = sp.subset_of()
    assert sp.settings["duplicates_dropped"]
    for a, b in copies:
        assert where.get(a) == where.get(b) or a not in where or b not in where
    check_duplicates(ds, sp)  # consistent membership passes
    trained = set(sp.ids("S_S", "S_C", "S_I"))
    cset = make_canaries(ds, m=10, kinds=["natural"], seed=1, exclude_ids=set(sp.ids("S_S", "S_C", "S_I", "S_E")))
    trained_pixels = {x[r].tobytes() for r in ds.indices(sorted(trained))}
    assert not trained_pixels & {im.tobytes() for im in cset.images}
    # a copy of a trained image put in S_E by hand: refused, naming both
    a, b = next((a, b) for a, b in copies if a in trained or b in trained)
    kept, other = (a, b) if a in trained else (b, a)
    sp.subsets = {k: [i for i in v if i != other] for k, v in sp.subsets.items()}
    sp.subsets["S_E"].append(other)
    with pytest.raises(MemlensError, match=f"'{other}' \\(S_E\\) is the same image as '{kept}'"):
        check_duplicates(ds, sp)


def test_a_baseline_with_other_canaries_is_compared_like_for_like(world, tmp_path):
    """Two releases audited with different canary sets: their canary AUCs are not a like-for-like
    change, so the rule compares what both measured alike (natural S_C against S_E) and says so."""
    from memlens.config import DataConfig
    from memlens.data import load
    from memlens.data.canaries import make_canaries, save_canaries
    from memlens.data.splits import Splits

    root, _ = world
    digits = load(DataConfig())
    splits = Splits.load(root / "s.json")
    other = make_canaries(digits, m=40, kinds=["natural"], seed=9,
                          exclude_ids=set(splits.ids("S_S", "S_C", "S_I", "S_E")))
    save_canaries(other, tmp_path / "canaries")
    _train_pair(tmp_path, root / "s.json", tmp_path / "canaries", digits)
    code, _, err = run("audit", "--f", tmp_path / "f", "--g", tmp_path / "g", "--splits", root / "s.json", "--views",
                       "2", "--max-per-subset", "20", "--out", tmp_path / "new")
    assert code == 0, err
    (tmp_path / "p.yaml").write_text("rules: {}\nbaseline: {max_increase: {membership_auc: 0.5}}\n")

    def row(audit):
        code, _, err = run("gate", audit, "--policy", tmp_path / "p.yaml", "--baseline", root / "audit", "--json",
                           tmp_path / "v.json")
        assert code == 0, err
        (r,) = json.loads((tmp_path / "v.json").read_text())["results"]
        return r

    assert row(tmp_path / "new")["detail"] == "membership AUC (natural images)"
    assert row(root / "signed")["detail"] == "membership AUC (the same canaries)"
    from memlens.audit.results import read_audit
    from memlens.policy.baseline import comparable_basis

    new, old = read_audit(tmp_path / "new"), read_audit(root / "audit")
    assert comparable_basis(new, old) == "natural" and comparable_basis(old, old) == "canaries"
    new.summary.privacy.primary_score = "other"
    assert comparable_basis(new, old) is None  # nothing measured alike: the rule fails (see gate.evaluate)


def _digits():
    from memlens.data import load

    return load()

