"""Reference designs: K encoders trained by memlens or elsewhere, audited end to end."""

import json

import numpy as np
import pytest
from conftest import run

from memlens.config import AuditConfig, SplitConfig, SplitSizes, TrainConfig
from memlens.data import make_splits
from memlens.data.references import ReferenceDesign, canary_coins, natural_halves, reference_members
from memlens.errors import MemlensError

# ----------------------------------------------------------------------------- the design


def test_halves_are_balanced_and_pair_zero_is_f_and_g(digits):
    splits = make_splits(digits, SplitConfig(sizes=SplitSizes(S_S=60, S_C=20, S_I=20, S_E=20), seed=3))
    canaries = [f"canary/{k:05d}" for k in range(200)]
    d = ReferenceDesign(k=8, seed=5)
    members = [reference_members(splits, canaries, d, i) for i in range(8)]
    pool = splits.ids("S_C", "S_I")
    counts = {p: sum(p in m[0] for m in members) for p in pool}
    assert set(counts.values()) == {4}  # every pool image in exactly K/2 references
    assert {len(m[0]) for m in members} == {60 + 20}  # as many training images in every reference
    assert all(set(splits.subsets["S_S"]) <= set(m[0]) for m in members)
    assert not any(set(splits.subsets["S_E"]) & set(m[0]) for m in members)
    assert natural_halves(splits, d, 0) == (splits.subsets["S_C"], splits.subsets["S_I"])  # K = 2: f and g
    assert natural_halves(splits, d, 1) != natural_halves(splits, d, 2)
    # canaries: one encoder of each pair, by independent fair coins per pair
    for j in range(4):
        a, b = set(members[2 * j][1]), set(members[2 * j + 1][1])
        assert a.isdisjoint(b) and a | b == set(canaries)
    coins = np.stack([canary_coins(canaries, d, j) for j in range(4)])
    assert abs(coins.mean() - 0.5) < 0.05 and abs(np.corrcoef(coins)[0, 1]) < 0.2
    with pytest.raises(MemlensError, match="even number"):
        ReferenceDesign(k=3)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def refs(tmp_path_factory, digits):
    """K = 4 references of a tiny MAE on digits (with 40 canaries), and f/g trained alike."""
    from memlens.data.canaries import make_canaries, save_canaries
    from memlens.dp.training import train_encoder

    root = tmp_path_factory.mktemp("refs")
    splits = make_splits(digits, SplitConfig(sizes=SplitSizes(S_S=60, S_C=30, S_I=30, S_E=30), seed=1))
    splits.save(root / "s.json")
    cset = make_canaries(digits, m=40, kinds=["natural"], seed=2,
                         exclude_ids=set(splits.ids("S_S", "S_C", "S_I", "S_E")))
    save_canaries(cset, root / "canaries")
    base = {"framework": "mae", "splits": str(root / "s.json"), "epochs": 3, "batch_size": 32,
            "model": {"arch": "vit_micro", "depth": 1, "embed_dim": 16, "num_heads": 2}, "mae": {"decoder_dim": 16},
            "canaries": str(root / "canaries")}
    for i in range(4):
        cfg = TrainConfig.model_validate({**base, "seed": i // 2, "reference": {"index": i, "k": 4, "seed": 7}})
        train_encoder(cfg, root / f"ref-{i}", dataset=digits)
    nocan = {k: v for k, v in base.items() if k != "canaries"}
    for side in ("f", "g"):
        train_encoder(TrainConfig.model_validate({**nocan, "subsets": side}), root / side, dataset=digits)
    for i in range(2):
        cfg = TrainConfig.model_validate({**nocan, "reference": {"index": i, "k": 2, "seed": 7}})
        train_encoder(cfg, root / f"pair-{i}", dataset=digits)
    train_encoder(TrainConfig.model_validate({**base, "subsets": "all", "seed": 9}), root / "release", dataset=digits)
    return root


def test_k2_complementary_halves_is_the_f_and_g_audit(refs, digits):
    """Pair 0 of the default pool is (S_C, S_I): with the same seed its two references are f and g
    exactly, and the reference audit gives the f/g audit's per-image scores (out - in)."""
    from memlens.audit import run_audit
    from memlens.train.run import load_encoder

    wf, wr = load_encoder(refs / "f").state_dict(), load_encoder(refs / "pair-0").state_dict()
    assert all(np.array_equal(wf[k].numpy(), wr[k].numpy()) for k in wf)
    common = dict(splits=str(refs / "s.json"), views=4)
    fg = run_audit(AuditConfig(f=[str(refs / "f")], g=[str(refs / "g")], **common), dataset=digits).points
    rr = run_audit(AuditConfig(references=[str(refs / "pair-1"), str(refs / "pair-0")], **common),
                   dataset=digits).points
    fg, rr = fg.set_index("id"), rr.set_index("id").loc[fg["id"]]
    c = fg.subset == "S_C"
    assert np.allclose(rr.loc[c.values, "sslmem"], fg.loc[c, "sslmem"])
    assert np.allclose(rr.loc[c.values, "mem_p"], fg.loc[c, "mem_p"])
    i = fg.subset == "S_I"  # in g: memorization = align_f - align_g
    assert np.allclose(rr.loc[i.values, "sslmem"], -fg.loc[i, "sslmem"])
    assert rr.loc[(fg.subset.isin(["S_S", "S_E"])).values, "sslmem"].isna().all()
    # one pair: the loss estimate has no spread over seeds of its own; its p-values come from the
    # control images (S_S, S_E) scored under the same labelling, the same as under f and g
    assert rr.loc[c.values, "lossmem"].notna().all() and rr.loc[c.values, "lossmem_p"].between(0, 1).all()
    assert np.allclose(rr.loc[c.values, "lossmem_p"], fg.loc[c, "lossmem_p"])
    assert rr.loc[~c.values & ~i.values, "lossmem_p"].isna().all()


def test_reference_audit_counts_training_randomness(refs, digits, tmp_path):
    from memlens.audit import read_audit, run_audit, write_audit

    res = run_audit(AuditConfig(references=[str(refs / f"ref-{i}") for i in (3, 1, 0, 2)], splits=str(refs / "s.json"),
                                views=4), dataset=digits)
    s = res.summary
    assert s.design["kind"] == "references" and s.design["pairs"] == 2 and s.design["pool_images"] == 60
    assert s.inference["training_randomness_counted"] and s.inference["pairs"] == 2
    pts = res.points
    pool = pts[pts.candidate]
    assert set(pool.subset) == {"S_C", "S_I"} and len(pool) == 60
    assert (pool.mem_ci_low <= pool.sslmem).all() and (pool.sslmem <= pool.mem_ci_high).all()
    assert s.reliability_encoders["pairs"] == 2 and -1 <= s.reliability_encoders["split_half_r"] <= 1
    # the same estimator on MAE's reconstruction loss: out minus in of each encoder's loss centred on
    # its control images (S_S, S_E), recomputed here by hand from the saved per-encoder signals
    write_audit(res, tmp_path / "sig")
    from memlens.audit import read_signals

    sig = read_signals(tmp_path / "sig")
    ids = list(pts["id"])
    by = {(r.encoder_index, r.id): r for r in sig.itertuples()}
    enc = sorted(sig.encoder_index.unique())
    ctrl_ids = [i for i, c in zip(pts["id"], pts["control"], strict=True) if c]
    assert ctrl_ids and set(pts.loc[pts.control, "subset"]) == {"S_S", "S_E"}
    centre = {e: np.mean([by[(e, i)].loss for i in ctrl_ids]) for e in enc}
    for row in pool.itertuples():
        ins = [by[(e, row.id)].loss - centre[e] for e in enc if by[(e, row.id)].member]
        outs = [by[(e, row.id)].loss - centre[e] for e in enc if not by[(e, row.id)].member]
        assert row.lossmem == pytest.approx(np.mean(outs) - np.mean(ins), abs=1e-6)
    assert len(ids) == len(set(ids))
    assert (pool.lossmem_ci_low <= pool.lossmem).all() and pool.lossmem_q.notna().all()
    lm = s.loss_memorization
    assert lm["loss"] == "MAE reconstruction loss" and lm["reliability_encoders"]["pairs"] == 2
    assert lm["inference"]["at_risk"] == int(pool.lossmem_at_risk.sum()) == len(lm["at_risk_points"])
    assert pts.loc[~pts.candidate, "lossmem"].isna().all()
    # privacy: each reference the target in turn, against the other pair's references
    p = s.privacy
    assert p["design"] == "references" and p["references_per_target"] == [2, 2, 2, 2]
    assert p["primary_score"] == "rmia_loss" and {"lira_align", "lira_loss", "loss_ref"} <= set(
        p["canaries"]["metrics"])
    assert p["canaries"]["n_in"] == p["canaries"]["n_out"] == 80  # 40 canaries x 4 targets, half in each
    assert p["epsilon_lower_bound"]["targets"] == 4
    table = res.canaries
    assert len(table) == 160 and {"target", "included", "score_lira_loss"} <= set(table.columns)
    write_audit(res, tmp_path / "a")
    assert read_audit(tmp_path / "a").summary.design["pairs"] == 2
    # the report's first page gives both at-risk counts and both reliabilities
    from memlens.reports import build_context, render_html

    html = render_html(build_context([read_audit(tmp_path / "a")], redact=True))
    n_align, n_loss = s.inference["at_risk"], lm["inference"]["at_risk"]
    assert f"{n_align} of 60 images are memorized at a false discovery rate of 0.1" in html
    assert f"By the training loss (MAE reconstruction loss): {n_loss} of 60 images memorized" in html
    assert "over encoders (two halves of the 2 pairs" in html and "By the training loss" in html
    # the retrain reliability comes before any list, and the calibration self-check is on the first page
    section = html[html.index("Training images most at risk"):]
    assert section.index("over encoders (two halves") < section.index("memorized at a false discovery rate")
    assert "Calibration self-check on 90 control images (60 in every encoder, 30 in none)" in html
    # what a reviewer stopped at: the RMIA score explained, pairs named as such, counts as integers,
    # the references listed as references, no f/g rows
    import re

    assert "so +1.0000 means it beat every one of them" in html and "encoder of one pair" in html
    assert not re.search(r"\d\.0 of \d", html) and "reference encoders (4, each on the shared images" in html
    assert "encoders f (trained with S_C)" not in html
    assert str(tmp_path) not in html and "/tmp/" not in html  # no absolute path of the auditor's machine
    # a target: the release candidate, attacked with all references
    tgt = run_audit(AuditConfig(references=[str(refs / f"ref-{i}") for i in range(4)], target=str(refs / "release"),
                                splits=str(refs / "s.json"), views=4), dataset=digits)
    tp = tgt.points
    assert tp["target_member"].sum() == (tp.subset != "S_E").sum()
    assert {"target_lira_loss", "target_rmia_align", "target_align"} <= set(tp.columns)
    assert tgt.summary.privacy["targets"] == ["release"] and tgt.summary.model["units_encoder"] == "release"
    with pytest.raises(MemlensError, match="not whole pairs of the design of 4: missing \\[3\\]"):
        run_audit(AuditConfig(references=[str(refs / f"ref-{i}") for i in range(3)], splits=str(refs / "s.json"),
                              views=4), dataset=digits)


def test_references_trained_elsewhere_audit_like_runs(refs, digits, tmp_path):
    """The K = 4 references exported as plain weight files and declared against a design written by memlens
    design (as a team training with its own code would): the same per-image numbers as auditing the runs; the
    release candidate audited as itself from its weights (CLI --target/--target-weights, and the API)."""
    import memlens
    from memlens.audit import run_audit
    from memlens.train.export import export_run

    code, out, err = run("design", "--splits", refs / "s.json", "--k", "4", "--seed", "7", "--canaries",
                         refs / "canaries", "--out", tmp_path / "design")
    assert code == 0, err
    lists = [(tmp_path / "design" / f"ref-{i:02d}.txt").read_text().split() for i in range(4)]
    assert all(lists) and lists[0] != lists[1]
    specs = []
    for i in (2, 0, 3, 1):  # any order: each spec says which list it trained on
        spec = export_run(refs / f"ref-{i}", tmp_path / f"ref-{i}.safetensors")
        specs.append({**spec, "reference": i, "name": f"ref-{i}"})
    common = dict(splits=str(refs / "s.json"), views=4, canaries=str(refs / "canaries"))
    as_runs = run_audit(AuditConfig(references=[str(refs / f"ref-{i}") for i in range(4)], **common),
                        dataset=digits).points.set_index("id")
    ext = memlens.audit_encoders(references=specs, design=tmp_path / "design", dataset=digits, augment="mae",
                        **common).points.set_index("id").loc[as_runs.index]
    # (the exported encoders carry no MAE decoder, so the loss-based columns exist for the runs only)
    for col in ("align_in", "align_out", "sslmem", "mem", "mem_se", "mem_p", "mem_q", "at_risk"):
        np.testing.assert_allclose(ext[col].to_numpy(float), as_runs[col].to_numpy(float), atol=1e-9,
                                   equal_nan=True, err_msg=col)
    # the declaration is what the audit relies on: a reference declared on another list gives other numbers
    wrong = [dict(s) for s in specs]
    wrong[0]["reference"], wrong[1]["reference"] = wrong[1]["reference"], wrong[0]["reference"]
    bad = memlens.audit_encoders(references=wrong, design=tmp_path / "design", dataset=digits, augment="mae", **common)
    assert not np.allclose(bad.points.set_index("id").loc[as_runs.index, "mem"].to_numpy(float),
                           as_runs["mem"].to_numpy(float), equal_nan=True)
    # the release candidate as itself, from its weights
    target = export_run(refs / "release", tmp_path / "release.safetensors")
    ordered = sorted(specs, key=lambda s: s["reference"])
    cli = ["audit", "--design", tmp_path / "design", *[x for s in ordered for x in ("--references", s["model"])],
           *[x for s in ordered for x in ("--reference-weights", s["weights"])],
           "--model-kwargs", json.dumps(specs[0]["kwargs"]), "--input-size", str(specs[0]["input_size"]),
           "--mean", ",".join(map(str, specs[0]["mean"])), "--std", ",".join(map(str, specs[0]["std"])),
           "--target", target["model"], "--target-weights", target["weights"],
           "--config", _digits_yaml(tmp_path, refs / "s.json"), "--views", "4", "--augment", "mae",
           "--out", tmp_path / "audit"]
    code, out, err = run(*cli)
    assert code == 2 and "give the same set to the audit" in err  # the design planted canaries
    code, out, err = run(*cli, "--canaries", refs / "canaries")
    assert code == 0, err
    from memlens.audit import read_audit

    a = read_audit(tmp_path / "audit")
    assert a.summary.design["target"] and "target_member" in a.points and a.points.target_member.any()
    assert a.summary.privacy["targets"] == [a.summary.design["target"]]
    # the same from Python: references, target and design
    api = memlens.audit_encoders(references=specs, target={**target, "name": "release"}, design=tmp_path / "design",
                        dataset=digits, augment="mae", **common)
    assert api.summary.design["target"] == "release"
    np.testing.assert_allclose(api.points.set_index("id").loc[a.points["id"], "target_align"].to_numpy(),
                               a.points["target_align"].to_numpy(), rtol=1e-5)  # the CSV keeps 6 digits


def _digits_yaml(tmp_path, splits):
    """An audit config naming the bundled digits (the CLI's --data takes a path)."""
    path = tmp_path / "audit.yaml"
    path.write_text(f"splits: {splits}\ndata: {{source: digits}}\n")
    return path

