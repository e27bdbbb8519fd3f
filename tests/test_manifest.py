"""Manifest: round trip through pandas/pyarrow (polars and DuckDB where installed), validation of foreign or
newer files, atomic writes, and the weighting strategies. Second part: what a reader may rely on (types,
metadata, row checks), the messages a user sees for files that are not manifests, and the chunked writer."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_scan import planted_scan

import hardmine.manifest as hm
from hardmine._version import __version__
from hardmine.enums import Strategy
from hardmine.manifest import (
    FORMAT_VERSION,
    MANIFEST_FORMAT,
    REQUIRED_COLUMNS,
    cap_weights,
    check_destination,
    compute_weights,
    export_manifest,
    read_manifest,
    read_manifest_metadata,
    resolve_strategy,
    write_manifest,
)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The planted-blobs scan of test_scan.py, built once per session for every module that reads it (none
    changes it), instead of once per module."""
    return planted_scan(tmp_path_factory.getbasetemp() / "planted-shared")


def _frame(n: int = 50, seed: int = 0) -> pd.DataFrame:
    g = np.random.default_rng(seed)
    h = g.random(n)
    rank = pd.Series(-h).rank(method="first").astype(np.int64).to_numpy()
    df = pd.DataFrame({
        "sample_id": np.arange(100, 100 + n), "label": g.integers(0, 3, n), "pred": g.integers(0, 3, n),
        "loss": g.random(n), "confidence": g.random(n), "margin": g.random(n) - 0.5, "el2n": g.random(n),
        "grad_norm": g.random(n), "knn_outlier": g.random(n), "hardness": h, "rank": rank,
    })
    df["correct"] = pd.array(df["pred"] == df["label"], dtype="boolean")
    df["confident_error"] = pd.array(g.random(n) < 0.1, dtype="boolean")
    df["near_miss"] = pd.array(g.random(n) < 0.1, dtype="boolean")
    w, hard = compute_weights(df)
    df["is_hard"] = pd.array(hard, dtype="boolean")
    df["weight"] = w
    return df


# ------------------------------------------------------------------------------------------ round trip
def test_round_trip_pandas_and_pyarrow(tmp_path, planted):  # noqa: F811
    sc, _ = planted
    m = sc.manifest()
    out = tmp_path / "copy.parquet"
    write_manifest(m, out, m.attrs["hardmine"])
    back = read_manifest(out)
    pd.testing.assert_frame_equal(back, m)
    assert back.attrs["hardmine"] == m.attrs["hardmine"]
    table = pq.read_table(out)
    assert table.num_rows == len(m) and table.column_names[:4] == ["sample_id", "label", "pred", "correct"]
    assert set(REQUIRED_COLUMNS) <= set(table.column_names)
    assert table.schema.field("sample_id").type == pa.int64() and table.schema.field("correct").type == pa.bool_()
    meta = json.loads(table.schema.metadata[b"hardmine"])
    assert meta["format_version"] == FORMAT_VERSION and meta["model_fingerprint"] == m.attrs["hardmine"]["model_fingerprint"]
    plain = pd.read_parquet(out)  # plain pandas, no hardmine
    assert len(plain) == len(m) and plain["rank"].min() == 1


def test_opens_in_polars_and_duckdb(planted):  # noqa: F811
    sc, _ = planted
    path = str(sc.manifest_path)
    n = sc.n_samples
    pl = pytest.importorskip("polars")
    frame = pl.read_parquet(path)
    assert frame.height == n and set(REQUIRED_COLUMNS) <= set(frame.columns)
    duckdb = pytest.importorskip("duckdb")
    rows = duckdb.sql(f"SELECT count(*), min(rank), sum(CASE WHEN is_hard THEN 1 ELSE 0 END) FROM '{path}'").fetchall()[0]
    counts = sc.manifest()["label"].value_counts()  # default per-class export: the top 10% of each class
    assert rows[0] == n and rows[1] == 1 and rows[2] == sum(math.ceil(0.1 * c) for c in counts)


