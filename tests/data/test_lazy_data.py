"""Lazy image sources: images of their own sizes, tar shards, Hugging Face datasets and parquet read on
demand, trained on and audited with the same scores whichever form holds the same files."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from memlens.config import AuditConfig, DataConfig, SplitConfig, SplitSizes, TrainConfig
from memlens.data import load, make_splits
from memlens.errors import MemlensError
from tests.conftest import run, write_jpeg_folder, write_png_folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """64 JPEGs of mixed sizes (24-64 px, both orientations) in two class folders, train and test parts."""
    root = tmp_path_factory.mktemp("photos") / "imgs"
    rels = write_jpeg_folder(root, 40, seed=3, parts=("train", "test"))
    return root, rels


def _to_shards(root: Path, rels: list[str], out: Path, per_shard: int = 15) -> str:
    """WebDataset shards of images under ``root``: member = the relative path, and a .class member with
    the label (the name of the image's class folder, as the folder source reads it)."""
    out.mkdir(parents=True, exist_ok=True)
    for k in range(0, len(rels), per_shard):
        with tarfile.open(out / f"train-{k // per_shard:04d}.tar", "w") as tar:
            for rel in rels[k:k + per_shard]:
                tar.add(root / rel, arcname=rel)
                label = Path(rel).parent.name.encode()
                info = tarfile.TarInfo(rel.rsplit(".", 1)[0] + ".class")
                info.size = len(label)
                tar.addfile(info, io.BytesIO(label))
    n = (len(rels) + per_shard - 1) // per_shard
    return str(out / f"train-{{0000..{n - 1:04d}}}.tar")


def test_images_keep_their_size_and_the_fingerprint_is_over_bytes(photos, tmp_path):
    root, rels = photos
    ds = load(DataConfig(source="folder", path=str(root)))
    assert ds.lazy and len(ds) == 80 and ds.has_test_part and ds.class_names == ("a", "b")
    sizes = ds.sizes()
    assert len(np.unique(sizes, axis=0)) > 10
    assert (sizes[:, 0] > sizes[:, 1]).any() and (sizes[:, 0] < sizes[:, 1]).any()  # both orientations
    k = ds.ids.index(rels[5])
    from PIL import Image

    with Image.open(root / rels[5]) as im:
        assert np.array_equal(ds.pixels.read(k), np.asarray(im.convert("RGB")))
    # a changed file changes the fingerprint; touching nothing keeps it (index reused)
    again = load(DataConfig(source="folder", path=str(root)))
    assert again.fingerprint == ds.fingerprint
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(root, copy)
    assert load(DataConfig(source="folder", path=str(copy))).fingerprint == ds.fingerprint  # same bytes, same ids
    victim = copy / rels[0]
    with Image.open(victim) as im:
        im.rotate(90, expand=True).save(victim, quality=90)
    assert load(DataConfig(source="folder", path=str(copy))).fingerprint != ds.fingerprint


def test_every_source_form_gives_the_folder_fingerprint(photos, tmp_path):
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, rels = photos
    train = [r for r in rels if r.startswith("train/")]
    folder = load(DataConfig(source="folder", path=str(root / "train")))
    # ids in the folder of the train part alone are relative to it
    ids = [r.removeprefix("train/") for r in train]
    shards = load(DataConfig(source="shards", path=_to_shards(root / "train", ids, tmp_path / "shards")))
    classes = ["a", "b"]
    hf_ds = datasets.Dataset.from_dict(
        {"id": ids, "image": [str(root / r) for r in train], "label": [classes.index(r.split("/")[1]) for r in train]},
        features=datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                    "label": datasets.ClassLabel(names=classes)}))
    hf_ds = hf_ds.map(lambda x: x, features=hf_ds.features)  # embed the bytes as save_to_disk would from a hub
    hf_ds.save_to_disk(str(tmp_path / "hf"))
    hf = load(DataConfig(source="hf", path=str(tmp_path / "hf")))
    table = pa.table({"id": ids, "image": [(root / r).read_bytes() for r in train],
                      "label": [r.split("/")[1] for r in train]})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=7)
    parquet = load(DataConfig(source="parquet", path=str(tmp_path / "t.parquet")))
    assert set(shards.ids) == set(folder.ids) == set(hf.ids) == set(parquet.ids) and len(folder) == 40
    assert len(shards.meta) and shards.meta["shards"] == 3
    assert folder.fingerprint == shards.fingerprint == hf.fingerprint == parquet.fingerprint
    assert folder.class_names == shards.class_names == hf.class_names == parquet.class_names == ("a", "b")
    for ds in (shards, hf, parquet):
        for k in (0, 3, 39):
            assert np.array_equal(ds.pixels.read(k), folder.pixels.read(folder.ids.index(ds.ids[k])))


