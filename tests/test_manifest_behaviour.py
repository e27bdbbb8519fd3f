"""manifest.py behaviour the mutation run asked for: weights, caps, temperatures, strategies, metadata, errors."""

from __future__ import annotations

import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_manifest import _io_frame

import hardmine
from hardmine.enums import Strategy, TaskKind
from hardmine.manifest import (
    REQUIRED_COLUMNS,
    REQUIRED_COLUMNS_LM,
    bool_column,
    cap_weights,
    check_destination,
    class_names,
    compute_weights,
    export_manifest,
    finish_manifest,
    float_column,
    read_manifest,
    read_manifest_metadata,
    required_columns,
    resolve_strategy,
    write_manifest,
)


# ------------------------------------------------------------------------------------------- columns
def test_bool_column_is_one_zero_and_nan_for_missing():
    df = pd.DataFrame({"flag": pd.array([True, False, None], dtype="boolean")})
    out = bool_column(df, "flag")
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, [1.0, 0.0, np.nan])


def test_bool_column_of_an_absent_column_is_all_nan():
    df = pd.DataFrame({"x": [1, 2, 3, 4]})
    out = bool_column(df, "flag")
    assert out.shape == (4,) and out.dtype == np.float64 and np.isnan(out).all()


def test_float_column_reads_nullable_columns_with_nan_and_absent_ones_as_nan():
    df = pd.DataFrame({"a": pd.array([1, None, 3], dtype="Int64"), "b": pd.array([True, None, False], dtype="boolean")})
    np.testing.assert_array_equal(float_column(df, "a"), [1.0, np.nan, 3.0])
    np.testing.assert_array_equal(float_column(df, "b"), [1.0, np.nan, 0.0])
    out = float_column(df, "missing")
    assert out.shape == (3,) and out.dtype == np.float64 and np.isnan(out).all()


# --------------------------------------------------------------------------------------- class names
def test_class_names_from_a_manifest_frame_and_from_its_metadata():
    df = pd.DataFrame({"sample_id": [0, 1]})
    df.attrs["hardmine"] = {"class_names": ["cat", 7]}
    assert class_names(df) == ["cat", "7"]  # as text, class 0 first
    assert class_names({"class_names": ["a", "b"]}) == ["a", "b"]  # the metadata dict itself


def test_class_names_unknown_is_none():
    df = pd.DataFrame({"sample_id": [0, 1]})
    assert class_names(df) is None  # no metadata at all
    df.attrs["hardmine"] = {"task": "classification"}
    assert class_names(df) is None  # metadata without names
    assert class_names({"class_names": []}) is None
    assert class_names({"class_names": "ab"}) is None  # not a list
    assert class_names(None) is None


# ------------------------------------------------------------------ manifests without hardmine metadata
def test_a_resaved_manifest_warns_what_is_lost_at_the_callers_line(tmp_path):
    p = tmp_path / "plain.parquet"
    _io_frame().to_parquet(p)  # pandas drops the hardmine key, keeps the columns
    with pytest.warns(UserWarning) as rec:
        read_manifest_metadata(p)
    (w,) = [r for r in rec if "no hardmine metadata" in str(r.message)]
    assert str(p) in str(w.message) and "without provenance" in str(w.message)
    # Attributed to the caller, not to a line inside hardmine (under mutmut, whose trampoline adds frames,
    # that is mutmut's file; in a plain run, this test file).
    assert Path(hardmine.__file__).parent not in Path(w.filename).resolve().parents


def test_export_refuses_an_object_that_only_looks_half_like_a_scan():
    df = _io_frame()
    only_manifest = type("OnlyManifest", (), {"manifest": lambda self: df})()
    with pytest.raises(ValueError, match="export_manifest got a OnlyManifest; pass a Scan"):
        export_manifest(only_manifest)
    only_path = type("OnlyPath", (), {"manifest_path": "x.parquet"})()
    with pytest.raises(ValueError, match="export_manifest got a OnlyPath; pass a Scan"):
        export_manifest(only_path)


def test_a_bare_frame_is_exported_with_a_warning_naming_the_frame():
    df = _io_frame()  # every column, no attrs["hardmine"]
    with pytest.warns(UserWarning) as rec:
        out = export_manifest(df, strategy="top-k")
    msgs = [str(r.message) for r in rec]
    assert any(m.startswith("the DataFrame has every manifest column but no hardmine metadata") for m in msgs), msgs
    assert out.attrs["hardmine"]["provenance"] is None


def test_export_of_an_unknown_source_says_what_to_pass():
    with pytest.raises(ValueError) as e:
        export_manifest(42)
    msg = str(e.value)
    assert "export_manifest got a int" in msg
    assert "pass a Scan, a scan directory, a manifest path or a DataFrame from read_manifest" in msg


