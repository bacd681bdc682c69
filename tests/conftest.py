import os

import numpy as np
import pytest
import torch

# Under pytest-xdist each worker gets one intra-op thread, so two workers use the two cores
# without oversubscribing them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def run(*args):
    """Run the memlens CLI in-process: (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from memlens.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    # Keep every test's data cache private and out of the user's home directory.
    monkeypatch.setenv("MEMLENS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def digits():
    from memlens.data import load

    return load()


def small_train_config(**kw):
    """A micro training config that runs in about a second."""
    from memlens.config import TrainConfig

    base = {"framework": "mae", "subsets": "all", "epochs": 2, "batch_size": 64,
            "model": {"arch": "vit_micro", "depth": 2, "embed_dim": 32}, "mae": {"decoder_dim": 32}}
    base.update(kw)
    return TrainConfig.model_validate(base)


def write_png_folder(root, layout, size=8, seed=0):
    """layout: {relative_path: None} -> random PNGs; returns the paths written."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for rel in layout:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def write_jpeg_folder(root, n, *, seed=0, classes=("a", "b"), sizes=(24, 64), parts=("train",)):
    """n JPEGs per part of random sizes and both orientations in class folders (smooth content, so
    they compress like photos); returns the relative paths."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for part in parts:
        for k in range(n):
            h, w = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
            yy, xx = np.mgrid[0:h, 0:w]
            f = rng.uniform(0.02, 0.2, size=3)
            img = 127 + 100 * np.sin(f[0] * yy + f[1] * xx + rng.uniform(0, 6, size=(3, 1, 1)))
            rel = f"{part}/{classes[k % len(classes)]}/{k:05d}.jpg" if len(parts) > 1 else \
                f"{classes[k % len(classes)]}/{k:05d}.jpg"
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8).transpose(1, 2, 0)).save(p, quality=90)
            out.append(rel)
    return out


def restamp(path, edit, *, drop_files=()):
    """Rewrite a memlens record as memlens itself would after ``edit(doc)``: a new integrity stamp.

    Tests use it to reach checks that sit behind the digest (a record written by memlens in a state
    the test wants, e.g. an interrupted run), never to test the digest itself.
    """
    import json
    from pathlib import Path

    from memlens.integrity import FIELD, stamp

    path = Path(path)
    doc = json.loads(path.read_text())
    files = {k: v for k, v in doc[FIELD]["files"].items() if k not in drop_files}
    edit(doc)
    path.write_text(json.dumps(stamp(doc, files=files), indent=2))
