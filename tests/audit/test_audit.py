"""The audit engine end to end, checked against independent recomputations."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from memlens.audit import read_audit, run_audit, write_audit
from memlens.audit.classmem import classmem
from memlens.audit.unitmem import unitmem
from memlens.cli import app
from memlens.config import AuditConfig, EncoderSpec, SplitConfig, SplitSizes, TrainConfig
from memlens.data import Augmenter, Splits, make_splits
from memlens.errors import MemlensError
from memlens.rng import RowStreams, derive_seed
from memlens.train import load_encoder, train_loop

RECIPE = {"framework": "mae", "epochs": 1, "batch_size": 64, "model": {"arch": "vit_micro", "depth": 2,
                                                                       "embed_dim": 32},
          "mae": {"decoder_dim": 32}}


@pytest.fixture(scope="module")
def pair(tmp_path_factory, digits):
    root = tmp_path_factory.mktemp("pair")
    make_splits(digits, SplitConfig(sizes=SplitSizes(S_S=120, S_C=40, S_I=40, S_E=40), seed=3)).save(root / "s.json")
    for side in ("f", "g"):
        cfg = TrainConfig.model_validate({**RECIPE, "splits": str(root / "s.json"), "subsets": side})
        train_loop(cfg, root / side, dataset=digits)
    cfg = TrainConfig.model_validate({**RECIPE, "splits": str(root / "s.json"), "subsets": "f", "seed": 5})
    train_loop(cfg, root / "f5", dataset=digits)
    # 4 views per point, and UnitMem on the same 4 views: the single-pass configuration
    audit_cfg = AuditConfig(f=[str(root / "f")], g=[str(root / "g")], splits=str(root / "s.json"), views=4,
                            batch_points=16, bootstrap=500, reliability={"bootstrap": 50})
    return root, audit_cfg, run_audit(audit_cfg, dataset=digits)


def _views(cfg, digits, ids, n_views, aug_name="mae"):
    """Each point's views, drawn from its own key as the engine documents (not batch positions)."""
    enc = load_encoder(cfg.f[0].model)
    aug = Augmenter(aug_name, mean=enc.normalization[0], std=enc.normalization[1])
    keys = [derive_seed(cfg.seed, "view", aug_name, i, j) for i in ids for j in range(n_views)]
    images = torch.from_numpy(digits.images[digits.indices(ids)])
    return aug.views(images, n_views, RowStreams(keys))


def _order(cfg, digits):
    """The engine's point order (S_C, S_S, S_I, S_E), rebuilt from the splits."""
    splits = Splits.load(cfg.splits, digits)
    return [i for name in ("S_C", "S_S", "S_I", "S_E") for i in splits.subsets[name]]


def _all_pairs_l2(z):
    """(points, views, D) -> mean normalised-l2 distance over all pairs of distinct views, by double loop."""
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    v = z.shape[1]
    d = [np.linalg.norm(z[:, i] - z[:, j], axis=-1) for i in range(v) for j in range(i + 1, v)]
    return np.mean(d, axis=0)


def test_sslmem_matches_an_independent_computation(pair, digits):
    root, cfg, result = pair
    ids = _order(cfg, digits)[:48]
    f, g = load_encoder(cfg.f[0].model), load_encoder(cfg.g[0].model)
    with torch.no_grad():
        v = _views(cfg, digits, ids, 4)
        zf = f.forward_features(v).reshape(48, 4, -1).double().numpy()
        zg = g.forward_features(v).reshape(48, 4, -1).double().numpy()
    pts = result.points.set_index("id")
    assert np.allclose(pts.loc[ids, "align_f"], _all_pairs_l2(zf), atol=1e-5)
    assert np.allclose(pts.loc[ids, "align_g"], _all_pairs_l2(zg), atol=1e-5)
    assert np.allclose(pts["sslmem"], pts["align_g"] - pts["align_f"])
    span = pts["sslmem"].max() - pts["sslmem"].min()
    assert np.allclose(pts["sslmem_range_norm"], pts["sslmem"] / span)
    assert np.allclose(pts["sslmem_sym_norm"], (pts["align_g"] - pts["align_f"]) / (pts["align_f"] + pts["align_g"]))
    # the papers' disjoint pairs (v1, v2), (v3, v4) on the same views
    disjoint = run_audit(cfg.model_copy(update={"pairing": "disjoint"}), dataset=digits).points.set_index("id")
    zn = zf / np.linalg.norm(zf, axis=-1, keepdims=True)
    expected = (np.linalg.norm(zn[:, 0] - zn[:, 1], axis=-1) + np.linalg.norm(zn[:, 2] - zn[:, 3], axis=-1)) / 2
    assert np.allclose(disjoint.loc[ids, "align_f"], expected, atol=1e-5)