# ------------------------------------------------------------------------------------------- export
def _framed() -> pd.DataFrame:
    """A manifest frame with its hardmine metadata (so no bare-frame warning)."""
    df = _io_frame()
    df.attrs["hardmine"] = {"format": "hardmine-manifest", "format_version": 2, "task": "classification"}
    return df


def _sliced_frame() -> pd.DataFrame:
    """Two classes of 6; class 0 has a failing slice (0/1: 2 of 3 wrong) and a clean one (0/0)."""
    df = _framed()
    df["label"] = np.repeat([0, 1], 6)
    df["slice"] = ["0/0"] * 3 + ["0/1"] * 3 + ["1/0"] * 6
    df["correct"] = pd.array([True, True, True, False, False, True] + [True] * 5 + [False], dtype="boolean")
    return df


def test_export_passes_the_slice_boost_on():
    df = _sliced_frame()
    flat = export_manifest(df.copy(), strategy="slices", slice_boost=0.0, cap=None)["weight"].to_numpy()
    np.testing.assert_allclose(flat, 1.0)  # no boost: class-balanced (two classes of 6) and nothing else
    boosted = export_manifest(df.copy(), strategy="slices", slice_boost=2.0, cap=None)
    w = boosted["weight"].to_numpy()
    assert w[3:6].min() > w[0:3].max()  # the failing slice of class 0 is drawn more often than the clean one
    assert boosted.attrs["hardmine"]["export"]["slice_boost"] == 2.0


def test_export_applies_the_cap():
    df = _framed()
    uncapped = export_manifest(df.copy(), strategy="top-k", top=0.1, boost=20.0, cap=None)["weight"]
    assert uncapped.max() > 3.0  # the cap below binds
    capped = export_manifest(df.copy(), strategy="top-k", top=0.1, boost=20.0, cap=3.0)
    assert capped["weight"].max() == pytest.approx(3.0)
    assert capped["weight"].mean() == pytest.approx(1.0)
    assert capped.attrs["hardmine"]["export"]["cap"] == 3.0


def test_export_overwrites_a_foreign_file_only_when_told(tmp_path):
    target = tmp_path / "user.csv"
    target.write_text("a,b\n")
    with pytest.raises(ValueError, match="pass overwrite=True"):
        export_manifest(_framed(), out=target)
    assert target.read_text() == "a,b\n"
    export_manifest(_framed(), out=target, overwrite=True)
    assert read_manifest_metadata(target)["export"]["strategy"]


def test_export_names_a_bad_hard_set():
    with pytest.raises(ValueError, match=r"^hard_set='most' is not a valid choice; use one of 'top'"):
        export_manifest(_framed(), hard_set="most")


def test_export_stamps_a_fresh_utc_creation_time():
    df = _framed()
    df.attrs["hardmine"]["created"] = "2000-01-01T00:00:00+00:00"
    out = export_manifest(df)
    created = out.attrs["hardmine"]["created"]
    assert created != "2000-01-01T00:00:00+00:00" and created.endswith("+00:00")  # ISO 8601, UTC
    assert abs(datetime.fromisoformat(created) - datetime.now(timezone.utc)) < timedelta(hours=1)


# ---------------------------------------------------------------------------------------------- slices
def test_slices_need_a_slice_for_every_sample():
    df = _sliced_frame()
    df.loc[2, "slice"] = None
    with pytest.raises(ValueError, match=r"^strategy 'slices' needs a slice for every sample; rescore the scan"):
        compute_weights(df, "slices")


def test_slices_count_an_unknown_prediction_as_correct():
    df = _sliced_frame()
    known = compute_weights(df, "slices", slice_boost=2.0, cap=None)[0]
    df["correct"] = df["correct"].astype("boolean")
    df.loc[0, "correct"] = pd.NA  # was True: an unknown outcome is not an error of its slice
    unknown = compute_weights(df, "slices", slice_boost=2.0, cap=None)[0]
    np.testing.assert_allclose(unknown, known)


def test_slices_boost_a_lone_failing_member_over_a_flagged_label_issue():
    # Class 0: sample 0 is wrong and alone in its slice; sample 1 is a flagged label issue (never boosted).
    df = _sliced_frame().iloc[:8].copy()
    df["label"] = [0, 0, 1, 1, 1, 1, 1, 1]
    df["slice"] = ["0/0", "0/1", "1/0", "1/0", "1/0", "1/1", "1/1", "1/1"]
    df["correct"] = pd.array([False, True, True, True, True, True, True, True], dtype="boolean")
    df["is_label_issue"] = pd.array([False, True] + [False] * 6, dtype="boolean")
    w = compute_weights(df, "slices", slice_boost=2.0, cap=None)[0]
    # raw weights 1 + 2 * (1/1) / (1/1) = 3 and 1, each class then gets the same total mass (4 per class of 8)
    np.testing.assert_allclose(w[:2], [3.0, 1.0])
    # Class 1 has no error at all: no slice is boosted, its six members share its mass 4 equally.
    np.testing.assert_allclose(w[2:], 4.0 / 6.0)


