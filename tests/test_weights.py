"""Sampling weights against their documented behaviour: the cap binds and water-fills (mean 1, max == cap,
order kept, uncapped weights keep their ratios), per-class and proportional follow ``hardness ** temperature``
at every temperature, and ``is_hard`` is the top fraction by rank. Planted truth where it matters: a scan of
blobs with flipped labels and a rare sub-cluster."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from test_scan import planted_scan

from hardmine.manifest import cap_weights, compute_weights, export_manifest


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The planted-blobs scan of test_scan.py, built once per session for every module that reads it (none
    changes it), instead of once per module."""
    return planted_scan(tmp_path_factory.getbasetemp() / "planted-shared")


def _scored(hardness: np.ndarray, labels: np.ndarray | None = None) -> pd.DataFrame:
    h = np.asarray(hardness, dtype=np.float64)
    rank = pd.Series(-h).rank(method="first").astype(np.int64).to_numpy()
    df = pd.DataFrame({"sample_id": np.arange(len(h)), "hardness": h, "rank": rank})
    if labels is not None:
        df["label"] = np.asarray(labels)
    return df


def _assert_water_filled(raw: np.ndarray, w: np.ndarray, cap: float) -> None:
    """The water-filling solution: ``w = min(cap, c * raw)`` for the one ``c`` that makes the mean 1."""
    raw = np.asarray(raw, dtype=np.float64)
    assert w.mean() == pytest.approx(1.0, rel=1e-9)
    assert w.max() <= cap * (1 + 1e-9)
    free = w < cap * (1 - 1e-9)
    if free.any():
        c = w[free] / raw[free]
        np.testing.assert_allclose(c, c[0], rtol=1e-9)  # uncapped weights keep their ratios
        # and every capped weight would have been at or above the cap uncapped
        assert (c[0] * raw[~free] >= cap * (1 - 1e-9)).all()
    order = np.argsort(raw, kind="stable")
    assert (np.diff(w[order]) >= -1e-12).all()  # a harder sample never gets less weight


# ------------------------------------------------------------------------------------------ cap binds
def test_cap_binds_on_proportional_weights():
    h = np.linspace(0.05, 1.0, 40)
    df = _scored(h)
    uncapped, _ = compute_weights(df, "proportional", temperature=4.0, cap=None)
    assert uncapped.max() > 4.0  # precondition: without the cap the hardest samples exceed it
    w, _ = compute_weights(df, "proportional", temperature=4.0, cap=2.5)
    assert w.max() == pytest.approx(2.5)
    assert np.isclose(w, 2.5).sum() >= 2  # several samples reach the cap
    _assert_water_filled(h**4, w, 2.5)
    assert w.min() > uncapped.min()  # the mass taken from the top goes to the rest


def test_cap_binds_on_top_k_and_per_class_weights():
    h = np.linspace(0.1, 1.0, 30)
    df = _scored(h, labels=np.repeat([0, 1, 2], 10))
    w, hard = compute_weights(df, "top-k", top=0.1, boost=50.0, cap=3.0)
    assert hard.sum() == 3
    np.testing.assert_allclose(w[hard], 3.0)  # uncapped they would be 50*30/(3*50+27) = 8.5
    np.testing.assert_allclose(w[~hard], (30 - 3 * 3.0) / 27)
    wc, _ = compute_weights(df, "per-class", temperature=8.0, cap=2.0)
    assert wc.max() == pytest.approx(2.0) and wc.mean() == pytest.approx(1.0)
    uncapped, _ = compute_weights(df, "per-class", temperature=8.0, cap=None)
    assert uncapped.max() > 2.0
    _assert_water_filled(uncapped, wc, 2.0)


def test_cap_of_one_is_uniform_and_a_loose_cap_changes_nothing():
    h = np.linspace(0.1, 1.0, 25)
    df = _scored(h)
    np.testing.assert_allclose(compute_weights(df, "proportional", temperature=3.0, cap=1.0)[0], 1.0)
    loose, _ = compute_weights(df, "proportional", temperature=1.0, cap=20.0)
    np.testing.assert_allclose(loose, h / h.mean())


