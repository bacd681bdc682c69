"""End to end on trained encoders: the audit finds canaries planted to be memorable.

(The SimCLR planted-atypical-points experiment is ``benchmarks/planted_points.py``: 2 minutes of CPU.)"""

import pytest

from memlens.audit import run_audit
from memlens.config import AuditConfig, DataConfig, SplitConfig, SplitSizes, SyntheticConfig, TrainConfig
from memlens.data import load, make_splits
from memlens.dp import train

pytestmark = pytest.mark.slow


def test_canaries_are_found_without_dp_and_bounded_with_it(tmp_path):
    """Planted canaries end to end: a non-private encoder gives them away (AUC > 0.8, an epsilon lower
    bound above 0 at 95% confidence); a DP-SGD encoder at epsilon 1 keeps the bound within 1.

    The canaries are real images carrying a random class (a supervised canary is a mislabelled
    point); the score is the training loss under f against the reference g's."""
    import json

    from memlens.audit.privacy import epsilon_lower_bound
    from memlens.data.canaries import make_canaries, save_canaries

    data = DataConfig(source="synthetic", synthetic=SyntheticConfig(n=400, n_test=60, image_size=16, classes=10,
                                                                    seed=3))
    ds = load(data)
    splits = make_splits(ds, SplitConfig(sizes=SplitSizes(S_S=120, S_C=30, S_I=30, S_E=60), seed=0))
    splits.save(tmp_path / "splits.json")
    cset = make_canaries(ds, m=100, kinds=["natural"], seed=0, exclude_ids=set(splits.ids("S_S", "S_C", "S_I", "S_E")))
    save_canaries(cset, tmp_path / "canaries")
    recipe = {"framework": "supervised", "data": data.model_dump(), "splits": str(tmp_path / "splits.json"),
              "model": {"arch": "resnet9"}, "augment": "none", "epochs": 30, "batch_size": 64,
              "optim": {"lr": 0.003}, "canaries": str(tmp_path / "canaries")}
    for side in ("f", "g"):
        train(TrainConfig.model_validate({**recipe, "subsets": side}), tmp_path / side, dataset=ds)
    rec = json.loads((tmp_path / "f" / "run.json").read_text())
    assert rec["canaries"]["members_trained"] == len(cset.membership().included)
    result = run_audit(AuditConfig(f=[str(tmp_path / "f")], g=[str(tmp_path / "g")],
                                   splits=str(tmp_path / "splits.json"), views=4, augment="weak"), dataset=ds)
    p = result.summary.privacy
    m = p["canaries"]["metrics"]["loss_ref"]
    assert p["primary_score"] == "loss_ref" and m["auc"] > 0.8 and m["mann_whitney_p"] < 0.05
    assert p["epsilon_lower_bound"]["epsilon"] > 0 and p["claimed_epsilon"] is None
    table = result.canaries
    assert len(table) == 100 and set(table.columns) >= {"id", "kind", "included", "score_sslmem", "score_neg_align_f",
                                                        "score_loss_ref", "score_neg_loss_f"}
    # anyone can recompute the bound from the table
    again = epsilon_lower_bound(table.loc[table.included, "score_loss_ref"],
                                table.loc[~table.included, "score_loss_ref"], delta=p["delta"])
    assert again.epsilon == pytest.approx(p["epsilon_lower_bound"]["epsilon"], rel=1e-6)

    # DP at epsilon 1 (a ViT: BatchNorm cannot be trained privately), the same canaries
    dp = {**recipe, "model": {"arch": "vit_micro", "depth": 1, "embed_dim": 16, "num_heads": 2}, "epochs": 4,
          "dp": {"epsilon": 1.0}}
    for side in ("f", "g"):
        train(TrainConfig.model_validate({**dp, "subsets": side}), tmp_path / f"dp-{side}", dataset=ds)
    dp_res = run_audit(AuditConfig(f=[str(tmp_path / "dp-f")], g=[str(tmp_path / "dp-g")],
                                   splits=str(tmp_path / "splits.json"), views=4, augment="weak"), dataset=ds)
    q = dp_res.summary.privacy
    assert q["primary_score"] == "loss_ref" and q["claimed_epsilon"] <= 1.0
    assert q["epsilon_lower_bound"]["epsilon"] <= 1.0
