"""Calibration on controls (memlens.audit.nulls): negative controls find nothing, positive controls are
found at the error rate stated, offsets and ties never favour "memorized"."""

import json

import numpy as np
import pytest
import timm
import torch
from conftest import run, small_train_config
from safetensors.torch import save_file
from scipy import stats
from sklearn.metrics import roc_curve

import memlens
import memlens.dp.training
from memlens.audit import nulls
from memlens.audit.inference import ControlNull, per_image
from memlens.audit.privacy import (
    epsilon_lower_bound,
    epsilon_one_run_fdp_counts,
    guesses_at_threshold,
    tpr_at_fpr,
)
from memlens.config import DataConfig, SplitConfig, SplitSizes
from memlens.data import make_splits

# ----------------------------------------------------------------------------- synthetic designs


def _design(pairs: int, n_pool: int, n_all: int, n_none: int, rng):
    """Membership of a halves design: pool images split by every pair, controls in all / none."""
    e = 2 * pairs
    n = n_pool + n_all + n_none
    member = np.zeros((e, n), dtype=bool)
    for j in range(pairs):
        # pair 0 splits the pool into its first and second half (as S_C / S_I); others at random
        first = np.arange(n_pool) < n_pool // 2 if j == 0 else rng.permutation(n_pool) < n_pool // 2
        member[2 * j, :n_pool], member[2 * j + 1, :n_pool] = first, ~first
    member[:, n_pool:n_pool + n_all] = True
    return member, [(2 * j, 2 * j + 1) for j in range(pairs)]


def _scores(member, rng, *, offset_sd=0.05, effect=None):
    """Alignment-like scores: image difficulty + per-encoder offset + per-(encoder, image) training
    noise, minus ``effect`` where the encoder trained on the image (lower = better fitted)."""
    e, n = member.shape
    values = rng.normal(1.0, 0.2, n)[None, :] + rng.normal(0, offset_sd, (e, 1)) + rng.normal(0, 0.02, (e, n))
    if effect is not None:
        values = values - effect[None, :] * member
    return values


def _audit(values, member, pairs, n_pool, fdr=0.1):
    controls = np.zeros(member.shape[1], bool)
    controls[n_pool:] = True
    centred = nulls.centre_on_controls(values, controls)
    eligible = ~controls
    return per_image(centred, member, pairs, view_var=np.full(member.shape[1], np.nan), fdr=fdr, confidence=0.95,
                     eligible=eligible, null=ControlNull(controls))


@pytest.mark.parametrize("pairs", [1, 2, 4])
def test_a_constant_added_to_one_encoder_changes_nothing(pairs):
    rng = np.random.default_rng(pairs)
    member, pr = _design(pairs, 100, 60, 60, rng)
    values = _scores(member, rng, effect=np.r_[rng.exponential(0.02, 100), np.zeros(120)])
    a = _audit(values, member, pr, 100)
    shifted = values.copy()
    shifted[0] += 0.3  # encoder 0 aligns every image worse
    b = _audit(shifted, member, pr, 100)
    for field in ("mem", "p", "q", "se", "ci_low"):
        np.testing.assert_allclose(getattr(a, field), getattr(b, field), atol=1e-9, equal_nan=True)
    assert (a.at_risk == b.at_risk).all()


@pytest.mark.parametrize("pairs", [1, 2, 4])
def test_no_memorization_lists_nothing_at_the_error_rate_stated(pairs):
    """Global null with per-encoder offsets (the shape of the bug: pair 0's halves are S_C and S_I):
    null p-values uniform in every audit, and the share of audits listing any image at most q."""
    rng = np.random.default_rng(10 + pairs)
    any_listed, below, model_below = 0, [], []
    reps = 60
    for _ in range(reps):
        member, pr = _design(pairs, 100, 100, 100, rng)
        res = _audit(_scores(member, rng, offset_sd=0.05), member, pr, 100)
        p = res.p[:100]
        any_listed += bool(res.at_risk.any())
        below.append(np.mean(p < 0.05))
        if res.p_model is not None and np.isfinite(res.p_model[:100]).any():
            model_below.append(np.mean(res.p_model[:100] < 0.05))
    assert any_listed / reps <= 0.1 + 2 * np.sqrt(0.1 * 0.9 / reps)
    assert abs(np.mean(below) - 0.05) < 0.015
    # each audit's fraction stays in a wide binomial range (the old p-values did not: shared offsets)
    lo, hi = stats.binom.ppf([0.0005, 0.9995], 100, 0.05) / 100
    assert np.mean([(lo <= b <= hi) for b in below]) >= 0.95