# ------------------------------------------------------------------------------- the cap (cap_weights)
def test_cap_weights_takes_integer_weights():
    w = cap_weights([1, 1, 2], cap=None)  # counts, e.g. how often each sample should be drawn
    assert w.dtype == np.float64
    np.testing.assert_allclose(w, [0.75, 0.75, 1.5])


def test_cap_weights_never_turns_zero_weights_into_nan():
    # Everything above the cap is fixed and the rest is zero: nothing left to scale up.
    w = cap_weights(np.array([5.0, 0.0, 0.0, 0.0]), cap=2.0)
    assert np.isfinite(w).all()
    np.testing.assert_allclose(w, [2.0, 0.0, 0.0, 0.0])


# ------------------------------------------------------------------------------------- destinations
def test_check_destination_refuses_a_foreign_file_unless_told_and_quotes_the_path(tmp_path):
    target = tmp_path / "user.csv"
    target.write_text("a,b\n")
    with pytest.raises(ValueError) as e:
        check_destination(target)  # overwrite is off by default
    assert str(e.value).startswith(f"{str(target)!r} exists and is not a hardmine manifest")
    assert check_destination(target, overwrite=True) == target
    with pytest.raises(ValueError) as e:
        check_destination(tmp_path)
    assert str(e.value).startswith(f"cannot write a manifest to {str(tmp_path)!r}: it is a directory")


# --------------------------------------------------------------------------- compute_weights: errors
def test_a_negative_slice_boost_is_refused_with_its_name_and_meaning():
    with pytest.raises(ValueError) as e:
        compute_weights(_sliced_frame(), "slices", slice_boost=-1.0)
    assert str(e.value) == "slice_boost=-1.0 must be a finite number >= 0 (0 = class-balanced, no slice boost)."


def test_class_balanced_strategies_name_the_remedy_for_non_integer_labels():
    df = _framed()
    df["label"] = df["label"].astype(np.float64)  # a regression target
    for strategy in ("per-class", "slices"):
        with pytest.raises(ValueError) as e:
            compute_weights(df.assign(slice="0/0"), strategy)
        assert "needs integer class labels" in str(e.value)
        assert str(e.value).endswith("use 'top-k' or 'proportional' for regression scans.")


def test_an_empty_manifest_has_nothing_to_weight():
    with pytest.raises(ValueError, match=r"^the manifest is empty; there is nothing to weight\.$"):
        compute_weights(_framed().iloc[:0], "top-k")


def test_a_bad_strategy_is_named_as_the_strategy_argument():
    with pytest.raises(ValueError, match=r"^strategy='most' is not a valid choice; use one of 'top-k'"):
        compute_weights(_framed(), "most")


# ------------------------------------------------------------------------------------------ hard sets
def test_threshold_hard_set_includes_a_sample_exactly_at_the_threshold():
    df = _framed()
    cut = float(df["hardness"].iloc[3])
    _, hard = compute_weights(df, "top-k", hard_set="threshold", threshold=cut)
    assert hard.tolist() == [True] * 4 + [False] * (len(df) - 4)  # hardness decreases with the row


def test_without_any_hardness_no_sample_reaches_a_threshold_above_the_hardness_scale():
    # hardness is a mean of rank-normalised signals, so at most 1; a sample without any signal is weighted
    # like the others but never counted above that scale.
    df = _framed()
    df["hardness"] = np.nan
    w, hard = compute_weights(df, "proportional", hard_set="threshold", threshold=1.5)
    assert not hard.any()
    np.testing.assert_allclose(w, 1.0)


def test_noise_rate_needs_confident_error_and_says_so():
    said = ("hard_set='noise-rate' needs the 'confident_error' column of a labelled classification manifest; this "
            "manifest has none (regression or unlabelled data): use hard_set='top' or 'threshold'.")
    with pytest.raises(ValueError) as e:
        compute_weights(_framed().drop(columns="confident_error"), "top-k", hard_set="noise-rate")
    assert str(e.value) == said
    # a regression or unlabelled manifest has the column, all null: no noise rate to read (not one sample hard)
    df = _framed()
    df["confident_error"] = pd.array([pd.NA] * len(df), dtype="boolean")
    with pytest.raises(ValueError) as e:
        compute_weights(df, "top-k", hard_set="noise-rate")
    assert str(e.value) == said


