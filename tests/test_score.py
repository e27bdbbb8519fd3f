"""Score functions against slow, obvious definitions, plus the planted case for the robust divergence."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hardmine.enums import TaskKind
from hardmine.score import (
    DEFAULT_WEIGHTS,
    ONE_HOT_MAX_CLASSES,
    SCORE_TABLE,
    KnnResult,
    PopulationStats,
    ScoreConfig,
    classification_stats,
    composite_hardness,
    divergence_scores,
    finalize_scores,
    flag_scores,
    hardness_rank,
    knn_scores,
    population_pass,
    rank_normalize,
)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))


def test_classification_stats_match_definitions():
    g = np.random.default_rng(0)
    logits = g.normal(size=(40, 5)) * 3
    logits[0] = [2.0, 2.0, 0.0, 0.0, 0.0]  # a tie: pred is the lower class id
    labels = g.integers(0, 5, 40)
    labels[0] = 1
    st = classification_stats(logits, labels)
    p = torch.softmax(torch.tensor(logits), 1).numpy()
    for i in range(40):
        y = labels[i]
        others = np.delete(p[i], y)
        assert st["confidence"][i] == pytest.approx(p[i, y])
        assert st["margin"][i] == pytest.approx(p[i, y] - others.max())
        assert st["el2n"][i] == pytest.approx(np.linalg.norm(p[i] - np.eye(5)[y]))
        assert st["pred_confidence"][i] == pytest.approx(p[i].max())
    assert st["pred"][0] == 0 and not st["correct"][0] and st["margin"][0] == pytest.approx(0.0)
    assert (st["correct"] == (st["pred"] == labels)).all()
    assert ((st["margin"] < 0) == ~st["correct"])[1:].all()  # negative margin = misclassified (no ties)
    big = classification_stats(np.array([[1000.0, -1000.0]]), np.array([1]))  # no overflow
    assert np.isfinite(big["el2n"]).all() and big["confidence"][0] == pytest.approx(0.0)


def _reference_divergences(z: np.ndarray, y: np.ndarray, loo: bool) -> dict[str, np.ndarray]:
    """Slow definitions, one sample at a time."""
    unit = np.array([r / np.linalg.norm(r) if np.linalg.norm(r) > 0 else r for r in z])
    out = {k: np.empty(len(z)) for k in ("class_divergence", "global_divergence", "class_divergence_plain",
                                         "global_divergence_plain", "class_distance")}
    for i in range(len(z)):
        same = (y == y[i]) & ((np.arange(len(z)) != i) if loo else True)
        every = (np.arange(len(z)) != i) if loo else np.ones(len(z), bool)
        out["class_divergence"][i] = 1 - _cos(unit[i], unit[same].sum(0))
        out["global_divergence"][i] = 1 - _cos(unit[i], unit[every].sum(0))
        out["class_divergence_plain"][i] = 1 - _cos(z[i], z[same].sum(0))
        out["global_divergence_plain"][i] = 1 - _cos(z[i], z[every].sum(0))
        out["class_distance"][i] = np.linalg.norm(z[i] - z[same].mean(0)) if same.any() else np.nan
    return out


@pytest.mark.parametrize("loo", [False, True])
@pytest.mark.parametrize("n_classes", [4, ONE_HOT_MAX_CLASSES + 8])  # all classes in one product / per row
def test_divergences_match_definitions_streamed_in_blocks(loo, n_classes):
    g = np.random.default_rng(1)
    n = 50 if n_classes <= ONE_HOT_MAX_CLASSES else 200
    # float32, as a scan stores them: the scores are computed in float64 all the same (checked to 1e-9 against
    # definitions evaluated in float64)
    z = (g.normal(size=(n, 6)) * g.exponential(1, (n, 1))).astype(np.float32)
    z[4] = 0.0  # zero gradient
    y = g.integers(0, n_classes - 1, n)
    y[7] = n_classes - 1  # a singleton class
    blocks = [(i, z[i : i + 13]) for i in range(0, n, 13)]
    pop = population_pass(blocks, 6, y, n_classes)
    one = PopulationStats.empty(6, n_classes)
    one.update(z, y)
    np.testing.assert_allclose(pop.class_unit_sum, one.class_unit_sum)
    np.testing.assert_array_equal(pop.class_count, [np.sum(y == c) for c in range(n_classes)])
    z64 = z.astype(np.float64)
    unit = z64 / np.maximum(np.linalg.norm(z64, axis=1, keepdims=True), 1e-300)  # (n, 6); the zero row stays 0
    np.testing.assert_allclose(pop.class_unit_sum, [unit[y == c].sum(0) for c in range(n_classes)], atol=1e-12)
    np.testing.assert_allclose(pop.class_plain_sum, [z64[y == c].sum(0) for c in range(n_classes)], atol=1e-12)
    np.testing.assert_allclose(pop.unit_sum, unit.sum(0), atol=1e-12)
    got = {k: np.concatenate([divergence_scores(b, y[s : s + len(b)], pop, loo)[k] for s, b in blocks])
           for k in ("class_divergence", "global_divergence", "class_divergence_plain", "global_divergence_plain",
                     "class_distance")}
    ref = _reference_divergences(z64, y, loo)
    for k in got:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-9, atol=1e-9, err_msg=k)
    assert got["class_divergence"][4] == 1.0  # zero gradient: no direction
    if loo:  # the singleton has no class-mates: divergence 1, distance undefined
        assert got["class_divergence"][7] == 1.0 and np.isnan(got["class_distance"][7])
    else:  # the singleton is its class's mean
        assert got["class_distance"][7] == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("loo", [False, True])
def test_without_labels_only_the_global_divergences_are_computed(loo):
    g = np.random.default_rng(4)
    z = (g.normal(size=(30, 5)) * g.exponential(1, (30, 1))).astype(np.float32)
    z[2] = 0.0
    pop = population_pass([(0, z[:16]), (16, z[16:])], 5, None, None)
    got = divergence_scores(z, None, pop, loo)
    assert sorted(got) == sorted(["global_divergence", "global_divergence_plain", "class_divergence",
                                  "class_divergence_plain", "class_distance"])
    ref = _reference_divergences(z.astype(np.float64), np.zeros(30, dtype=np.int64), loo)
    for k in ("global_divergence", "global_divergence_plain"):
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-9, atol=1e-9, err_msg=k)
    for k in ("class_divergence", "class_divergence_plain", "class_distance"):
        assert got[k].shape == (30,) and np.isnan(got[k]).all(), k
    got["class_divergence"][0] = 0.0  # three arrays, not one shared: writing one leaves the others NaN
    assert np.isnan(got["class_divergence_plain"][0]) and np.isnan(got["class_distance"][0])
    # population sums with classes, rows without labels (e.g. unlabelled rows scored against a labelled scan)
    with_classes = population_pass([(0, z)], 5, np.zeros(30, dtype=np.int64), 2)
    unlabelled = divergence_scores(z, None, with_classes, loo)
    for k in ("class_divergence", "class_divergence_plain", "class_distance"):
        assert np.isnan(unlabelled[k]).all(), k
    np.testing.assert_allclose(unlabelled["global_divergence"], got["global_divergence"], rtol=1e-12, atol=1e-12)


def test_robust_divergence_ranks_a_large_gradient_subgroup_where_plain_fails():
    """The issue's finding, planted: a rare sub-group with large gradients dominates the plain mean, so plain
    cosine ranks it as *typical*; the mean of unit vectors gives each sample one vote and ranks it rare."""
    g = np.random.default_rng(2)
    d = 10
    bulk = np.eye(d)[0] + 0.3 * g.normal(size=(190, d))
    rare = 50.0 * (np.eye(d)[1] + 0.3 * g.normal(size=(10, d)))
    z = np.concatenate([bulk, rare])
    y = np.zeros(200, dtype=np.int64)
    is_rare = np.r_[np.zeros(190, bool), np.ones(10, bool)]
    pop = population_pass([(0, z)], d, y, 1)
    s = divergence_scores(z, y, pop)

    def auroc(v):
        return (v[is_rare][:, None] > v[~is_rare][None, :]).mean()

    assert auroc(s["class_divergence"]) > 0.95
    assert auroc(s["class_divergence_plain"]) < 0.05  # below random: the failure the robust form fixes


def test_knn_scores_with_missing_neighbours():
    res = KnnResult(
        sims=np.array([[0.9, 0.5, np.nan], [0.2, 0.2, 0.2]]),
        rows=np.array([[1, 2, -1], [0, 2, 3]]),
        abs_rows=np.array([[1, 3, -1], [0, 2, 3]]),
    )
    labels_all = np.array([0, 0, 1, 1])
    out = knn_scores(res, labels_all, labels_all[:2])
    np.testing.assert_allclose(out["knn_outlier"], [1 - 0.7, 0.8])
    np.testing.assert_allclose(out["neighbor_disagreement"], [0.5, 2 / 3])
    assert np.isnan(knn_scores(res, None, None)["neighbor_disagreement"]).all()


def test_rank_normalize_and_hardness():
    r = rank_normalize(np.array([3.0, 1.0, 2.0, 2.0, np.nan]))
    np.testing.assert_allclose(r[:4], [1.0, 0.25, 0.625, 0.625])  # ties averaged, / 4 valid values
    assert np.isnan(r[4])
    np.testing.assert_allclose(rank_normalize(np.array([3.0, 1.0, 2.0]), -1), [1 / 3, 1.0, 2 / 3])
    flags = pd.array([True, False, None], dtype="boolean")
    np.testing.assert_allclose(rank_normalize(flags)[:2], [1.0, 0.5])
    cols = {"loss": np.array([1.0, 2.0, 3.0, 4.0]), "confidence": np.array([0.9, 0.1, 0.5, np.nan])}
    h, used = composite_hardness(cols, {"loss": 1.0, "confidence": 3.0})
    # sample 3 has no confidence: its hardness is its loss rank alone.
    expected = [(0.25 + 3 * (1 / 3)) / 4, (0.5 + 3 * 1.0) / 4, (0.75 + 3 * (2 / 3)) / 4, 1.0]
    np.testing.assert_allclose(h, expected)
    assert used == {"confidence": 3.0, "loss": 1.0}
    np.testing.assert_array_equal(hardness_rank(np.array([0.5, 0.9, 0.5, np.nan, 0.9])), [3, 1, 4, 5, 2])


def test_flags():
    cfg = ScoreConfig(confident_error_threshold=0.8, near_miss_margin=0.1)
    out = flag_scores(
        pd.array([False, False, True, True, None], dtype="boolean"),
        np.array([0.85, 0.6, 0.9, 0.55, np.nan]), np.array([-0.7, -0.2, 0.8, 0.05, np.nan]), cfg,
    )
    assert out["confident_error"].tolist() == [True, False, False, False, pd.NA]
    assert out["near_miss"].tolist() == [False, False, False, True, pd.NA]


def test_finalize_scores_orders_by_hardness():
    stats = pd.DataFrame({
        "sample_id": [10, 11, 12], "label": [0, 1, 0], "loss": [0.1, 2.0, 0.5], "grad_norm": [1.0, 3.0, 2.0],
        "pred": [0, 0, 0], "correct": pd.array([True, False, True], dtype="boolean"),
        "confidence": [0.9, 0.1, 0.6], "pred_confidence": [0.9, 0.9, 0.6], "margin": [0.8, -0.8, 0.2],
        "el2n": [0.1, 1.2, 0.5],
    })
    grad = {k: np.array([0.1, 0.9, 0.5]) for k in ("class_divergence", "knn_outlier", "neighbor_disagreement")}
    df, used = finalize_scores(stats, grad, ScoreConfig(), TaskKind.CLASSIFICATION)
    assert df["rank"].tolist() == [3, 1, 2] and set(used) == set(DEFAULT_WEIGHTS)
    assert df["confident_error"].tolist() == [False, True, False]


def test_score_config_validation_and_table():
    with pytest.raises(ValueError, match="not a weightable score"):
        ScoreConfig(weights={"pred": 1.0})
    with pytest.raises(ValueError, match="all zero"):
        ScoreConfig(weights={"loss": 0.0})
    with pytest.raises(ValueError, match=">= 0"):
        ScoreConfig(weights={"loss": -1.0})
    with pytest.raises(ValueError, match="k=0"):
        ScoreConfig(k=0)
    with pytest.raises(ValueError, match="top=0"):
        ScoreConfig(top=0)
    with pytest.raises(ValueError, match="cap=0.5"):
        ScoreConfig(cap=0.5)
    with pytest.raises(ValueError, match="strategy='best'"):
        ScoreConfig(strategy="best")
    with pytest.raises(ValueError, match="unknown ScoreConfig field"):
        ScoreConfig.from_dict({"kk": 3})
    cfg = ScoreConfig(k=4, weights={"loss": 2, "margin": 1})
    assert ScoreConfig.from_dict(cfg.to_dict()) == cfg
    # Every weightable column has a direction, and only "lower"/"false" ones are negated.
    for name, info in SCORE_TABLE.items():
        if info.orientation == -1:
            assert info.harder_when in ("lower", "false"), name
        elif info.orientation == 1:
            assert info.harder_when in ("higher", "true"), name


# ------------------------------------------------------------------------------ options and their ranges
def test_export_parameter_ranges():
    from hardmine.score import validate_export_params

    for ok in ((1.0, 5.0, 1.0, 20.0), (1, 1e-9, 0, 1), (np.float64(0.5), np.int64(2), 0.0, None), (1e-9, 1, 3, 1.0)):
        validate_export_params(*ok)
    bad = [
        ((0, 5, 1, 20), r"^top=0 must be a fraction in \(0, 1\] \(e\.g\. 0\.1 = the hardest 10%\)\.$"),
        ((1.01, 5, 1, 20), r"^top=1\.01 must be a fraction"),
        ((True, 5, 1, 20), r"^top=True must be a fraction"),
        ((float("nan"), 5, 1, 20), r"^top=nan must be a fraction"),
        ((0.1, 0, 1, 20), r"boost"),
        ((0.1, float("inf"), 1, 20), r"boost"),
        ((0.1, 5, -0.1, 20), r"temperature"),
        ((0.1, 5, 1, 0.99), r"^cap=0\.99 must be None or a number >= 1: the largest weight allowed, as a multiple "
                            r"of the mean weight \(which is 1\)\.$"),
        ((0.1, 5, 1, float("inf")), r"^cap=inf must be None"),
        ((0.1, 5, 1, "3"), r"^cap='3' must be None"),
    ]
    for args, pattern in bad:
        with pytest.raises(ValueError, match=pattern):
            validate_export_params(*args)


def test_score_config_fields_are_checked_and_normalised():
    from hardmine.enums import Strategy

    cfg = ScoreConfig(weights={"margin": 1, "loss": 0}, strategy="top-k", confident_error_threshold=1.0,
                      near_miss_margin=2.0, k=1)
    assert cfg.weights == {"margin": 1.0, "loss": 0.0} and all(type(w) is float for w in cfg.weights.values())
    assert cfg.strategy is Strategy.TOP_K
    d = cfg.to_dict()
    assert d["strategy"] == "top-k" and list(d["weights"]) == ["loss", "margin"] and d["k"] == 1
    assert ScoreConfig().to_dict()["strategy"] is None
    assert ScoreConfig().weights == DEFAULT_WEIGHTS and ScoreConfig().weights is not DEFAULT_WEIGHTS
    assert ScoreConfig(confident_error_threshold=0.0, near_miss_margin=0.0).near_miss_margin == 0.0
    for kwargs, name in (
        ({"k": True}, "k"), ({"k": 2.5}, "k"), ({"weights": {}}, "weights"), ({"weights": [("loss", 1)]}, "weights"),
        ({"weights": {"loss": True}}, "loss"), ({"weights": {"loss": float("inf")}}, "loss"),
        ({"weights": {"hardness": 1.0}}, "hardness"), ({"confident_error_threshold": 1.01}, "confident_error"),
        ({"confident_error_threshold": -0.01}, "confident_error"), ({"near_miss_margin": 2.01}, "near_miss"),
        ({"near_miss_margin": True}, "near_miss"), ({"leave_one_out": 1}, "leave_one_out"),
        ({"temperature": -1}, "temperature"), ({"boost": 0}, "boost"),
    ):
        with pytest.raises(ValueError, match=name):
            ScoreConfig(**kwargs)
    with pytest.raises(ValueError, match=r"not a weightable score; use some of \['loss', 'confidence', 'margin'"):
        ScoreConfig(weights={"pred": 1.0})
    with pytest.raises(ValueError, match=r"^ScoreConfig weights=\{'loss': 0\.0, 'margin': 0\} are all zero; give "
                                         r"one signal a weight > 0\.$"):
        ScoreConfig(weights={"loss": 0.0, "margin": 0})
    with pytest.raises(ValueError, match=r"^unknown ScoreConfig field\(s\) \['a', 'kk'\]; known: \['boost', "):
        ScoreConfig.from_dict({"kk": 3, "a": 1, "k": 2})
    assert ScoreConfig.from_dict({"k": 3}).k == 3


def test_default_strategy_and_table_entries():
    from hardmine.enums import Strategy
    from hardmine.score import DEFAULT_STRATEGY, DEFAULT_STRATEGY_REGRESSION, default_strategy

    assert default_strategy(True) is DEFAULT_STRATEGY and default_strategy(False) is DEFAULT_STRATEGY_REGRESSION
    assert DEFAULT_STRATEGY_REGRESSION is Strategy.PROPORTIONAL  # regression has no classes to balance
    assert DEFAULT_STRATEGY is not DEFAULT_STRATEGY_REGRESSION
    assert SCORE_TABLE["margin"].to_dict() == {"meaning": SCORE_TABLE["margin"].meaning, "harder_when": "lower",
                                               "orientation": -1, "needs_classes": True}


# ----------------------------------------------------------------------------------- per-batch stats
def test_regression_stats_and_one_output_classifiers():
    from hardmine.score import regression_stats

    r = regression_stats(np.array([[1.5], [-2.0]]))
    np.testing.assert_array_equal(r["pred"], [1.5, -2.0])
    assert r["correct"].isna().all() and len(r["correct"]) == 2
    for name in ("confidence", "pred_confidence", "margin", "el2n"):
        assert np.isnan(r[name]).all() and r[name].shape == (2,), name
    r["confidence"][0] = 1.0
    assert np.isnan(r["margin"][0])  # separate arrays, not one shared
    np.testing.assert_array_equal(regression_stats(np.array([3.0, 4.0]))["pred"], [3.0, 4.0])
    assert np.isnan(regression_stats(np.ones((2, 3)))["pred"]).all()  # multi-output: no scalar prediction
    # One logit z is a binary BCE-with-logits model: the two-class model [0, z] (labels 0 and 1).
    z = np.array([0.3, -2.0, 2.0])
    one = classification_stats(z[:, None], np.array([0, 0, 1]))
    p1 = 1 / (1 + np.exp(-z))
    np.testing.assert_allclose(one["confidence"], [1 - p1[0], 1 - p1[1], p1[2]])
    np.testing.assert_allclose(one["margin"], 2 * one["confidence"] - 1)
    assert one["pred"].tolist() == [1, 0, 1] and one["correct"].tolist() == [False, True, True]
    flat = classification_stats(z, np.array([0, 0, 1]))  # (B,) logits: the same model
    np.testing.assert_allclose(flat["confidence"], one["confidence"])
    st = classification_stats(np.array([[0.0, 0.0, np.log(2.0)]]), np.array([2]))
    np.testing.assert_allclose(st["confidence"], [0.5])
    np.testing.assert_allclose(st["margin"], [0.25])
    assert st["pred"].dtype == np.int64


def test_unit_rows_keep_zero_rows_zero():
    from hardmine.score import unit_rows

    u, norms = unit_rows(np.array([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]], dtype=np.float32))
    np.testing.assert_allclose(u, [[0.6, 0.8], [0.0, 0.0], [0.0, -1.0]])
    np.testing.assert_allclose(norms, [5.0, 0.0, 2.0])
    assert u.dtype == np.float64


def test_population_without_labels_and_blocks_with_absent_classes():
    z = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    pop = population_pass([(0, z[:1]), (1, z[1:])], 2, None, 3)
    assert pop.class_count is None and pop.n == 3
    np.testing.assert_allclose(pop.unit_sum, [2.0, 1.0])
    np.testing.assert_allclose(pop.plain_sum, [4.0, 2.0])
    lab = np.array([2, 0, 2])
    pop2 = population_pass([(0, z[:2]), (2, z[2:])], 2, lab, 4)
    np.testing.assert_array_equal(pop2.class_count, [1, 0, 2, 0])
    np.testing.assert_allclose(pop2.class_plain_sum, [[0.0, 2.0], [0, 0], [4.0, 0.0], [0, 0]])
    np.testing.assert_allclose(pop2.class_unit_sum, [[0.0, 1.0], [0, 0], [2.0, 0.0], [0, 0]])
    pop3 = PopulationStats.empty(2, 4)
    pop3.update(z, None)  # no labels for this block: only the global sums move
    assert pop3.n == 3 and pop3.class_count.sum() == 0


def test_population_sums_skip_empty_blocks_and_keep_no_work_arrays():
    z = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]], dtype=np.float32)
    lab = np.array([2, 0, 2])
    empty = np.zeros((0, 2), dtype=np.float32)
    pop = population_pass([(0, empty), (0, z[:2]), (2, empty), (2, z[2:]), (3, empty)], 2, lab, 3)
    ref = population_pass([(0, z[:2]), (2, z[2:])], 2, lab, 3)
    assert pop.n == 3
    for f in ("unit_sum", "plain_sum", "class_count", "class_unit_sum", "class_plain_sum"):
        np.testing.assert_array_equal(getattr(pop, f), getattr(ref, f))
    assert pop._work == [] and ref._work == []  # population_pass hands back no (rows, D) work arrays
    grow = PopulationStats.empty(2, 3)
    grow.update(z[:1], lab[:1])
    grow.update(z, lab)  # a larger block than the work arrays were made for
    np.testing.assert_array_equal(grow.class_count, [1, 0, 3])
    np.testing.assert_allclose(grow.class_plain_sum[2], [5.0, 0.0])
    assert grow._work[0].shape == (3, 2)
    grow.release_work()
    assert grow._work == []


# -------------------------------------------------------------------------------------- hardness
def test_composite_hardness_drops_signals_missing_everywhere_and_skips_zero_weights():
    cols = {"loss": np.array([1.0, 2.0, 3.0]), "margin": np.full(3, np.nan), "el2n": np.array([3.0, 2.0, 1.0])}
    h, used = composite_hardness(cols, {"loss": 1.0, "margin": 5.0, "el2n": 0.0})
    assert used == {"loss": 1.0}
    np.testing.assert_allclose(h, [1 / 3, 2 / 3, 1.0])
    h2, _ = composite_hardness({"loss": np.array([1.0, np.nan])}, {"loss": 1.0})
    assert h2[0] == 1.0 and np.isnan(h2[1])  # a sample with no signal has no hardness
    with pytest.raises(ValueError, match=r"^hardness weight for 'grad_norm', but there is no such score column\.$"):
        composite_hardness(cols, {"grad_norm": 1.0})
    assert np.isnan(rank_normalize(np.array([np.nan, np.nan]))).all()


def test_score_pass_streams_blocks_with_neighbours_and_reports_progress():
    from hardmine.score import score_pass

    g = np.random.default_rng(0)
    z = g.normal(size=(10, 3))
    y = np.array([0, 1] * 5)
    blocks = [(0, z[:4]), (4, z[4:])]
    pop = population_pass(blocks, 3, y, 2)
    seen, progress = [], []

    def knn(u, rows):
        seen.append((u.dtype, u.flags["C_CONTIGUOUS"], rows.tolist()))
        np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, rtol=1e-6)
        nb = (rows[:, None] + np.array([1, 2])) % 10  # two "neighbours" per row
        return KnnResult(sims=np.full((len(rows), 2), 0.5), rows=nb, abs_rows=nb)

    out = score_pass(blocks, 10, y, pop, ScoreConfig(), knn, on_block=progress.append)
    assert progress == [4, 10]
    assert [s[2] for s in seen] == [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9]] and all(s[0] == np.float32 for s in seen)
    np.testing.assert_allclose(out["knn_outlier"], 0.5)
    np.testing.assert_allclose(out["neighbor_disagreement"], 0.5)  # one of the two neighbours has the other label
    np.testing.assert_allclose(out["class_divergence"], divergence_scores(z, y, pop)["class_divergence"])
    none = score_pass(blocks, 10, y, pop, ScoreConfig(), None)
    assert np.isnan(none["knn_outlier"]).all() and np.isnan(none["neighbor_disagreement"]).all()
    assert set(none) == {"class_divergence", "global_divergence", "class_divergence_plain",
                         "global_divergence_plain", "class_distance", "knn_outlier", "neighbor_disagreement"}


def test_finalize_scores_refuses_weights_it_cannot_use():
    stats = pd.DataFrame({"sample_id": [0, 1], "label": [0.5, 1.5], "loss": [0.1, 2.0], "grad_norm": [1.0, 3.0],
                          "pred": [0.4, 1.0], "correct": pd.array([None, None], dtype="boolean"),
                          "confidence": [np.nan] * 2, "pred_confidence": [np.nan] * 2, "margin": [np.nan] * 2,
                          "el2n": [np.nan] * 2})
    with pytest.raises(ValueError, match=r"none of the weighted signals \['margin'\] exists for a regression "
                                         r"scan; weight signals that do \(for regression: loss, grad_norm"):
        finalize_scores(stats.copy(), {}, ScoreConfig(weights={"margin": 1.0}), TaskKind.REGRESSION)
    with pytest.raises(ValueError, match=r"hardness weight for 'knn_outlier', but the scan has no such column"):
        finalize_scores(stats.copy(), {}, ScoreConfig(weights={"knn_outlier": 1.0}), TaskKind.REGRESSION)
    df, used = finalize_scores(stats.copy(), {}, ScoreConfig(weights={"margin": 1.0, "loss": 1.0}),
                               TaskKind.REGRESSION)
    assert used == {"loss": 1.0} and df["rank"].tolist() == [2, 1]
    assert df["confident_error"].isna().all() and df["near_miss"].isna().all()


def test_stats_are_float64_whatever_the_input_precision():
    from hardmine.score import regression_stats

    g = np.random.default_rng(5)
    logits = (g.normal(size=(30, 4)) * 4).astype(np.float32)
    labels = g.integers(0, 4, 30)
    st32 = classification_stats(logits, labels)
    st64 = classification_stats(logits.astype(np.float64), labels)
    for name in ("confidence", "pred_confidence", "margin", "el2n"):
        assert st32[name].dtype == np.float64, name
        np.testing.assert_allclose(st32[name], st64[name], rtol=1e-13, atol=0, err_msg=name)
    # integral labels given as floats (e.g. from a float tensor) index the classes the same way
    stf = classification_stats(logits, labels.astype(np.float64))
    np.testing.assert_array_equal(stf["correct"], st64["correct"])
    np.testing.assert_allclose(stf["confidence"], st64["confidence"])
    r = regression_stats(np.array([[1.25], [2.5]], dtype=np.float32))
    assert r["pred"].dtype == np.float64 and str(r["correct"].dtype) == "boolean"


def test_softmax_is_stable_per_row():
    # Rows on very different scales: each row is shifted by its own maximum, so none underflows to 0/0.
    st = classification_stats(np.array([[1000.0, 999.0], [-1000.0, -1001.0]]), np.array([0, 1]))
    p1 = 1 / (1 + np.exp(-1.0))
    np.testing.assert_allclose(st["confidence"], [p1, 1 - p1])
    np.testing.assert_allclose(st["margin"], [2 * p1 - 1, 1 - 2 * p1])
    assert np.isfinite(st["el2n"]).all()


def test_knn_scores_count_every_found_neighbour_and_only_those():
    res = KnnResult(
        sims=np.array([[0.9, 0.1], [0.4, 0.0], [0.3, 0.7]]),
        rows=np.array([[0, 2], [2, -1], [-1, -1]]),  # row 0 is a neighbour like any other
        abs_rows=np.array([[0, 2], [2, -1], [-1, -1]]),
    )
    labels_all = np.array([1, 0, 0])
    out = knn_scores(res, labels_all, np.array([0, 0, 1]))
    np.testing.assert_allclose(out["knn_outlier"][:2], [1 - 0.5, 1 - 0.4])  # one neighbour: its own cosine
    assert np.isnan(out["knn_outlier"][2])  # no neighbour: unknown, not "isolated"
    np.testing.assert_allclose(out["neighbor_disagreement"][:2], [0.5, 0.0])
    assert np.isnan(out["neighbor_disagreement"][2])


def test_knn_columns_scatter_groups_in_any_order():
    from hardmine.score import knn_columns

    y = np.array([0, 1, 0, 1, 0, 0])
    # Two groups out of row order (as knn_all yields them, list by list); row 5 in no group stays NaN.
    groups = [
        (np.array([3, 0]), KnnResult(sims=np.array([[0.9, np.nan], [0.2, 0.4]]), rows=np.array([[1, -1], [2, 4]]),
                                     abs_rows=np.array([[1, 2], [2, 1]]))),
        (np.array([4, 1, 2]), KnnResult(sims=np.full((3, 2), 1.0), rows=np.array([[0, 2]] * 3),
                                        abs_rows=np.array([[0, 2], [3, 5], [1, 3]]))),
    ]
    out = knn_columns(groups, 6, y)
    np.testing.assert_allclose(out["knn_outlier"], [0.7, 0.0, 0.0, 0.1, 0.0, np.nan])
    # row 3 (label 1): neighbours 1 (1), 2 (0) -> 1/2; row 0 (0): 2 (0), 1 (1) -> 1/2; row 1 (1): 3, 5 -> 1/2
    np.testing.assert_allclose(out["neighbor_disagreement"], [0.5, 0.5, 1.0, 0.5, 0.0, np.nan])
    unlabelled = knn_columns(groups, 6, None)
    assert np.isnan(unlabelled["neighbor_disagreement"]).all()


def test_score_pass_for_regression_and_leave_one_out():
    from hardmine.score import score_pass

    g = np.random.default_rng(1)
    z = g.normal(size=(9, 3))
    y = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2])
    blocks = [(0, z[:5]), (5, z[5:])]
    pop = population_pass(blocks, 3, y, 3)
    loo = score_pass(blocks, 9, y, pop, ScoreConfig(leave_one_out=True), None)
    ref = divergence_scores(z, y, pop, leave_one_out=True)
    for name in ("class_divergence", "global_divergence", "class_distance"):
        np.testing.assert_allclose(loo[name], ref[name], err_msg=name)
    assert not np.allclose(loo["class_divergence"], divergence_scores(z, y, pop)["class_divergence"])
    pop_r = population_pass(blocks, 3, None, None)
    reg = score_pass(blocks, 9, None, pop_r, ScoreConfig(), None)
    assert np.isnan(reg["class_divergence"]).all() and np.isnan(reg["class_distance"]).all()
    np.testing.assert_allclose(reg["global_divergence"], divergence_scores(z, None, pop_r)["global_divergence"])


def test_knn_scores_edge_cases():
    # one valid neighbour that disagrees: the fraction is 1, not 1/2
    res = KnnResult(sims=np.array([[0.6, np.nan]]), rows=np.array([[1, -1]]), abs_rows=np.array([[1, -1]]))
    out = knn_scores(res, np.array([0, 1]), np.array([0]))
    np.testing.assert_allclose(out["knn_outlier"], [0.4])
    np.testing.assert_allclose(out["neighbor_disagreement"], [1.0])
    # labels of the block missing (regression rows): no disagreement, whatever the scan's labels
    assert np.isnan(knn_scores(res, np.array([0, 1]), None)["neighbor_disagreement"]).all()
    # a one-sample scan: no neighbour at all, and no out-of-range lookup for the missing one
    lonely = KnnResult(sims=np.array([[np.nan]]), rows=np.array([[-1]]), abs_rows=np.array([[-1]]))
    one = knn_scores(lonely, np.array([3]), np.array([3]))
    assert np.isnan(one["knn_outlier"]).all() and np.isnan(one["neighbor_disagreement"]).all()


def test_finalize_scores_flags_near_misses_from_the_margin():
    stats = pd.DataFrame({
        "sample_id": [0, 1, 2], "label": [0, 1, 0], "loss": [0.1, 0.7, 2.0], "grad_norm": [1.0, 2.0, 3.0],
        "pred": [0, 1, 1], "correct": pd.array([True, True, False], dtype="boolean"),
        "confidence": [0.9, 0.52, 0.05], "pred_confidence": [0.9, 0.52, 0.95], "margin": [0.8, 0.04, -0.9],
        "el2n": [0.1, 0.6, 1.3],
    })
    df, _ = finalize_scores(stats, {}, ScoreConfig(weights={"near_miss": 1.0, "loss": 1.0}),
                            TaskKind.CLASSIFICATION)
    assert df["near_miss"].tolist() == [False, True, False]
    assert df["confident_error"].tolist() == [False, False, True]


def test_neighbor_scores_are_computed_when_asked_or_weighted():
    # None (default): only when a hardness weight uses knn_outlier or neighbor_disagreement.
    assert ScoreConfig().neighbor_scores is None and not ScoreConfig().computes_neighbor_scores
    assert ScoreConfig(weights={"margin": 1, "knn_outlier": 0.5}).computes_neighbor_scores
    assert ScoreConfig(weights={"loss": 1, "neighbor_disagreement": 0.5}).computes_neighbor_scores
    assert not ScoreConfig(weights={"margin": 1, "knn_outlier": 0}).computes_neighbor_scores  # weight 0: unused
    assert ScoreConfig(neighbor_scores=True).computes_neighbor_scores
    assert not ScoreConfig(neighbor_scores=False).computes_neighbor_scores
    assert ScoreConfig(neighbor_scores=True).to_dict()["neighbor_scores"] is True
    assert ScoreConfig.from_dict({"k": 5}).neighbor_scores is None  # a scan.json written before the field
    # The messages say what the value means and what to do (the whole remedy, not just the offending value).
    with pytest.raises(ValueError, match=r"neighbor_scores=1 must be True, False or None \(None: only when the "
                       r"hardness weights use knn_outlier or neighbor_disagreement\)\.$"):
        ScoreConfig(neighbor_scores=1)
    with pytest.raises(ValueError, match=r"neighbor_scores=False, but the hardness weights use \['knn_outlier'\]; "
                       r"set neighbor_scores=True \(or None\) or give those weights 0\.$"):
        ScoreConfig(neighbor_scores=False, weights={"margin": 1, "knn_outlier": 1})


def test_score_config_messages_name_the_field_and_its_meaning():
    for kwargs, message in (
        ({"k": 0}, "ScoreConfig k=0 must be a positive integer (neighbours per sample)."),
        ({"leave_one_out": 1}, "ScoreConfig leave_one_out=1 must be True or False."),
        ({"near_miss_margin": 3}, "ScoreConfig near_miss_margin=3 must be a number in [0.0, 2.0]."),
        ({"confident_error_threshold": 2}, "ScoreConfig confident_error_threshold=2 must be a number in [0.0, 1.0]."),
        ({"weights": {"loss": -1}}, "hardness weight loss=-1 must be a finite number >= 0."),
    ):
        with pytest.raises(ValueError) as err:
            ScoreConfig(**kwargs)
        assert str(err.value) == message


def test_flags_accept_plain_lists_with_missing_values():
    out = flag_scores([True, None, False], [0.9, None, 0.95], [0.05, None, -0.5], ScoreConfig())
    assert out["near_miss"].tolist() == [True, pd.NA, False]
    assert out["confident_error"].tolist() == [False, pd.NA, True]


def test_divergences_in_float64_without_floating_point_warnings():
    g = np.random.default_rng(3)
    z = g.normal(size=(12, 5))
    z[2] = 0.0  # a zero gradient: no direction, divergence 1, and no 0/0 on the way
    y = np.array([0, 1, 2] * 4)
    z[[0, 3]] = z[[6, 9]]  # identical rows make a class sum exactly parallel to them
    pop = population_pass([(0, z)], 5, y, 3)
    with np.errstate(all="raise"):
        ref = divergence_scores(z, y, pop)
        loo = divergence_scores(z, y, pop, leave_one_out=True)
    assert ref["class_divergence"][2] == 1.0 and ref["global_divergence"][2] == 1.0
    assert np.isfinite(loo["class_divergence"]).all()
    z32 = z.astype(np.float32)
    pop32 = population_pass([(0, z32)], 5, y, 3)
    got = divergence_scores(z32, y.astype(np.float64), pop32)  # float32 rows, integral float labels
    ref32 = divergence_scores(z32.astype(np.float64), y, pop32)
    for name, v in got.items():
        assert v.dtype == np.float64, name
        np.testing.assert_allclose(v, ref32[name], rtol=1e-13, atol=1e-13, err_msg=name)


def test_divergences_without_class_information_are_missing_not_wrong():
    z = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = np.array([0, 1, 0])
    with_classes = population_pass([(0, z)], 2, y, 2)
    no_classes = population_pass([(0, z)], 2, None, None)
    for labels, pop in ((None, with_classes), (y, no_classes), (None, no_classes)):
        s = divergence_scores(z, labels, pop)
        assert set(s) == {"global_divergence", "global_divergence_plain", "class_divergence",
                          "class_divergence_plain", "class_distance"}
        for name in ("class_divergence", "class_divergence_plain", "class_distance"):
            assert isinstance(s[name], np.ndarray) and s[name].shape == (3,) and np.isnan(s[name]).all(), name
        np.testing.assert_allclose(s["global_divergence"], divergence_scores(z, y, with_classes)["global_divergence"])


def test_population_sums_in_float64_for_any_input_and_integer_counts():
    g = np.random.default_rng(8)
    z = (g.normal(size=(40, 3)) * 100).astype(np.float32)
    y = g.integers(0, 3, 40)
    p32 = population_pass([(0, z[:17]), (17, z[17:])], 3, y.astype(np.float64), 3)  # integral float labels
    p64 = population_pass([(0, z.astype(np.float64))], 3, y, 3)
    assert p32.class_count.dtype.kind == "i"
    np.testing.assert_array_equal(p32.class_count, p64.class_count)
    for name in ("unit_sum", "plain_sum", "class_unit_sum", "class_plain_sum"):
        np.testing.assert_allclose(getattr(p32, name), getattr(p64, name), rtol=1e-12, err_msg=name)


def test_leave_one_out_distance_for_classes_of_one_and_two():
    z = np.array([[1.0, 0.0], [0.0, 3.0], [4.0, 4.0]])
    y = np.array([0, 0, 1])  # a class of two and a class of one
    pop = population_pass([(0, z)], 2, y, 2)
    with np.errstate(all="raise"):
        s = divergence_scores(z, y, pop, leave_one_out=True)
    np.testing.assert_allclose(s["class_distance"][:2], np.sqrt(10.0))  # to the one other member
    assert np.isnan(s["class_distance"][2]) and s["class_divergence"][2] == 1.0


def test_export_parameter_messages_say_what_the_number_means():
    from hardmine.score import validate_export_params

    for args, message in (
        ((0.1, 0, 1, 20), "boost=0 must be a finite number > 0 (weight of a hard sample vs an easy one)."),
        ((0.1, 5, -1, 20), "temperature=-1 must be a finite number >= 0 (0 = uniform)."),
    ):
        with pytest.raises(ValueError) as err:
            validate_export_params(*args)
        assert str(err.value) == message


def test_hardness_with_fractional_weights_and_a_signal_missing_before_others():
    cols = {"confidence": np.full(4, np.nan), "loss": np.array([4.0, 1.0, 3.0, 2.0])}
    h, used = composite_hardness(cols, {"confidence": 1.0, "loss": 0.5})  # sorted: confidence comes first
    assert used == {"loss": 0.5}  # the missing signal is dropped, the next one still counts
    np.testing.assert_allclose(h, [1.0, 0.25, 0.75, 0.5])  # a weighted *mean*: one signal = its ranks
    h2, _ = composite_hardness({"loss": cols["loss"], "el2n": np.array([1.0, 2.0, 3.0, 4.0])},
                               {"loss": 0.25, "el2n": 0.75})
    np.testing.assert_allclose(h2, 0.25 * np.array([1.0, 0.25, 0.75, 0.5]) + 0.75 * np.array([0.25, 0.5, 0.75, 1.0]))


def test_ranks_are_integers_and_accept_nullable_input():
    r = hardness_rank(pd.array([0.5, None, 0.9], dtype="Float64"))
    assert r.tolist() == [2, 3, 1] and r.dtype == np.int64
    assert hardness_rank(np.array([0.1, 0.3])).dtype == np.int64
    np.testing.assert_allclose(rank_normalize([1.0, pd.NA, 3.0]), [0.5, np.nan, 1.0])
    np.testing.assert_allclose(rank_normalize(np.array([2, 1, 3])), [2 / 3, 1 / 3, 1.0])  # integers too


def test_knn_columns_refuses_a_negative_sample_count_by_name():
    from hardmine.score import knn_columns

    with pytest.raises(ValueError) as e:
        knn_columns([], -1, None)
    assert str(e.value) == "n=-1 must be a non-negative integer (number of samples)."


def test_a_causal_lm_scan_at_the_default_weights_ranks_by_perplexity_and_grad_norm():
    from hardmine.score import DEFAULT_WEIGHTS, DEFAULT_WEIGHTS_LM, finalize_scores, weights_for_task

    assert weights_for_task(DEFAULT_WEIGHTS, TaskKind.CAUSAL_LM) == DEFAULT_WEIGHTS_LM
    assert weights_for_task({"loss": 1.0}, TaskKind.CAUSAL_LM) == {"loss": 1.0}  # the user's own weights stand
    assert weights_for_task(DEFAULT_WEIGHTS, TaskKind.CLASSIFICATION) == DEFAULT_WEIGHTS
    stats = pd.DataFrame({"sample_id": np.arange(4), "loss": [1.0, 2.0, 3.0, 4.0],
                          "perplexity": [2.0, 8.0, 4.0, 1.0]})
    df, used = finalize_scores(stats, {"grad_norm": np.array([0.5, 3.0, 1.0, 0.1])}, ScoreConfig(), TaskKind.CAUSAL_LM)
    assert used == DEFAULT_WEIGHTS_LM  # no margin in a causal-LM scan
    assert df["rank"].tolist() == [3, 1, 2, 4]


def test_multilabel_logits_just_below_zero_from_a_float32_model_predict_the_label_absent():
    # A scan hands over the model's float32 logits. sigmoid(-1e-9) = 0.5 - 2.5e-10 is below the 0.5 threshold,
    # but computed in float32 it is exactly 0.5, which would predict the label present: wrong, with a
    # margin whose sign disagrees with `correct`.
    from hardmine.score import multilabel_stats

    logits = np.array([[-1e-9, 3.0], [1e-9, -3.0]], dtype=np.float32)  # (B, C)
    targets = np.array([[0, 1], [1, 0]])
    st = multilabel_stats(logits, targets)
    assert st["correct"].tolist() == [True, True]
    assert list(st["pred"]) == list(st["label"])
    assert (st["margin"] > 0).all()


# ------------------------------------------------------------------ the ranks' fast sorts (exact equivalents)
_TIES = [0.0, -0.0, 1.0, -1.0, 2.5, np.inf, -np.inf, np.nan]


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.one_of(st.sampled_from(_TIES), st.floats(allow_nan=True, allow_infinity=True)), max_size=60),
    orientation=st.sampled_from([1, -1]),
)
def test_rank_normalize_equals_pandas_average_rank(values, orientation):
    # rank_normalize sorts once with numpy's unstable sort and averages runs of equal values: the numbers must
    # be exactly pandas' average ranks (ties, -0.0 == 0.0, infinities ranked, NaN kept) over the count of values
    # present (infinities included), so every one lies in (0, 1] as documented.
    x = np.asarray(values, dtype=np.float64)
    v = x * orientation
    n_valid = int((~np.isnan(v)).sum())
    want = pd.Series(v).rank(method="average", na_option="keep").to_numpy() / n_valid if n_valid else np.full(len(v), np.nan)
    got = rank_normalize(x, orientation)
    np.testing.assert_array_equal(got, want)
    present = got[~np.isnan(got)]
    assert ((present > 0) & (present <= 1)).all()


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.one_of(st.sampled_from(_TIES), st.floats(allow_nan=True, allow_infinity=True)), max_size=60))
def test_hardness_rank_equals_the_lexsort_definition(values):
    # 1 = hardest; ties (NaN last, infinities as "no signal") by sample order: lexsort's stable order exactly.
    h = np.asarray(values, dtype=np.float64)
    key = np.where(np.isfinite(h), -h, np.inf)
    want = np.empty(len(h), dtype=np.int64)
    want[np.lexsort((np.arange(len(h)), key))] = np.arange(1, len(h) + 1)
    np.testing.assert_array_equal(hardness_rank(h), want)


def test_ranks_at_scale_match_pandas_with_and_without_ties():
    rng = np.random.default_rng(0)
    continuous = rng.standard_normal(50_000)  # no ties: the positions path
    tied = rng.integers(0, 40, 50_000).astype(np.float64)  # runs of equal values: the averaged path
    tied[::97] = np.nan
    for x in (continuous, tied):
        want = pd.Series(x).rank(method="average").to_numpy() / np.isfinite(x).sum()
        np.testing.assert_array_equal(rank_normalize(x), want)
        key = np.where(np.isfinite(x), -x, np.inf)
        lex = np.empty(len(x), dtype=np.int64)
        lex[np.lexsort((np.arange(len(x)), key))] = np.arange(1, len(x) + 1)
        np.testing.assert_array_equal(hardness_rank(x), lex)


@pytest.mark.parametrize("labelled", [True, False])
def test_divergence_from_dots_gives_divergence_scores(labelled):
    # The products a scan's slices take from its last pass (divergence_directions) give the same scores as the
    # block-by-block route, zero gradient and singleton class included.
    from hardmine.score import divergence_directions, divergence_from_dots

    g = np.random.default_rng(12)
    z = (g.normal(size=(70, 9)) * g.exponential(1, (70, 1))).astype(np.float32)
    z[3] = 0.0
    y = g.integers(0, 3, 70)
    y[5] = 3  # a singleton class
    pop = population_pass([(0, z[:40]), (40, z[40:])], 9, y, 4)
    dirs = divergence_directions(pop)
    assert dirs.shape == (4, 9, 4)
    for c in range(4):  # the columns: global unit and plain sums, then the class's
        np.testing.assert_array_equal(dirs[c].T, [pop.unit_sum, pop.plain_sum, pop.class_unit_sum[c],
                                                  pop.class_plain_sum[c]])
    z64 = z.astype(np.float64)
    dots = np.einsum("bd,bde->be", z64, dirs[y])  # (70, 4)
    sq = np.einsum("ij,ij->i", z64, z64)
    got = divergence_from_dots(sq, dots if labelled else dots[:, :2], y if labelled else None, pop)
    want = divergence_scores(z, y if labelled else None, pop)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-12, err_msg=k)
    # and against the definitions (both routes above share the formulas)
    ref = _reference_divergences(z64, y, False)
    for k in ("global_divergence", "global_divergence_plain", *(
            ("class_divergence", "class_divergence_plain", "class_distance") if labelled else ())):
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-9, atol=1e-9, err_msg=k)
    assert got["global_divergence"][3] == 1.0 and not np.isnan(got["global_divergence"]).any()
    if not labelled:
        assert np.isnan(got["class_divergence"]).all()
    # float32 norms are widened first (not rooted in float32); integral float labels index as class ids
    sq32, lab = sq.astype(np.float32), y.astype(np.float64) if labelled else None
    narrow = divergence_from_dots(sq32, dots if labelled else dots[:, :2], lab, pop)
    wide = divergence_from_dots(sq32.astype(np.float64), dots if labelled else dots[:, :2], y if labelled else None, pop)
    for k in want:
        np.testing.assert_array_equal(narrow[k], wide[k], err_msg=k)


def test_divergence_from_dots_and_directions_refuse_what_does_not_fit():
    from hardmine.score import divergence_directions, divergence_from_dots

    g = np.random.default_rng(13)
    z = g.normal(size=(10, 4))
    y = g.integers(0, 2, 10)
    pop = population_pass([(0, z)], 4, y, 2)
    with pytest.raises(ValueError, match=r"dots \(B, 4\)"):
        divergence_from_dots(np.ones(10), np.ones((10, 2)), y, pop)  # labelled rows need the class products
    with pytest.raises(ValueError, match=r"dots \(B, 2\)"):
        divergence_from_dots(np.ones(10), np.ones((10, 4)), None, pop)
    with pytest.raises(ValueError, match=r"\(10, 1\)"):
        divergence_from_dots(np.ones((10, 1)), np.ones((10, 4)), y, pop)
    with pytest.raises(ValueError, match=r"sq must be \(B,\) and dots \(B, 4\).*\(10,\) and \(9, 4\)"):
        divergence_from_dots(np.ones(10), np.ones((9, 4)), y, pop)
    with pytest.raises(ValueError, match="labels has shape"):
        divergence_from_dots(np.ones(10), np.ones((10, 4)), y[:9], pop)
    with pytest.raises(ValueError, match="^these population statistics have no per-class sums"):
        divergence_directions(population_pass([(0, z)], 4, None, None))
