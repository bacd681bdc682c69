import tarfile

import numpy as np
import pytest

from memlens.config import DataConfig, SyntheticConfig
from memlens.data import load
from memlens.data.dataset import Dataset
from memlens.data.sources import synthetic
from memlens.errors import MemlensError
from tests.conftest import write_png_folder


def test_digits_are_the_real_sklearn_images(digits):
    from sklearn.datasets import load_digits

    raw = load_digits()
    assert digits.images.shape == (1797, 8, 8, 1) and digits.images.dtype == np.uint8
    # 16 grey levels scaled to 0..255
    assert np.array_equal(digits.images[..., 0], np.rint(raw.images * 255 / 16).astype(np.uint8))
    assert list(digits.labels[:10]) == list(raw.target[:10])
    assert digits.ids[0] == "digits/0000" and not digits.has_test_part


def test_fingerprint_is_stable_and_sensitive(digits):
    again = load()
    assert again.fingerprint == digits.fingerprint
    assert len(digits.fingerprint) == 64
    pixels = digits.images.copy()
    pixels[5, 3, 3, 0] ^= 1
    changed = Dataset(images=pixels, ids=digits.ids, labels=digits.labels, class_names=digits.class_names,
                      parts=digits.parts, source="x")
    assert changed.fingerprint != digits.fingerprint
    renamed = Dataset(images=digits.images, ids=("other",) + digits.ids[1:], labels=digits.labels,
                      class_names=digits.class_names, parts=digits.parts, source="x")
    assert renamed.fingerprint != digits.fingerprint


def test_synthetic_is_deterministic_and_records_outliers():
    cfg = SyntheticConfig(n=200, n_test=50, image_size=16, outliers=7, seed=3)
    a, b = synthetic(cfg), synthetic(cfg)
    assert a.fingerprint == b.fingerprint
    assert synthetic(cfg.model_copy(update={"seed": 4})).fingerprint != a.fingerprint
    outliers = a.meta["outlier_ids"]
    assert len(outliers) == 7 and set(outliers) <= set(a.ids)
    assert a.images.shape == (250, 16, 16, 3) and a.has_test_part
    # Planted points are atypical: far from their nearest other training image.
    x = a.images[a.parts == "train"].reshape(200, -1).astype(float)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nearest = d.min(1)
    rows = a.indices(outliers)
    assert nearest[rows].min() > np.median(np.delete(nearest, rows))


def test_folder_with_parts_and_classes(tmp_path):
    layout = [f"{part}/{cls}/{i}.png" for part in ("train", "test") for cls in ("cat", "dog") for i in range(3)]
    write_png_folder(tmp_path / "imgs", layout)
    (tmp_path / "imgs" / "README.txt").write_text("not an image")
    ds = load(DataConfig(source="folder", path=str(tmp_path / "imgs")))
    assert len(ds) == 12 and ds.class_names == ("cat", "dog")
    assert "train/cat/0.png" in ds.ids and ds.has_test_part
    assert ds.labels[ds.ids.index("test/dog/2.png")] == 1


def test_flat_folder_is_unlabelled(tmp_path):
    write_png_folder(tmp_path / "flat", [f"{i}.png" for i in range(4)])
    ds = load(DataConfig(source="folder", path=str(tmp_path / "flat")))
    assert ds.labels is None and len(ds) == 4 and not ds.has_test_part