def test_noise_rate_counts_an_unknown_confident_error_as_none():
    df = _framed()
    ce = np.zeros(len(df), dtype=object)
    ce[:] = False
    ce[[0, 1, 2]] = True  # 3 of 12 confident errors: the hardest 25% are hard
    df["confident_error"] = pd.array(list(ce), dtype="boolean")
    df.loc[[5, 6, 7], "confident_error"] = pd.NA  # unknown: not an estimated label error
    _, hard = compute_weights(df, "top-k", hard_set="noise-rate")
    assert hard.sum() == 3 and hard[:3].all()


def test_noise_rate_without_any_confident_error_marks_exactly_one_sample():
    df = _framed()
    df["confident_error"] = pd.array([False] * len(df), dtype="boolean")
    _, hard = compute_weights(df, "top-k", hard_set="noise-rate")
    assert hard.tolist() == [True] + [False] * (len(df) - 1)  # at least one sample, the hardest


# -------------------------------------------------------------------------------- weights from hardness
def test_weights_of_a_float32_hardness_column_are_those_of_its_values_in_float64():
    df = _framed()
    df["hardness"] = np.linspace(0.9, 0.1, len(df)).astype(np.float32)
    as64 = df.assign(hardness=df["hardness"].astype(np.float64))
    w32 = compute_weights(df, "proportional", temperature=3.0, cap=None)[0]
    w64 = compute_weights(as64, "proportional", temperature=3.0, cap=None)[0]
    np.testing.assert_allclose(w32, w64, rtol=1e-13, atol=0)


def test_the_label_issue_limit_does_not_depend_on_the_hardness_scale():
    # proportional: a flagged sample gets at most the mean raw weight; multiplying every hardness by the same
    # factor multiplies every raw weight by the same factor, so the weights are the same.
    df = _framed().iloc[:3].copy()
    df["is_label_issue"] = pd.array([True, False, False], dtype="boolean")
    df["hardness"] = [3.0, 1.0, 1.0]
    df["rank"] = [1, 2, 3]
    unit = compute_weights(df, "proportional", temperature=2.0, cap=None)[0]
    tiny = compute_weights(df.assign(hardness=df["hardness"] * 1e-5), "proportional", temperature=2.0, cap=None)[0]
    np.testing.assert_allclose(unit, [1.0, 1.0, 1.0])  # the flagged sample is held at the mean, which it sets
    np.testing.assert_allclose(tiny, unit, rtol=1e-9)


def test_an_unknown_label_issue_flag_does_not_keep_a_sample_out_of_the_boost():
    df = _framed()
    df["is_label_issue"] = pd.array([pd.NA, True] + [False] * (len(df) - 2), dtype="boolean")
    w, hard = compute_weights(df, "top-k", top=2 / len(df), boost=4.0, cap=None)
    assert hard[:2].all()
    assert w[0] == pytest.approx(4 * w[2])  # unknown: boosted like any hard sample
    assert w[1] == pytest.approx(w[2])  # flagged: the un-boosted weight


def test_slices_do_not_boost_anything_in_a_class_without_errors():
    # Class 1 has no wrong prediction and one flagged label issue: every member gets the same weight.
    df = _sliced_frame()
    df.loc[11, "correct"] = True
    df["is_label_issue"] = pd.array([False] * 6 + [True] + [False] * 5, dtype="boolean")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and nothing to warn about
        w = compute_weights(df, "slices", slice_boost=2.0, cap=None)[0]
    np.testing.assert_allclose(w[6:], 1.0)


# ------------------------------------------------------------------------------------ default strategy
def test_a_classification_manifest_with_a_missing_slice_defaults_to_per_class():
    df = _sliced_frame()
    df.loc[4, "slice"] = None
    assert resolve_strategy(df) is Strategy.PER_CLASS
    assert export_manifest(df).attrs["hardmine"]["export"]["strategy"] == "per-class"
    assert resolve_strategy(_sliced_frame()) is Strategy.SLICES


def test_the_recorded_task_decides_the_default_strategy_over_the_label_dtype():
    df = _sliced_frame()
    df.attrs["hardmine"] = {"task": "regression"}  # integer targets of a regression
    assert resolve_strategy(df) is Strategy.PROPORTIONAL
    df = _sliced_frame()
    df["label"] = df["label"].astype(np.float64)  # read back as floats, still a classification
    df.attrs["hardmine"] = {"task": "classification"}
    assert resolve_strategy(df) is Strategy.SLICES