def test_scores_do_not_depend_on_batching_or_order(pair, digits):
    root, cfg, result = pair
    other = run_audit(cfg.model_copy(update={"batch_points": 7}), dataset=digits)
    assert np.array_equal(other.points["sslmem"].to_numpy(), result.points["sslmem"].to_numpy())
    assert np.allclose(other.units["unitmem"], result.units["unitmem"], equal_nan=True, atol=1e-9)
    assert (other.units["argmax_id"].fillna("") == result.units["argmax_id"].fillna("")).all()


def test_layer_and_unit_metrics_match_an_independent_computation(pair, digits):
    root, cfg, result = pair
    ids = _order(cfg, digits)[:40]  # the candidates come first
    f, g = load_encoder(cfg.f[0].model), load_encoder(cfg.g[0].model)
    layer = "blocks.1.mlp.act"
    outs = {"f": [], "g": []}
    hooks = [enc.get_submodule(layer).register_forward_hook(lambda m, i, o, s=s: outs[s].append(o.detach()))
             for s, enc in (("f", f), ("g", g))]
    with torch.no_grad():
        v = _views(cfg, digits, ids, 4)
        f.forward_features(v)
        g.forward_features(v)
    for h in hooks:
        h.remove()
    of, og = outs["f"][0].double().numpy(), outs["g"][0].double().numpy()  # 40 points x 4 views
    af = _all_pairs_l2(of.reshape(40, 4, -1))
    ag = _all_pairs_l2(og.reshape(40, 4, -1))
    row = result.layers.set_index("layer").loc[layer]
    assert row["layermem"] == pytest.approx(np.mean((ag - af) / (af + ag)), abs=1e-5)
    # UnitMem and ClassMem of the GELU layer on D' = S_C: each activation clamped at 0, then the
    # mean over views and tokens
    mu = torch.from_numpy(np.clip(of, 0, None).reshape(40, 4, of.shape[1], -1).mean(axis=(1, 2)))
    ref = unitmem(mu, min_activation=0.01)
    units = result.units[result.units.layer == layer].sort_values("unit")
    assert np.allclose(units["unitmem"], ref.unitmem.numpy(), atol=1e-5, equal_nan=True)
    assert np.allclose(units["mu_max"], ref.mu_max.numpy(), atol=1e-5)
    assert list(units["argmax_id"].fillna("")) == [ids[i] if i >= 0 else "" for i in ref.argmax.tolist()]
    assert np.allclose(units["active_frac"], (mu > 0.01).double().mean(0).numpy())
    labels = torch.from_numpy(digits.labels[digits.indices(ids)])
    assert np.allclose(units["classmem"], classmem(mu, labels, min_activation=0.01).numpy(), atol=1e-5,
                       equal_nan=True)
    # signed layers (attention output) are not measured as units by default
    assert set(result.units["layer"]) == {"blocks.0.mlp.act", "blocks.1.mlp.act"}


