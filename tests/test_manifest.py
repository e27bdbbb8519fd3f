"""Manifest: round trip through pandas/pyarrow (polars and DuckDB where installed), validation of foreign or
newer files, atomic writes, and the weighting strategies."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_scan import planted  # noqa: F401  (module-scoped fixture)

import hardmine.manifest as hm
from hardmine.enums import Strategy
from hardmine.manifest import (
    FORMAT_VERSION,
    REQUIRED_COLUMNS,
    cap_weights,
    compute_weights,
    export_manifest,
    read_manifest,
    read_manifest_metadata,
    resolve_strategy,
    write_manifest,
)


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


def test_default_strategy_is_per_class_for_classification_and_proportional_for_regression(planted):  # noqa: F811
    sc, _ = planted
    df = sc.manifest()
    assert sc.manifest().attrs["hardmine"]["export"]["strategy"] == "per-class"  # what the scan wrote
    w, hard = compute_weights(df)  # strategy=None
    w_pc, hard_pc = compute_weights(df, "per-class")
    np.testing.assert_array_equal(w, w_pc)
    np.testing.assert_array_equal(hard, hard_pc)
    labels = df["label"].to_numpy()
    for c in np.unique(labels):  # class-balanced: every class gets the same total mass
        assert w[labels == c].sum() == pytest.approx(len(df) / len(np.unique(labels)))
    assert export_manifest(sc).attrs["hardmine"]["export"]["strategy"] == "per-class"
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