# ------------------------------------------------------------------------------------------ validation
def test_reader_rejects_foreign_and_newer_files(tmp_path):
    df = _frame()
    with pytest.raises(ValueError, match="does not exist"):
        read_manifest(tmp_path / "nope.parquet")
    (tmp_path / "text.parquet").write_text("not parquet at all")
    with pytest.raises(ValueError, match="not a readable Parquet"):
        read_manifest(tmp_path / "text.parquet")
    df.drop(columns=["weight"]).to_parquet(tmp_path / "foreign.parquet")
    with pytest.raises(ValueError, match="not a hardmine manifest"):
        read_manifest(tmp_path / "foreign.parquet")
    write_manifest(df, tmp_path / "ok.parquet", {"note": "test"})
    assert read_manifest_metadata(tmp_path / "ok.parquet")["note"] == "test"
    write_manifest(df, tmp_path / "new.parquet", {"format_version": FORMAT_VERSION + 1, "hardmine_version": "9.0"})
    with pytest.raises(ValueError, match="newer|Upgrade hardmine"):
        read_manifest(tmp_path / "new.parquet")
    table = pq.read_table(tmp_path / "ok.parquet").drop_columns(["weight"])
    pq.write_table(table, tmp_path / "missing.parquet")
    with pytest.raises(ValueError, match=r"missing required column\(s\) \['weight'\]"):
        read_manifest(tmp_path / "missing.parquet")
    dup = df.copy()
    dup.loc[1, "sample_id"] = dup.loc[0, "sample_id"]
    write_manifest(dup, tmp_path / "dup.parquet", {})
    with pytest.raises(ValueError, match="unique"):
        read_manifest(tmp_path / "dup.parquet")
    bad = df.copy()
    bad.loc[0, "weight"] = -1.0
    write_manifest(bad, tmp_path / "neg.parquet", {})
    with pytest.raises(ValueError, match="weights"):
        read_manifest(tmp_path / "neg.parquet")
    with pytest.raises(ValueError, match="missing required"):
        write_manifest(df.drop(columns=["rank"]), tmp_path / "x.parquet", {})