@settings(max_examples=60, deadline=None)
@given(
    raw=hnp.arrays(np.float64, st.integers(1, 40), elements=st.floats(1e-3, 1e3)),
    cap=st.floats(1.0, 10.0),
)
def test_cap_weights_is_water_filling_for_any_weights(raw, cap):
    w = cap_weights(raw, cap)
    assert w.shape == raw.shape
    _assert_water_filled(raw, w, cap)
    np.testing.assert_allclose(cap_weights(raw, None), raw * len(raw) / raw.sum())
    if (raw * len(raw) / raw.sum()).max() <= cap:
        np.testing.assert_allclose(w, raw * len(raw) / raw.sum())  # nothing to cap: only normalised


def test_cap_weights_does_not_modify_its_input():
    raw = np.array([9.0, 1.0, 1.0, 1.0])
    cap_weights(raw, 1.5)
    np.testing.assert_array_equal(raw, [9.0, 1.0, 1.0, 1.0])


# --------------------------------------------------------------------------------- temperature works
@pytest.mark.parametrize("temperature", [0.0, 0.5, 2.0, 3.0])
def test_per_class_weights_follow_the_temperature(temperature):
    g = np.random.default_rng(3)
    labels = np.repeat([0, 1, 2, 3], [5, 10, 20, 25])
    h = g.uniform(0.05, 1.0, len(labels))
    df = _scored(h, labels)
    w, _ = compute_weights(df, "per-class", temperature=temperature, cap=None)
    for c, size in zip([0, 1, 2, 3], [5, 10, 20, 25]):
        m = labels == c
        assert w[m].sum() == pytest.approx(len(h) / 4)  # class-balanced at every temperature
        np.testing.assert_allclose(w[m] / w[m].sum(), h[m] ** temperature / (h[m] ** temperature).sum())
        if temperature == 0:
            np.testing.assert_allclose(w[m], len(h) / (4 * size))  # uniform inside the class


def _issues(m: pd.DataFrame) -> np.ndarray:
    """Flagged label issues: never oversampled (at most their class's mean weight), so left out of the
    proportionality checks below."""
    if "is_label_issue" not in m:
        return np.zeros(len(m), dtype=bool)
    return m["is_label_issue"].fillna(False).to_numpy(dtype=bool)


def test_per_class_export_uses_the_temperature(planted):  # noqa: F811
    sc, data = planted
    t1 = export_manifest(sc, strategy="per-class", temperature=1.0, cap=None)
    t3 = export_manifest(sc, strategy="per-class", temperature=3.0, cap=None)
    assert t3.attrs["hardmine"]["export"]["temperature"] == 3.0
    h = t3["hardness"].to_numpy()
    labels = t3["label"].to_numpy()
    issue = _issues(t3)
    w3 = t3["weight"].to_numpy()
    for c in np.unique(labels):
        m = (labels == c) & ~issue
        np.testing.assert_allclose(w3[m] / w3[m].sum(), h[m] ** 3 / (h[m] ** 3).sum())
        assert w3[labels == c].sum() == pytest.approx(len(labels) / len(np.unique(labels)))
        assert (w3[(labels == c) & issue] <= w3[labels == c].mean() * (1 + 1e-9)).all()
    # A sharper temperature concentrates the mass on the planted rare sub-cluster (correct labels, harder).
    rare = data["rare"]
    assert w3[rare].sum() > 1.2 * t1["weight"].to_numpy()[rare].sum()
    t0 = export_manifest(sc, strategy="per-class", temperature=0.0, cap=None)
    counts = pd.Series(labels).value_counts()
    np.testing.assert_allclose(t0["weight"], len(labels) / (len(counts) * counts[labels].to_numpy()))


def test_proportional_export_uses_the_temperature(planted):  # noqa: F811
    sc, _ = planted
    df = export_manifest(sc, strategy="proportional", temperature=0.5, cap=None)
    h = df["hardness"].to_numpy()
    w = df["weight"].to_numpy()
    ok = ~_issues(df)
    np.testing.assert_allclose(w[ok] / w[ok].sum(), h[ok] ** 0.5 / (h[ok] ** 0.5).sum())
    assert w.mean() == pytest.approx(1.0)


