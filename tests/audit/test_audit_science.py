"""End to end on trained encoders: the audit finds canaries planted to be memorable.

(The SimCLR planted-atypical-points experiment is ``benchmarks/planted_points.py``: 2 minutes of CPU.)"""

import pytest

from memlens.audit import run_audit
from memlens.config import AuditConfig, DataConfig, SplitConfig, SplitSizes, SyntheticConfig, TrainConfig
from memlens.data import load, make_splits
from memlens.dp.training import train_encoder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def canary_world(tmp_path_factory):
    """Synthetic data with 100 natural canaries, a non-private supervised ResNet9 f/g pair and a DP-SGD ViT pair
    at epsilon 1 trained with them, and the audit of each."""
    from memlens.data.canaries import make_canaries, save_canaries

    root = tmp_path_factory.mktemp("canaries")
    data = DataConfig(source="synthetic", synthetic=SyntheticConfig(n=400, n_test=60, image_size=16, classes=10,
                                                                    seed=3))
    ds = load(data)
    splits = make_splits(ds, SplitConfig(sizes=SplitSizes(S_S=120, S_C=30, S_I=30, S_E=60), seed=0))
    splits.data = data
    splits.save(root / "splits.json")
    cset = make_canaries(ds, m=100, kinds=["natural"], seed=0, exclude_ids=set(splits.ids("S_S", "S_C", "S_I", "S_E")))
    save_canaries(cset, root / "canaries")
    recipe = {"framework": "supervised", "data": data.model_dump(), "splits": str(root / "splits.json"),
              "model": {"arch": "resnet9"}, "augment": "none", "epochs": 30, "batch_size": 64,
              "optim": {"lr": 0.003}, "canaries": str(root / "canaries")}
    for side in ("f", "g"):
        train_encoder(TrainConfig.model_validate({**recipe, "subsets": side}), root / side, dataset=ds)
    # DP at epsilon 1 (a ViT: BatchNorm cannot be trained privately), the same canaries; reproducible noise,
    # so the tests below judge one fixed draw (with secret noise the gate's verdict on the CI recipe varied
    # from run to run: a canary AUC of 50 members is within 0.1 of 0.5 only about 95% of the time)
    dp = {**recipe, "model": {"arch": "vit_micro", "depth": 1, "embed_dim": 16, "num_heads": 2}, "epochs": 4,
          "dp": {"epsilon": 1.0, "reproducible": True}}
    for side in ("f", "g"):
        train_encoder(TrainConfig.model_validate({**dp, "subsets": side}), root / f"dp-{side}", dataset=ds)
    audits = {}
    for name, (f, g) in {"plain": ("f", "g"), "dp": ("dp-f", "dp-g")}.items():
        audits[name] = run_audit(AuditConfig(f=[str(root / f)], g=[str(root / g)], splits=str(root / "splits.json"),
                                             views=4, augment="weak"), dataset=ds)
    return root, ds, cset, audits


def test_canaries_are_found_without_dp_and_bounded_with_it(canary_world):
    """Planted canaries end to end: a non-private encoder gives them away (AUC > 0.8, an epsilon lower
    bound above 0 at 95% confidence); a DP-SGD encoder at epsilon 1 keeps the bound within 1.

    The canaries are real images carrying a random class (a supervised canary is a mislabelled
    point); the score is the training loss under f against the reference g's."""
    import json

    from memlens.audit.privacy import epsilon_lower_bound

    root, ds, cset, audits = canary_world
    rec = json.loads((root / "f" / "run.json").read_text())
    assert rec["canaries"]["members_trained"] == len(cset.membership().included)
    result = audits["plain"]
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
    q = audits["dp"].summary.privacy
    assert q["primary_score"] == "loss_ref" and q["claimed_epsilon"] <= 1.0
    assert q["epsilon_lower_bound"]["epsilon"] <= 1.0


def test_ci_recipe_passes_the_dp_encoder_and_fails_the_non_private_one(canary_world, tmp_path):
    """docs/ci/github-actions.yml as a release job runs it, with the default policy: the DP encoder passes
    (its positive control: the non-private audit, whose canaries are found), the non-private one fails."""
    import os
    import sys
    from pathlib import Path

    from test_release import _run_workflow

    root, _, _, audits = canary_world
    audits["plain"].save(tmp_path / "control")
    repo = Path(__file__).resolve().parents[2]
    for enc, expected in (("dp-", 0), ("", 1)):
        work = tmp_path / f"job-{enc or 'plain'}"
        work.mkdir()
        summary = work / "summary.md"
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               "F_ENCODER": str(root / f"{enc}f"), "G_ENCODER": str(root / f"{enc}g"),
               "SPLITS": str(root / "splits.json"), "POLICY": str(repo / "policies" / "default.yaml"),
               "CONTROL": str(tmp_path / "control"), "OUT": "memlens-out", "GITHUB_STEP_SUMMARY": str(summary),
               "AUDIT_ARGS": "--views 4 --augment weak"}
        env.pop("BASELINE", None)
        code, ran = _run_workflow(repo / "docs" / "ci" / "github-actions.yml", env, work)
        assert code == expected, (enc, ran, summary.read_text() if summary.exists() else "")
        text = summary.read_text()
        assert ("memlens gate: PASSED" if expected == 0 else "memlens gate: FAILED") in text
        assert (work / "memlens-out" / "report.pdf").is_file() and (work / "memlens-out" / "gate.json").is_file()