def test_write_is_atomic(tmp_path, monkeypatch):
    df = _frame()
    path = tmp_path / "m.parquet"
    write_manifest(df, path, {"v": 1})
    before = path.read_bytes()

    def broken(table, where, **kw):
        with open(where, "wb") as f:
            f.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(hm.pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        write_manifest(df, path, {"v": 2})
    assert path.read_bytes() == before  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["m.parquet"]  # and no temporary is left


def test_before_replace_runs_after_the_write_and_its_failure_keeps_the_old_manifest(tmp_path):
    # A scan writes its manifest while its slice table is still being computed, and waits for the table in
    # before_replace: the new manifest must not replace the old one unless that succeeds.
    df = _frame()
    path = tmp_path / "m.parquet"
    write_manifest(df, path, {"v": 1})
    before = path.read_bytes()
    seen = []

    def fails() -> None:
        seen.append(sorted(p.name for p in tmp_path.iterdir()))  # the new file exists, beside the old one
        raise RuntimeError("the slice table failed")

    with pytest.raises(RuntimeError, match="slice table failed"):
        write_manifest(df, path, {"v": 2}, before_replace=fails)
    assert len(seen[0]) == 2 and "m.parquet" in seen[0]
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.parquet"]
    write_manifest(df, path, {"v": 3}, before_replace=lambda: seen.append("ok"))
    assert seen[-1] == "ok" and read_manifest(path).attrs["hardmine"]["v"] == 3


@settings(max_examples=100, deadline=None)
@given(
    labels=st.lists(st.integers(-3, 10**6), min_size=1, max_size=40),
    small=st.booleans(),
)
def test_unique_labels_equals_numpy_unique(labels, small):
    # Counting instead of sorting for small non-negative class ids; np.unique's arrays and dtypes exactly.
    y = np.abs(np.asarray(labels, dtype=np.int64)) % 7 if small else np.asarray(labels, dtype=np.int64)
    _assert_unique_labels(y)


_EDGE_LABELS = [
    [-1, 0, 1, 2],  # a negative label with a small maximum: np.unique, not a count
    [0, 0, 4, 4],  # the largest label the count takes (2 * N ... )
    [0, 9, 9, 9],  # ... and beyond it
    [5], [0], [2**40, 3],
]


@pytest.mark.parametrize(("labels", "dtype"), [
    (labels, dtype) for labels in _EDGE_LABELS for dtype in (np.int64, np.int32, np.uint8, np.uint64)
    if min(labels) >= np.iinfo(dtype).min and max(labels) <= np.iinfo(dtype).max  # representable only
])
def test_unique_labels_edges(labels, dtype):
    _assert_unique_labels(np.asarray(labels).astype(dtype))


def _assert_unique_labels(y: np.ndarray) -> None:
    got = hm._unique_labels(y)
    want = np.unique(y, return_inverse=True, return_counts=True)
    assert len(got) == 3
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype


@settings(max_examples=100, deadline=None)
@given(
    classes=st.lists(st.integers(0, 4), min_size=1, max_size=40),
    ranks=st.sampled_from(["permutation", "ties", "huge"]),
    seed=st.integers(0, 2**16),
)
def test_by_class_then_rank_is_lexsort(classes, ranks, seed):
    # One sort of a combined key, falling back to lexsort on ties or a key that could overflow: always
    # lexsort's order (by class, then rank, then row).
    g = np.random.default_rng(seed)
    inv = np.asarray(classes, dtype=np.int64)
    n = len(inv)
    rank = {"permutation": g.permutation(n) + 1, "ties": g.integers(-2, 3, n), "huge": g.integers(0, 2**62, n)}[ranks]
    np.testing.assert_array_equal(hm._by_class_then_rank(inv, rank), np.lexsort((rank, inv)))


@pytest.mark.parametrize("top", [2**55, 2**61, 2**62 - 3])
def test_by_class_then_rank_with_wide_ranks(top):
    # Three classes of ranks near 2**62 would overflow the combined key (the lexsort fallback), smaller ones fit:
    # lexsort's order either way.
    inv = np.array([2, 0, 1, 2, 0, 1, 2])
    rank = np.array([top, top - 1, top - 2, 0, 1, top, 5])
    np.testing.assert_array_equal(hm._by_class_then_rank(inv, rank), np.lexsort((rank, inv)))


# -------------------------------------------------------------------------------------------- weights
def test_top_k_weights_and_normalisation():
    df = _frame(n=50)
    w, hard = compute_weights(df, "top-k", top=0.1, boost=4.0, cap=None)
    assert hard.sum() == 5 and (df["rank"].to_numpy()[hard] <= 5).all()
    assert w.mean() == pytest.approx(1.0)
    # 5 samples at 4 and 45 at 1, scaled to mean 1.
    np.testing.assert_allclose(w[hard], 4 * 50 / (5 * 4 + 45))
    np.testing.assert_allclose(w[~hard], 50 / (5 * 4 + 45))


def test_cap_keeps_any_sample_from_dominating():
    w = cap_weights(np.array([1000.0, 1, 1, 1, 1, 1, 1, 1, 1, 1]), cap=3.0)
    assert w.max() == pytest.approx(3.0) and w.mean() == pytest.approx(1.0)
    np.testing.assert_allclose(w[1:], (10 - 3) / 9)
    w2 = cap_weights(np.array([50.0, 40, 1, 1, 1, 1, 1, 1, 1, 1]), cap=2.0)
    assert w2.max() <= 2.0 + 1e-12 and w2.mean() == pytest.approx(1.0)
    np.testing.assert_allclose(w2[:2], 2.0)
    np.testing.assert_allclose(cap_weights(np.array([5.0, 1.0]), cap=1.0), [1.0, 1.0])


def test_proportional_and_per_class():
    df = _frame(n=60, seed=1)
    h = df["hardness"].to_numpy()
    w, _ = compute_weights(df, "proportional", temperature=2.0, cap=None)
    np.testing.assert_allclose(w, h**2 / np.mean(h**2))
    w0, _ = compute_weights(df, "proportional", temperature=0.0)
    np.testing.assert_allclose(w0, 1.0)
    wc, hard = compute_weights(df, "per-class", temperature=1.0, top=0.2, cap=None)
    labels = df["label"].to_numpy()
    classes = np.unique(labels)
    for c in classes:  # every class gets the same total mass, hardness-proportional inside
        m = labels == c
        assert wc[m].sum() == pytest.approx(len(df) / len(classes))
        np.testing.assert_allclose(wc[m] / wc[m].sum(), h[m] / h[m].sum())
        assert hard[m].sum() == math.ceil(0.2 * m.sum())
        assert h[m][hard[m]].min() >= h[m][~hard[m]].max()  # the hardest of each class


def test_default_strategy_is_class_balanced_for_classification_and_proportional_for_regression(planted):  # noqa: F811
    from hardmine.score import DEFAULT_STRATEGY

    sc, _ = planted
    df = sc.manifest()
    assert DEFAULT_STRATEGY in (Strategy.PER_CLASS, Strategy.SLICES)  # the class-balanced strategies
    assert sc.manifest().attrs["hardmine"]["export"]["strategy"] == DEFAULT_STRATEGY.value  # what the scan wrote
    w, hard = compute_weights(df)  # strategy=None
    w_pc, hard_pc = compute_weights(df, DEFAULT_STRATEGY)
    np.testing.assert_array_equal(w, w_pc)
    np.testing.assert_array_equal(hard, hard_pc)
    labels = df["label"].to_numpy()
    for c in np.unique(labels):  # class-balanced: every class gets the same total mass
        assert w[labels == c].sum() == pytest.approx(len(df) / len(np.unique(labels)))
    assert export_manifest(sc).attrs["hardmine"]["export"]["strategy"] == DEFAULT_STRATEGY.value
    reg = df.assign(label=df["label"].astype(np.float64) + 0.5)  # float labels: a regression manifest
    reg.attrs = {}  # no metadata: decided from the labels
    assert resolve_strategy(reg) is Strategy.PROPORTIONAL
    # The metadata's task wins over the label dtype (integer-valued regression targets stay regression).
    tagged = df.copy()
    tagged.attrs = {"hardmine": {"task": "regression"}}
    assert resolve_strategy(tagged) is Strategy.PROPORTIONAL
    nullable = df.assign(label=pd.array([None] + df["label"].tolist()[1:], dtype="Int64"))
    nullable.attrs = {}
    assert resolve_strategy(nullable) is Strategy.PROPORTIONAL  # missing labels: not class ids
    np.testing.assert_array_equal(compute_weights(reg)[0], compute_weights(reg, "proportional")[0])
    assert resolve_strategy(df, "top-k") is Strategy.TOP_K


def test_export_manifest(tmp_path, planted):  # noqa: F811
    sc, _ = planted
    out = tmp_path / "export.parquet"
    df = export_manifest(sc, strategy="proportional", temperature=2.0, cap=5.0, out=out)
    back = read_manifest(out)
    pd.testing.assert_frame_equal(back, df)
    assert back.attrs["hardmine"]["export"] == {"strategy": "proportional", "top": 0.1, "boost": 5.0,
                                                "temperature": 2.0, "cap": 5.0}
    assert back["weight"].max() <= 5.0 + 1e-9 and back["weight"].mean() == pytest.approx(1.0)
    for source in (sc.path, sc.manifest_path, sc.manifest()):
        again = export_manifest(source, strategy="proportional", temperature=2.0, cap=5.0)
        np.testing.assert_allclose(again["weight"], df["weight"])
    unchanged = ["sample_id", "label", "hardness", "rank"]
    pd.testing.assert_frame_equal(df[unchanged], sc.manifest()[unchanged])
    with pytest.raises(ValueError, match="strategy='jtt'"):
        export_manifest(sc, strategy="jtt")
    with pytest.raises(ValueError, match="top=1.5"):
        export_manifest(sc, top=1.5)
    with pytest.raises(ValueError, match="boost=0"):
        export_manifest(sc, boost=0)
    with pytest.raises(ValueError, match="no hardmine metadata"):
        export_manifest(pd.DataFrame({"a": [1]}))
    with pytest.raises(ValueError, match="got a int"):
        export_manifest(3)


# ------------------------------------------------------------------------------ files: what readers rely on
def _io_frame(n: int = 12, ids=None) -> pd.DataFrame:
    g = np.random.default_rng(0)
    h = np.linspace(1.0, 0.1, n)  # rank 1 first
    df = pd.DataFrame({
        "sample_id": np.arange(n) if ids is None else ids, "label": np.arange(n) % 3, "pred": np.zeros(n, np.int64),
        "loss": g.random(n), "confidence": g.random(n), "margin": g.random(n) - 0.5, "el2n": g.random(n),
        "grad_norm": g.random(n), "knn_outlier": g.random(n), "hardness": h, "rank": np.arange(1, n + 1),
    })
    df["correct"] = pd.array(df["pred"] == df["label"], dtype="boolean")
    df["confident_error"] = pd.array(np.arange(n) % 4 == 0, dtype="boolean")
    df["near_miss"] = pd.array(np.zeros(n, bool), dtype="boolean")
    w, hard = compute_weights(df, "top-k")
    df["is_hard"] = pd.array(hard, dtype="boolean")
    df["weight"] = w
    return df


def _file_meta(path) -> dict:
    return json.loads(pq.read_schema(path).metadata[b"hardmine"])


def test_written_file_types_order_and_metadata(tmp_path):
    df = _io_frame().assign(extra=np.arange(12.0))
    df = df[["extra"] + [c for c in df.columns if c != "extra"]]  # a user column first in the frame
    p = write_manifest(df, tmp_path / "m.parquet", {"note": "x"})
    assert p == tmp_path / "m.parquet"
    schema = pq.read_schema(p)
    assert schema.names[0] == "sample_id" and schema.names[-1] == "extra"  # contract columns first, in order
    assert [n for n in schema.names if n in hm.MANIFEST_COLUMNS] == [c for c in hm.MANIFEST_COLUMNS if c in df]
    for c in ("correct", "confident_error", "near_miss", "is_hard"):
        assert schema.field(c).type == pa.bool_(), c
    assert schema.field("rank").type == pa.int64() and schema.field("sample_id").type == pa.int64()
    meta = _file_meta(p)
    assert meta["note"] == "x" and meta["format"] == MANIFEST_FORMAT and meta["format_version"] == FORMAT_VERSION
    assert meta["hardmine_version"] == __version__
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", meta["created"])
    kept = write_manifest(df, tmp_path / "k.parquet", {"created": "then", "format_version": 1})
    assert _file_meta(kept)["created"] == "then"  # given metadata is kept, defaults only fill gaps
    back = read_manifest(p)
    assert back.attrs["hardmine"] == meta
    for c in ("correct", "confident_error", "near_miss", "is_hard"):
        assert str(back[c].dtype) == "boolean", c
    pd.testing.assert_frame_equal(back[df.columns], df, check_dtype=False)


def test_string_sample_ids_round_trip(tmp_path):
    df = _io_frame(ids=[f"img_{i:03d}" for i in range(12)])
    p = write_manifest(df, tmp_path / "s.parquet", {})
    assert pq.read_schema(p).field("sample_id").type == pa.string()
    assert read_manifest(p)["sample_id"].tolist() == df["sample_id"].tolist()
    mixed = _io_frame(ids=[100, "b", 3.5] + list(range(9)))  # object ids become their text
    assert read_manifest(write_manifest(mixed, tmp_path / "o.parquet", {}))["sample_id"].tolist()[:3] == ["100", "b", "3.5"]


def test_large_frames_are_written_a_row_group_at_a_time(tmp_path, monkeypatch):
    df = _io_frame(n=25)
    whole = write_manifest(df, tmp_path / "whole.parquet", {"created": "t"})
    monkeypatch.setattr(hm, "_ROW_GROUP", 10)
    chunked = write_manifest(df, tmp_path / "chunked.parquet", {"created": "t"})
    f = pq.ParquetFile(chunked)
    assert f.metadata.num_row_groups == 3 and f.metadata.num_rows == 25
    assert [f.metadata.row_group(i).num_rows for i in range(3)] == [10, 10, 5]
    assert pq.read_table(chunked).equals(pq.read_table(whole))
    assert _file_meta(chunked) == _file_meta(whole)
    pd.testing.assert_frame_equal(read_manifest(chunked), read_manifest(whole))
    exactly = write_manifest(df.iloc[:10], tmp_path / "ten.parquet", {})  # == _ROW_GROUP rows: one group
    assert pq.ParquetFile(exactly).metadata.num_row_groups == 1


def test_a_scan_directory_reads_its_manifest(tmp_path):
    (tmp_path / "scan").mkdir()
    write_manifest(_io_frame(), tmp_path / "scan" / "manifest.parquet", {"note": "dir"})
    assert read_manifest_metadata(tmp_path / "scan")["note"] == "dir"
    assert len(read_manifest(str(tmp_path / "scan"))) == 12
    with pytest.raises(ValueError, match=r"^.*empty(/|\\)manifest\.parquet does not exist; pass a manifest "
                                         r"\.parquet file or a scan directory\.$"):
        (tmp_path / "empty").mkdir()
        read_manifest(tmp_path / "empty")


def _write_raw(path, df: pd.DataFrame, meta) -> None:
    table = pa.Table.from_pandas(df, preserve_index=False)
    md = None if meta is None else {b"hardmine": meta if isinstance(meta, bytes) else json.dumps(meta).encode()}
    pq.write_table(table.replace_schema_metadata(md), path)


def test_reader_messages_for_files_that_are_not_manifests(tmp_path):
    df = _io_frame()
    ok = {"format": MANIFEST_FORMAT, "format_version": 1, "hardmine_version": "x"}
    cases = [
        (b"{not json", r": the 'hardmine' metadata is not valid JSON \("),
        ({"format": "other"}, rf": the 'hardmine' metadata does not describe a '{MANIFEST_FORMAT}' file\.$"),
        (["a list"], r"does not describe a"),
        ({**ok, "format_version": "v2"}, r": format_version 'v2' is not a version number\.$"),
        ({**ok, "format_version": "1.7"}, None),  # minor versions are readable
        ({**ok, "format_version": FORMAT_VERSION + 1, "hardmine_version": "9.9"},
         rf" was written by hardmine 9\.9 with manifest format {FORMAT_VERSION + 1}; this hardmine "
         rf"\({re.escape(__version__)}\) reads format {FORMAT_VERSION} or older\. Upgrade hardmine to read it\.$"),
    ]
    for i, (meta, pattern) in enumerate(cases):
        p = tmp_path / f"c{i}.parquet"
        _write_raw(p, df, meta)
        if pattern is None:
            assert read_manifest_metadata(p)["format_version"] == "1.7"
        else:
            with pytest.raises(ValueError, match=pattern):
                read_manifest_metadata(p)
    p = tmp_path / "cols.parquet"
    _write_raw(p, df.drop(columns=["weight", "rank"]), ok)
    with pytest.raises(ValueError, match=r"is missing required column\(s\) \['rank', 'weight'\]; it is not a "
                                         r"complete hardmine manifest\.$"):
        read_manifest_metadata(p)
    bare = tmp_path / "bare.parquet"
    _write_raw(bare, df.drop(columns=["weight"]), None)
    with pytest.raises(ValueError, match=r"is a Parquet file but not a hardmine manifest \(no 'hardmine' key in "
                                         r"its metadata, and no column\(s\) \['weight'\]\); write one with"):
        read_manifest_metadata(bare)
    (tmp_path / "t.parquet").write_text("text")
    with pytest.raises(ValueError, match=r"t\.parquet is not a readable Parquet file \(.*\); pass a hardmine "
                                         r"manifest\.$"):
        read_manifest_metadata(tmp_path / "t.parquet")


def test_resaved_manifest_is_read_without_provenance(tmp_path):
    p = tmp_path / "plain.parquet"
    _io_frame().to_parquet(p)  # pandas drops the hardmine key, keeps the columns
    with pytest.warns(UserWarning, match="has every manifest column but no hardmine metadata"):
        meta = read_manifest_metadata(p)
    assert meta == {"format": MANIFEST_FORMAT, "format_version": FORMAT_VERSION, "provenance": None}


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (lambda d: d.iloc[:0], r": the manifest has no rows\.$"),
        (lambda d: d.assign(sample_id=[0, 0, 0] + list(range(3, 12))),
         r": sample_id must be unique and present; duplicated/missing e\.g\. \[0, 0\]\.$"),
        (lambda d: d.assign(sample_id=[None] + [f"s{i}" for i in range(11)]), r"sample_id must be unique"),
        (lambda d: d.assign(loss=["a"] * 12), r": column 'loss' has dtype (object|str), expected a number\.$"),
        (lambda d: d.assign(weight=[np.inf] + [1.0] * 11), r": weights must be finite and >= 0\.$"),
        (lambda d: d.assign(weight=[-0.5] + [1.0] * 11), r": weights must be finite and >= 0\.$"),
        (lambda d: d.assign(rank=[2] * 12), r": rank must be a permutation of 1\.\.12\.$"),
        (lambda d: d.assign(rank=np.arange(12)), r": rank must be a permutation of 1\.\.12\.$"),
    ],
)
def test_rows_are_validated_on_read(tmp_path, change, pattern):
    p = tmp_path / "bad.parquet"
    bad = change(_io_frame())
    table = pa.Table.from_pandas(bad, preserve_index=False)
    pq.write_table(table.replace_schema_metadata({b"hardmine": json.dumps(
        {"format": MANIFEST_FORMAT, "format_version": 1}).encode()}), p)
    with pytest.raises(ValueError, match=pattern):
        read_manifest(p)
    assert read_manifest_metadata(p)["format"] == MANIFEST_FORMAT  # only the rows are wrong


