"""Drift between two scans: a planted unseen sub-population is flagged, data from the reference distribution is
not; per-class/per-slice shares and rates; files, refusals and the CLI's exit codes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_scan import batches_of, planted_blobs, trained_mlp
from typer.testing import CliRunner

from hardmine.cli import app
from hardmine.drift import DRIFT_FILE, SUMMARY_FILE, drift, read_drift, share_shift
from hardmine.scan import scan

runner = CliRunner()
N_NOVEL = 300


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    """A model trained on half of the planted blobs (the reference scan), the other half as new data from the
    same distribution, and a shifted set: 700 of that half plus 300 samples of a sub-population the model
    never saw (a new blob, random labels)."""
    root = tmp_path_factory.mktemp("drift")
    d = planted_blobs()
    x, y = d["x"], d["y"]
    g = np.random.default_rng(1)
    perm = g.permutation(len(y))
    a, b = perm[:1000], perm[1000:]
    model = trained_mlp(x[a], y[a])
    opts = {"dim": 32, "engine": "vmap"}
    ref = scan(model, batches_of(x[a], y[a]), out=root / "ref", **opts)
    same = scan(model, batches_of(x[b], y[b], ids=list(range(5000, 6000))), out=root / "same", **opts)
    novel = (g.normal(0, 3.0, x.shape[1]) + g.normal(0, 1, (N_NOVEL, x.shape[1]))).astype(np.float32)
    xs = np.concatenate([x[b[: 1000 - N_NOVEL]], novel])
    ys = np.concatenate([y[b[: 1000 - N_NOVEL]], g.integers(0, 4, N_NOVEL)])
    shifted = scan(model, batches_of(xs, ys, ids=list(range(7000, 8000))), out=root / "shifted", **opts)
    other = scan(model, batches_of(x[b[:200]], y[b[:200]]), out=root / "other_seed", dim=32, engine="vmap", seed=5)
    return {"root": root, "ref": ref, "same": same, "shifted": shifted, "other": other}


def test_unseen_subpopulation_is_flagged_and_same_distribution_is_not(scans):
    same = drift(scans["ref"], scans["same"])
    shifted = drift(scans["ref"], scans["shifted"])
    # The threshold is the reference's own 0.99 quantile: reference-like data is flagged at about 1%.
    assert same.summary["unfamiliar_rate"] <= 0.03
    assert same.score < 0.05 and same.summary["class_p_value"] > 0.01
    u = shifted.samples["unfamiliar"].to_numpy(dtype=bool)
    assert u[-N_NOVEL:].mean() >= 0.9  # the new sub-population
    assert u[:-N_NOVEL].mean() <= 0.03  # the familiar part of the same scan
    assert shifted.score >= 0.2 and shifted.score == pytest.approx(shifted.summary["unfamiliar_excess"])
    assert shifted.summary["slice_tv"] > same.summary["slice_tv"]
    # The same threshold for both: it comes from the reference alone.
    assert same.summary["threshold"] == shifted.summary["threshold"]
    fam = shifted.samples["familiarity"].to_numpy()
    assert np.median(fam[-N_NOVEL:]) < np.median(fam[:-N_NOVEL])


def test_per_sample_rows_and_group_tables(scans):
    res = drift(scans["ref"], scans["shifted"], k=5)
    s = res.samples
    assert s["sample_id"].tolist() == list(range(7000, 8000))
    assert {"familiarity", "distance", "nearest_id", "nearest_similarity", "unfamiliar", "ref_slice", "label",
            "pred", "correct"} <= set(s.columns)
    ref_ids = set(scans["ref"].sample_ids().tolist())
    assert set(s["nearest_id"].tolist()) <= ref_ids
    ref_slices = set(scans["ref"].manifest()["slice"].astype(str))
    assert s["ref_slice"].notna().all() and set(s["ref_slice"]) <= ref_slices
    summ = res.summary
    assert summ["k"] == 5 and summ["n_new"] == 1000 and summ["n_reference"] == 1000
    by_class = {r["label"]: r for r in summ["per_class"]}
    assert sorted(by_class) == [0, 1, 2, 3]
    assert sum(r["share_new"] for r in by_class.values()) == pytest.approx(1.0)
    for r in by_class.values():
        for key in ("failure_rate", "confident_error_rate", "ece"):
            assert 0.0 <= r[f"{key}_reference"] <= 1.0 and 0.0 <= r[f"{key}_new"] <= 1.0
    # The novel blob's random labels are mostly wrong for the model: failure rises in the new scan.
    assert summ["new_overall"]["failure_rate"] > summ["reference_overall"]["failure_rate"] + 0.1
    assert summ["per_slice"] and sum(r["share_new"] for r in summ["per_slice"]) == pytest.approx(1.0)


def test_share_shift_statistics():
    same = share_shift(pd.Series({0: 50, 1: 50}), pd.Series({0: 500, 1: 500}))
    assert same["tv"] == pytest.approx(0.0) and same["chi2"] == pytest.approx(0.0) and same["p_value"] == pytest.approx(1.0)
    moved = share_shift(pd.Series({0: 100, 1: 100}), pd.Series({0: 150, 2: 50}))
    assert moved["tv"] == pytest.approx(0.5) and moved["dof"] == 2 and moved["p_value"] < 1e-6
    # Pearson's statistic by hand on the 2 x 2 table [[60, 40], [40, 60]]: expected 50 everywhere.
    hand = share_shift(pd.Series({"a": 60, "b": 40}), pd.Series({"a": 40, "b": 60}))
    assert hand["chi2"] == pytest.approx(4 * 100 / 50) and hand["p_value"] == pytest.approx(0.004677734981047266)


def test_files_atomic_and_refusals(scans, tmp_path):
    out = tmp_path / "d"
    res = drift(scans["ref"], scans["same"], out=out)
    assert sorted(p.name for p in out.iterdir()) == [DRIFT_FILE, SUMMARY_FILE]
    back = read_drift(out)
    pd.testing.assert_frame_equal(back.samples, res.samples, check_dtype=False)
    assert json.loads((out / SUMMARY_FILE).read_text())["score"] == pytest.approx(res.score)
    drift(scans["ref"], scans["shifted"], out=out)  # its own report: replaced
    assert read_drift(out).summary["new"].endswith("shifted")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no earlier drift report"):
        drift(scans["ref"], scans["same"], out=mine)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    with pytest.raises(ValueError, match="not comparable .*seed: 0 vs 5"):
        drift(scans["ref"], scans["other"], out=tmp_path / "nope")
    assert not (tmp_path / "nope").exists()  # a refused command leaves nothing
    for kwargs, match in (({"k": 0}, "k=0"), ({"quantile": 1.0}, "quantile=1.0"), ({"quantile": "x"}, "quantile='x'"),
                          ({"k": 1000}, "k=1000")):
        with pytest.raises(ValueError, match=match):
            drift(scans["ref"], scans["same"], **kwargs)
    with pytest.raises(ValueError, match="not a hardmine scan directory"):
        drift(tmp_path, scans["same"])


def test_a_failed_write_leaves_no_half_report(scans, tmp_path, monkeypatch):
    import hardmine.drift

    def broken(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(hardmine.drift, "atomic_write_json", broken)
    with pytest.raises(OSError, match="disk full"):
        drift(scans["ref"], scans["same"], out=tmp_path / "d")
    assert list(tmp_path.iterdir()) == []  # neither the directory nor a temporary one


def test_cli_drift_json_and_fail_above(scans, tmp_path):
    def invoke(*args):
        return runner.invoke(app, ["drift", *(str(a) for a in args)], catch_exceptions=False)

    ref, same, shifted = (scans["root"] / n for n in ("ref", "same", "shifted"))
    res = invoke(ref, same, "--out", tmp_path / "a", "--json", "--fail-above", "0.05")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["failed"] is False
    res = invoke(ref, shifted, "--out", tmp_path / "b", "--fail-above", "0.05")
    assert res.exit_code == 3 and "above --fail-above 0.05" in " ".join(res.output.split())
    assert (tmp_path / "b" / SUMMARY_FILE).is_file()  # the report is written either way
    assert "unfamiliar" in res.output
    res = invoke(ref, scans["root"] / "other_seed", "--out", tmp_path / "c")
    assert res.exit_code == 2 and "not comparable" in res.output and not (tmp_path / "c").exists()
    (tmp_path / "f").write_text("x")
    res = invoke(ref, same, "--out", tmp_path / "f")
    assert res.exit_code == 2 and "is a file" in res.output


def test_drift_between_causal_lm_scans_has_no_class_table(tmp_path):
    # A causal LM's manifest has no label column: drift compares familiarity (and slices, none here) only
    import torch

    class LM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(11, 8), torch.nn.Linear(8, 11)

        def forward(self, input_ids, attention_mask=None):
            return self.head(self.emb(input_ids))

    torch.manual_seed(0)
    ids = torch.randint(0, 11, (40, 6))
    data = [{"input_ids": ids[i : i + 16], "labels": ids[i : i + 16]} for i in range(0, 40, 16)]
    lm = scan(LM().eval(), data, out=tmp_path / "lm", dim=8, task="causal-lm")
    report = drift(lm, lm, k=3)
    assert report.score == 0.0 and report.summary["per_class"] == []
    assert np.isnan(report.summary["class_tv"]) and report.summary["class_dof"] == 0


def test_a_one_sample_scan_says_no_k_works(tmp_path):
    import torch
    from models import MLP

    torch.manual_seed(0)
    model = MLP(d_in=4, hidden=6, n_classes=3).eval()
    one = scan(model, [(torch.randn(1, 4), torch.tensor([1]))], out=tmp_path / "one", dim=4)
    with pytest.raises(ValueError, match=r"has 1 sample\(s\): no other sample to be a neighbour"):
        one.neighbors([0], k=1)
    with pytest.raises(ValueError, match=r"has 1 sample\(s\); drift needs at least 2"):
        drift(one, one, k=1)