def test_outputs_and_schema(pair, tmp_path):
    root, cfg, result = pair
    out = write_audit(result, tmp_path / "audit")
    a = read_audit(out)
    assert list(a.points.columns) == ["id", "subset", "label", "candidate", "align_f", "align_g", "sslmem",
                                      "sslmem_range_norm", "sslmem_sym_norm", "mem", "mem_se", "mem_ci_low",
                                      "mem_ci_high", "mem_p", "mem_q", "mem_p_model", "at_risk", "control", "loss_f",
                                      "loss_g", "lossmem", "lossmem_se", "lossmem_ci_low", "lossmem_ci_high",
                                      "lossmem_p", "lossmem_q", "lossmem_p_model", "lossmem_at_risk", "rank",
                                      "requested", "topk_freq"]
    # one pair: p-values from the control images (they carry the training noise); intervals cover the views only
    inf = a.summary.inference
    assert inf["training_randomness_counted"] and not inf["interval_counts_training"]
    assert "views' jackknife only" in inf["method"] and inf["null"]["controls"] == 160
    cand = a.points[a.points.candidate]
    assert (cand.subset == "S_C").all() and len(cand) == 40 and cand["mem_p"].between(0, 1).all()
    assert a.points.loc[~a.points.candidate, "mem_q"].isna().all()
    assert set(a.points.loc[a.points.control, "subset"]) == {"S_S", "S_E"}
    # MAE runs keep their decoder: the reconstruction loss on fixed masks under f and under g
    assert (a.points["loss_f"] > 0).all() and (a.points["loss_g"] > 0).all()
    # loss memorization of a candidate (in f, out of g): loss out minus loss in, less the same difference on the
    # control images (offset-free); its p-value ranks it among the controls' differences (table: 5-6 digits)
    ctrl = a.points[a.points.control]
    offset = (ctrl["loss_g"] - ctrl["loss_f"]).mean()
    np.testing.assert_allclose(cand["lossmem"], cand["loss_g"] - cand["loss_f"] - offset, atol=2e-5)
    null = (ctrl["loss_g"] - ctrl["loss_f"]).to_numpy()
    expect = [(1 + (null >= x - 1e-5).sum()) / (1 + len(null)) for x in cand["loss_g"] - cand["loss_f"]]
    np.testing.assert_allclose(cand["lossmem_p"], expect, atol=1 / len(null) + 1e-9)
    assert a.summary.privacy["primary_score"] == "loss_ref" and "natural" in a.summary.privacy
    assert len(a.points) == 240 and a.points.groupby("subset").size().to_dict() == {"S_C": 40, "S_E": 40,
                                                                                   "S_I": 40, "S_S": 120}
    assert list(a.layers.columns[:2]) == ["layer", "kind"] and {"layermem", "delta_layermem", "layermem_top",
                                                                "layermem_least"} <= set(a.layers.columns)
    assert len(a.layers) == len(load_encoder(cfg.f[0].model).layer_specs())
    assert list(a.units.columns) == ["layer", "unit", "unitmem", "mu_max", "mu_rest", "argmax_id", "active_frac",
                                     "classmem", "unitmem_p", "flagged"]
    ranked = a.units.dropna(subset=["unitmem"])
    assert ranked["unitmem_p"].between(1 / 201 - 1e-6, 1).all()
    assert (a.units.flagged == (a.units.unitmem_p <= 0.05)).all()
    assert a.summary.units["null"]["members"] == 40 and a.summary.units["tested"] == len(ranked)
    assert len(a.units) == a.summary.model["units_total"]
    assert list(a.tests.columns[:6]) == ["name", "hypothesis", "statistic", "p_value", "effect_size", "method"]
    assert {"C>S", "C>E", "S>I", "E>I", "C>ctrl", "I<ctrl", "C>ctrl[loss]"} == set(a.tests["name"]) - {
        n for n in a.tests["name"] if n.startswith("unitmem")}
    s = a.summary
    assert s.encoders[0].side == "f" and len(s.encoders[0].weights_sha256) == 64 and s.splits["hash"]
    assert s.reliability["views"] == 4 and -1 <= s.reliability["split_half_r"] <= 1
    assert 0 <= s.reliability["topk_overlap_mean"] <= 1
    assert s.views.model_dump() == {"count": 4, "pairing": "all", "auto": False, "pairs_per_point": 6}
    assert s.vit_blocks and s.vit_blocks[1]["delta_attention"] == pytest.approx(
        s.vit_blocks[1]["attention"] - s.vit_blocks[0]["resblock_mlp"])
    assert (a.points[a.points.subset == "S_C"].sort_values("rank")["sslmem"].diff().dropna() <= 0).all()
    # written atomically: no temporary directories left next to it
    assert [p.name for p in tmp_path.iterdir()] == ["audit"]
    with pytest.raises(MemlensError, match="already holds an audit; pass --force"):
        write_audit(result, out)
    write_audit(result, out, force=True)


def test_same_seed_same_scores(pair, digits):
    root, cfg, result = pair
    again = run_audit(cfg, dataset=digits)
    assert again.points["sslmem"].tolist() == result.points["sslmem"].tolist()
    assert again.units["unitmem"].equals(result.units["unitmem"])
    other = run_audit(cfg.model_copy(update={"seed": 1}), dataset=digits)
    assert other.points["sslmem"].tolist() != result.points["sslmem"].tolist()


