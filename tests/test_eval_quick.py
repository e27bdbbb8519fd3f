"""Smoke test of the quality benchmark: ``scripts/eval_quality.py --quick`` runs end to end on real
Fashion-MNIST and writes well-formed JSON and Markdown; plus exact checks of its metric helpers."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hardmine.datasets import fashion_mnist_dir

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "eval_quality.py"
sys.path.insert(0, str(ROOT / "scripts"))

from evalkit.metrics import auroc, mean_std, precision_at_k, subgroup_accuracy  # noqa: E402

HAS_FMNIST = (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").exists()


# ------------------------------------------------------------------------------------------------ metrics
def _pairwise_auroc(s: np.ndarray, pos: np.ndarray) -> float:
    """The definition: P(score of a random positive > score of a random negative), ties count 1/2."""
    wins = [(a > b) + 0.5 * (a == b) for a, b in itertools.product(s[pos], s[~pos])]
    return float(np.mean(wins))


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_matches_pairwise_definition(ties):
    rng = np.random.default_rng(3)
    for n in (2, 7, 60):
        s = rng.integers(0, 4, n).astype(float) if ties else rng.normal(size=n)
        pos = rng.random(n) < 0.4
        pos[0], pos[-1] = True, False  # both classes present
        assert auroc(s, pos) == pytest.approx(_pairwise_auroc(s, pos), abs=1e-12)


def test_auroc_edge_cases():
    assert auroc(np.array([1.0, 2.0, 3.0]), np.array([False, False, True])) == 1.0
    assert auroc(np.array([3.0, 2.0, 1.0]), np.array([False, False, True])) == 0.0
    assert math.isnan(auroc(np.array([1.0, 2.0]), np.array([True, True])))
    with pytest.raises(ValueError, match="NaN"):
        auroc(np.array([np.nan, 1.0]), np.array([True, False]))


def test_precision_at_rate_and_subgroups():
    s = np.array([0.9, 0.8, 0.1, 0.7, 0.2])
    pos = np.array([True, False, False, True, False])
    assert precision_at_k(s, pos) == 0.5  # top-2 = rows 0, 1
    assert precision_at_k(s, pos, k=3) == pytest.approx(2 / 3)
    acc = subgroup_accuracy(
        np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), np.array([5, 5, 6, 6]), {5: 0.9, 6: 0.1}
    )
    assert acc["per_group"] == {5: 0.5, 6: 1.0}
    assert acc["worst"] == 0.5 and acc["weighted"] == pytest.approx(0.55) and acc["mean"] == 0.75
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2}


# ------------------------------------------------------------------------------------------------ quick run
def _in_unit(ms: dict, what: str) -> None:
    assert ms["n"] >= 1, what
    assert 0.0 <= ms["mean"] <= 1.0 and ms["std"] >= 0.0, (what, ms)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_FMNIST, reason="Fashion-MNIST (Debian dataset-fashion-mnist) is not installed")
def test_quick_run_writes_wellformed_results(tmp_path):
    out = tmp_path / "q.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--workdir", str(tmp_path / "scans")],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    md = out.with_suffix(".md").read_text()
    assert "support no claim" in md and "| ERM |" in md

    meta = res["meta"]
    assert meta["quick"] is True and meta["claims"] is False
    assert meta["seeds"] == [0] and meta["retrain_seeds"] == [0]
    assert set(res["tasks"]) == {
        "noise-symmetric",
        "noise-pairs",
        "hidden-strat",
        "hidden-strat+noise5",
        "long-tail",
    }
    has_cleanlab = importlib.util.find_spec("cleanlab") is not None

    for name in ("noise-symmetric", "noise-pairs"):
        summ = res["tasks"][name]["summary"]
        assert 0.03 < summ["noise_rate"]["mean"] <= 0.10 + 1e-9
        scores = summ["scores"]
        for col in (
            "hardness (default)",
            "loss",
            "el2n",
            "grad_norm",
            "margin (negated)",
            "class_divergence",
            "class_divergence_plain",
            "knn_outlier",
            "neighbor_disagreement",
        ):
            assert f"hardmine:{col}" in scores, sorted(scores)
        assert ("cleanlab:label quality (K-fold)" in scores) == has_cleanlab
        for sname, row in scores.items():
            _in_unit(row["auroc"], f"{name}/{sname}/auroc")
            _in_unit(row["p_at_rate"], f"{name}/{sname}/p_at_rate")
        # hardmine's loss column is the loss of the model it scanned: it must equal the harness's own.
        for run in res["tasks"][name]["runs"]:
            assert run["hardmine_vs_reference"]["loss_max_abs_diff"] < 1e-3

    for name in ("hidden-strat", "hidden-strat+noise5", "long-tail"):
        summ = res["tasks"][name]["summary"]
        pols = summ["policies"]
        assert {"ERM", "class-balanced sampling", "focal loss (gamma=2)"} <= set(pols)
        assert any(p.startswith("JTT") for p in pols) and any(p.startswith("loss top-") for p in pols)
        hm = [p for p in pols if p.startswith("hardmine manifest")]
        assert hm and any("(default)" in p for p in hm), sorted(pols)
        # Retraining under another hardness weighting goes through Scan.rescore; its hardness must equal the
        # composite the weight study computes from the manifest columns.
        for run in res["tasks"][name]["runs"]:
            rescored = [r for p, r in run["policies"].items() if "weights:" in p]
            assert rescored
            for r in rescored:
                assert r["rescore_vs_composite_max_abs_diff"] < 1e-9
        online = pols["hardmine online weighting (training-loop API)"]
        if importlib.util.find_spec("hardmine.online") is None:
            assert online["status"] == "not yet available" and "acc" not in online
        else:  # the training-loop API exists: both online rows carry numbers (checked in the loop below)
            assert "status" not in online
            assert "status" not in pols["hardmine online weighting + MinerSampler refreshed per epoch"]
        for pname, row in pols.items():
            if "status" in row:
                continue
            keys = ("balanced_acc", "tail_acc") if name == "long-tail" else ("acc", "worst", "minority_acc")
            for k in keys:
                _in_unit(row[k], f"{name}/{pname}/{k}")
            _in_unit(row["draw_share_minority"], f"{name}/{pname}/draw_share_minority")
        if name != "long-tail":
            for sname, row in summ["minority_scores"].items():
                _in_unit(row["auroc"], f"{name}/{sname}/minority auroc")

    assert len(res["targets"]) == 5
    for t in res["targets"]:
        assert t["met"] in (True, False, None)
        assert t["paired_diff"] and all(abs(v["mean"]) <= 1.0 for v in t["paired_diff"].values())
    assert all("worst-case shortfall" in r for r in res["hardness_weights"]["rows"].values())
    rec = res["recommendation"]
    assert rec["strategy"]["name"] in res["strategies"]["rows"]
    assert rec["weights"]["name"] in res["hardness_weights"]["rows"]
