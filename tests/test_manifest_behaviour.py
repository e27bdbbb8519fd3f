"""manifest.py behaviour the mutation run asked for: weights, caps, temperatures, strategies, metadata, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_manifest import _io_frame

import hardmine
from hardmine.manifest import bool_column, class_names, export_manifest, float_column, read_manifest_metadata


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
