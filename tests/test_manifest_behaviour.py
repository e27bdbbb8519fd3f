"""manifest.py behaviour the mutation run asked for: weights, caps, temperatures, strategies, metadata, errors."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_manifest import _io_frame

import hardmine
from hardmine.manifest import (
    bool_column,
    class_names,
    compute_weights,
    export_manifest,
    float_column,
    read_manifest_metadata,
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