def test_tar_gz_is_read_without_extracting_and_cached(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_png_folder(src, [f"train/c{k}/{i}.png" for k in range(2) for i in range(3)])
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "train", arcname="train")
    cache = tmp_path / "cache"
    first = load(DataConfig(source="folder", path=str(archive)), cache_dir=cache)
    assert not (tmp_path / "train").exists()  # nothing extracted next to the archive
    # indexed once (offsets, digests), the decompressed tar and the decoded pixels cached
    assert len(list(cache.glob("index-tar-*.npz"))) == 1 and len(list(cache.glob("untar-*.tar"))) == 1
    assert len(list(cache.glob("decoded-*.npy"))) == 1 and not first.lazy  # 8x8 images: decoded cache
    second = load(DataConfig(source="folder", path=str(archive)), cache_dir=cache)
    assert second.fingerprint == first.fingerprint and second.class_names == ("c0", "c1")
    folder_ds = load(DataConfig(source="folder", path=str(src)), cache_dir=cache)
    assert folder_ds.fingerprint == first.fingerprint  # same ids, same bytes
    lazy = load(DataConfig(source="folder", path=str(archive), cache="none"), cache_dir=cache)
    assert lazy.lazy and lazy.fingerprint == first.fingerprint
    assert np.array_equal(np.stack([lazy.pixels.read(i) for i in range(len(lazy))]), first.images)


def test_npz_source(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, (10, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(10) % 2, x_test=x[:4], y_test=np.zeros(4))
    ds = load(DataConfig(source="npz", path=str(tmp_path / "d.npz")))
    assert len(ds) == 14 and ds.has_test_part and ds.class_names == ("0", "1")
    np.savez(tmp_path / "f.npz", x=x.astype(np.float32))
    with pytest.raises(MemlensError, match="must be uint8"):
        load(DataConfig(source="npz", path=str(tmp_path / "f.npz")))


def test_empty_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MemlensError, match="no images found"):
        load(DataConfig(source="folder", path=str(tmp_path / "empty")))


def test_corrupt_images_are_named(tmp_path):
    write_png_folder(tmp_path / "d", ["a.png", "b.png"])
    (tmp_path / "d" / "bad.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(MemlensError, match=r"1 unreadable or corrupt image\(s\): bad.jpg.*on_bad_image: skip"):
        load(DataConfig(source="folder", path=str(tmp_path / "d")))
    ds = load(DataConfig(source="folder", path=str(tmp_path / "d"), on_bad_image="skip"))
    assert ds.ids == ("a.png", "b.png")
    assert ds.describe()["skipped"] == [{"id": "bad.jpg", "problem": "not a readable image (UnidentifiedImageError)",
                                         "when": "index"}]


def test_truncated_jpeg_is_found_when_indexed(tmp_path):
    from tests.conftest import write_jpeg_folder

    write_jpeg_folder(tmp_path / "d", 3, seed=1, sizes=(120, 160))
    victim = sorted((tmp_path / "d").rglob("*.jpg"))[1]
    victim.write_bytes(victim.read_bytes()[:-200])  # a download cut short: the header still reads
    with pytest.raises(MemlensError, match=r"truncated JPEG"):
        load(DataConfig(source="folder", path=str(tmp_path / "d")))


def test_mixed_sizes_are_read_lazily_at_their_own_size(tmp_path):
    write_png_folder(tmp_path / "d", ["a.png", "b.png"], size=8)
    write_png_folder(tmp_path / "d", ["c.png"], size=10)
    ds = load(DataConfig(source="folder", path=str(tmp_path / "d")))
    assert ds.lazy and ds.square_size is None
    assert ds.pixels.read(2).shape == (10, 10, 3) and ds.pixels.read(0).shape == (8, 8, 3)
    with pytest.raises(MemlensError, match="images differ in size.*model.input_size"):
        _ = ds.image_size
    ds = load(DataConfig(source="folder", path=str(tmp_path / "d"), resize=8))  # squashing stays a choice
    assert ds.images.shape == (3, 8, 8, 3)


def test_missing_path_and_unknown_source():
    from memlens.config import validate

    with pytest.raises(MemlensError, match="source 'folder' needs a path"):
        validate(DataConfig, {"source": "folder"}, source="cfg")
    with pytest.raises(MemlensError, match="'folder', 'npz', 'manifest', 'shards', 'hf' or 'parquet'"):
        validate(DataConfig, {"source": "imagenet"}, source="cfg")
    with pytest.raises(MemlensError, match="not found"):
        load(DataConfig(source="folder", path="/nonexistent/dir"))
