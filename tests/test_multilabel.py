"""Multi-label models (``loss_fn="bce"`` / ``--loss bce``): (B, C) logits against (B, C) 0/1 targets, exact
per-sample gradients, their own documented columns, a scan and a CLI run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from test_cli import _scan
from torch import nn
from torch.testing import assert_close

from hardmine.engine import GradientExtractor
from hardmine.extract import reference_per_sample_grads
from hardmine.manifest import read_manifest
from hardmine.online import OnlineMiner
from hardmine.scan import scan
from hardmine.score import multilabel_stats


def multi():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4))


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, :4] + 0.5 * torch.randn(n, 4, generator=g) > 0).float()  # (N, 4) 0/1
    return x, y


@pytest.mark.parametrize("engine", ["factored", "vmap"])
@pytest.mark.parametrize("b", [1, 5])
def test_exact_per_sample_gradients_and_loss(engine, b):
    model = multi().double()
    x, y = _data(b)
    res = GradientExtractor(model, dim=8, engine=engine, loss_fn="bce")((x.double(), y.double()))
    ref = reference_per_sample_grads(model, (x.double(), y.double()), loss_fn="bce")
    assert_close(res.grad_norm, ref.grad_norm)
    want = F.binary_cross_entropy_with_logits(model(x.double()), y.double(), reduction="none").mean(1)
    assert_close(res.loss, want)


def test_stats_are_the_documented_ones():
    logits = np.array([[2.0, -1.0, 0.5], [-3.0, 1.0, -0.2]])
    t = np.array([[1, 0, 0], [0, 1, 1]])
    st = multilabel_stats(logits, t)
    p = 1 / (1 + np.exp(-logits))
    p_t = np.where(t == 1, p, 1 - p)
    assert st["label"] == ["0", "1,2"] and st["pred"] == ["0,2", "1"]
    assert st["correct"].tolist() == [False, False]
    np.testing.assert_allclose(st["confidence"], p_t.mean(1))
    np.testing.assert_allclose(st["margin"], (2 * p_t - 1).min(1))
    np.testing.assert_allclose(st["el2n"], np.linalg.norm(p - t, axis=1))


def test_scan_writes_label_sets_and_global_signals(tmp_path):
    model = multi().eval()
    x, y = _data()
    s = scan(model, [(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)], out=tmp_path / "s", dim=8,
             loss_fn="bce", engine="vmap")
    m = s.manifest().sort_values("sample_id")
    meta = m.attrs["hardmine"]
    assert meta["task"] == "multilabel" and meta["loss"] == "bce" and meta["export"]["strategy"] == "proportional"
    assert m["label"].iloc[0] == ",".join(str(i) for i in np.flatnonzero(y[0].numpy()))
    assert m["class_divergence"].isna().all() and np.isfinite(m["global_divergence"]).all()
    assert np.isfinite(m["hardness"]).all() and m["slice"].isna().all()
    with pytest.raises(ValueError, match="0 or 1"):
        scan(model, [(x[:4], y[:4] * 2)], out=tmp_path / "bad", dim=8, loss_fn="bce")
    with pytest.raises(ValueError, match="online miner does not mine multi-label"):
        OnlineMiner(model, layers="2", loss_fn="bce").observe(x[:4], y[:4])


def test_cli_scans_multilabel_rows(tmp_path):
    model = multi()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    x, y = _data()
    pd.DataFrame({"feat": list(x.numpy()), "labels": list(y.numpy().astype(int))}).to_parquet(tmp_path / "m.parquet")
    res = _scan(tmp_path, "--feature-column", "feat", "--label-column", "labels", "--loss", "bce",
                model="test_multilabel:multi", data="m.parquet")
    assert res.exit_code == 0, res.output
    m = read_manifest(tmp_path / "scan")
    assert m.attrs["hardmine"]["task"] == "multilabel" and len(m) == 48
    np.savez(tmp_path / "m.npz", X=x.numpy(), y=y.numpy())
    assert _scan(tmp_path, "--loss", "bce", model="test_multilabel:multi", data="m.npz", out="npz").exit_code == 0
    bad = pd.DataFrame({"feat": list(x.numpy()), "labels": [[0, 2, 0, 1]] * 48})
    bad.to_parquet(tmp_path / "bad.parquet")
    res = _scan(tmp_path, "--feature-column", "feat", "--label-column", "labels", "--loss", "bce",
                model="test_multilabel:multi", data="bad.parquet", out="bad")
    assert res.exit_code == 2 and "must be 0 or 1" in " ".join(res.output.split())


def test_multilabel_stats_by_hand():
    from hardmine.score import multilabel_stats

    # sample 0: both labels right (logit 2 for a true label, -2 for a false one); sample 1: label 1 wrong;
    # sample 2: logit exactly 0 (p = 0.5) counts as predicted, and its label is true.
    logits = np.array([[2.0, -2.0], [2.0, 1.0], [0.0, -3.0]])
    targets = np.array([[1, 0], [1, 0], [1, 0]])
    s = multilabel_stats(logits, targets)
    np.testing.assert_array_equal(s["correct"], [True, False, True])
    assert s["pred"] == ["0", "0,1", "0"] and s["label"] == ["0", "0", "0"]
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    np.testing.assert_allclose(s["pred_confidence"], [sig(2.0), (sig(2.0) + sig(1.0)) / 2, (0.5 + sig(3.0)) / 2])
    np.testing.assert_allclose(s["confidence"], [sig(2.0), (sig(2.0) + 1 - sig(1.0)) / 2, (0.5 + sig(3.0)) / 2])
    np.testing.assert_allclose(s["margin"], [2 * sig(2.0) - 1, 2 * (1 - sig(1.0)) - 1, 0.0], atol=1e-12)