def test_several_f_runs_and_seed_consistency(pair, digits):
    root, cfg, result = pair
    two = run_audit(cfg.model_copy(update={"f": [EncoderSpec(model=str(root / "f")),
                                                 EncoderSpec(model=str(root / "f5"))]}), dataset=digits)
    single_f5 = run_audit(cfg.model_copy(update={"f": [EncoderSpec(model=str(root / "f5"))]}), dataset=digits)
    # the expectation over encoders: align_f is the mean of the two runs' alignments on the same views
    assert np.allclose(two.points["align_f"], (result.points["align_f"] + single_f5.points["align_f"]) / 2)
    assert len(two.summary.consistency["seeds"]) == 1


def test_unitmem_with_unaugmented_views_and_median(pair, digits):
    root, cfg, _ = pair
    changed = AuditConfig.model_validate({**cfg.model_dump(), "unitmem": {"augment": "none", "views": 1,
                                                                          "rest": "median"}})
    r = run_audit(changed, dataset=digits)
    assert r.summary.timings["unit_pass"] > 0 and r.units["unitmem"].dropna().between(0, 1).all()
    # unaugmented views: recompute one layer's UnitMem from plain forward passes over D' = S_C
    splits = Splits.load(cfg.splits, digits)
    f = load_encoder(cfg.f[0].model)
    layer = "blocks.0.mlp.act"
    seen = []
    h = f.get_submodule(layer).register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    aug = Augmenter("none", mean=f.normalization[0], std=f.normalization[1])
    with torch.no_grad():
        f.forward_features(aug(torch.from_numpy(digits.images[digits.indices(splits.subsets["S_C"])]), None))
    h.remove()
    ref = unitmem(seen[0].clamp_min(0).mean(dim=1), rest="median", min_activation=0.01)
    units = r.units[r.units.layer == layer].sort_values("unit")
    assert np.allclose(units["unitmem"], ref.unitmem.numpy(), atol=1e-5, equal_nan=True)


def test_mismatched_runs_are_refused(pair, digits, tmp_path):
    root, cfg, _ = pair
    with pytest.raises(MemlensError, match=r"trained on S_S\+S_I, but a f run must be trained on S_S\+S_C"):
        run_audit(cfg.model_copy(update={"f": cfg.g, "g": cfg.f}), dataset=digits)
    other = TrainConfig.model_validate({**RECIPE, "epochs": 2, "splits": cfg.splits, "subsets": "g"})
    train_loop(other, tmp_path / "g2", dataset=digits)
    with pytest.raises(MemlensError, match=r"differ in their recipe \(epochs: 1 vs 2\)"):
        run_audit(cfg.model_copy(update={"g": [EncoderSpec(model=str(tmp_path / "g2"))]}), dataset=digits)
    other = make_splits(digits, SplitConfig(sizes=SplitSizes(S_S=120, S_C=40, S_I=40, S_E=40), seed=9))
    other.save(tmp_path / "o.json")
    with pytest.raises(MemlensError, match="trained with other splits"):
        run_audit(cfg.model_copy(update={"splits": str(tmp_path / "o.json")}), dataset=digits)


def test_audit_cli(pair, tmp_path):
    root, cfg, _ = pair
    runner = CliRunner()
    args = ["audit", "--f", cfg.f[0].model, "--g", cfg.g[0].model, "--splits", cfg.splits, "--out",
            str(tmp_path / "a")]
    r = runner.invoke(app, args + ["--views", "4", "--distance", "cosine"])
    assert r.exit_code == 0, r.stderr
    assert "S_C: mean SSLMem" in r.stdout and (tmp_path / "a" / "units.csv").is_file()
    assert json.loads((tmp_path / "a" / "audit.json").read_text())["settings"]["distance"] == "cosine"
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "already holds an audit" in r.stderr
    r = runner.invoke(app, args[:-2] + ["--out", str(tmp_path / "b"), "--distance", "manhattan"])
    assert r.exit_code == 2 and "'l2', 'l1', 'cosine' or 'angular'" in r.stderr


def test_views_auto_adds_views_until_reliable_or_budget(pair, digits):
    root, cfg, _ = pair
    auto = cfg.model_copy(update={"views": "auto", "reliability": cfg.reliability.model_copy(
        update={"target": 0.99, "max_views": 16})})
    r = run_audit(auto, dataset=digits)
    hist = r.summary.reliability["history"]
    assert hist[0]["views"] == 10 and r.summary.views["auto"]
    # an unreachable target: views grow to the budget and stop there
    assert hist[-1]["views"] == 16 and r.summary.views["count"] == 16 and len(hist) == 2
    # the first views of a point are the same whatever the total: the 10-view pass is a prefix
    assert r.summary.reliability["views"] == 16
