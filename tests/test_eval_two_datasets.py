"""Smoke test of the benchmark's second dataset and of the rules over both: ``eval_quality.py --quick
--dataset satellite`` runs end to end on the real Satellite table, and ``eval_summary.py`` picks defaults and
judges targets from two result files (paired intervals computed here by hand)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from evalkit.data import SATELLITE_RDA  # noqa: E402
from evalkit.metrics import paired_interval  # noqa: E402

HAS_SATELLITE = Path(SATELLITE_RDA).exists()
HAS_RDATA = __import__("importlib.util").util.find_spec("rdata") is not None


def test_paired_interval_is_the_t_interval():
    d = [0.01, 0.03, -0.02, 0.04, 0.02]
    ms = paired_interval(d)
    half = 2.776 * np.std(d, ddof=1) / math.sqrt(5)  # t(0.975, 4 df)
    assert ms["mean"] == pytest.approx(np.mean(d)) and ms["ci95"] == pytest.approx(half)
    assert math.isnan(paired_interval([0.1])["ci95"])


@pytest.mark.slow
@pytest.mark.skipif(not (HAS_SATELLITE and HAS_RDATA), reason="mlbench Satellite (r-cran-mlbench) or rdata missing")
def test_satellite_quick_run_and_the_rules_over_two_datasets(tmp_path):
    runs = {}
    for ds, name in (("satellite", "eval_quality_satellite.json"), ("fashion-mnist", "eval_quality.json")):
        out = tmp_path / name
        proc = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "eval_quality.py"), "--quick", "--dataset", ds, "--no-online",
             "--retrain-weightings", "0", "--out", str(out)],
            capture_output=True, text=True, timeout=300, cwd=ROOT,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[ds] = json.loads(out.read_text())
    sat = runs["satellite"]
    assert sat["meta"]["dataset"] == "satellite" and sat["meta"]["n_classes"] == 6
    hs = sat["tasks"]["hidden-strat"]["summary"]
    assert set(hs["slice_f1"]) == {"gradients", "output-layer", "features"}
    assert all(0.0 <= v["mean"] <= 1.0 for v in hs["slice_f1"].values())
    pols = hs["policies"]
    assert {"JTT (errors x5)", "JTT (errors x20)", "GEORGE-style (feature clusters, group-balanced)"} <= set(pols)
    assert any(p.startswith("hardmine manifest: slices") for p in pols)
    scores = sat["tasks"]["noise-pairs"]["summary"]["scores"]
    assert {f"hardmine:label_issue[{m}]" for m in ("loss", "margin", "log-margin")} <= set(scores)
    for t in sat["targets"]:
        assert all("ci95" in v for v in t["paired_diff"].values())
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "eval_summary.py"), "--results", str(tmp_path), "--out",
         str(tmp_path / "summary.json")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summ = json.loads((tmp_path / "summary.json").read_text())
    assert summ["label_issue"]["choice"] in summ["label_issue"]["rows"]
    assert summ["embedding"]["choice"] in ("gradients", "output-layer")
    assert summ["strategy"]["choice"].startswith("hardmine manifest: ")
    # The label-issue rule by hand: smallest worst-case shortfall against max(cleanlab, loss).
    short = {m: r["shortfall"] for m, r in summ["label_issue"]["rows"].items()}
    assert summ["label_issue"]["choice"] == min(short, key=short.get)
    assert set(summ["targets"]) == {"fashion-mnist", "satellite"}
    assert len(summ["targets"]["satellite"]) == 5
    assert "When to use which strategy" in (tmp_path / "summary.md").read_text()
