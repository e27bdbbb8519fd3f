"""Which samples an export marks ``is_hard``: the top fraction, a hardness threshold, or the estimated
label-noise rate — on the planted-blob scan (flipped labels are known)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_cli import _scan, invoke, trained  # noqa: F401  (the trained fixture)
from test_scan import planted_scan

from hardmine.manifest import compute_weights, export_manifest, read_manifest


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The planted-blobs scan shared with the other modules that only read it (test_manifest.py's)."""
    return planted_scan(tmp_path_factory.getbasetemp() / "planted-shared")


def test_threshold_marks_exactly_the_samples_above_it_and_top_k_boosts_them(planted):
    sc, _ = planted
    m = sc.manifest()
    cut = float(np.quantile(m["hardness"], 0.93))
    df = export_manifest(sc, strategy="top-k", boost=4, cap=None, hard_set="threshold", threshold=cut)
    hard = df["is_hard"].to_numpy(dtype=bool)
    assert np.array_equal(hard, m["hardness"].to_numpy() >= cut) and 0 < hard.sum() < len(df)
    w = df["weight"].to_numpy()
    issue = df["is_label_issue"].to_numpy(dtype=bool) if "is_label_issue" in df else np.zeros(len(df), bool)
    boosted = hard & ~issue  # likely label errors are marked hard but never oversampled
    assert boosted.any() and np.allclose(w[boosted] / w[~hard].max(), 4.0) and w.mean() == pytest.approx(1.0)
    assert np.allclose(w[hard & issue], w[~hard].max())
    assert df.attrs["hardmine"]["export"]["hard_set"] == "threshold"
    per_class = export_manifest(sc, strategy="per-class", hard_set="threshold", threshold=cut)
    assert np.array_equal(per_class["is_hard"].to_numpy(dtype=bool), hard)  # one cut for every class


def test_noise_rate_uses_the_share_of_confident_errors(planted):
    sc, data = planted
    m = sc.manifest()
    rate = m["confident_error"].to_numpy(dtype=bool).mean()
    assert 0.02 < rate < 0.1  # the planted 5% flips are mostly confident errors
    df = export_manifest(sc, strategy="top-k", hard_set="noise-rate")
    hard = df["is_hard"].to_numpy(dtype=bool)
    assert hard.sum() == int(np.ceil(rate * len(df) - 1e-9))
    assert np.array_equal(hard, m["rank"].to_numpy() <= hard.sum())
    assert data["flipped"][hard].mean() > 0.6  # the set is mostly the planted label errors
    top_default = export_manifest(sc, strategy="top-k")  # the default keeps the top fraction, metadata as before
    assert "hard_set" not in top_default.attrs["hardmine"]["export"]


def test_bad_hard_set_arguments_are_clear(planted):
    sc, _ = planted
    m = sc.manifest()
    with pytest.raises(ValueError, match="needs a finite threshold"):
        compute_weights(m, "top-k", hard_set="threshold")
    with pytest.raises(ValueError, match="threshold=0.5 is only used"):
        compute_weights(m, "top-k", threshold=0.5)
    with pytest.raises(ValueError, match="hard_set='bogus'"):
        compute_weights(m, "top-k", hard_set="bogus")


def test_cli_export_hard_set(tmp_path, trained):  # noqa: F811
    assert _scan(tmp_path).exit_code == 0
    res = invoke("export", tmp_path / "scan", "--out", tmp_path / "t.parquet", "--strategy", "top-k",
                 "--hard-set", "threshold", "--threshold", "0.9", "--json")
    assert res.exit_code == 0, res.output
    df = read_manifest(tmp_path / "t.parquet")
    assert np.array_equal(df["is_hard"].to_numpy(dtype=bool), df["hardness"].to_numpy() >= 0.9)
    assert json.loads(res.stdout)["hard"] == int((df["hardness"] >= 0.9).sum())
    res = invoke("export", tmp_path / "scan", "--out", tmp_path / "t.parquet", "--hard-set", "threshold")
    assert res.exit_code == 2 and "needs a finite threshold" in " ".join(res.output.split())


def test_cli_export_reports_the_boost_over_the_samples_it_boosts(planted, tmp_path):
    sc, _ = planted
    res = invoke("export", sc.path, "--out", tmp_path / "k.parquet", "--strategy", "top-k", "--boost", "4", "--json")
    summary = json.loads(res.stdout)
    assert summary["hard_to_easy"] == pytest.approx(4.0)  # not diluted by the hard label errors left at 1
    df = read_manifest(tmp_path / "k.parquet")
    issues = int((df["is_hard"].to_numpy(dtype=bool) & df["is_label_issue"].to_numpy(dtype=bool)).sum())
    assert issues > 0 and f"{issues} of the hard samples are likely label errors" in summary["weights"]