def test_geometry_is_cut_from_the_original_with_the_batched_box():
    """The loader cuts each view from the decoded original with the box the batched pipeline would
    draw from the image's stream, then torchvision's antialiased resized crop."""
    from torchvision.transforms.v2 import functional as TF

    from memlens.data.augment import SETS, Augmenter, Cut, Flip, ResizedCrop
    from memlens.rng import RowStreams

    for name in ("normal", "strong", "independent", "mae", "weak"):  # each op draws what it declares
        d = RowStreams([7])
        Augmenter(name, size=8)(torch.zeros(1, 8, 8, 3, dtype=torch.uint8), d)
        assert d.pos == sum(op.counters for op in SETS[name])
    aug = Augmenter("strong", size=16)  # colour, h-flip, grey, crop, v-flip
    geo = aug.geometry(calls=2)
    assert [o for o, _ in geo.flips] == [9, 33] and geo.offset == 11 and geo.stride == 34
    img = torch.randint(0, 255, (3, 40, 70), dtype=torch.uint8)
    for key in range(20):
        views = geo.cut(img, key)
        assert views.shape == (2, 3, 16, 16)
        for c in range(2):
            d = RowStreams([key])
            d.skip(c * geo.stride)
            d.skip(9)
            hflip = bool(d.rand()[0] < 1.0)
            d.skip(1)
            crop = next(op for op in SETS["strong"] if isinstance(op, ResizedCrop))
            top, left, h, w = (int(v) for v in crop.params(1, 40, 70, d)[0])
            vflip = bool(d.rand()[0] < 1.0)
            ref = TF.resized_crop(img, top, left, h, w, [16, 16], antialias=True)
            ref = ref.flip(-1) if hflip else ref
            assert torch.equal(views[c], ref.flip(-2) if vflip else ref)
    mae = Augmenter("mae", size=16).geometry(1)
    flipped = sum(not torch.equal(mae.cut(img, k)[0], TF.resized_crop(img, *(int(v) for v in mae.crop.params(
        1, 40, 70, _at(k, 0))[0]), [16, 16], antialias=True)) for k in range(200))
    assert 70 < flipped < 130  # mae's flip has p = 0.5
    # the batched rest (colour, grey) draws each operation's numbers at the position the dense
    # pipeline does, past the crop's and the flips' numbers (used by the loader)
    sq = torch.randint(0, 255, (6, 16, 16, 3), dtype=torch.uint8)
    keys = [11, 12, 13, 14, 15, 16]
    chw = sq.permute(0, 3, 1, 2).unsqueeze(1)
    got = aug(Cut(chw.clone()), RowStreams(keys))
    d = RowStreams(keys)
    x = chw[:, 0].float() / 255
    for op in SETS["strong"]:
        if isinstance(op, (ResizedCrop, Flip)):
            d.skip(op.counters)
        else:
            x = op(x, d)
    assert torch.allclose(got, x) and d.pos == geo.stride


def _at(key: int, offset: int):
    from memlens.rng import RowStreams

    d = RowStreams([key])
    d.skip(offset)
    return d


