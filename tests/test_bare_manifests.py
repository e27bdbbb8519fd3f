"""Manifests round-trip through pandas and polars: a file or frame that lost the ``hardmine`` metadata but
has every manifest column is read (with a warning that provenance is missing) by every reader."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_cli import _scan, invoke, train_and_save

from hardmine.manifest import export_manifest, read_manifest
from hardmine.sampler import ManifestSampler


@pytest.fixture(scope="module")
def resaved(tmp_path_factory):
    """One CLI scan for the whole module (its tests only read it; each writes files of its own names)."""
    tmp_path = tmp_path_factory.mktemp("resaved")
    train_and_save(tmp_path)
    assert _scan(tmp_path).exit_code == 0
    df = read_manifest(tmp_path / "scan")
    path = tmp_path / "resaved.parquet"
    pd.DataFrame(df).to_parquet(path)  # pandas keeps columns, drops the hardmine key
    return tmp_path, df, path


def test_readers_accept_a_manifest_resaved_by_pandas(resaved):
    tmp_path, df, path = resaved
    with pytest.warns(UserWarning, match="no hardmine metadata"):
        back = read_manifest(path)
    pd.testing.assert_frame_equal(back.reset_index(drop=True), df.reset_index(drop=True), check_dtype=False)
    assert back.attrs["hardmine"]["provenance"] is None
    with pytest.warns(UserWarning):
        exp = export_manifest(path, strategy="top-k", top=0.1, boost=3)
    assert int(exp["is_hard"].sum()) == 12
    with pytest.warns(UserWarning):
        sampler = ManifestSampler(path, seed=0, dataset_ids=np.arange(1000, 1120))  # the scan's own ids
    draws = np.array(list(sampler))
    assert len(draws) == len(df) and draws.min() >= 0 and draws.max() < 120
    assert np.array_equal(draws, np.array(list(ManifestSampler(df, seed=0, dataset_ids=np.arange(1000, 1120)))))


def test_a_bare_frame_is_accepted_by_export_and_the_sampler(resaved):
    _, df, _ = resaved
    bare = pd.DataFrame({c: df[c].to_numpy() for c in df.columns})  # no attrs
    with pytest.warns(UserWarning, match="no hardmine metadata"):
        exp = export_manifest(bare, strategy="proportional")
    assert np.isclose(exp["weight"].mean(), 1.0)
    with pytest.raises(ValueError, match="no hardmine metadata.*missing manifest column"):
        export_manifest(bare.drop(columns=["rank"]))


def test_cli_show_and_export_read_a_resaved_manifest(resaved):
    tmp_path, _, path = resaved
    res = invoke("show", path, "--top", "3")
    assert res.exit_code == 0 and "sample_id" in res.stdout
    res = invoke("export", path, "--out", tmp_path / "again.parquet")
    assert res.exit_code == 0, res.output
    assert len(read_manifest(tmp_path / "again.parquet")) == 120


def test_polars_round_trip_is_read(resaved):
    pl = pytest.importorskip("polars")
    tmp_path, df, _ = resaved
    out = tmp_path / "polars.parquet"
    pl.read_parquet(tmp_path / "scan" / "manifest.parquet").write_parquet(out)
    with pytest.warns(UserWarning):
        back = read_manifest(out)
    assert back["sample_id"].tolist() == df["sample_id"].tolist()


def test_sampler_refuses_custom_ids_without_dataset_ids_and_warns_on_absent_items(resaved, tmp_path):
    scan_dir = resaved[0] / "scan"  # scanned with ids 1000..1119 from the .npz
    assert read_manifest(scan_dir).attrs["hardmine"]["sample_id_kind"] == "custom"
    with pytest.raises(ValueError, match="pass dataset_ids="):
        ManifestSampler(scan_dir)
    ok = ManifestSampler(scan_dir, dataset_ids=np.arange(1000, 1120))
    assert max(ok) < 120
    m = read_manifest(scan_dir)
    with pytest.warns(UserWarning, match="20 of the 140 dataset items are not in the manifest"):
        ManifestSampler(m, dataset_ids=np.arange(1000, 1140))
    # A scan with default ids records positions; a filtered manifest of it warns about what is never drawn.
    pos = export_manifest(scan_dir)
    pos["sample_id"] = np.arange(len(pos))
    pos.attrs["hardmine"] = {**pos.attrs["hardmine"], "sample_id_kind": "positions"}
    with pytest.warns(UserWarning, match="10 of the 120 dataset items"):
        ManifestSampler(pos.iloc[:110])