def test_a_manifest_of_predicted_targets_defaults_to_proportional():
    df = _sliced_frame()
    df.attrs["hardmine"] = {"task": "classification", "targets": "predictions"}  # no labels to balance by
    assert resolve_strategy(df) is Strategy.PROPORTIONAL


def test_without_metadata_the_labels_decide_the_default_strategy():
    df = _sliced_frame()
    df.attrs.clear()
    assert resolve_strategy(df) is Strategy.SLICES  # integer labels, no missing value: classification
    assert resolve_strategy(df.drop(columns="label")) is Strategy.PROPORTIONAL
    assert resolve_strategy(df.assign(label=df["label"] + 0.5)) is Strategy.PROPORTIONAL
    missing = df.assign(label=pd.array([None] + df["label"].tolist()[1:], dtype="Int64"))
    assert resolve_strategy(missing) is Strategy.PROPORTIONAL


# ------------------------------------------------------------------------------------- finish_manifest
_DOOR = {"task": "classification", "source": {"door": "test"}, "loss": "cross_entropy"}


def _tail_frame() -> pd.DataFrame:
    return pd.DataFrame({"sample_id": np.arange(8), "label": np.repeat([0, 1], 4),
                         "hardness": [0.9, 0.1, 0.5, 0.3, 0.8, 0.2, 0.7, 0.4]})


def test_finish_manifest_records_the_common_metadata():
    out = finish_manifest(_tail_frame(), _DOOR, strategy="top-k")
    meta = out.attrs["hardmine"]
    assert meta["format"] == "hardmine-manifest" and meta["format_version"] == 2
    assert meta["hardmine_version"] == hardmine.__version__
    assert meta["created"].endswith("+00:00")  # UTC, ISO 8601
    assert abs(datetime.fromisoformat(meta["created"]) - datetime.now(timezone.utc)) < timedelta(hours=1)
    assert meta["task"] == "classification" and meta["n_samples"] == 8
    assert out["is_hard"].dtype == "boolean"


def test_finish_manifest_needs_a_source_that_names_its_door():
    with pytest.raises(ValueError, match="'source' must be a dict with 'door', got {'steps': 3}"):
        finish_manifest(_tail_frame(), {**_DOOR, "source": {"steps": 3}})


def test_finish_manifest_refuses_a_bad_cap_before_touching_the_frame():
    df = _tail_frame()
    with pytest.raises(ValueError, match="cap"):
        finish_manifest(df, _DOOR, cap=0.5)
    assert list(df.columns) == ["sample_id", "label", "hardness"] and not df.attrs


def test_finish_manifest_keeps_a_rank_the_frame_has():
    df = _tail_frame().assign(rank=np.arange(1, 9))  # the door's own order, not the hardness order
    out = finish_manifest(df, _DOOR, strategy="top-k", top=0.25)
    assert out["rank"].tolist() == list(range(1, 9))
    assert out["is_hard"].tolist() == [True, True] + [False] * 6


def test_finish_manifest_applies_the_cap_it_is_given():
    kw = dict(strategy="top-k", top=0.125, boost=50.0)
    assert finish_manifest(_tail_frame(), _DOOR, cap=2.0, **kw)["weight"].max() == pytest.approx(2.0)
    uncapped = finish_manifest(_tail_frame(), _DOOR, cap=None, **kw)["weight"]
    assert uncapped.max() == pytest.approx(8 * 50 / 57) and uncapped.max() < 20  # below the default cap
    capped = finish_manifest(_tail_frame(), _DOOR, cap=1.5, **kw)
    assert capped["weight"].max() == pytest.approx(1.5) and capped.attrs["hardmine"]["export"]["cap"] == 1.5


def test_finish_manifest_defaults_by_the_recorded_task_and_targets():
    assert finish_manifest(_tail_frame(), {**_DOOR, "task": "regression"}).attrs["hardmine"]["export"][
        "strategy"] == "proportional"  # integer targets, but a regression
    out = finish_manifest(_tail_frame(), {**_DOOR, "targets": "predictions"})
    assert out.attrs["hardmine"]["export"]["strategy"] == "proportional"
    with_labels = finish_manifest(_tail_frame(), _DOOR)  # classification, no slices: per-class
    assert with_labels.attrs["hardmine"]["export"]["strategy"] == "per-class"


# ------------------------------------------------------------------------------------------ the reader
def test_a_duplicated_id_is_reported_with_the_file_and_three_examples(tmp_path):
    df = _framed()
    df["sample_id"] = [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]  # six duplicates
    p = tmp_path / "dup.parquet"
    write_manifest(df, p, {"task": "classification"})
    with pytest.raises(ValueError) as e:
        read_manifest(p)
    assert str(e.value) == f"{p}: sample_id must be unique and present; duplicated/missing e.g. [0, 1, 2]."


