"""The audit's pure metric functions against values computed by hand."""

import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from memlens.audit.alignment import alignment_loss, pair_distance, pairwise_distances
from memlens.audit.classmem import ClassMemAccumulator, classmem
from memlens.audit.layermem import delta_layermem, layermem, vit_block_table
from memlens.audit.sslmem import in_out_means, range_normalize, sslmem, symmetric_normalize
from memlens.audit.stats import (
    bootstrap_ci,
    cohens_d,
    holm,
    mann_whitney,
    ranking_consistency,
    signed_rank,
    sslmem_tests,
    welch,
)
from memlens.audit.unitmem import UnitMemAccumulator, unitmem

T = torch.tensor


def test_pair_distances_on_normalised_vectors():
    u, v = T([[3.0, 4.0]]), T([[8.0, 6.0]])  # -> (0.6, 0.8) and (0.8, 0.6)
    assert pair_distance(u, v, "l2").item() == pytest.approx(math.sqrt(0.08))
    assert pair_distance(u, v, "l1").item() == pytest.approx(0.4)
    assert pair_distance(u, v, "cosine").item() == pytest.approx(0.04)
    assert pair_distance(u, v, "angular").item() == pytest.approx(math.acos(0.96) / math.pi)
    assert pair_distance(u, 5 * u, "l2").item() == pytest.approx(0.0, abs=1e-7)  # scale does not matter


def test_alignment_loss_pairs_consecutive_views():
    # 2 points x 2 pairs x 2 views, 2-d outputs; distances by hand (l2 of normalised vectors)
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    views = T([e1, e1, e1, e2,   # point 0: pairs (e1, e1) -> 0 and (e1, e2) -> sqrt 2
               e2, e2, e2, e2])  # point 1: both pairs identical -> 0
    got = alignment_loss(views, views_per_point=4, pairing="disjoint")
    assert torch.allclose(got, T([math.sqrt(2) / 2, 0.0]).double())
    # all pairs of point 0: (e1,e1) 0, (e1,e1) 0, (e1,e2) x3 sqrt 2 -> 3 sqrt 2 / 6
    got = alignment_loss(views, views_per_point=4, pairing="all")
    assert torch.allclose(got, T([math.sqrt(2) / 2, 0.0]).double())
    with pytest.raises(ValueError, match="whole number of points"):
        alignment_loss(views[:6], views_per_point=4, pairing="disjoint")
    with pytest.raises(ValueError, match="whole number of points"):
        alignment_loss(views[:6], views_per_point=4)
    assert alignment_loss(views[:4], views_per_point=4).shape == (1,)


@pytest.mark.parametrize("metric", ["l2", "l1", "cosine", "angular"])
def test_all_pairs_alignment_equals_a_brute_force_double_loop(metric):
    g = torch.Generator().manual_seed(7)
    views = torch.randn(5 * 6, 3, 4, generator=g)  # 5 points x 6 views, (3, 4) outputs
    views[7] = views[6] + 1e-4 * torch.randn(3, 4, generator=g)  # nearly identical views keep their small
    # distance, which 2 - 2 cos in float32 would lose
    got = alignment_loss(views, views_per_point=6, pairing="all", metric=metric)
    flat = views.reshape(5, 6, -1).double()
    expected = []
    for p in range(5):
        d = [pair_distance(flat[p, i], flat[p, j], metric) for i in range(6) for j in range(i + 1, 6)]
        expected.append(torch.stack(d).mean())
    assert torch.allclose(got, torch.stack(expected), atol=1e-6, rtol=1e-5)
    tiny = pair_distance(flat[1, 0], flat[1, 1], "l2").item()
    assert tiny < 1e-3
    assert pairwise_distances(views, views_per_point=6)[1, 0, 1].item() == pytest.approx(tiny, rel=1e-2)


def test_sslmem_and_its_normalisations():
    f, g = np.array([1.0, 2.0, 0.5, 0.0]), np.array([3.0, 1.0, 0.5, 0.0])
    raw = sslmem(f, g)
    assert np.array_equal(raw, [2.0, -1.0, 0.0, 0.0])
    assert np.allclose(range_normalize(raw), [2 / 3, -1 / 3, 0.0, 0.0])  # range = 2 - (-1) = 3
    assert np.array_equal(range_normalize(np.array([0.2, 0.2])), [0.0, 0.0])
    assert np.allclose(symmetric_normalize(f, g), [0.5, -1 / 3, 0.0, 0.0])  # 0/0 -> 0


