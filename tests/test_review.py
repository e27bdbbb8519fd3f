"""Review queue and corrections on the planted blobs: the queue holds the planted label errors first and spreads
over slices; a filled queue round-trips into a corrected manifest; bad queues are refused with nothing written;
files that are not queues (or hold an expert's work) are never replaced."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from test_scan import planted_scan
from typer.testing import CliRunner

from hardmine.cli import app
from hardmine.enums import Strategy
from hardmine.manifest import compute_weights, export_manifest, read_manifest
from hardmine.review import QUEUE_COLUMNS, read_queue, relabel, review_queue

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_scan(tmp_path_factory.mktemp("review"))


def test_queue_puts_confident_errors_first_and_spreads_over_slices(planted, tmp_path):
    sc, data = planted
    m = sc.manifest()
    budget = 40
    q = review_queue(sc, budget=budget, out=tmp_path / "q.csv")
    assert list(q.columns) == list(QUEUE_COLUMNS) and len(q) == budget
    assert q["queue_position"].tolist() == list(range(1, budget + 1))
    assert q["sample_id"].is_unique
    # Reasons come in priority order.
    order = {"confident-error": 0, "label-issue": 1, "near-miss": 2}
    assert np.all(np.diff([order[r] for r in q["reason"]]) >= 0)
    by_id = m.set_index("sample_id")
    assert by_id.loc[q.loc[q["reason"] == "confident-error", "sample_id"], "confident_error"].all()
    # The planted flips are what a confident error mostly is here.
    flipped = set(m["sample_id"].to_numpy()[data["flipped"]].tolist())
    assert np.mean([s in flipped for s in q["sample_id"]]) >= 0.8
    # Spread: no slice takes more than its share of the budget while others have candidates.
    groups = q["slice"].value_counts()
    cands = m[m["confident_error"].fillna(False).astype(bool)]["slice"].nunique()
    assert groups.max() <= math.ceil(budget / cands) and len(groups) >= min(cands, budget)
    # Context to judge: the labels of the gradient neighbours, agreement with the sample's own label.
    first = q.iloc[0]
    labels = [int(v) for v in first["neighbor_labels"].split()]
    assert len(labels) == 5 and first["neighbor_agreement"] == pytest.approx(np.mean([v == first["label"] for v in labels]))
    assert (q["corrected_label"] == "").all() and (q["note"] == "").all()
    back = read_queue(tmp_path / "q.csv")
    assert back["sample_id"].astype(int).tolist() == q["sample_id"].tolist()


def test_hardest_first_within_a_slice_and_label_issue_fallback(planted, monkeypatch):
    sc, _ = planted
    q = review_queue(sc, budget=400)
    for _, g in q[q["reason"] == "confident-error"].groupby("slice"):
        assert g["rank"].is_monotonic_increasing
    assert set(q["reason"]) == {"confident-error", "label-issue", "near-miss"} or len(q) < 400
    # Without is_label_issue and slice (an older manifest): neighbour disagreement picks the candidates and
    # the budget is spread over classes.
    m = sc.manifest().drop(columns=["is_label_issue", "label_issue", "slice"])
    monkeypatch.setattr(sc, "manifest", lambda: m.copy())
    q = review_queue(sc, budget=60)
    nd = m.set_index("sample_id")["neighbor_disagreement"]
    issues = q.loc[q["reason"] == "label-issue", "sample_id"]
    assert len(issues) and (nd.loc[issues] >= 0.5).all()
    assert (q["slice"] == "").all() and q["label"].value_counts().max() <= 60 // 4


def test_round_trip_review_then_relabel(planted, tmp_path):
    sc, data = planted
    m = sc.manifest()
    q = review_queue(sc, budget=30)
    true_y = dict(zip(m["sample_id"].tolist(), data["true_y"].tolist()))
    # The expert fixes the first ten (the true class), confirms the next five, leaves the rest.
    q.loc[:9, "corrected_label"] = [str(true_y[s]) for s in q.loc[:9, "sample_id"]]
    q.loc[10:14, "corrected_label"] = q.loc[10:14, "label"].astype(str)
    q.loc[0, "note"] = "a shirt, not a coat, however you look at it"
    q.to_csv(tmp_path / "filled.csv", index=False)
    out = tmp_path / "corrected.parquet"
    res = invoke("relabel", sc.path, tmp_path / "filled.csv", "--out", out, "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    c = read_manifest(out)
    assert summary["reviewed"] == 15 and summary["changed"] == int((c["label"] != c["original_label"]).sum())
    reviewed = c["reviewed"].to_numpy(dtype=bool)
    assert reviewed.sum() == 15
    ids15 = set(q.loc[:14, "sample_id"].tolist())
    assert set(c.loc[reviewed, "sample_id"]) == ids15
    cid = c.set_index("sample_id")
    for s in q.loc[:9, "sample_id"]:
        assert cid.loc[s, "label"] == true_y[s]
        assert bool(cid.loc[s, "correct"]) == (cid.loc[s, "pred"] == true_y[s])
    assert (c.loc[~reviewed, "label"] == m.loc[~reviewed, "label"]).all()  # the rest untouched
    assert cid.loc[q.loc[0, "sample_id"], "review_note"] == "a shirt, not a coat, however you look at it"
    assert c.loc[reviewed, "is_label_issue"].eq(False).all()
    meta = c.attrs["hardmine"]["review"]
    assert meta["reviewed"] == 15 and meta["queue"].endswith("filled.csv") and len(meta["queue_sha256"]) == 64
    assert c.attrs["hardmine"]["model_fingerprint"] == m.attrs["hardmine"]["model_fingerprint"]  # provenance kept
    # An export of the corrected file no longer down-weights reviewed samples: under the slices strategy a
    # suspected label error is never boosted, a reviewed one is weighted like its slice mates.
    before = export_manifest(m, strategy=Strategy.SLICES).set_index("sample_id")
    after = export_manifest(out, strategy=Strategy.SLICES).set_index("sample_id")
    was_issue = [s for s in ids15 if bool(before.loc[s, "is_label_issue"])]
    assert was_issue
    for s in was_issue:
        mates = after[(after["slice"] == after.loc[s, "slice"]) & ~after["is_label_issue"].astype(bool)]
        assert np.isclose(after.loc[s, "weight"], mates["weight"]).any()
    assert "reviewed" in after.columns  # the column survives an export
    w, _ = compute_weights(c)
    np.testing.assert_allclose(c["weight"].to_numpy(), w)


def test_relabel_recomputes_weights_with_every_export_parameter(planted, tmp_path):
    # An export at slice_boost=3: its weights after relabel are the slices strategy's at 3, as its metadata says
    sc, _ = planted
    exported = tmp_path / "e.parquet"
    export_manifest(sc, strategy=Strategy.SLICES, slice_boost=3.0, out=exported)
    q = review_queue(sc, budget=5)
    q.loc[:0, "corrected_label"] = q.loc[:0, "label"].astype(str)  # one label confirmed
    q.to_csv(tmp_path / "q.csv", index=False)
    res = invoke("relabel", exported, tmp_path / "q.csv", "--out", tmp_path / "r.parquet")
    assert res.exit_code == 0, res.output
    r = read_manifest(tmp_path / "r.parquet")
    assert r.attrs["hardmine"]["export"]["slice_boost"] == 3.0
    at3, _ = compute_weights(r, Strategy.SLICES, slice_boost=3.0)
    at_default, _ = compute_weights(r, Strategy.SLICES)
    assert not np.allclose(at3, at_default)  # the parameter matters here
    np.testing.assert_allclose(r["weight"].to_numpy(), at3)


def test_bad_queues_are_refused_and_nothing_is_written(planted, tmp_path):
    sc, _ = planted
    q = review_queue(sc, budget=10)
    out = tmp_path / "c.parquet"
    cases = {
        "unknown": ("sample_id", 0, "123456", "sample_id '123456' is not in the scan"),
        "range": ("corrected_label", 1, "4", "corrected_label '4' is not a class in [0, 3]"),
        "text": ("corrected_label", 1, "dog", "corrected_label 'dog' is not a class"),
        "noint": ("sample_id", 2, "abc", "sample_id 'abc' is not an integer id"),
    }
    for name, (col, row, value, message) in cases.items():
        bad = q.copy()
        bad[col] = bad[col].astype(object)
        bad.loc[row, col] = value
        bad.to_csv(tmp_path / f"{name}.csv", index=False)
        res = invoke("relabel", sc.path, tmp_path / f"{name}.csv", "--out", out)
        assert res.exit_code == 2 and message in " ".join(res.output.split()), (name, res.output)
        assert f"line {row + 2}" in res.output and not out.exists()
    dup = pd.concat([q, q.iloc[[3]]])
    dup.to_csv(tmp_path / "dup.csv", index=False)
    res = invoke("relabel", sc.path, tmp_path / "dup.csv", "--out", out)
    assert res.exit_code == 2 and "is listed twice (also line 5)" in " ".join(res.output.split())
    assert not out.exists()
    (tmp_path / "nocol.csv").write_text("sample_id,label\n1,2\n")
    res = invoke("relabel", sc.path, tmp_path / "nocol.csv", "--out", out)
    assert res.exit_code == 2 and "no 'corrected_label' column" in res.output
    with pytest.raises(ValueError, match="is a directory"):
        relabel(sc, tmp_path / "dup.csv", out=tmp_path)


def test_review_never_clobbers_files_it_did_not_write_or_an_experts_work(planted, tmp_path):
    sc, _ = planted
    mine = tmp_path / "mine.csv"
    mine.write_text("a,b\n1,2\n")
    res = invoke("review", sc.path, "--out", mine, "--budget", "5")
    assert res.exit_code == 2 and "is not a review queue written by hardmine" in " ".join(res.output.split())
    assert "--overwrite" in res.output and mine.read_text() == "a,b\n1,2\n"
    res = invoke("review", sc.path, "--out", tmp_path, "--budget", "5")
    assert res.exit_code == 2 and "is a directory" in res.output
    qpath = tmp_path / "q.csv"
    res = invoke("review", sc.path, "--out", qpath, "--budget", "5", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["samples"] == 5
    assert invoke("review", sc.path, "--out", qpath, "--budget", "6").exit_code == 0  # its own, unfilled: replaced
    assert len(read_queue(qpath)) == 6
    filled = read_queue(qpath)
    filled.loc[0, "corrected_label"] = "1"
    filled.to_csv(qpath, index=False)
    res = invoke("review", sc.path, "--out", qpath, "--budget", "5")
    assert res.exit_code == 2 and "filled-in" in res.output and read_queue(qpath).loc[0, "corrected_label"] == "1"
    assert invoke("review", sc.path, "--out", mine, "--budget", "5", "--overwrite").exit_code == 0
    assert len(read_queue(mine)) == 5
    with pytest.raises(ValueError, match="budget=0"):
        review_queue(sc, budget=0)


def test_the_queue_names_classes_when_the_scan_recorded_names(tmp_path):
    import torch
    from models import MLP
    from test_cli import _blobs

    import hardmine
    from hardmine.review import review_queue

    x, y = _blobs()
    names = ["ant", "bee", "cow", "dog"]
    batches = [(torch.from_numpy(x[i : i + 40]), torch.from_numpy(y[i : i + 40])) for i in range(0, len(y), 40)]
    s = hardmine.scan(MLP().eval(), batches, out=tmp_path / "s", dim=8, provenance={"class_names": names})
    q = review_queue(s, budget=10)
    assert len(q) and all(q["label_name"] == [names[v] for v in q["label"]])
    assert all(q["pred_name"] == [names[v] for v in q["pred"]])
