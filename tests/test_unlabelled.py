"""Unlabelled scans: the model's own prediction is the target (BADGE's trick); the columns that need true
labels are null, and everything else (gradients, hardness, index, export) works."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from test_cli import _scan, invoke, trained  # noqa: F401  (the trained fixture)
from test_scan import batches_of, planted_blobs, trained_mlp

from hardmine.engine import GradientExtractor
from hardmine.manifest import read_manifest
from hardmine.scan import scan


def test_unlabelled_scan_uses_predictions_and_nulls_label_columns(tmp_path):
    data = planted_blobs(seed=2, n_per=40)
    model = trained_mlp(data["x"], data["y"], steps=40)
    x = torch.from_numpy(data["x"])
    unlabelled = [x[i : i + 32] for i in range(0, len(x), 32)]  # bare tensors: no targets at all
    s = scan(model, unlabelled, out=tmp_path / "u", dim=8, engine="vmap", labels=None)
    m = s.manifest()
    meta = m.attrs["hardmine"]
    assert meta["targets"] == "predictions" and meta["export"]["strategy"] == "proportional"
    for c in ("label", "correct", "confident_error", "near_miss"):
        assert m[c].isna().all(), c
    assert m["neighbor_disagreement"].isna().all() and m["slice"].isna().all()
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    assert (m.sort_values("sample_id")["pred"].to_numpy() == pred).all()
    # The gradients are those of the loss at the predicted class: the same as a labelled scan with y = pred.
    ref = GradientExtractor(model, dim=8, engine="vmap")((x[:5], torch.from_numpy(pred[:5])))
    np.testing.assert_allclose(s.gradients()[:5], ref.z.numpy(), rtol=1e-5, atol=1e-7)
    assert np.isfinite(m["hardness"]).all() and np.isclose(m["weight"].mean(), 1.0)
    # Batches that do carry targets: ignored, same result.
    again = scan(model, batches_of(data["x"], data["y"], 32), out=tmp_path / "v", dim=8, engine="vmap", labels=None)
    np.testing.assert_array_equal(again.gradients(), s.gradients())
    with pytest.raises(ValueError, match="labels=3"):
        scan(model, unlabelled, out=tmp_path / "w", labels=3)


def test_models_without_class_logits_cannot_scan_unlabelled_data(tmp_path):
    model = torch.nn.Linear(4, 3)  # on (B, T, 4) inputs: (B, T, 3) outputs, no class to predict per sample
    with pytest.raises(ValueError, match="needs a classifier's"):
        scan(model, [torch.randn(3, 5, 4)], out=tmp_path / "r", dim=4, labels=None)
    assert not (tmp_path / "r").exists()  # failed before its first shard: nothing left


def test_cli_no_labels_reads_no_label_column(tmp_path, trained):  # noqa: F811
    _, x, _ = trained
    pd.DataFrame({"feat": list(x)}).to_parquet(tmp_path / "u.parquet")  # no label column at all
    res = _scan(tmp_path, "--feature-column", "feat", "--no-labels", data="u.parquet")
    assert res.exit_code == 0, res.output
    m = read_manifest(tmp_path / "scan")
    assert len(m) == len(x) and m["label"].isna().all() and m.attrs["hardmine"]["targets"] == "predictions"
    np.savez(tmp_path / "x_only.npz", X=x)
    assert _scan(tmp_path, "--no-labels", data="x_only.npz", out="npz").exit_code == 0
    res = _scan(tmp_path, "--feature-column", "feat", data="u.parquet", out="needs")
    assert res.exit_code == 2 and "--label-column 'label' is not a column" in " ".join(res.output.split())
    assert invoke("show", tmp_path / "scan", "--top", "3").exit_code == 0