def test_in_out_means_against_a_loop():
    rng = np.random.default_rng(0)
    values, member = rng.normal(size=(5, 3, 7)), rng.random((5, 7)) < 0.5
    member[:, 0], member[:, 1] = True, False  # no out-encoder, no in-encoder
    m_in, m_out = in_out_means(values, member)
    for layer in range(3):
        for i in range(7):
            ins, outs = values[member[:, i], layer, i], values[~member[:, i], layer, i]
            assert m_in[layer, i] == pytest.approx(ins.mean()) if len(ins) else math.isnan(m_in[layer, i])
            assert m_out[layer, i] == pytest.approx(outs.mean()) if len(outs) else math.isnan(m_out[layer, i])
    flat_in, flat_out = in_out_means(values[:, 1], member)  # (E, n): the same as one layer of (E, L, n)
    assert np.array_equal(flat_in, m_in[1], equal_nan=True) and np.array_equal(flat_out, m_out[1], equal_nan=True)


def test_layermem_and_delta():
    assert layermem(np.array([1.0, 1.0]), np.array([3.0, 1.0])) == pytest.approx(0.25)  # mean of 0.5 and 0
    assert math.isnan(layermem(np.array([]), np.array([])))
    d = delta_layermem({"a": 0.1, "b": 0.25, "c": 0.2}, {"a": None, "b": "a", "c": "b"})
    assert d["a"] is None and d["b"] == pytest.approx(0.15) and d["c"] == pytest.approx(-0.05)


def test_vit_block_table_follows_table_10():
    from memlens.models.layers import LayerSpec

    v = {"blocks.0.attn": 0.006, "blocks.0.res_attn": 0.007, "blocks.0.mlp": 0.020, "blocks.0": 0.022,
         "blocks.1.attn": 0.028, "blocks.1.res_attn": 0.028, "blocks.1.mlp": 0.039, "blocks.1": 0.040}
    kinds = {"attn": "attention", "res_attn": "resblock_attn", "mlp": "mlp", "": "block"}
    specs = [LayerSpec(name=f"blocks.{b}.{k}" if k else f"blocks.{b}", kind=kind, units=4, layout="tokens", depth=0,
                       block=b) for b in range(2) for k, kind in kinds.items()]
    rows = vit_block_table(v, specs)
    assert rows[0].delta_attention is None and rows[0].delta_mlp == pytest.approx(0.013)
    assert rows[1].delta_attention == pytest.approx(0.006)  # 0.028 - 0.022 (paper's row 2: 0.006)
    assert rows[1].delta_mlp == pytest.approx(0.011)         # 0.039 - 0.028 (paper: 0.011)
    assert rows[1].delta_block == pytest.approx(0.018)       # 0.040 - 0.022 (paper: 0.018)


def test_unitmem_by_hand():
    mu = T([[1.0, 0.0, 2.0],
            [3.0, 0.0, 2.0],
            [2.0, 0.0, 2.0]])
    r = unitmem(mu)
    # unit 0: max 3 (point 1), rest mean (1 + 2) / 2 = 1.5 -> 1.5 / 4.5
    assert r.unitmem[0].item() == pytest.approx(1 / 3) and r.argmax[0] == 1 and r.mu_rest[0] == pytest.approx(1.5)
    # unit 1: silent everywhere -> not ranked (NaN, no responsible point); unit 2: constant -> 0, first point
    assert math.isnan(r.unitmem[1].item()) and r.argmax[1] == -1
    assert r.unitmem[2].item() == 0.0 and r.argmax[2] == 0
    assert r.active.tolist() == [3, 0, 3]


def test_unitmem_activation_floor_and_signed_rules():
    mu = T([[0.004, 0.5], [0.009, 2.0], [0.0, 0.5]])
    r = unitmem(mu, min_activation=0.01)
    assert math.isnan(r.unitmem[0].item()) and r.argmax[0] == -1  # mu_max 0.009 below the floor
    assert r.unitmem[1].item() == pytest.approx((2 - 0.5) / (2 + 0.5)) and r.argmax[1] == 1
    assert r.active.tolist() == [0, 3]
    # a signed layer measured with shift: the response above the least-responding point
    signed = T([[-1.0], [2.0], [0.5]])
    shifted = unitmem(signed, shift="shift")  # -> 0, 3, 1.5: max 3, rest 0.75
    assert shifted.unitmem.item() == pytest.approx((3 - 0.75) / (3 + 0.75)) and shifted.argmax.item() == 1


