"""Slices and label issues with planted truth: a rare sub-cluster per class is recovered by a slice, flipped
labels get a high ``label_issue`` and are not boosted by the ``slices`` export, slices are deterministic for a
seed, ``slices.parquet`` round-trips, and ``hardmine slices`` prints a real scan's worst slices."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_scan import batches_of, planted_blobs, trained_mlp
from typer.testing import CliRunner

from hardmine.cli import app
from hardmine.enums import LabelIssueMethod, SliceEmbedding
from hardmine.label_issues import class_thresholds, flag_label_issues, label_issue_score
from hardmine.manifest import compute_weights, read_manifest
from hardmine.scan import Scan, scan
from hardmine.slices import (
    SLICE_COLUMNS,
    SLICES_FILE,
    SliceAssignment,
    assign_slices,
    embedding_columns,
    expected_calibration_error,
    fit_scan_slices,
    fit_slice_centroids,
    fit_slices,
    read_slice_table,
    slice_count,
    slice_ids,
    slice_table,
)


def _auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney AUROC (no ties in these continuous scores)."""
    r = np.argsort(np.argsort(score)) + 1.0
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((r[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _best_f1(within: np.ndarray, y: np.ndarray, truth: np.ndarray, c: int) -> float:
    best = 0.0
    rare = truth & (y == c)
    for k in np.unique(within[y == c]):
        member = (y == c) & (within == k)
        best = max(best, 2 * float((member & rare).sum()) / (member.sum() + rare.sum()))
    return best


@pytest.fixture(scope="module")
def clean_scan(tmp_path_factory):
    """Planted blobs with their TRUE labels (a 4% rare sub-cluster per class, no flips), a model trained
    100 steps (it still fails on part of the sub-clusters: a failure mode to find), scanned."""
    data = planted_blobs(seed=1)
    y = data["true_y"]
    model = trained_mlp(data["x"], y, seed=1, steps=100)
    s = scan(model, batches_of(data["x"], y), out=tmp_path_factory.mktemp("slices") / "s", dim=32, engine="vmap",
             shard_rows=500, seed=0)
    return s, data


@pytest.fixture(scope="module")
def noisy_scan(tmp_path_factory):
    data = planted_blobs(seed=0)
    model = trained_mlp(data["x"], data["y"], seed=0)
    s = scan(model, batches_of(data["x"], data["y"]), out=tmp_path_factory.mktemp("noisy") / "s", dim=32,
             engine="vmap", seed=0)
    return s, data


# ------------------------------------------------------------------------------------------------ K rule
def test_k_rule_grows_with_the_square_root_of_the_class():
    assert [slice_count(n) for n in (0, 1, 5, 10, 40, 200, 500, 4000, 10**6)] == [0, 1, 1, 1, 2, 4, 7, 16, 16]
    with pytest.raises(ValueError, match="-3"):
        slice_count(-3)


# ------------------------------------------------------------------------------------------------ slices
def test_a_slice_recovers_the_rare_subcluster_of_each_class(clean_scan):
    s, data = clean_scan
    df = s.manifest().sort_values("sample_id")
    y = data["true_y"]
    within = df["slice"].str.split("/").str[1].astype(int).to_numpy()
    f1 = [_best_f1(within, y, data["rare"], c) for c in range(4)]
    assert np.mean(f1) >= 0.8, f1
    assert min(f1) >= 0.5, f1
    # Recovered by the table too: the slice most rare members fall in holds few others.
    table = read_slice_table(s.path)
    for c in range(4):
        rare = data["rare"] & (y == c)
        rare_slice = pd.Series(df["slice"].to_numpy()[rare]).mode()[0]
        size = int(table.loc[table["slice"] == rare_slice, "size"].iloc[0])
        if f1[c] >= 0.8:
            assert size <= 2 * rare.sum()


def test_slicing_reads_the_vectors_twice_and_samples_a_bounded_number_of_rows(clean_scan, monkeypatch):
    """Two passes over the rows (the k-means sample, then the assignment) and a sample of at most 256 rows
    per slice; under the sample's memory cap each class shrinks in proportion (never below 16 rows per slice)
    and streamed Lloyd passes over every row refine the centroids (the old behaviour, on every scan, read
    every row up to 21 times)."""
    import hardmine.slices as slices_mod

    s, data = clean_scan
    y = data["true_y"].astype(np.int64)
    read, sampled = [0], []

    def blocks():
        for start, z in s.iter_gradients(max_rows=300):
            read[0] += len(z)
            yield start, z

    kmeans = slices_mod._kmeans

    def counting_kmeans(x, k, seed):
        sampled.append((len(x), k))
        return kmeans(x, k, seed)

    monkeypatch.setattr(slices_mod, "_kmeans", counting_kmeans)
    a = fit_slices(blocks, y, seed=0)
    n_c = np.bincount(y)
    assert len(y) * 2 <= read[0] <= len(y) * 2 + 300  # two passes (and the first block, for the width)
    assert [k for _, k in sampled] == [slice_count(int(m)) for m in n_c]
    assert [m for m, _ in sampled] == [min(256 * slice_count(int(m)), int(m)) for m in n_c]  # all 500
    # A cap of 400 rows' worth of vectors: the classes shrink in proportion, down to 16 per slice at least,
    # and the refinement passes over every row run (more than two passes).
    sampled.clear()
    read[0] = 0
    monkeypatch.setattr(slices_mod, "SAMPLE_BYTES_MAX", 400 * 4 * s.out_dim)
    b = fit_slices(blocks, y, seed=0)
    assert [m for m, _ in sampled] == [max(int(500 * 400 / 2000), 16 * slice_count(500))] * 4
    assert read[0] > len(y) * 3
    assert len(b.within) == len(y) and set(b.counts) == set(a.counts)


def test_slices_are_deterministic_for_a_seed_and_change_with_it(clean_scan):
    s, data = clean_scan
    y = data["true_y"].astype(np.int64)
    a = fit_slices(s.iter_gradients, y, seed=3)
    b = fit_slices(lambda: s.iter_gradients(max_rows=97), y, seed=3)  # other block boundaries, same result
    assert np.array_equal(a.within, b.within)
    assert np.allclose(a.similarity, b.similarity)
    c = fit_slices(s.iter_gradients, y, seed=4)
    assert not np.array_equal(a.within, c.within)
    # Numbered by size inside each class: slice 0 is the largest.
    for cls in range(4):
        sizes = np.bincount(a.within[y == cls])
        assert np.all(np.diff(sizes) <= 0), sizes
    # The scan's own column is the seed-0 assignment of the same rule.
    d = fit_slices(s.iter_gradients, y, seed=0)
    assert np.array_equal(d.ids(y), s.manifest().sort_values("sample_id")["slice"].to_numpy(dtype=object))


def test_output_layer_embedding_uses_only_the_last_layers_columns(clean_scan):
    s, data = clean_scan
    layout = s.engine_metadata["layout"]
    cols = embedding_columns(layout, SliceEmbedding.OUTPUT_LAYER)
    last = [e for e in layout if e["param"].startswith(layout[-1]["param"].rsplit(".", 1)[0] + ".")]
    assert len(cols) == sum(e["width"] for e in last) < s.out_dim
    assert embedding_columns(layout, "gradients") is None
    a = fit_slices(s.iter_gradients, data["true_y"].astype(np.int64), seed=0, columns=cols)
    assert set(a.counts) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="'pixels'"):
        embedding_columns(layout, "pixels")


@pytest.mark.parametrize("embedding", ["gradients", "output-layer"])  # one product per class run / two
def test_the_last_pass_gives_the_divergence_products_and_the_same_slices(clean_scan, embedding):
    from hardmine.score import divergence_directions, divergence_from_dots, divergence_scores, population_pass

    s, data = clean_scan
    y = data["true_y"].astype(np.int64)
    layout = s.engine_metadata["layout"]
    pop = population_pass(s.iter_gradients(), s.out_dim, y, 4)
    fit = fit_slice_centroids(s.iter_gradients, y, layout, 0, embedding)

    def blocks():
        return s.iter_gradients(max_rows=97)

    seen: list[int] = []
    got = assign_slices(fit, blocks, divergence_directions(pop), on_block=seen.append)
    plain = assign_slices(fit, blocks)
    assert plain.sq is None and plain.dots is None
    assert seen == sorted(seen) and seen[-1] == len(y) and len(seen) > 1
    # The same slices with or without the products, and the same as the one-call fit.
    np.testing.assert_array_equal(got.assignment.within, plain.assignment.within)
    np.testing.assert_allclose(got.assignment.similarity, plain.assignment.similarity, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(plain.assignment.within, fit_scan_slices(s.iter_gradients, y, layout, 0, embedding).within)
    # Every row's squared norm over all columns and its products with its class's directions.
    z = s.gradients().astype(np.float64)
    np.testing.assert_allclose(got.sq, np.einsum("ij,ij->i", z, z), rtol=1e-12)
    want = np.stack([z @ pop.unit_sum, z @ pop.plain_sum, np.einsum("ij,ij->i", z, pop.class_unit_sum[y]),
                     np.einsum("ij,ij->i", z, pop.class_plain_sum[y])], axis=1)
    np.testing.assert_allclose(got.dots, want, rtol=1e-10, atol=1e-10)
    scores = divergence_from_dots(got.sq, got.dots, y, pop)
    for k, v in divergence_scores(z, y, pop).items():
        np.testing.assert_allclose(scores[k], v, rtol=1e-9, atol=1e-12, err_msg=k)


def test_assign_slices_refuses_directions_that_do_not_fit_and_closes_its_share(clean_scan):
    from hardmine._shared_pass import SharedPass

    s, data = clean_scan
    y = data["true_y"].astype(np.int64)
    fit = fit_slice_centroids(s.iter_gradients, y, None, 0)
    with pytest.raises(ValueError, match=rf"directions must be \(classes, {s.out_dim}, e\)"):
        assign_slices(fit, s.iter_gradients, np.zeros((4, s.out_dim + 1, 4)))
    with pytest.raises(ValueError, match="3 classes"):
        assign_slices(fit, s.iter_gradients, np.zeros((3, s.out_dim, 4)))
    with pytest.raises(ValueError, match="SliceCentroids"):
        assign_slices(fit_slices(s.iter_gradients, y), s.iter_gradients)
    share = SharedPass()
    with pytest.raises(ValueError, match="directions must be"):
        assign_slices(fit, s.iter_gradients, np.zeros(4), share=share)
    share.help()  # closed by the failed call: returns at once instead of waiting for a pass


def test_slices_parquet_round_trips(clean_scan):
    s, data = clean_scan
    df = s.manifest()
    table = read_slice_table(s.path / SLICES_FILE)
    assert list(table.columns) == list(SLICE_COLUMNS)
    assert table["size"].sum() == len(df)
    assert set(table["slice"]) == set(df["slice"])
    assert table.attrs["hardmine"]["embedding"] == "gradients"
    again = slice_table(df)  # recomputed from the manifest (representatives differ: no centroid similarity)
    merged = table.merge(again, on="slice", suffixes=("", "_again"))
    for col in ("size", "share_of_class", "error_rate", "mean_loss", "mean_confidence", "ece", "label_issue_rate"):
        assert np.allclose(merged[col], merged[f"{col}_again"], equal_nan=True), col
    assert merged["hardest_ids"].map(list).equals(merged["hardest_ids_again"].map(list))
    by_id = df.set_index("sample_id")
    for _, row in table.iterrows():
        members = set(by_id.index[by_id["slice"] == row["slice"]])
        assert set(row["representative_ids"]) <= members and set(row["hardest_ids"]) <= members
        assert len(row["representative_ids"]) == min(5, row["size"])
        top = by_id.loc[list(members), "hardness"].max()
        assert by_id.loc[row["hardest_ids"][0], "hardness"] == top
    with pytest.raises(ValueError, match="does not exist"):
        read_slice_table(s.path / "nope.parquet")


def test_ece_known_values():
    # All predictions at confidence 0.9, 90% right: calibrated. At 0.9 but 50% right: off by 0.4.
    conf = np.full(10, 0.9)
    assert expected_calibration_error(conf, np.array([1] * 9 + [0])) == pytest.approx(0.0)
    assert expected_calibration_error(conf, np.array([1] * 5 + [0] * 5)) == pytest.approx(0.4)
    # Two bins: 0.25 with 0/2 right (0.25 off), 1.0 with 2/2 right (0 off) -> 0.125.
    assert expected_calibration_error(np.array([0.25, 0.25, 1.0, 1.0]), np.array([0, 0, 1, 1])) == pytest.approx(0.125)
    with pytest.raises(ValueError, match="bins=0"):
        expected_calibration_error(conf, conf, bins=0)


def test_bad_inputs_raise_clear_errors(clean_scan):
    s, data = clean_scan
    with pytest.raises(ValueError, match="integer"):
        fit_slices(s.iter_gradients, data["true_y"].astype(float))
    with pytest.raises(ValueError, match="cover 2000 rows but there are 10"):
        fit_slices(s.iter_gradients, data["true_y"][:10].astype(np.int64))
    with pytest.raises(ValueError, match="callable"):
        fit_slices([(0, np.zeros((2, 3)))], np.array([0, 1]))


# ------------------------------------------------------------------------------------------ label issues
def test_label_issue_ranks_flipped_labels_and_is_label_issue_is_precise(noisy_scan):
    s, data = noisy_scan
    df = s.manifest().sort_values("sample_id").reset_index(drop=True)
    flipped = data["flipped"]
    assert _auroc(df["label_issue"].to_numpy(), flipped) >= 0.95
    for m in LabelIssueMethod:
        assert _auroc(label_issue_score(df, m), flipped) >= 0.9, m
    flags = df["is_label_issue"].to_numpy(dtype=bool)
    assert np.array_equal(flags, flag_label_issues(df))
    assert flags.sum() >= 0.4 * flipped.sum()
    assert flipped[flags].mean() >= 0.8  # what it flags is mostly flipped
    assert not (flags & data["rare"]).any() or (flags & data["rare"]).sum() <= 2  # rare-but-valid stay unflagged


def test_flags_follow_the_rule_row_by_row_with_thresholds_missing_for_some_predictions():
    rng = np.random.default_rng(3)
    n = 500
    y = rng.integers(0, 5, n)
    pred = rng.integers(-1, 7, n)  # -1, 5 and 6 have no threshold below: never flagged
    conf = rng.uniform(0, 1, n)
    pred_conf = rng.uniform(0, 1, n)
    pred_conf[::50] = np.nan
    t = {0: 0.2, 1: 0.5, 2: 0.9, 3: 0.0, 4: 0.6}
    df = pd.DataFrame({"label": y, "pred": pred, "confidence": conf, "pred_confidence": pred_conf})
    want = np.array([p != lab and p in t and pc >= t[p] for lab, p, pc in zip(y, pred, pred_conf)])  # NaN: False
    got = flag_label_issues(df, thresholds=t)
    assert np.array_equal(got, want) and 0 < want.sum() < n
    assert not flag_label_issues(df, thresholds={}).any()


def test_label_issues_are_not_boosted_by_the_slices_export(noisy_scan):
    s, data = noisy_scan
    df = s.export(strategy="slices").sort_values("sample_id").reset_index(drop=True)
    flags = df["is_label_issue"].to_numpy(dtype=bool)
    w = df["weight"].to_numpy()
    assert flags.any()
    for c in range(4):
        m = df["label"].to_numpy() == c
        if (flags & m).any():
            assert w[flags & m].max() <= w[~flags & m].min() + 1e-12  # never above any unflagged sample
    # Without the flags the same frame boosts flipped samples above the rest.
    plain = df.drop(columns="is_label_issue")
    w_plain, _ = compute_weights(plain, "slices")
    assert w_plain[data["flipped"]].mean() > w[data["flipped"]].mean()


@pytest.mark.parametrize("strategy", ["top-k", "proportional", "per-class", "slices"])
def test_no_strategy_oversamples_a_flagged_label_issue(noisy_scan, strategy):
    s, data = noisy_scan
    df = s.export(strategy=strategy).sort_values("sample_id").reset_index(drop=True)
    flags = df["is_label_issue"].to_numpy(dtype=bool)
    w = df["weight"].to_numpy()
    labels = df["label"].to_numpy()
    assert flags.any()
    for c in range(4):
        m = labels == c
        uniform = w[m].mean() if strategy in ("per-class", "slices") else w.mean()
        assert (w[flags & m] <= uniform + 1e-9).all()  # at most what uniform sampling would give
    # The same manifest without the flags (as written before they existed) does oversample flipped labels.
    plain = df.drop(columns="is_label_issue")
    w_plain, _ = compute_weights(plain, strategy)
    assert w_plain[data["flipped"]].mean() > w[data["flipped"]].mean()


def test_slices_weights_by_hand():
    # Class 0: slice 0/0 (4 samples, 2 wrong, one of them a flagged label issue), 0/1 (4 samples, all right);
    # class 1: one slice, none wrong. The formula of the strategy table, exactly.
    df = pd.DataFrame(
        {
            "label": [0, 0, 0, 0, 0, 0, 0, 0, 1, 1],
            "slice": ["0/0"] * 4 + ["0/1"] * 4 + ["1/0"] * 2,
            "correct": [False, False, True, True, True, True, True, True, True, True],
            "is_label_issue": [True, False, False, False, False, False, False, False, False, False],
            "hardness": np.linspace(1, 0.1, 10),
            "rank": np.arange(1, 11),
        }
    )
    w, hard = compute_weights(df, "slices", slice_boost=5.0, cap=None)
    # Non-issue members: 0/0 has 1 wrong of 3 -> e_s = 1/3; class 0: 1 wrong of 7 -> e_c = 1/7.
    raw = np.array([1.0] + [1 + 5 * (1 / 3) / (1 / 7)] * 3 + [1.0] * 4 + [1.0, 1.0])
    raw[:8] /= raw[:8].sum()
    raw[8:] /= raw[8:].sum()
    assert np.allclose(w, raw * 10 / raw.sum())
    _, hard_pc = compute_weights(df, "per-class", cap=None)
    assert hard.tolist() == hard_pc.tolist()  # is_hard: the top fraction of each class, as per-class
    with pytest.raises(ValueError, match="'slice'"):
        compute_weights(df.drop(columns="slice"), "slices")


def test_class_thresholds_are_mean_label_confidence():
    t = class_thresholds(np.array([0.9, 0.7, 0.2, 0.4]), np.array([0, 0, 1, 1]))
    assert t == pytest.approx({0: 0.8, 1: 0.3})
    with pytest.raises(ValueError, match="float64"):
        class_thresholds(np.array([0.5]), np.array([0.0]))


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_slices_on_a_real_scan(clean_scan):
    s, _ = clean_scan
    runner = CliRunner()
    res = runner.invoke(app, ["slices", str(s.path), "--top", "3", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    table = read_slice_table(s.path)
    assert len(rows) == 3
    errs = [r["error_rate"] for r in rows]
    assert errs == sorted(errs, reverse=True) and errs[0] == table["error_rate"].max()
    res = runner.invoke(app, ["slices", str(s.path), "--class", "2", "--json"])
    assert res.exit_code == 0, res.output
    assert {r["label"] for r in json.loads(res.output)} == {2}
    res = runner.invoke(app, ["slices", str(s.path), "--top", "2"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "error_rate" in res.output and rows[0]["slice"] in res.output
    res = runner.invoke(app, ["slices", str(s.path), "--class", "9"])
    assert res.exit_code == 2 and "--class 9" in res.output


def test_rescore_rewrites_slices_and_manifest_reads_old_files(clean_scan, tmp_path):
    s, _ = clean_scan
    reopened = Scan.open(s.path)
    before = read_slice_table(s.path)
    df = reopened.rescore()
    pd.testing.assert_frame_equal(read_slice_table(s.path), before)
    assert df["slice"].notna().all()
    # A manifest written before these columns existed is still read.
    old = read_manifest(s.path).drop(columns=["slice", "label_issue", "is_label_issue"])
    old.to_parquet(tmp_path / "old.parquet")
    with pytest.warns(UserWarning, match="no hardmine metadata"):
        back = read_manifest(tmp_path / "old.parquet")
    assert "is_label_issue" not in back


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(-5, 2**40), st.integers(0, 30)), max_size=60),
    st.sampled_from([np.int64, np.int32, np.uint8]),
)
def test_slice_ids_name_every_row_label_slash_slice(pairs, label_dtype):
    """Whatever the labels (dense, sparse, negative, any integer width): "<label>/<k>" row by row."""
    lab = np.array([a for a, _ in pairs], dtype=np.int64)
    if label_dtype is not np.int64:
        info = np.iinfo(label_dtype)
        lab = np.clip(lab, info.min, info.max).astype(label_dtype)
    w = np.array([b for _, b in pairs], dtype=np.int64)
    got = slice_ids(lab, w)
    assert got.dtype == object and got.tolist() == [f"{a}/{b}" for a, b in zip(lab.tolist(), w.tolist())]


@settings(max_examples=60)
@given(
    st.lists(st.tuples(st.integers(0, 2), st.sampled_from([0.0, 0.5, 1.0, np.nan]), st.integers(-2, 2)),
             min_size=1, max_size=60),
    st.integers(0, 7),
)
def test_slice_examples_are_the_top_members_with_ties_in_scan_order(rows, n_examples):
    # Many ties (three hardness values, five similarities) and NaN hardness: the examples must be exactly the
    # members first in a stable sort, hardest first (NaN last) and most similar first.
    sl, hard, sim = zip(*rows)
    df = pd.DataFrame({"slice": [f"0/{k}" for k in sl], "label": 0, "sample_id": np.arange(len(rows)) * 10,
                       "hardness": np.array(hard, dtype=float)})
    similarity = np.array(sim, dtype=float)
    table = slice_table(df, similarity, n_examples=n_examples)
    for _, row in table.iterrows():
        m = np.flatnonzero(df["slice"].to_numpy() == row["slice"])
        hard_key = -np.nan_to_num(df["hardness"].to_numpy()[m], nan=-np.inf)
        assert list(row["hardest_ids"]) == list(df["sample_id"].to_numpy()[m[np.argsort(hard_key, kind="stable")[:n_examples]]])
        rep = m[np.argsort(-similarity[m], kind="stable")[:n_examples]]
        assert list(row["representative_ids"]) == list(df["sample_id"].to_numpy()[rep])


def test_annotate_manifest_adds_label_issues_unless_told_they_are_there(noisy_scan):
    # Compared with add_label_issue_columns on the same frame, not with the stored manifest: other tests rescore
    # this scan (with other label-issue methods too), and under `make mutate` they may run first.
    from hardmine.label_issues import add_label_issue_columns
    from hardmine.slices import annotate_manifest

    s, _ = noisy_scan
    layout = s.engine_metadata.get("layout")
    base = s.manifest().drop(columns=["slice", "label_issue", "is_label_issue"])
    want = add_label_issue_columns(base.copy())["label_issue"].to_numpy()
    fresh = base.copy()
    annotate_manifest(fresh, s.iter_gradients, layout, 0, None)
    np.testing.assert_array_equal(fresh["label_issue"].to_numpy(), want)  # added
    kept = base.copy()
    kept["label_issue"] = -1.0  # a caller's own columns (a scan adds them while its clustering finishes)
    kept["is_label_issue"] = pd.array([False] * len(kept), dtype="boolean")
    annotate_manifest(kept, s.iter_gradients, layout, 0, None, label_issues=False)
    assert (kept["label_issue"] == -1.0).all()  # left as they were
    pd.testing.assert_series_equal(kept["slice"], fresh["slice"])
    # The slice column given with its assignment (a scan names the slices in its worker) is the one used.
    a = fit_scan_slices(s.iter_gradients, base["label"].to_numpy(), layout, 0)
    assert isinstance(a, SliceAssignment)
    names = np.array([f"given/{i}" for i in range(len(base))], dtype=object)
    given = base.copy()
    annotate_manifest(given, s.iter_gradients, layout, 0, None, assignment=a, slice_column=names)
    assert given["slice"].tolist() == names.tolist()
    with pytest.raises(ValueError, match="slice_column"):
        annotate_manifest(base.copy(), s.iter_gradients, layout, 0, None, assignment=a, slice_column=names[:-1])
    with pytest.raises(ValueError, match="slice_column"):
        annotate_manifest(base.copy(), s.iter_gradients, layout, 0, None, slice_column=names)


def test_set_column_shares_the_array_and_keeps_rows_in_order():
    from hardmine._frames import set_column

    df = pd.DataFrame({"a": [1.0, 2.0, 3.0]}, index=[10, 5, 7])
    v = np.array([4.0, 5.0, 6.0])
    set_column(df, "b", v)
    if int(pd.__version__.split(".")[0]) >= 3 or pd.options.mode.copy_on_write:  # pandas 2 copied a Series too
        assert np.shares_memory(df["b"].to_numpy(), v)  # no 8 MB copy per column at a million rows
    assert df["b"].tolist() == [4.0, 5.0, 6.0]  # by position, whatever the frame's index
    set_column(df, "c", pd.array([True, None, False], dtype="boolean"))
    assert df["c"].dtype == "boolean" and df["c"].isna().tolist() == [False, True, False]