def test_unsigned_ids_are_written_as_they_are_and_too_large_ones_are_refused(tmp_path):
    df = _framed()
    big = np.iinfo(np.int64).max
    df["sample_id"] = np.arange(big - len(df) + 1, big + 1, dtype=np.uint64)  # the largest that fit int64
    p = write_manifest(df, tmp_path / "u.parquet", {"task": "classification"})
    assert read_manifest(p)["sample_id"].tolist() == [int(v) for v in df["sample_id"]]
    df["sample_id"] = np.arange(len(df), dtype=np.uint64) + np.uint64(2**63)  # would wrap to negative ids
    with pytest.raises(ValueError, match=r"sample_id 9223372036854775819 does not fit .* pass such ids as strings"):
        write_manifest(df, tmp_path / "w.parquet", {"task": "classification"})
    assert not (tmp_path / "w.parquet").exists()


def test_text_ids_are_written_and_read_back_as_text(tmp_path):
    df = _framed()
    df["sample_id"] = [f"img-{i:03d}" for i in range(len(df))]
    p = write_manifest(df, tmp_path / "t.parquet", {"task": "classification"})
    assert pq.read_schema(p).field("sample_id").type == pa.string()
    assert read_manifest(p)["sample_id"].tolist() == df["sample_id"].tolist()


def test_a_zero_weight_is_a_valid_weight(tmp_path):
    df = _framed()
    df["weight"] = np.r_[0.0, np.full(len(df) - 1, len(df) / (len(df) - 1))]  # sample 0 is never drawn
    p = write_manifest(df, tmp_path / "zero.parquet", {"task": "classification"})
    assert read_manifest(p)["weight"].iloc[0] == 0.0


def test_a_missing_weight_is_refused_whatever_the_column_type():
    df = _io_frame()
    df["weight"] = pd.array([True] * (len(df) - 1) + [None], dtype="boolean")
    with pytest.raises(ValueError, match=r"^the DataFrame: weights must be finite and >= 0\.$"):
        export_manifest(df)


def test_a_resaved_causal_lm_manifest_is_read_without_its_metadata(tmp_path):
    p = tmp_path / "lm.parquet"
    _lm_frame().to_parquet(p)  # no hardmine key, no label/pred columns
    with pytest.warns(UserWarning, match="no hardmine metadata"):
        assert read_manifest_metadata(p)["provenance"] is None


# ------------------------------------------------------------------------------------------ the writer
def _lm_frame(n: int = 4) -> pd.DataFrame:
    lm = pd.DataFrame({c: np.linspace(1.0, 2.0, n) for c in REQUIRED_COLUMNS_LM})
    lm["sample_id"], lm["rank"] = np.arange(n), np.arange(1, n + 1)
    lm["is_hard"], lm["weight"] = pd.array([True] + [False] * (n - 1), dtype="boolean"), 1.0
    lm["n_target_tokens"] = np.arange(3, 3 + n)
    return lm