def test_layer_rules_for_units():
    from memlens.models.layers import LayerSpec

    out = T([[[-0.1, 2.0], [0.3, -0.05]]])  # (B=1, T=2, D=2)
    gelu = LayerSpec(name="a", kind="mlp_hidden", units=2, layout="tokens", depth=0, block=0, unit_kind="gelu")
    assert torch.allclose(gelu.unit_activations(out), T([[0.15, 1.0]]))  # clamped at 0, then averaged
    other = LayerSpec(name="b", kind="mlp", units=2, layout="tokens", depth=0, block=0)
    assert torch.allclose(other.unit_activations(out, signed="abs"), T([[0.2, 1.025]]))
    assert torch.allclose(other.unit_activations(out, signed="raw"), T([[0.1, 0.975]]))
    assert gelu.is_unit_layer and not other.is_unit_layer


def test_unitmem_median_variant():
    assert unitmem(T([[1.0], [5.0], [2.0], [10.0]]), rest="median").unitmem.item() == pytest.approx(8 / 12)
    assert unitmem(T([[1.0], [5.0], [2.0], [10.0]]), rest="mean").unitmem.item() == pytest.approx(
        (10 - 8 / 3) / (10 + 8 / 3))
    # even number of others: the median interpolates (1, 2, 4, 5 -> 3)
    assert unitmem(T([[1.0], [5.0], [2.0], [4.0], [10.0]]), rest="median").unitmem.item() == pytest.approx(7 / 13)


def test_unitmem_needs_two_points():
    with pytest.raises(ValueError, match="at least 2 points"):
        unitmem(T([[1.0, 2.0]]))


@pytest.mark.parametrize("rest,shift", [("mean", "none"), ("median", "none"), ("mean", "shift")])
def test_streaming_unitmem_equals_the_batch_formula(rest, shift):
    g = torch.Generator().manual_seed(0)
    mu = torch.rand(37, 11, generator=g)
    if shift == "shift":
        mu = mu - 0.5
    mu[5, 3] = mu[20, 3] = 9.0  # a tie for the maximum: the first (5) must win
    mu[:, 7] = 0.001  # silent unit
    b = unitmem(mu, rest=rest, shift=shift, min_activation=0.01)
    # points arrive out of order and on two "processes", each with its D' positions
    perm = torch.randperm(37, generator=g)
    halves = []
    for part in (perm[:18], perm[18:]):
        acc = UnitMemAccumulator(11, rest=rest, shift=shift, min_activation=0.01)
        for chunk in torch.split(part, 7):
            acc.update(mu[chunk], chunk)
        halves.append(acc)
    halves[1].merge(halves[0])
    a = halves[1].result()
    assert torch.allclose(a.unitmem, b.unitmem, atol=1e-6, equal_nan=True) and torch.equal(a.argmax, b.argmax)
    assert a.argmax[3] == 5 and a.argmax[7] == -1
    if shift == "none":
        assert torch.equal(a.active, b.active)


def test_classmem_by_hand():
    mu = T([[1.0], [3.0], [2.0], [6.0]])
    labels = T([0, 0, 1, 1])
    # class means 2 and 4: (4 - 2) / (4 + 2)
    assert classmem(mu, labels).item() == pytest.approx(1 / 3)
    acc = ClassMemAccumulator(1, 5)
    acc.update(mu[:3], labels[:3])
    other = ClassMemAccumulator(1, 5)
    other.update(mu[3:], labels[3:])
    acc.merge(other)
    assert acc.result().item() == pytest.approx(1 / 3)  # empty classes 2..4 are left out
    with pytest.raises(ValueError, match="two classes"):
        classmem(mu, T([1, 1, 1, 1]))
    assert math.isnan(classmem(T([[0.001], [0.002]]), T([0, 1]), min_activation=0.01).item())


def test_holm_by_hand():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    out = holm([0.5, float("nan"), 0.01])
    assert out[0] == pytest.approx(0.5) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)


def test_effect_sizes_by_hand():
    assert cohens_d(np.array([1.0, 2, 3]), np.array([2.0, 3, 4])) == pytest.approx(-1.0)
    mw = mann_whitney([3.0, 4.0], [1.0, 2.0], alternative="greater", name="x", hypothesis="x")
    assert mw.statistic == 4 and mw.effect_size == pytest.approx(1.0)
    sr = signed_rank([1.0, 2.0, -3.0], alternative="two-sided", name="x", hypothesis="x")
    assert sr.effect_size == pytest.approx(0.0)


def test_welch_matches_the_textbook_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 1, 40), rng.normal(0, 2, 60)
    r = welch(a, b, alternative="greater", name="x", hypothesis="x")
    se = math.sqrt(a.var(ddof=1) / 40 + b.var(ddof=1) / 60)
    t = (a.mean() - b.mean()) / se
    dof = se ** 4 / ((a.var(ddof=1) / 40) ** 2 / 39 + (b.var(ddof=1) / 60) ** 2 / 59)
    assert r.statistic == pytest.approx(t) and r.p_value == pytest.approx(sps.t.sf(t, dof))