def test_destinations(tmp_path):
    assert check_destination(tmp_path / "new.parquet") == tmp_path / "new.parquet"
    with pytest.raises(ValueError, match=r"it is a directory; give a file path such as '.*manifest\.parquet'\.$"):
        check_destination(tmp_path)
    (tmp_path / "user.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"exists and is not a hardmine manifest; refusing to replace it\. "
                                         r"Choose another path, or pass overwrite=True to replace it\.$"):
        write_manifest(_io_frame(), tmp_path / "user.csv", {})
    assert (tmp_path / "user.csv").read_text() == "a,b\n"
    write_manifest(_io_frame(), tmp_path / "user.csv", {}, overwrite=True)
    write_manifest(_io_frame(), tmp_path / "user.csv", {"v": 2})  # now a manifest: replaced without asking
    assert _file_meta(tmp_path / "user.csv")["v"] == 2
    with pytest.raises(ValueError, match=r"^cannot write .*nodir(/|\\)m\.parquet: directory .*nodir does not "
                                         r"exist\.$"):
        write_manifest(_io_frame(), tmp_path / "nodir" / "m.parquet", {})
    with pytest.raises(ValueError, match=r"^manifest is missing required column\(s\) \['hardness'\]; it needs \["):
        write_manifest(_io_frame().drop(columns=["hardness"]), tmp_path / "x.parquet", {})
    (tmp_path / "user2.csv").write_text("x")
    with pytest.raises(ValueError, match="refusing to replace"):  # export checks the destination first
        export_manifest(42, out=tmp_path / "user2.csv")  # (a bad source would fail later)