def test_a_causal_lm_manifest_is_written_with_the_lm_columns_only(tmp_path):
    p = write_manifest(_lm_frame(), tmp_path / "lm.parquet", {"task": "causal-lm"})
    assert read_manifest(p).attrs["hardmine"]["task"] == "causal-lm"
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['label', 'pred'"):
        write_manifest(_lm_frame(), tmp_path / "c.parquet", {"task": "classification"})


def test_unknown_token_counts_are_written_as_missing_integers(tmp_path):
    lm = _lm_frame()
    lm["n_target_tokens"] = [5.0, np.nan, 7.0, 2.0]  # an online LM's rows without token statistics
    p = write_manifest(lm, tmp_path / "lm.parquet", {"task": "causal-lm"})
    assert pq.read_schema(p).field("n_target_tokens").type == pa.int64()
    assert pq.read_table(p).column("n_target_tokens").to_pylist() == [5, None, 7, 2]


def test_flags_held_as_numbers_keep_their_missing_values(tmp_path):
    df = _framed()
    df["near_miss"] = [1.0, 0.0, np.nan] + [0.0] * (len(df) - 3)  # e.g. after a merge that left gaps
    p = write_manifest(df, tmp_path / "m.parquet", {"task": "classification"})
    assert pq.read_schema(p).field("near_miss").type == pa.bool_()
    assert pq.read_table(p).column("near_miss").to_pylist()[:3] == [True, False, None]


def test_a_slice_column_without_any_slice_is_still_a_text_column(tmp_path):
    df = _framed().assign(slice=None)  # regression manifests have no slices
    p = write_manifest(df, tmp_path / "m.parquet", {"task": "regression"})
    assert pq.read_schema(p).field("slice").type == pa.string()


def test_the_written_metadata_does_not_depend_on_the_key_order(tmp_path):
    a = {"task": "classification", "created": "x", "source": {"door": "scan", "b": 1, "a": 2}}
    b = {"source": {"a": 2, "b": 1, "door": "scan"}, "created": "x", "task": "classification"}
    pa_ = write_manifest(_framed(), tmp_path / "a.parquet", a)
    pb_ = write_manifest(_framed(), tmp_path / "b.parquet", b)
    assert pq.read_schema(pa_).metadata[b"hardmine"] == pq.read_schema(pb_).metadata[b"hardmine"]


def test_metadata_values_json_cannot_hold_are_written_as_text(tmp_path):
    p = write_manifest(_framed(), tmp_path / "m.parquet", {"task": "classification", "data": tmp_path})
    assert read_manifest_metadata(p)["data"] == str(tmp_path)


# ------------------------------------------------------------------------------ causal-LM manifests
def test_a_causal_lm_task_needs_the_lm_columns_named_or_as_a_member():
    assert required_columns("causal-lm") == REQUIRED_COLUMNS_LM
    assert required_columns(TaskKind.CAUSAL_LM) == REQUIRED_COLUMNS_LM
    assert required_columns(TaskKind.CLASSIFICATION) == REQUIRED_COLUMNS == required_columns(None)


def test_a_causal_lm_manifest_frame_is_exported_with_its_own_columns():
    lm = _lm_frame()
    lm.attrs["hardmine"] = {"format": "hardmine-manifest", "format_version": 2, "task": "causal-lm"}
    out = export_manifest(lm, strategy="top-k", top=0.25, boost=3.0, cap=None)  # no label/pred columns
    assert out["is_hard"].tolist() == [True, False, False, False]
    np.testing.assert_allclose(out["weight"], [2.0, 2 / 3, 2 / 3, 2 / 3])


def test_export_checks_the_cap_before_reading_the_source(tmp_path):
    with pytest.raises(ValueError, match=r"^cap=0\.5 must be None or a number >= 1"):
        export_manifest(tmp_path / "absent.parquet", cap=0.5)


@pytest.mark.parametrize("dtype", ["string", object])
def test_slice_names_are_written_as_text_with_missing_ones_null(tmp_path, dtype):
    """The slice column as the scan makes it (pandas strings) or as a user's frame may hold it (Python objects,
    numbers among them): text in the file, every kind of missing value null."""
    df = _io_frame()
    values = ["0/1", None, "1/0", np.nan, pd.NA, 7, "2/2", "0/0", None, "1/1", "2/0", "x"]
    if dtype == "string":  # a pandas string array holds only text or missing values
        values = [v if v is None or v is pd.NA or isinstance(v, str) or v != v else str(v) for v in values]
    df["slice"] = pd.Series(values, dtype=dtype)
    p = write_manifest(df, tmp_path / "m.parquet", {})
    assert pq.read_schema(p).field("slice").type == pa.string()
    got = pq.read_table(p).column("slice").to_pylist()
    assert got == ["0/1", None, "1/0", None, None, "7", "2/2", "0/0", None, "1/1", "2/0", "x"]


def test_a_filtered_manifest_is_ranked_over_its_own_rows_when_exported(tmp_path):
    # Some rows of a manifest keep the scan's ranks: its export ranks them again by hardness (the hardest
    # 10% of the rows given are hard) and writes a file read_manifest reads back
    df = _framed()
    df["hardness"] = np.linspace(1.0, 0.1, len(df))[::-1]  # the last rows hardest
    df["rank"] = np.arange(len(df), 0, -1)
    sub = df[df["label"] != 1]  # 8 of 12 rows, ranks with gaps
    out = export_manifest(sub, strategy="top-k", top=0.25, out=tmp_path / "sub.parquet")
    assert sorted(out["rank"]) == list(range(1, 9)) and int(out["is_hard"].sum()) == 2
    hardest = out.sort_values("hardness", ascending=False)["sample_id"].head(2).tolist()
    assert out.loc[out["is_hard"].astype(bool), "sample_id"].tolist() == sorted(hardest)
    back = read_manifest(tmp_path / "sub.parquet")
    assert len(back) == 8 and sorted(back["rank"]) == list(range(1, 9))
    whole = export_manifest(df, strategy="top-k", top=0.25)  # a whole manifest keeps its ranks
    np.testing.assert_array_equal(whole["rank"].to_numpy(), df["rank"].to_numpy())
    # Ties in hardness keep the scan's order of them, whatever order the frame's rows are in now
    tied = df.copy()
    tied["hardness"] = 0.5
    tied["rank"] = np.arange(1, len(df) + 1)[::-1]  # the scan broke the tie: the last rows first
    sub = tied[tied["label"] != 1].sort_values("loss")
    out = export_manifest(sub, strategy="top-k", top=0.25)
    want = sub["rank"].rank(method="first").astype(int).to_numpy()
    np.testing.assert_array_equal(out.set_index("sample_id").loc[sub["sample_id"], "rank"].to_numpy(), want)


def test_a_causal_lm_manifest_without_its_metadata_exports(tmp_path):
    from hardmine.manifest import REQUIRED_COLUMNS_LM

    n = 6
    lm = pd.DataFrame({c: np.linspace(0.1, 1.0, n) for c in REQUIRED_COLUMNS_LM})
    lm["sample_id"], lm["rank"], lm["n_target_tokens"] = np.arange(n), np.arange(n, 0, -1), np.arange(1, n + 1)
    lm["is_hard"] = pd.array(np.zeros(n, bool), dtype="boolean")
    lm["weight"] = 1.0
    lm.to_parquet(tmp_path / "bare.parquet")  # re-saved by pandas: no hardmine key
    with pytest.warns(UserWarning, match="no hardmine metadata"):
        out = export_manifest(tmp_path / "bare.parquet", out=tmp_path / "e.parquet")
    assert out.attrs["hardmine"]["task"] == "causal-lm" and len(read_manifest(tmp_path / "e.parquet")) == n
    with pytest.warns(UserWarning, match="no hardmine metadata"):
        assert len(export_manifest(lm)) == n  # the frame itself, no attrs


@pytest.mark.parametrize(
    ("ranks", "message"),
    [
        (np.array(["x"] * 12, dtype=object), "column 'rank' has dtype"),
        (pd.array([pd.NA, *range(2, 13)], dtype="Int64"), r"rank must be a permutation of 1\.\.12"),
        (np.arange(1, 13) + 0.5, r"rank must be a permutation of 1\.\.12"),
        (np.ones(12, dtype=np.int64), r"rank must be a permutation of 1\.\.12"),
    ],
)
def test_an_edited_manifest_frame_is_checked_on_export(ranks, message):
    # A frame with its metadata, edited since its scan: ranks that are no selection of the scan's are refused
    # with the manifest's own message, not an internal error or weights computed on them
    df = _framed()
    df["rank"] = ranks
    with pytest.raises(ValueError, match=rf"^the DataFrame: {message}"):
        export_manifest(df)


def test_whole_ranks_held_as_floats_export_as_integers():
    df = _framed()
    df["rank"] = np.arange(12, 0, -1).astype(np.float64)
    out = export_manifest(df)
    assert out["rank"].dtype == np.int64 and out["rank"].tolist() == list(range(12, 0, -1))


def test_a_frame_without_metadata_takes_its_task_from_its_columns():
    from hardmine.manifest import REQUIRED_COLUMNS_LM

    message = (
        "the DataFrame has every manifest column but no hardmine metadata (re-saved by pandas/polars?): read as a "
        "manifest, without provenance (model/dataset fingerprints, scan configuration)."
    )
    both = _io_frame()
    for c in REQUIRED_COLUMNS_LM:
        if c not in both:
            both[c] = 1.0 if c != "n_target_tokens" else 3
    both.attrs = {}
    with pytest.warns(UserWarning) as caught:
        out = export_manifest(both)
    assert [str(w.message) for w in caught] == [message]
    assert out.attrs["hardmine"].get("task") != "causal-lm"  # every classification column: a classifier's
    lm = both.drop(columns=["label", "pred", "correct", "confidence", "margin", "el2n", "confident_error",
                            "near_miss"])
    with pytest.warns(UserWarning, match="no hardmine metadata"):
        assert export_manifest(lm).attrs["hardmine"]["task"] == "causal-lm"
    # With metadata that names no task (a classifier's, written before tasks were recorded) the same columns are
    # a classification manifest missing its columns
    lm.attrs["hardmine"] = {"format": "hardmine-manifest", "format_version": 2}
    with pytest.raises(ValueError, match=r"the DataFrame is missing manifest column\(s\) \['label'"):
        export_manifest(lm)


def test_an_unfinished_scan_directory_is_read_with_the_way_to_resume_it(tmp_path):
    (tmp_path / "scan.json").write_text("{}")
    with pytest.raises(ValueError) as info:
        read_manifest(tmp_path)
    assert str(info.value) == (
        f"the scan in {tmp_path} is not complete (no manifest yet); rerun the same `hardmine scan` command (or "
        "hardmine.scan with the same arguments) to resume it."
    )