def test_sslmem_hypothesis_family():
    rng = np.random.default_rng(1)
    scores = {"S_C": rng.normal(0.3, 0.1, 200), "S_S": rng.normal(0.0, 0.1, 800),
              "S_I": rng.normal(-0.3, 0.1, 200), "S_E": rng.normal(0.1, 0.1, 200)}
    scores["controls"] = np.r_[scores["S_S"], scores["S_E"]]
    tests = {(t.name, t.method): t for t in sslmem_tests(scores)}
    for (name, method), t in tests.items():
        assert t.p_holm < 1e-6, (name, method)
    assert len(tests) == 12 and {m for _, m in tests} == {"welch_t", "mann_whitney_u"}
    # subsets that were not scored are left out of the family; no one-sample test against 0 (offsets)
    assert {t.name for t in sslmem_tests({"S_C": scores["S_C"], "S_S": scores["S_S"]})} == {"C>S"}


def test_sslmem_tests_ignore_an_encoder_offset():
    """Every subset test compares two sets of images scored by the same encoders: adding a constant to
    SSLMem (one encoder aligning every image better) changes no statistic or p-value."""
    rng = np.random.default_rng(3)
    scores = {k: rng.normal(0, 0.1, 100) for k in ("S_C", "S_S", "S_I", "S_E")}
    scores["controls"] = np.r_[scores["S_S"], scores["S_E"]]
    base = sslmem_tests(scores)
    shifted = sslmem_tests({k: v + 0.05 for k, v in scores.items()})
    for a, b in zip(base, shifted, strict=True):
        assert a.p_value == pytest.approx(b.p_value, rel=1e-9) and a.p_holm > 0.01


def test_bootstrap_interval():
    rng = np.random.default_rng(2)
    x = rng.normal(0.5, 1.0, 400)
    lo, hi = bootstrap_ci(x, seed=0)
    assert lo < x.mean() < hi and hi - lo == pytest.approx(2 * 1.96 / 20, rel=0.2)


def test_ranking_consistency():
    a = np.arange(50.0)
    same = ranking_consistency(a, a, k=10, name_a="a", name_b="b")
    assert same.overlap == 1.0 and same.tau == pytest.approx(1.0)
    flipped = ranking_consistency(a, -a, k=10, name_a="a", name_b="b")
    assert flipped.overlap == 0.0 and flipped.tau == pytest.approx(-1.0)
    half = ranking_consistency(a, np.r_[a[:45], -a[45:]], k=10, name_a="a", name_b="b")
    assert half.overlap == 0.5


def test_reliability_recovers_a_known_reliability():
    """Scores = true per-point value + independent per-pair noise of known variance: the split-half
    (Spearman-Brown) estimate equals var_t / (var_t + noise of the averaged halves), within sampling
    error."""
    from memlens.audit.reliability import ranking_reliability, spearman_brown, views_needed

    rng = np.random.default_rng(0)
    n, v, sd_t, sd_e = 4000, 10, 1.0, 4.0
    t = rng.normal(0, sd_t, n)
    e = rng.normal(0, sd_e, (n, v, v))
    e = np.triu(e, 1) + np.triu(e, 1).transpose(0, 2, 1)
    dist_g = (t[:, None, None] + e)[None]  # one g encoder; f identically zero: score = mean g distance
    dist_f = np.zeros_like(dist_g)
    member = np.array([[True] * n, [False] * n])  # f trained on every point, g on none
    rel, freq = ranking_reliability(np.concatenate([dist_f, dist_g]), member, target=0.99, top_k=50, bootstrap=50,
                                    seed=1)
    pairs_half = (v // 2) * (v // 2 - 1) // 2
    pearson = sd_t ** 2 / (sd_t ** 2 + sd_e ** 2 / pairs_half)  # correlation of the two half-scores
    half = 6 / math.pi * math.asin(pearson / 2)  # its rank (Spearman) version for Gaussian scores
    assert rel.split_half_r == pytest.approx(half, abs=0.03)  # sampling error ~ 1/sqrt(n) = 0.016
    assert rel.reliability == pytest.approx(spearman_brown(half), abs=0.04)
    # the prophecy: a perfectly reliable score needs no more views, an unreliable one many more
    assert views_needed(0.95, 10, 0.9) == 10 and views_needed(0.5, 10, 0.9) == 90
    assert math.isinf(views_needed(-0.1, 10, 0.9))
    # stable top-k: the frequencies of the audit's own top-k are high on average
    assert 0 < rel.topk_overlap_mean <= 1 and np.nanmean(freq) == pytest.approx(50 / n, abs=0.005)