def test_export_sources_and_metadata(tmp_path):
    df = _io_frame()
    df.attrs["hardmine"] = {"format": MANIFEST_FORMAT, "model_fingerprint": "abc"}
    out = export_manifest(df, strategy="top-k", top=0.25, boost=2.0, cap=None)
    assert out.attrs["hardmine"]["model_fingerprint"] == "abc"
    assert out.attrs["hardmine"]["export"] == {"strategy": "top-k", "top": 0.25, "boost": 2.0,
                                               "temperature": 1.0, "cap": None}
    assert "hard_set" not in out.attrs["hardmine"]["export"]
    assert df["weight"].tolist() != out["weight"].tolist()  # the source frame is not modified
    assert out["is_hard"].tolist() == [True] * 3 + [False] * 9 and str(out["is_hard"].dtype) == "boolean"
    thr = export_manifest(df, strategy="top-k", hard_set="threshold", threshold=0.5)
    assert thr.attrs["hardmine"]["export"]["hard_set"] == "threshold"
    assert thr.attrs["hardmine"]["export"]["threshold"] == 0.5
    np.testing.assert_array_equal(thr["is_hard"].to_numpy(dtype=bool), df["hardness"].to_numpy() >= 0.5)
    bare = df.copy()
    bare.attrs = {}
    with pytest.warns(UserWarning, match="no hardmine metadata"):
        b = export_manifest(bare, strategy="top-k")
    assert b.attrs["hardmine"]["provenance"] is None
    bad = bare.assign(rank=[1] * 12)
    with pytest.raises(ValueError, match="the DataFrame: rank must be a permutation"):
        export_manifest(bad, strategy="top-k")
    with pytest.raises(ValueError, match=r"carries no hardmine metadata \(df\.attrs\['hardmine'\]\) and is missing "
                                         r"manifest column\(s\) \['rank'"):
        export_manifest(bare.drop(columns=["rank"]))
    with pytest.raises(ValueError, match=r"^the DataFrame is missing manifest column\(s\) \['weight'\]\.$"):
        export_manifest(df.drop(columns=["weight"]))
    with pytest.raises(ValueError, match=r"^export_manifest got a list; pass a Scan"):
        export_manifest([1])
    p = write_manifest(df, tmp_path / "m.parquet", df.attrs["hardmine"])
    from_path = export_manifest(str(p), strategy="top-k", top=0.25, boost=2.0, cap=None)
    np.testing.assert_allclose(from_path["weight"], out["weight"])
