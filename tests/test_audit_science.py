"""End to end on trained encoders: the audit finds points that were planted to be memorable."""

import pytest

from memlens.audit import run_audit
from memlens.config import AuditConfig, DataConfig, SplitConfig, SplitSizes, SyntheticConfig, TrainConfig
from memlens.data import load, make_splits
from memlens.train import train

pytestmark = pytest.mark.slow


def test_planted_atypical_points_are_found(tmp_path):
    # 200 typical images from 4 prototypes with individual variation, 10 planted singletons.
    data = DataConfig(source="synthetic", synthetic=SyntheticConfig(n=200, n_test=60, image_size=16, outliers=10,
                                                                    seed=1))
    ds = load(data)
    planted = ds.meta["outlier_ids"]
    # The planted points are asked about as candidates ("is this image memorized?"); the rest of
    # S_C is filled with typical points, and S_S / S_I hold typical points only.
    ids = tmp_path / "ask.txt"
    ids.write_text("\n".join(planted) + "\n")
    make_splits(ds, SplitConfig(sizes=SplitSizes(S_S=120, S_C=40, S_I=40, S_E=60), candidates_file=str(ids),
                                seed=0)).save(tmp_path / "splits.json")
    recipe = {"framework": "simclr", "data": data.model_dump(), "splits": str(tmp_path / "splits.json"),
              "model": {"arch": "resnet9"}, "augment": "mae", "epochs": 60, "batch_size": 64,
              "optim": {"lr": 0.003}}
    # Two encoders per side estimate the expectations over f and g in SSLMem's definition.
    for side in ("f", "g"):
        for seed in (0, 1):
            train(TrainConfig.model_validate({**recipe, "subsets": side, "seed": seed}), tmp_path / f"{side}{seed}",
                  dataset=ds)
    result = run_audit(AuditConfig(f=[str(tmp_path / "f0"), str(tmp_path / "f1")],
                                   g=[str(tmp_path / "g0"), str(tmp_path / "g1")],
                                   splits=str(tmp_path / "splits.json")),
                       dataset=ds)
    points = result.points
    order = points.sort_values("sslmem", ascending=False)["id"].tolist()
    decile = len(points) // 10
    ranks = sorted(order.index(p) + 1 for p in planted)
    assert ranks[-1] <= decile, f"planted points ranked {ranks} of {len(points)}"
    assert points.set_index("id").loc[planted, "requested"].all()

    tests = {(t.name, t.method): t for t in result.summary.tests}
    assert tests[("C>S", "welch_t")].p_value < 0.01
    assert tests[("C>S", "mann_whitney_u")].p_value < 0.01
    means = {k: v.mean for k, v in result.summary.subsets.items()}
    assert means["S_C"] > means["S_S"] > means["S_I"]
    # the at-risk list of the summary starts with planted points
    assert {p["id"] for p in result.summary.top_points[:5]} <= set(planted)