def test_eval_transform_matches_timm(photos):
    """Un-augmented input of images of any size: timm's eval transform (shorter side to size / crop_pct,
    centre crop)."""
    import timm.data
    from PIL import Image

    from memlens.data.augment import EvalTransform

    root, rels = photos
    for rel in rels[:6]:
        with Image.open(root / rel) as im:
            im = im.convert("RGB")
            t = timm.data.create_transform(input_size=(3, 32, 32), crop_pct=0.875, interpolation="bilinear",
                                           mean=(0, 0, 0), std=(1, 1, 1))
            theirs = t(im)
            mine = EvalTransform(32, crop_pct=0.875)(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
        assert mine.shape == (3, 32, 32)
        assert torch.equal(mine, (theirs * 255).round().to(torch.uint8))  # pixel for pixel


def _pair(tmp_path, data: DataConfig, *, dp: bool = False, **model):
    ds = load(data)
    make_splits(ds, SplitConfig(sizes=SplitSizes(S_S=14, S_C=8, S_I=8, S_E=8), seed=0)).save(tmp_path / "s.json")
    from memlens.dp.training import train_encoder

    base = {"framework": "mae", "data": data.model_dump(), "splits": str(tmp_path / "s.json"), "epochs": 2,
            "batch_size": 8, "augment": "mae", "model": {"arch": "vit_micro", "depth": 1, "embed_dim": 16,
                                                         "num_heads": 2, **model},
            "mae": {"decoder_dim": 16}, "workers": 1}
    if dp:
        base["dp"] = {"epsilon": 50.0, "delta": 1e-3, "max_grad_norm": 1.0}
    for side in ("f", "g"):
        train_encoder(TrainConfig.model_validate({**base, "subsets": side}), tmp_path / side)
    return ds


def test_mixed_sizes_train_with_and_without_dp_and_audit(photos, tmp_path):
    from memlens.audit import run_audit
    from memlens.train.run import read_run

    root, _ = photos
    data = DataConfig(source="folder", path=str(root))
    _pair(tmp_path / "plain", data, input_size=16)
    _pair(tmp_path / "dp", data, dp=True, input_size=16)
    rec = read_run(tmp_path / "dp" / "f")
    assert rec.status == "complete" and rec.data["image_size"] == 16 and rec.dp["epsilon_spent"] <= 50
    assert rec.data["read"].startswith("lazily") and rec.data["eval_transform"]["crop_pct"] == 0.875
    assert rec.environment["resources"]["workers"] == 1
    for kind in ("plain", "dp"):
        res = run_audit(AuditConfig(f=[str(tmp_path / kind / "f")], g=[str(tmp_path / kind / "g")],
                                    splits=str(tmp_path / kind / "s.json"), views=4, workers=1))
        pts = res.points
        assert len(pts) == 38 and np.isfinite(pts["sslmem"]).all() and pts["align_f"].std() > 0
        assert "loss_f" in pts and np.isfinite(pts["loss_f"]).all()  # MAE scores on the eval transform
        assert res.summary.environment["resources"]["workers"] == 1
    # the report renders what the audit accepted: images of several sizes (no single image shape)
    from memlens.audit import read_audit, write_audit
    from memlens.reports import build_context, render_html
    from memlens.reports.card import model_card_section

    write_audit(res, tmp_path / "audit")
    audit = read_audit(tmp_path / "audit")
    html = render_html(build_context([audit], redact=True))
    assert "images of several sizes (" in html and "px high" in html
    assert "S_C" in model_card_section([audit])


def test_shards_arrow_and_folder_audit_identically(photos, tmp_path):
    """Encoders trained on a folder, audited from the same images as shards and as a datasets Arrow
    dataset: identical tables (same ids, same bytes, hence the same views)."""
    datasets = pytest.importorskip("datasets")
    from memlens.audit import run_audit

    root, rels = photos
    train = [r for r in rels if r.startswith("train/")]
    data = DataConfig(source="folder", path=str(root / "train"), cache="none")
    _pair(tmp_path, data, input_size=16)
    classes = ["a", "b"]
    ids = [r.removeprefix("train/") for r in train]
    hf_ds = datasets.Dataset.from_dict(
        {"id": ids, "image": [{"bytes": (root / r).read_bytes(), "path": None} for r in train],
         "label": [classes.index(r.split("/")[1]) for r in train]},
        features=datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                    "label": datasets.ClassLabel(names=classes)}))
    hf_ds.save_to_disk(str(tmp_path / "hf"))
    cfg = dict(f=[str(tmp_path / "f")], g=[str(tmp_path / "g")], splits=str(tmp_path / "s.json"), views=4,
               max_per_subset=6)
    ref = run_audit(AuditConfig(**cfg)).points
    got = run_audit(AuditConfig(**cfg, data=DataConfig(source="hf", path=str(tmp_path / "hf")))).points
    assert got[["id", "sslmem", "loss_f"]].equals(ref[["id", "sslmem", "loss_f"]])
    pattern = _to_shards(root / "train", ids, tmp_path / "shards")
    got = run_audit(AuditConfig(**cfg, data=DataConfig(source="shards", path=pattern))).points
    assert got[["id", "sslmem", "loss_f"]].equals(ref[["id", "sslmem", "loss_f"]])


