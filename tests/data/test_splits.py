import json

import pytest

from memlens.config import SplitConfig, SplitSizes, SyntheticConfig
from memlens.data import Splits, make_splits
from memlens.data.sources import synthetic
from memlens.errors import MemlensError


def test_default_sizes_follow_the_papers(digits):
    s = make_splits(digits)
    sizes = s.sizes()
    # No test part: S_E (= |S_C|) is set aside first, then 80/10/10 of the remaining N' = N / 1.1.
    n_prime = 1797 / 1.1
    assert sizes["S_C"] == round(0.1 * n_prime) == sizes["S_I"] == sizes["S_E"]
    assert abs(sizes["S_S"] - 0.8 * n_prime) <= 3
    assert sum(sizes.values()) <= 1797
    all_ids = [i for name in sizes for i in s.subsets[name]]
    assert len(all_ids) == len(set(all_ids))  # disjoint


def test_seeded_and_reproducible(digits):
    a, b = make_splits(digits, SplitConfig(seed=1)), make_splits(digits, SplitConfig(seed=1))
    assert a.hash == b.hash
    assert make_splits(digits, SplitConfig(seed=2)).hash != a.hash


def test_extra_set_comes_from_the_test_part():
    ds = synthetic(SyntheticConfig(n=300, n_test=100))
    s = make_splits(ds)
    assert all(i.startswith("synthetic/test/") for i in s.subsets["S_E"])
    assert len(s.subsets["S_E"]) == len(s.subsets["S_C"]) == 30
    assert not any(i.startswith("synthetic/test/") for name in ("S_S", "S_C", "S_I") for i in s.subsets[name])


def test_explicit_sizes(digits):
    s = make_splits(digits, SplitConfig(sizes=SplitSizes(S_S=500, S_C=50, S_I=50, S_E=40)))
    assert s.sizes() == {"S_S": 500, "S_C": 50, "S_I": 50, "S_E": 40}
    with pytest.raises(MemlensError, match="need 2100 training images"):
        make_splits(digits, SplitConfig(sizes=SplitSizes(S_S=1800, S_C=100, S_I=100)))


def test_requested_candidates(digits, tmp_path):
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("# images to check\ndigits/0007\ndigits/0100\n\n")
    s = make_splits(digits, SplitConfig(candidates_file=str(ids_file)))
    assert {"digits/0007", "digits/0100"} <= set(s.subsets["S_C"]) and s.requested == ["digits/0007", "digits/0100"]
    assert len(s.subsets["S_C"]) == 163  # topped up to the default size
    only = make_splits(digits, SplitConfig(candidates_file=str(ids_file), fill_candidates=False))
    assert only.subsets["S_C"] == ["digits/0007", "digits/0100"] and len(only.subsets["S_I"]) == 2
    ids_file.write_text("digits/9999\n")
    with pytest.raises(MemlensError, match="id 'digits/9999' is not in"):
        make_splits(digits, SplitConfig(candidates_file=str(ids_file)))


def test_candidate_from_test_part_refused(tmp_path):
    ds = synthetic(SyntheticConfig(n=100, n_test=20))
    f = tmp_path / "c.txt"
    f.write_text("synthetic/test/00003\n")
    with pytest.raises(MemlensError, match="in the test part"):
        make_splits(ds, SplitConfig(candidates_file=str(f)))


def test_load_validates(digits, tmp_path):
    path = tmp_path / "splits.json"
    make_splits(digits).save(path)
    loaded = Splits.load(path, digits)
    assert loaded.hash == make_splits(digits).hash

    raw = json.loads(path.read_text())
    raw["subsets"]["S_I"].append(raw["subsets"]["S_C"][0])
    path.write_text(json.dumps(raw))
    with pytest.raises(MemlensError, match="in both S_C and S_I; subsets must be disjoint"):
        Splits.load(path)

    raw = json.loads(path.read_text())
    raw["subsets"]["S_I"] = raw["subsets"]["S_I"][:-1] + ["digits/12345"]
    path.write_text(json.dumps(raw))
    with pytest.raises(MemlensError, match="S_I: id 'digits/12345' is not in"):
        Splits.load(path, digits)

    other = synthetic(SyntheticConfig(n=200))
    make_splits(digits).save(path)
    with pytest.raises(MemlensError, match="made for other data"):
        Splits.load(path, other)

    path.write_text("{not json")
    with pytest.raises(MemlensError, match="not valid JSON"):
        Splits.load(path)
    path.write_text(json.dumps({"fingerprint": "x"}))
    with pytest.raises(MemlensError, match="splits file"):
        Splits.load(path)