def test_top_k_export_uses_top_and_boost(planted):  # noqa: F811
    sc, data = planted
    n = sc.n_samples
    df = export_manifest(sc, strategy="top-k", top=0.05, boost=3.0, cap=None)
    hard = df["is_hard"].to_numpy(dtype=bool)
    issue = _issues(df)
    w = df["weight"].to_numpy()
    assert hard.sum() == math.ceil(0.05 * n)
    assert (df["rank"].to_numpy()[hard] <= hard.sum()).all()
    assert (hard & ~issue).any()
    np.testing.assert_allclose(w[hard & ~issue] / w[~hard].max(), 3.0)
    np.testing.assert_allclose(w[~hard], w[~hard].max())
    np.testing.assert_allclose(w[issue], w[~hard].max())  # a flagged label issue is never boosted
    # The planted label errors are the hardest: most of the hard set is flipped labels.
    assert data["flipped"][hard].mean() > 0.5


# ------------------------------------------------------------------------------------------- is_hard
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), top=st.floats(0.01, 1.0), seed=st.integers(0, 1000))
def test_is_hard_is_the_top_fraction_by_rank(n, top, seed):
    g = np.random.default_rng(seed)
    h = g.random(n)
    labels = g.integers(0, 3, n)
    df = _scored(h, labels)
    k = max(1, math.ceil(top * n - 1e-9))
    for strategy in ("top-k", "proportional"):
        _, hard = compute_weights(df, strategy, top=top)
        assert hard.sum() == k
        assert set(np.flatnonzero(hard)) == set(np.argsort(-h, kind="stable")[:k])
    _, hard = compute_weights(df, "per-class", top=top)
    for c in np.unique(labels):
        m = labels == c
        kc = max(1, math.ceil(top * m.sum() - 1e-9))
        assert hard[m].sum() == kc
        assert set(np.flatnonzero(m)[hard[m]]) == set(np.flatnonzero(m)[np.argsort(-h[m], kind="stable")[:kc]])


def test_top_fraction_rounds_up_and_never_marks_nothing():
    df = _scored(np.linspace(0, 1, 10))
    assert compute_weights(df, "top-k", top=0.25)[1].sum() == 3  # ceil(2.5)
    assert compute_weights(df, "top-k", top=0.01)[1].sum() == 1  # at least one
    assert compute_weights(df, "top-k", top=0.3)[1].sum() == 3  # 0.3*10 = 3.0000000000000004 is 3
    assert compute_weights(df, "top-k", top=1.0)[1].all()


def test_missing_hardness_is_drawn_at_the_lowest_weight():
    h = np.array([0.9, np.nan, 0.3, 0.6])
    df = pd.DataFrame({"sample_id": range(4), "hardness": h, "rank": [1, 4, 3, 2]})
    w, _ = compute_weights(df, "proportional", temperature=1.0, cap=None)
    assert np.isfinite(w).all() and w[1] == pytest.approx(w[2])  # same as the least hard sample
    all_missing = df.assign(hardness=np.nan)
    np.testing.assert_allclose(compute_weights(all_missing, "proportional", cap=None)[0], 1.0)


def test_zero_hardness_still_gets_a_positive_weight():
    df = _scored(np.array([0.0, 0.5, 1.0]))
    w, _ = compute_weights(df, "proportional", temperature=1.0, cap=None)
    assert w[0] > 0 and w[0] < 1e-9


def test_weights_refuse_bad_frames():
    df = _scored(np.array([0.2, 0.8]), labels=[0.5, 1.5])
    with pytest.raises(ValueError, match="integer class labels"):
        compute_weights(df, "per-class")
    with pytest.raises(ValueError, match="no 'label' column"):
        compute_weights(df.drop(columns=["label"]), "per-class")
    with pytest.raises(ValueError, match="no 'rank' column"):
        compute_weights(df.drop(columns=["rank"]), "top-k")
    with pytest.raises(ValueError, match="no 'hardness' column"):
        compute_weights(df.drop(columns=["hardness"]), "proportional")
    with pytest.raises(ValueError, match="empty"):
        compute_weights(df.iloc[:0], "proportional")
    with pytest.raises(ValueError, match="cap=0.5"):
        compute_weights(df, "proportional", cap=0.5)
    with pytest.raises(ValueError, match="temperature=-1"):
        compute_weights(df, "proportional", temperature=-1)