def test_unreadable_image_at_read_time_fails_or_is_skipped(photos, tmp_path):
    """A file broken after indexing: fail names it; skip leaves it out of training and of the audit,
    recorded in run.json and audit.json."""
    import shutil

    from memlens.audit import run_audit
    from memlens.dp.training import train_encoder
    from memlens.train.run import read_run

    root, _ = photos
    copy = tmp_path / "imgs"
    shutil.copytree(root / "train", copy)
    data = DataConfig(source="folder", path=str(copy), on_bad_image="skip")
    ds = load(data)
    make_splits(ds, SplitConfig(sizes=SplitSizes(S_S=14, S_C=8, S_I=8, S_E=8), seed=0)).save(tmp_path / "s.json")
    from memlens.data import Splits

    victim = Splits.load(tmp_path / "s.json").subsets["S_C"][0]
    # break it behind the index's back: same size and mtime, bytes that no longer decode
    path = copy / victim
    st = path.stat()
    path.write_bytes(b"\0" * st.st_size)
    import os

    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    base = {"framework": "mae", "data": data.model_dump(), "splits": str(tmp_path / "s.json"), "epochs": 1,
            "batch_size": 8, "model": {"arch": "vit_micro", "depth": 1, "embed_dim": 16, "num_heads": 2,
                                       "input_size": 16}, "mae": {"decoder_dim": 16}}
    for side in ("f", "g"):
        train_encoder(TrainConfig.model_validate({**base, "subsets": side}), tmp_path / side)
    assert {"id": victim, "when": "read"}.items() <= read_run(tmp_path / "f").data["skipped"][0].items()
    res = run_audit(AuditConfig(f=[str(tmp_path / "f")], g=[str(tmp_path / "g")], splits=str(tmp_path / "s.json"),
                                views=2))
    assert victim not in set(res.points["id"]) and len(res.points) == 37
    assert res.summary.data["skipped"][0]["id"] == victim
    failing = {**base, "data": {**data.model_dump(), "on_bad_image": "fail"}}
    with pytest.raises(MemlensError, match=f"image '{victim}' could not be read.*on_bad_image: skip"):
        train_encoder(TrainConfig.model_validate({**failing, "subsets": "f"}), tmp_path / "f2")


def test_decoded_cache_reads_the_same_pixels(tmp_path):
    from tests.conftest import write_png_folder

    write_png_folder(tmp_path / "d", [f"{c}/{i}.png" for c in "ab" for i in range(5)], size=12)
    cached = load(DataConfig(source="folder", path=str(tmp_path / "d")))
    lazy = load(DataConfig(source="folder", path=str(tmp_path / "d"), cache="none"))
    assert not cached.lazy and lazy.lazy and isinstance(cached.images, np.memmap)
    assert np.array_equal(cached.pixels.take(np.arange(10)), lazy.pixels.take(np.arange(10)))
    assert cached.fingerprint == lazy.fingerprint
    with pytest.raises(MemlensError, match="cache: decoded needs images of one square size"):
        write_png_folder(tmp_path / "m", ["a.png"], size=8)
        write_png_folder(tmp_path / "m", ["b.png"], size=9)
        load(DataConfig(source="folder", path=str(tmp_path / "m"), cache="decoded"))


def test_resource_rule():
    from memlens.resources import plan

    p = plan(lazy=True, processes_per_node=1, cores=8)
    assert p.workers == 4 and p.threads == min(torch.get_num_threads(), 4)
    p = plan(lazy=True, processes_per_node=4, cores=8)  # 2 cores each: one decoder, one thread
    assert (p.workers, p.threads) == (1, 1)
    p = plan(lazy=False, processes_per_node=2, cores=2)
    assert (p.workers, p.threads) == (0, 1)
    assert plan(lazy=True, workers=3, threads=2, cores=64).to_dict()["workers"] == 3