def test_planted_memorization_is_found_with_fdp_below_q():
    rng = np.random.default_rng(7)
    fdp, power = [], []
    for _ in range(30):
        member, pr = _design(2, 200, 150, 150, rng)
        effect = np.zeros(member.shape[1])
        planted = rng.choice(200, 20, replace=False)
        effect[planted] = 0.15
        res = _audit(_scores(member, rng, effect=effect), member, pr, 200)
        listed = set(np.flatnonzero(res.at_risk))
        fdp.append(len(listed - set(planted)) / max(len(listed), 1))
        power.append(len(listed & set(planted)) / 20)
    assert np.mean(fdp) <= 0.1 and np.mean(power) >= 0.8


def test_conformal_p_counts_ties_against_memorized():
    assert nulls.conformal_p(np.array([1.0]), np.array([1.0, 1.0, 0.0]))[0] == pytest.approx(3 / 4)
    assert nulls.conformal_p(np.array([2.0]), np.array([1.0, 1.0, 0.0]))[0] == pytest.approx(1 / 4)
    assert np.isnan(nulls.conformal_p(np.array([np.nan]), np.array([1.0]))[0])


# ----------------------------------------------------------------------------- ties in empirical privacy


def test_epsilon_bound_with_ties_equals_explicit_thresholds():
    """RMIA-like scores with many ties: each grid k becomes the threshold "at least the k-th score",
    tied scores guessed together; the bound equals the brute-force best over those explicit thresholds."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 8, 100).astype(float) / 7  # members
    b = rng.integers(0, 8, 100).astype(float) / 7  # non-members: same distribution, no signal
    bound = epsilon_lower_bound(a, b, delta=1e-5, confidence=0.95, strategy="grid")
    scores = np.sort(np.r_[a, b])[::-1]
    ks = sorted({max(1, round(f * 200)) for f in (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)})
    best = 0.0
    for k in ks:
        thr = scores[k - 1]
        guesses = sum(x >= thr for x in np.r_[a, b])
        correct = sum(x >= thr for x in a)
        best = max(best, epsilon_one_run_fdp_counts(200, guesses, correct, significance=0.05 / len(ks),
                                                    delta=1e-5))
    assert bound.epsilon == pytest.approx(best)
    assert guesses_at_threshold(a, b, scores[0]) == (int((a == scores[0]).sum() + (b == scores[0]).sum()),
                                                    int((a == scores[0]).sum()))
    # every score tied: members and non-members cannot be told apart, whatever their order
    same = np.full(100, 0.5)
    for strategy in ("grid", "bonferroni", "top:10"):
        assert epsilon_lower_bound(same, same, delta=1e-5, strategy=strategy).epsilon == 0.0


def test_tpr_at_low_fpr_with_ties_is_read_off_the_interpolated_roc():
    rng = np.random.default_rng(1)
    a = np.r_[np.ones(6), rng.uniform(0, 0.9, 194)]  # 3% of members at the top score 1.0
    b = np.r_[np.ones(3), rng.uniform(0, 0.9, 197)]  # 1.5% of non-members tie with them
    r = tpr_at_fpr(a, b, 0.01)
    f, t, _ = roc_curve(np.r_[np.ones(200), np.zeros(200)], np.r_[a, b], drop_intermediate=False)
    assert r.tpr == pytest.approx(np.interp(0.01, f, t)) and r.tpr == pytest.approx(0.03 * 0.01 / 0.015)


# ----------------------------------------------------------------------------- real negative controls

SIZES = SplitSizes(S_S=200, S_C=100, S_I=100, S_E=100)


@pytest.fixture(scope="module")
def random_pair(tmp_path_factory, digits):
    """Two random-init timm ResNet18s saved to safetensors: nothing trained, so nothing memorized."""
    root = tmp_path_factory.mktemp("null")
    splits = make_splits(digits, SplitConfig(sizes=SIZES, seed=11))
    splits.data = DataConfig(source="digits")
    splits.save(root / "s.json")
    for k, side in enumerate(("f", "g")):
        torch.manual_seed(100 + k)
        rn = timm.create_model("resnet18", num_classes=0)
        save_file({n: t.contiguous() for n, t in rn.state_dict().items()}, str(root / f"{side}.safetensors"))
    return root


def _check_nothing_found(summary, units, points):
    inf = summary.inference
    assert inf["null"]["method"] == "controls" and inf["null"]["controls"] == 300
    assert inf["at_risk"] == 0 and not points["at_risk"].any()
    for t in summary.tests:
        if not t.name.startswith("unitmem"):
            assert not (t.p_holm < 0.01), (t.name, t.method, t.p_holm)
    # LayerMem, offset-free: no layer's candidates above the controls'
    for row in summary.layers:
        assert row.layermem_p_holm is None or not row.layermem_p_holm < 0.01, (row.layer, row.layermem_p_holm)
    # units: flagged only above their own null; on encoders that memorized nothing about alpha of them
    u = summary.units
    assert u["null"] is not None and u["tested"] >= 50 and u["frac_flagged"] <= 0.08, u
    assert units.loc[units.flagged, "unitmem_p"].max() <= 0.05
    cand = points[points.candidate]
    # the candidates' p-values look uniform (the views-only p-values of one pair did not: KS p ~ 1e-4)
    assert np.mean(cand["mem_p"] < 0.05) <= 0.15 and stats.kstest(cand["mem_p"], "uniform").pvalue > 1e-3


def test_random_init_encoders_memorize_nothing(random_pair, tmp_path):
    root = random_pair
    code, out, err = run("audit", "--f", "timm:resnet18", "--f-weights", root / "f.safetensors",
                         "--g", "timm:resnet18", "--g-weights", root / "g.safetensors",
                         "--model-kwargs", '{"num_classes": 0}', "--input-size", "32", "--views", "6",
                         "--splits", root / "s.json", "--out", tmp_path / "a", "--layers", "layer4*")
    assert code == 0, err
    a = memlens.audit.read_audit(tmp_path / "a")
    _check_nothing_found(a.summary, a.units, a.points)
    check = a.summary.inference["null"]["self_check"]
    assert check is not None and check["passed"] and check["n"] == 300
    _recompute_from_signals(tmp_path / "a", a.points)
    # the roles swapped: the encoders' offset now points the other way (the old one-sample "S_C > 0"
    # fired in one order, p = 8e-16, and the views-only p-values listed images in the other)
    spec = lambda side: {"model": "timm:resnet18", "weights": str(root / f"{side}.safetensors"),  # noqa: E731
                         "kwargs": {"num_classes": 0}, "input_size": 32}
    swapped = memlens.audit_encoders(f=spec("g"), g=spec("f"), splits=root / "s.json", views=6, layers=["layer4*"])
    _check_nothing_found(swapped.summary, swapped.units, swapped.points)


def test_encoders_trained_on_identical_data_memorize_nothing(tmp_path, digits):
    """f and g trained on the same images (every training image) with different seeds: no membership
    contrast at all, whatever the splits declare."""
    splits = make_splits(digits, SplitConfig(sizes=SIZES, seed=12))
    splits.save(tmp_path / "s.json")
    specs = {}
    for k, side in enumerate(("f", "g")):
        memlens.dp.training.train_encoder(
            small_train_config(seed=k, splits=str(tmp_path / "s.json"), epochs=3), tmp_path / side,
                         dataset=digits)
        code, out, err = run("export", tmp_path / side, "--to", tmp_path / f"{side}.safetensors")
        assert code == 0, err
        specs[side] = json.loads(out.splitlines()[-1])
    res = memlens.audit_encoders(f=specs["f"], g=specs["g"], splits=tmp_path / "s.json", dataset=digits, views=6,
                        augment="mae")
    _check_nothing_found(res.summary, res.units, res.points)


# ----------------------------------------------------------------------------- LiRA and RMIA calibration


def _seeded_design(rng, *, pairs=2, n_pool=200, n_all=100, n_none=100):
    """Statistics (higher = member) of 2*pairs references sharing a seed in pairs, and of a target of its own
    seed: image effect + a per-(seed, image) effect shared by a pair + noise; no membership effect at all."""
    member, _ = _design(pairs, n_pool, n_all, n_none, rng)
    n = member.shape[1]
    image = rng.normal(0, 1, n)
    seeds = rng.normal(0, 0.5, (pairs + 1, n))  # the last one: the target's seed
    ref = image + np.repeat(seeds[:pairs], 2, axis=0) + rng.normal(0, 0.05, member.shape)
    target = image + seeds[pairs] + rng.normal(0, 0.05, n)
    t_member = np.zeros(n, bool)
    t_member[:n_pool // 2] = True  # half of the pool
    t_member[n_pool:n_pool + n_all] = True  # the shared images
    controls = np.zeros(n, bool)
    controls[n_pool:] = True
    return target, ref, member, t_member, controls, n_pool


def test_lira_widths_from_controls_count_the_targets_seed():
    """References sharing seeds in pairs see each other's seed effect; the target does not. Widths fitted on
    the references alone are too narrow (overconfident z); the target's own spread on control images is not."""
    from memlens.audit import mia

    rng = np.random.default_rng(5)
    # a reference of a K = 4 design attacked by the other pair: its two references share one seed
    target, ref, member, t_member, controls, n_pool = _seeded_design(rng, pairs=1)
    w = mia.control_widths(target, ref, member, t_member, controls)
    assert w is not None and 0.5 < w[1] < 0.9  # the two seeds' spread (0.5 * sqrt(2)) and noise
    outs = np.flatnonzero(~t_member[:n_pool])  # pool images the target did not train on
    z_ctrl = mia.lira(target, ref, member, online=False, widths=w)[outs]
    z_glob = mia.lira(target, ref, member, online=False, variance="global")[outs]
    assert 0.75 < np.std(z_ctrl) < 1.3 and np.std(z_glob) > 3 * np.std(z_ctrl)
    # no membership effect: members and non-members of the target are told apart by chance only
    on = mia.lira(target, ref, member, widths=w)
    auc = stats.mannwhitneyu(on[:n_pool][t_member[:n_pool]], on[:n_pool][~t_member[:n_pool]]).statistic / (
        (n_pool // 2) ** 2)
    assert 0.4 < auc < 0.6


def test_rmia_scores_x_and_its_population_the_same_way():
    from memlens.audit import mia

    rng = np.random.default_rng(6)
    target, ref, member, t_member, controls, n_pool = _seeded_design(rng)
    pool_out = np.flatnonzero(~t_member[:n_pool])
    none = np.flatnonzero(controls & ~t_member)  # in no reference: scored offline only
    base = mia.rmia(target, ref, member, pool_out)
    mixed = mia.rmia(target, ref, member, np.r_[pool_out, none])
    online = member.any(0) & (~member).any(0)
    # an online x is ranked among the online z only: adding offline-scored images to the population changes nothing
    np.testing.assert_allclose(base[online], mixed[online])
    # with no membership effect the target's non-members score uniformly against their own population
    assert abs(np.mean(mixed[pool_out]) - 0.5) < 0.08
    # a is fitted on the references: a value of the grid, the same for the same data
    a = mia.tune_rmia_a(ref, member, ~controls | controls, seed=0)
    assert a in mia.A_GRID and a == mia.tune_rmia_a(ref, member, np.ones(member.shape[1], bool), seed=0)


def _recompute_from_signals(audit_dir, points):
    """points.csv's offset-free estimate and null p-value of every candidate, recomputed by hand from
    signals.parquet (one f/g pair): centre each encoder on its control rows, take g - f, and rank each
    candidate's difference among the controls' (ties against the candidate)."""
    from memlens.audit import read_signals

    sig = read_signals(audit_dir)
    f = sig[sig.role == "f"].set_index("id")
    g = sig[sig.role == "g"].set_index("id")
    ctrl_ids = f.index[f.control]
    diff_raw = g["align"] - f["align"]
    centre = g.loc[ctrl_ids, "align"].mean() - f.loc[ctrl_ids, "align"].mean()
    null = diff_raw.loc[ctrl_ids].to_numpy()
    cand = points[points.candidate].set_index("id")
    assert len(ctrl_ids) == int(points.control.sum()) and len(cand) == 100
    for i, row in cand.iterrows():
        assert row["mem"] == pytest.approx(diff_raw[i] - centre, abs=1e-6)
        p = (1 + np.sum(null >= diff_raw[i] - 1e-12)) / (1 + len(null))
        assert row["mem_p"] == pytest.approx(p, abs=1e-6)