def test_hostile_images_decompression_bombs_and_16_bit(tmp_path):
    """A decompression bomb is a bad image (fail: one line, exit 2; skip: left out and said); a 16-bit PNG is
    scaled to 8 bits, not clipped to white."""
    from PIL import Image

    from memlens.data.decode import decode

    wide = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    buf = tmp_path / "wide.png"
    Image.fromarray(wide).save(buf)
    assert Image.open(buf).mode == "I;16"
    x = decode(buf.read_bytes(), channels=1)[0].numpy()
    np.testing.assert_array_equal(x, np.rint(wide / 257.0).astype(np.uint8))
    write_png_folder(tmp_path / "img", {f"{c}/{i}.png": None for c in "ab" for i in range(12)}, size=8)
    Image.new("L", (20000, 10000)).save(tmp_path / "img" / "a" / "bomb.png")  # 200 M pixels, 190 kB
    args = ["split", "--source", "folder", "--path", tmp_path / "img", "--sizes", "S_S=8,S_C=4,S_I=4,S_E=4"]
    code, _, err = run(*args, "--out", tmp_path / "s.json")
    assert code == 2 and "a/bomb.png (decompression bomb" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.json").exists()
    (tmp_path / "c.yaml").write_text(f"data: {{source: folder, path: {tmp_path / 'img'}, on_bad_image: skip}}\n"
                                     "split: {sizes: {S_S: 8, S_C: 4, S_I: 4, S_E: 4}}\n")
    code, out, err = run("split", "--config", tmp_path / "c.yaml", "--out", tmp_path / "s.json")
    assert code == 0, err
    assert "left out 1 unreadable image(s)" in out and "a/bomb.png" in out
    saved = json.loads((tmp_path / "s.json").read_text())
    assert [x["id"] for x in saved["skipped"]] == ["a/bomb.png"]


def test_every_source_reads_every_id_with_its_own_pixels(tmp_path):
    """The same uniform PNGs as a folder, a datasets DatasetDict (train/test, rows stored out of id order)
    and parquet (shuffled): one fingerprint, identical per-image scores. Formerly the decoded cache, keyed by
    the order-free fingerprint, served the folder's rows to the dataset stored in another order."""
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from memlens.audit import run_audit

    layout = {f"{part}/{c}/{i:04d}.png": None for part in ("train", "test") for c in ("cat", "dog")
              for i in range(16 if part == "train" else 6)}
    write_png_folder(tmp_path / "img", layout, size=8, seed=3)
    rels = sorted(layout)
    folder = DataConfig(source="folder", path=str(tmp_path / "img"))
    ds = _pair(tmp_path, folder, input_size=8)
    rng = np.random.default_rng(0)
    classes = ["cat", "dog"]

    def table(part):
        mine = [r for r in rels if r.startswith(part + "/")]
        mine = [mine[k] for k in rng.permutation(len(mine))]  # stored out of id order
        return {"id": mine, "image": [{"bytes": (tmp_path / "img" / r).read_bytes(), "path": None} for r in mine],
                "label": [classes.index(r.split("/")[1]) for r in mine]}

    feats = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                               "label": datasets.ClassLabel(names=classes)})
    datasets.DatasetDict({p: datasets.Dataset.from_dict(table(p), features=feats) for p in ("train", "test")}) \
        .save_to_disk(str(tmp_path / "hf"))
    rows = table("train")
    rows_test = table("test")
    for name, t in (("train.parquet", rows), ("test.parquet", rows_test)):
        pq.write_table(pa.table({"id": t["id"], "image": [x["bytes"] for x in t["image"]],
                                 "label": [classes[k] for k in t["label"]]}), tmp_path / name)
    hf = DataConfig(source="hf", path=str(tmp_path / "hf"))
    parquet = DataConfig(source="parquet", path=str(tmp_path / "train.parquet"),
                         test_path=str(tmp_path / "test.parquet"))
    assert load(hf).fingerprint == load(parquet).fingerprint == ds.fingerprint
    cfg = dict(f=[str(tmp_path / "f")], g=[str(tmp_path / "g")], splits=str(tmp_path / "s.json"), views=4)
    ref = run_audit(AuditConfig(**cfg)).points.set_index("id")
    for data in (hf, parquet):
        got = run_audit(AuditConfig(**cfg, data=data)).points.set_index("id").loc[ref.index]
        np.testing.assert_array_equal(got["sslmem"].to_numpy(), ref["sslmem"].to_numpy())
        np.testing.assert_array_equal(got["loss_f"].to_numpy(), ref["loss_f"].to_numpy())


def test_an_id_paired_with_other_pixels_is_caught(tmp_path, monkeypatch):
    """A decoded cache whose rows were swapped, or an index whose digests were: one line, at load."""
    import glob

    write_png_folder(tmp_path / "img", {f"a/{i}.png": None for i in range(10)}, size=8, seed=4)
    cache = tmp_path / "cache"
    data = DataConfig(source="folder", path=str(tmp_path / "img"), cache="decoded")
    load(data, cache_dir=cache)
    (npy,) = glob.glob(str(cache / "decoded-*.npy"))
    arr = np.load(npy)
    arr[[0, 1]] = arr[[1, 0]]
    np.save(npy, arr)
    with pytest.raises(MemlensError, match="decoded cache holds other pixels for 'a/"):
        load(data, cache_dir=cache)
