"""The training-loop API (``hardmine.online``) against slow, obvious references and planted truth.

* projected per-sample gradients (analytic last-layer path and autograd multi-layer path) == the exact
  per-sample gradients of ``reference_per_sample_grads`` projected with the same seeded Kronecker / dense
  matrices (float64 models, batch 1 and larger), and == an offline ``GradientExtractor``;
* one forward per step, ``param.grad`` untouched, the user's weighted backward gives the right gradient;
* weights and agreement == a NumPy re-implementation of the documented EMA formula;
* training dynamics == the same statistics recomputed with pandas from the per-step stats;
* planted truth: flipped labels and a rare sub-cluster get larger weights and rank hardest;
* checkpoint mid-training -> fresh model + miner -> resume == uninterrupted run;
* nothing left on the model; bad input raises ValueError.
"""

from __future__ import annotations

import copy
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from models import CNN, MLP, TinyTransformer, token_batch
from torch import nn
from torch.testing import assert_close

from hardmine.datasets import fashion_mnist_dir
from hardmine.engine import GradientExtractor
from hardmine.extract import reference_per_sample_grads
from hardmine.manifest import REQUIRED_COLUMNS, read_manifest
from hardmine.online import MinerSampler, OnlineMiner, WeightingConfig, solve_weights
from hardmine.online import dynamics as online_dynamics
from hardmine.online.weighting import device_training_weights, never_clipped, training_weights
from hardmine.project import random_matrix
from hardmine.sampler import ManifestSampler

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    """Tiny models train several times faster on one thread (no intra-op sync), more so on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _expected_z(miner: OnlineMiner, ref) -> torch.Tensor:
    """Exact per-sample gradients projected with explicit matrices: kron(P_out, P_in) or the dense block."""
    parts = []
    for name, blk in miner.layout.blocks.items():
        g = ref.grads[name]
        flat = g.reshape(g.shape[0], -1)  # (B, P)
        if blk.kind == "kron":
            a, b = blk.factors
            rows, cols = blk.matrix_shape
            p_out = random_matrix(rows, a, seed=miner.layout.seed, key=f"{name}:out").double()
            p_in = random_matrix(cols, b, seed=miner.layout.seed, key=f"{name}:in").double()
            parts.append(flat @ torch.kron(p_out, p_in))  # (B, a*b)
        else:
            parts.append(flat @ miner.layout.dense_matrix(name).double())  # (B, width)
    return torch.cat(parts, dim=1)


def _check(model, inputs, target, layers, path, loss_fn=None, dim=12):
    miner = OnlineMiner(model, layers=layers, dim=dim, seed=7, loss_fn=loss_fn)
    stats = miner.observe(inputs, target, list(range(len(target))))
    batch = (inputs, target)
    ref = reference_per_sample_grads(model, batch, loss_fn, params=layers)
    assert stats.path == path
    assert_close(stats.z, _expected_z(miner, ref).float())
    assert_close(stats.grad_norm, ref.grad_norm)
    assert_close(stats.loss.detach(), ref.loss)
    assert_close(stats.output.detach(), ref.output)
    return miner, stats


# ----------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("b", [1, 6])
def test_analytic_last_layer_cross_entropy(b):
    model = MLP().double()
    x, y = torch.randn(b, 12, dtype=torch.float64), torch.randint(0, 4, (b,))
    _check(model, x, y, "fc2", "analytic")
    _check(model, x, y, "fc2.weight", "analytic")  # matrix only, no bias block


@pytest.mark.parametrize("b", [1, 5])
def test_analytic_last_layer_mse(b):
    model = MLP(n_classes=3).double()
    x, y = torch.randn(b, 12, dtype=torch.float64), torch.randn(b, 3, dtype=torch.float64)
    _check(model, x, y, "fc2", "analytic", loss_fn="mse")


@pytest.mark.parametrize("b", [1, 5])
def test_autograd_path_multi_layer(b):
    torch.manual_seed(1)
    _check(
        MLP().double(), torch.randn(b, 12, dtype=torch.float64), torch.randint(0, 4, (b,)), None, "autograd"
    )
    _check(
        MLP().double(), torch.randn(b, 12, dtype=torch.float64), torch.randint(0, 4, (b,)), "fc1", "autograd"
    )
    cnn = CNN().double()
    _check(cnn, torch.randn(b, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (b,)), None, "autograd")


def test_autograd_path_tokens_embedding_layernorm_and_custom_loss():
    model = TinyTransformer().double()
    batch = token_batch(4)
    y = torch.tensor([0, 2, 1, 2])
    _check(model, batch, y, ["embed", "norm", "classifier"], "autograd")

    def smooth_ce(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, target, reduction="none", label_smoothing=0.1)

    # A custom loss on the output layer: the gradient at the logits comes from autograd (cheap: loss only).
    _check(
        MLP().double(),
        torch.randn(3, 12, dtype=torch.float64),
        torch.tensor([0, 1, 3]),
        "fc2",
        "autograd",
        loss_fn=smooth_ce,
    )


def test_a_module_a_later_step_skips_has_zero_gradients_not_an_error():
    # After the first observation saw it called, a module the forward skips on a step (a branch, an expert
    # nothing is routed to) has a zero gradient for every sample: the step's vectors stay exact
    from models import Branch, branch_batches

    torch.manual_seed(0)
    model = Branch().double()
    taken, skipped, y = branch_batches()
    miner = OnlineMiner(model, dim=12, seed=7)
    for inputs in (taken, skipped, taken):
        stats = miner.observe(inputs, y)
        ref = reference_per_sample_grads(model, (inputs, y))
        assert_close(stats.z, _expected_z(miner, ref).float())
        assert_close(stats.grad_norm, ref.grad_norm)
    with pytest.raises(ValueError, match=r"module b \(Linear\) was not called in the captured forward"):
        OnlineMiner(model, dim=12, seed=7).observe(skipped, y)  # the first observation must see every call
    # A step whose branch uses b's weights without calling b: not a skipped module, refused
    functional = Branch(functional_else=True).double()
    miner = OnlineMiner(functional, dim=12, seed=7)
    miner.observe(taken, y)
    with pytest.raises(ValueError, match=r"module b \(Linear\) was not called in the captured forward"):
        miner.observe(skipped, y)


def test_same_vectors_as_the_offline_engine():
    model = MLP()
    x, y = torch.randn(9, 12), torch.randint(0, 4, (9,))
    for layers in ("fc2", None):
        miner = OnlineMiner(model, layers=layers, dim=16, seed=3)
        online = miner.observe(x, y)
        offline = GradientExtractor(model, layers=layers, dim=16, seed=3, engine="factored")((x, y))
        assert miner.out_dim == offline.z.shape[1]
        assert_close(online.z, offline.z, rtol=1e-4, atol=1e-5)
        assert_close(online.grad_norm, offline.grad_norm, rtol=1e-4, atol=1e-6)


class InplaceNet(nn.Module):
    """A selected Linear whose output the model rewrites in place (ReLU(inplace=True))."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def test_output_modified_in_place_is_protected_on_every_step():
    model = InplaceNet().double()
    miner = OnlineMiner(model, layers=None, dim=12, seed=0)
    for step in range(3):  # step 1 clones everything and learns; later steps clone only fc1
        x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
        stats = miner.observe(x, y)
        ref = reference_per_sample_grads(model, (x, y))
        assert_close(stats.z, _expected_z(miner, ref).float(), msg=lambda m, s=step: f"step {s}: {m}")
    assert miner._protect == {"fc1"}


# ------------------------------------------------------------------------------------ one forward
class Counting(MLP):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x)


@pytest.mark.parametrize("layers", ["fc2", None])
def test_one_forward_no_param_grad_and_weighted_backward_is_right(layers):
    model = Counting().double()
    twin = copy.deepcopy(model)
    miner = OnlineMiner(model, layers=layers, dim=12, seed=0, weighting={"warmup_steps": 0, "strength": 3.0})
    x, y = torch.randn(8, 12, dtype=torch.float64), torch.randint(0, 4, (8,))
    miner.observe(x, y, list(range(8)))  # forms the directions, so the next weights differ from 1
    model.calls = 0
    stats = miner.observe(x, y, list(range(8)))
    assert model.calls == 1
    assert all(p.grad is None for p in model.parameters())
    assert not stats.weights.requires_grad and stats.loss.requires_grad
    assert stats.weights.std() > 0
    stats.weighted_loss().backward()
    # The same objective computed plainly on the twin model.
    loss = (F.cross_entropy(twin(x), y, reduction="none") * stats.weights).mean()
    loss.backward()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert_close(p.grad, q.grad, msg=lambda m, n=n: f"{n}: {m}")


def test_capture_and_observe_output_for_frameworks():
    model = MLP()
    miner = OnlineMiner(model, layers="fc2", dim=16, seed=0)
    x, y = torch.randn(6, 12), torch.randint(0, 4, (6,))
    with miner.capture():
        logits = model(x)
    a = miner.observe_output(
        {"logits": logits}, y, [f"s{i}" for i in range(6)]
    )  # mapping with logits, str ids
    b = OnlineMiner(model, layers="fc2", dim=16, seed=0).observe(x, y)
    assert_close(a.z, b.z)
    assert miner.manifest()["sample_id"].tolist() == [f"s{i}" for i in range(6)]


# ------------------------------------------------------------------------------------------ weighting
def test_solve_weights_mean_one_and_bounds():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 40))
        raw = np.exp(rng.normal(0, 2.0, n))  # wide spread: bounds bind often
        lo, hi = float(rng.uniform(0.05, 1.0)), float(rng.uniform(1.0, 6.0))
        w = solve_weights(raw, lo, hi)
        assert abs(w.mean() - 1.0) < 1e-9
        assert w.min() >= lo - 1e-12 and w.max() <= hi + 1e-12
        # Order is kept (the clipped scaling is monotone).
        assert np.all(np.diff(w[np.argsort(raw, kind="stable")]) >= -1e-12)
    assert_close(
        torch.from_numpy(solve_weights(np.array([1.0, 3.0]), 0.25, 4.0)), torch.tensor([0.5, 1.5]).double()
    )
    # [0.1, 1.9] with bounds [0.5, 1.2]: c*raw clipped at 1.2 for the second, the first takes 0.8.
    assert_close(
        torch.from_numpy(solve_weights(np.array([1.0, 19.0]), 0.5, 1.2)), torch.tensor([0.8, 1.2]).double()
    )


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    strength=st.floats(0.0, 8.0),
    lo=st.floats(0.05, 1.0),
    hi=st.floats(1.0, 6.0),
    seed=st.integers(0, 2**16),
)
def test_device_weights_equal_the_host_weights(n, strength, lo, hi, seed):
    # The GPU path's weights (tensor ops, no host sync) are the CPU path's, whether or not the configuration
    # lets a weight reach a bound (never_clipped: the usual solution is taken without the breakpoint search).
    cfg = WeightingConfig(strength=strength, min_weight=lo, max_weight=hi)
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1.0, 1.0, n)
    a[rng.random(n) < 0.1] = np.nan  # a non-finite gradient counts as agreeing
    a[rng.random(n) < 0.1] = 1.0
    host = training_weights(a, cfg, warm=False)
    device = device_training_weights(torch.from_numpy(a), cfg, warm=False)
    assert device.dtype == torch.float64
    assert_close(device, torch.from_numpy(host), rtol=1e-12, atol=1e-12)
    if never_clipped(cfg):  # then no weight is at a bound, whatever the agreements
        raw = 1.0 + strength * (1.0 - np.clip(np.nan_to_num(a, nan=1.0), -1, 1)) / 2.0
        np.testing.assert_allclose(host, raw / raw.mean(), rtol=1e-12)
        assert host.min() >= lo and host.max() <= hi


def test_never_clipped_is_exactly_the_bound_on_the_raw_weights():
    assert never_clipped(WeightingConfig())  # the defaults: raw weights in [1, 3], bounds 0.25 and 4
    assert never_clipped(WeightingConfig(strength=3.0, min_weight=0.25, max_weight=4.0))  # 4 and 1/4: on the bounds
    assert not never_clipped(WeightingConfig(strength=3.5, min_weight=0.2, max_weight=4.0))  # 4.5 > 4
    assert not never_clipped(WeightingConfig(strength=3.0, min_weight=0.3, max_weight=4.0))  # 1/4 < 0.3
    # Outside the bound, the bounds do bind: all agreeing but one opposed sample, strength 3.5, max 4.
    cfg = WeightingConfig(strength=3.5, min_weight=0.2, max_weight=4.0)
    a = np.array([-1.0] + [1.0] * 63)
    w = device_training_weights(torch.from_numpy(a), cfg, warm=False)
    assert float(w[0]) == pytest.approx(4.0) and float(w.mean()) == pytest.approx(1.0)
    assert_close(w, torch.from_numpy(training_weights(a, cfg, warm=False)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("c", [4, 70])  # 70 classes: the scatter (index_add) update instead of the matmul
def test_weights_and_agreement_follow_the_documented_formula(c):
    """Re-implement the EMA directions, agreement and weights in NumPy from the returned z and compare."""
    torch.manual_seed(0)
    model = MLP(n_classes=c)
    cfg = WeightingConfig(strength=2.5, momentum=0.8, warmup_steps=2, min_weight=0.5, max_weight=2.0)
    miner = OnlineMiner(model, layers=None, num_classes=c, dim=16, seed=1, weighting=cfg)
    dirs = np.zeros((c + 1, miner.out_dim))
    seen = np.zeros(c + 1, dtype=bool)
    for step in range(1, 7):
        x, y = torch.randn(10, 12), torch.randint(0, 3, (10,))  # class 3 never appears
        stats = miner.observe(x, y)
        z = stats.z.double().numpy()
        u = z / np.linalg.norm(z, axis=1, keepdims=True)
        unit_dirs = dirs / np.maximum(np.linalg.norm(dirs, axis=1, keepdims=True), 1e-30)
        lab = y.numpy()
        class_a = (u * unit_dirs[lab]).sum(1)
        assert_close(stats.agreement.double(), torch.from_numpy(class_a), atol=1e-5, rtol=1e-5)
        assert_close(
            stats.global_agreement.double(), torch.from_numpy(u @ unit_dirs[-1]), atol=1e-5, rtol=1e-5
        )
        if step <= cfg.warmup_steps:
            assert stats.warmup and torch.equal(stats.weights, torch.ones(10))
        else:
            raw = 1 + cfg.strength * (1 - class_a) / 2
            want = solve_weights(raw, cfg.min_weight, cfg.max_weight)
            assert_close(stats.weights.double(), torch.from_numpy(want), atol=1e-5, rtol=1e-5)
            assert abs(float(stats.weights.mean()) - 1) < 1e-5
        for r, members in [(k, lab == k) for k in range(c)] + [(c, np.ones(10, dtype=bool))]:
            if members.any():
                mean = u[members].mean(0)
                dirs[r] = cfg.momentum * dirs[r] + (1 - cfg.momentum) * mean if seen[r] else mean
                seen[r] = True
    assert not np.any(dirs[3])  # a class never seen keeps no direction (agreement 0 against it)


def test_regression_uses_the_global_direction():
    model = MLP(n_classes=1)
    miner = OnlineMiner(model, layers="fc2", dim=16, seed=0, weighting={"warmup_steps": 1})
    for _ in range(3):
        x = torch.randn(12, 12)
        stats = miner.observe(x, x[:, :1] * 2.0, list(range(12)))
    assert stats.confidence is None and stats.correct is None
    assert_close(stats.agreement, stats.global_agreement)
    df = miner.manifest()
    assert df["class_divergence"].isna().all() and df["aum"].isna().all() and df["correct"].isna().all()
    assert df.attrs["hardmine"]["task"] == "regression"
    assert df.attrs["hardmine"]["hardness_weights_used"] == {"global_divergence": 1.0, "loss": 1.0}
    assert np.isfinite(df["hardness"]).all()


# ------------------------------------------------------------------------------------- planted truth
def _blobs(n=2400, d=12, c=4, flip=0.05, rare=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(c, d, generator=g) * 3
    rare_centers = torch.randn(c, d, generator=g) * 3
    y = torch.randint(0, c, (n,), generator=g)
    is_rare = torch.rand(n, generator=g) < rare
    x = torch.where(is_rare[:, None], rare_centers[y], centers[y]) + torch.randn(n, d, generator=g)
    flipped = (torch.rand(n, generator=g) < flip) & ~is_rare
    noisy = y.clone()
    noisy[flipped] = (y[flipped] + torch.randint(1, c, (int(flipped.sum()),), generator=g)) % c
    return x, noisy, is_rare.numpy(), flipped.numpy()


def _auroc(pos: np.ndarray, score: np.ndarray) -> float:
    r = pd.Series(score).rank().to_numpy()
    n1 = pos.sum()
    return float((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(pos) - n1)))


def _train(model, miner, x, y, epochs, batch=100, seed=0, start_epoch=0, opt=None, stop_after=None):
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.05)
    steps = 0
    for epoch in range(start_epoch, epochs):
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for i in range(0, len(y), batch):
            idx = perm[i : i + batch]
            stats = miner.observe(x[idx], y[idx], idx)
            stats.weighted_loss().backward()
            opt.step()
            opt.zero_grad()
            steps += 1
            if stop_after is not None and steps == stop_after:
                return opt
    return opt


def test_planted_flips_and_rare_subgroup_are_upweighted_and_rank_hardest(tmp_path, one_thread):
    x, y, rare, flipped = _blobs()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))
    miner = OnlineMiner(model, layers="2", num_classes=4, dim=64, seed=0, weighting={"warmup_steps": 20})
    _train(model, miner, x, y, epochs=6)
    df = miner.manifest()
    w = df["last_weight"].to_numpy()
    bulk = ~rare & ~flipped
    assert w[rare].mean() > 1.15 * w[bulk].mean()
    assert w[flipped].mean() > 1.4 * w[bulk].mean()
    h = df["hardness"].to_numpy()
    assert _auroc(flipped, h) > 0.97
    assert _auroc(rare[~flipped], h[~flipped]) > 0.85
    assert _auroc(rare[~flipped], df["class_divergence"].to_numpy()[~flipped]) > 0.9  # the GradTail signal
    top = df.nsmallest(int(flipped.sum()), "rank")
    assert flipped[top.index].mean() > 0.7  # rank 1 = hardest
    # The manifest is a valid hardmine manifest that the offline sampler reads.
    path = miner.write_manifest(tmp_path / "online.parquet")
    back = read_manifest(path)
    assert set(REQUIRED_COLUMNS) <= set(back.columns) and len(back) == len(y)
    meta = back.attrs["hardmine"]
    assert meta["source"]["door"] == "online" and meta["steps"] == miner.step and meta["projection"]["seed"] == 0
    assert meta["layers"] == ["2.weight", "2.bias"] and meta["weighting"]["warmup_steps"] == 20
    draws = np.concatenate([list(ManifestSampler(path, seed=s)) for s in range(3)])
    hard_ids = back.loc[back["is_hard"].to_numpy(dtype=bool), "sample_id"].to_numpy()
    # The hard set is drawn at its share of the weight (top-k boost 5 on 10%: 5/14 = 0.36 before the cap),
    # within 4 binomial standard deviations of the draw count.
    w = back["weight"].to_numpy(dtype=np.float64)
    share = w[back["is_hard"].to_numpy(dtype=bool)].sum() / w.sum()
    assert 0.3 < share < 0.4
    rate = np.isin(draws, hard_ids).mean()
    assert abs(rate - share) < 4 * np.sqrt(share * (1 - share) / len(draws)), (rate, share)


# -------------------------------------------------------------------------------------------- dynamics
@pytest.mark.parametrize("path", ["host", "device"])
def test_dynamics_match_a_pandas_recomputation_including_repeated_ids(path, one_thread, monkeypatch):
    # The device path (a GPU's) records the landed steps together (dynamics.RECORD_EVERY): here all 15 at once,
    # ids repeated within and across them.
    if path == "device":
        monkeypatch.setattr(online_dynamics, "HOST_STATS_DEVICES", ())
    torch.manual_seed(0)
    model = MLP()
    miner = OnlineMiner(model, layers="fc2", dim=16, seed=0, weighting={"warmup_steps": 1})
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    data_x, data_y = torch.randn(30, 12), torch.randint(0, 4, (30,))
    rows = []
    rng = np.random.default_rng(0)
    for step in range(1, 16):
        ids = rng.integers(0, 30, 12)  # with replacement: repeated ids inside a batch
        stats = miner.observe(data_x[ids], data_y[ids], torch.as_tensor(ids))
        for i, sid in enumerate(ids):
            rows.append(
                {
                    "sample_id": int(sid),
                    "step": step,
                    "conf": float(stats.confidence[i]),
                    "correct": bool(stats.correct[i]),
                    "lm": float(stats.logit_margin[i]),
                    "loss": float(stats.loss[i].detach()),
                    "agreement": float(stats.agreement[i]),
                    "weight": float(stats.weights[i]),
                }
            )
        stats.weighted_loss().backward()
        opt.step()
        opt.zero_grad()
    obs = pd.DataFrame(rows)
    df = miner.manifest().set_index("sample_id")
    for sid, g in obs.groupby("sample_id", sort=True):
        got = df.loc[sid]
        corr = g["correct"].to_numpy()
        assert got["times_seen"] == len(g)
        assert got["confidence_mean"] == pytest.approx(g["conf"].mean(), rel=1e-6)
        assert got["variability"] == pytest.approx(g["conf"].std(ddof=0), abs=1e-6)
        assert got["aum"] == pytest.approx(g["lm"].mean(), rel=1e-6, abs=1e-9)
        assert got["forgetting_events"] == int((corr[:-1] & ~corr[1:]).sum())
        assert bool(got["never_learned"]) == (not corr.any())
        last = g.iloc[-1]
        assert got["loss"] == pytest.approx(last["loss"], rel=1e-6)
        assert got["agreement"] == pytest.approx(last["agreement"], rel=1e-5, abs=1e-6)
        assert got["last_weight"] == pytest.approx(last["weight"], rel=1e-6)
        assert bool(got["correct"]) == bool(last["correct"])
        assert got["class_divergence"] == pytest.approx(1 - last["agreement"], rel=1e-5, abs=1e-6)
    assert len(df) == obs["sample_id"].nunique()


def _packed_batches(n_batches: int, dim: int):
    """Packed device values (DeviceBatch.packed's layout) of batches of several sizes whose ids repeat within
    and across batches, with projected gradients."""
    rng = np.random.default_rng(3)
    names = ("label", "loss", "confidence", "pred", "agreement", "last_weight", "logit_margin", "correct")
    for step in range(n_batches):
        b = 3 + step % 4
        values = rng.normal(size=(b, len(names)))
        values[:, 0] = rng.integers(0, 3, b)  # label
        values[:, 3] = rng.integers(0, 3, b)  # pred
        values[:, -1] = values[:, 0] == values[:, 3]  # correct (0/1)
        ids = rng.integers(0, 9, b)
        yield (ids.tolist(), "int"), (torch.from_numpy(values), names), torch.randn(b, dim), step


def _recorded(dyn) -> dict:
    state = dyn.state_dict()
    return {"ids": state["ids"], "last": state["last"], **state["running"], "z": state["gradients"]}


def test_queued_device_batches_recorded_together_equal_one_by_one():
    from hardmine.enums import TaskKind

    task = TaskKind.CLASSIFICATION
    one, together = online_dynamics.SampleDynamics(5), online_dynamics.SampleDynamics(5)
    for ids, packed, z, step in _packed_batches(9, 5):
        one.submit(ids, packed, z, task, step)
        one.poll()  # at once (least=1)
        together.submit(ids, packed, z, task, step)
        together.poll(least=10)  # not yet: fewer queued
    assert one.n > 0 and together.n == 0 and len(together._pending) == 9
    together.poll(wait=True)
    got, want = _recorded(together), _recorded(one)
    assert got["ids"] == want["ids"]
    for k in want:
        if k != "ids":
            assert torch.equal(got[k].nan_to_num(7.0), want[k].nan_to_num(7.0)), k  # bit for bit
    assert sorted(want["last"][:, online_dynamics.COL["last_step"]].unique().tolist())[-1] == 8


def test_a_record_that_fails_loses_its_own_run_of_batches_only(monkeypatch):
    from hardmine.enums import TaskKind

    task = TaskKind.CLASSIFICATION
    dyn = online_dynamics.SampleDynamics(5)
    batches = list(_packed_batches(6, 5))
    for k, (ids, (values, names), z, step) in enumerate(batches):
        if k >= 3:  # a second run: batches without the logit margin are not recorded with the first three
            values, names = values[:, [0, 1, 2, 3, 4, 5, 7]], names[:6] + names[7:]
        dyn.submit(ids, (values, names), z, task, step)
    real, calls = dyn.record, []

    def fail_once(*args, **kw):
        calls.append(len(args[0][0]))
        if len(calls) == 1:
            raise MemoryError("no memory")
        return real(*args, **kw)

    monkeypatch.setattr(dyn, "record", fail_once)
    with pytest.raises(MemoryError):
        dyn.poll(wait=True)
    assert len(dyn._pending) == 3 and dyn.n == 0  # the failed run left the queue; the next one waits
    dyn.poll(wait=True)
    assert not dyn._pending and dyn._pending_bytes == 0
    assert calls == [sum(len(b[0][0]) for b in batches[:3]), sum(len(b[0][0]) for b in batches[3:])]
    assert sorted(dyn.ids) == sorted({i for b in batches[3:] for i in b[0][0]})


def test_a_kept_gradient_on_the_host_is_the_step_s_even_if_its_z_is_changed_later(monkeypatch):
    # On a CPU device that takes the device path (the tests and the dispatch benchmark), the dynamics are
    # recorded steps later: what they keep is the step's z as it was handed out.
    monkeypatch.setattr(online_dynamics, "HOST_STATS_DEVICES", ())
    torch.manual_seed(0)
    miner = OnlineMiner(nn.Sequential(nn.Linear(6, 3)), dim=4, keep_gradients=True)
    stats = miner.observe(torch.randn(4, 6), torch.tensor([0, 1, 2, 0]), [0, 1, 2, 3])
    want = stats.z.clone()
    stats.z.zero_()
    ids, z = miner.gradients()
    assert ids.tolist() == [0, 1, 2, 3] and torch.equal(torch.from_numpy(z), want) and want.abs().sum() > 0


def test_the_device_path_records_every_record_every_steps_or_when_the_queue_holds_record_bytes(monkeypatch):
    monkeypatch.setattr(online_dynamics, "HOST_STATS_DEVICES", ())
    every = online_dynamics.RECORD_EVERY
    torch.manual_seed(0)
    miner = OnlineMiner(nn.Sequential(nn.Linear(6, 3)), dim=4)
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    for step in range(every - 1):
        miner.observe(x, y, [4 * step + i for i in range(4)])
    assert miner._dyn.n == 0 and len(miner._dyn._pending) == every - 1  # queued, not recorded
    miner.observe(x, y, [-1, -2, -3, -4])
    assert miner._dyn.n == 4 * every and not miner._dyn._pending
    miner.observe(x, y, [0, 1, 2, 3])
    assert len(miner._dyn._pending) == 1 and miner.n_samples == 4 * every  # a read records what is queued
    assert not miner._dyn._pending
    # a queue holding RECORD_BYTES is recorded without waiting for RECORD_EVERY steps
    monkeypatch.setattr(online_dynamics, "RECORD_BYTES", 1)
    miner.observe(x, y, [100, 101, 102, 103])
    assert not miner._dyn._pending and miner._dyn.n == 4 * every + 4


def test_steps_queued_on_the_device_path_are_recorded_before_a_host_step(monkeypatch):
    # A miner whose model moves from a GPU to the CPU: the steps still queued come first, so the host step's
    # values are the last seen.
    monkeypatch.setattr(online_dynamics, "HOST_STATS_DEVICES", ())
    torch.manual_seed(0)
    miner = OnlineMiner(nn.Sequential(nn.Linear(6, 3)), dim=4, weighting={"warmup_steps": 0})
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    miner.observe(x, y, [0, 1, 2, 3])
    monkeypatch.setattr(online_dynamics, "HOST_STATS_DEVICES", ("cpu",))
    miner.observe(x, y, [0, 1, 2, 3])
    df = miner.manifest()
    assert (df["times_seen"] == 2).all() and (df["last_step"] == 2).all()  # the second step's


# ------------------------------------------------------------------------------------------ restarts
def test_checkpoint_mid_training_and_resume_gives_the_same_manifest(one_thread):
    x, y, _, _ = _blobs(n=600)

    def fresh():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
        miner = OnlineMiner(model, layers=None, dim=16, seed=2, weighting={"warmup_steps": 3})
        return model, miner, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    model, miner, opt = fresh()
    _train(model, miner, x, y, epochs=3, opt=opt)
    want = miner.manifest()

    model, miner, opt = fresh()
    _train(model, miner, x, y, epochs=3, opt=opt, stop_after=9)  # mid epoch 2 (6 steps per epoch)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "miner": miner.state_dict()}, buf)
    del model, miner, opt
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model, miner, opt = fresh()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    miner.load_state_dict(ckpt["miner"])
    assert miner.step == 9
    # Finish epoch 2 (steps 4..6 of its permutation), then epoch 3.
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    for i in range(300, 600, 100):
        idx = perm[i : i + 100]
        miner.observe(x[idx], y[idx], idx).weighted_loss().backward()
        opt.step()
        opt.zero_grad()
    _train(model, miner, x, y, epochs=3, opt=opt, start_epoch=2)
    got = miner.manifest()
    pd.testing.assert_frame_equal(got, want)


def test_load_state_refuses_a_different_configuration():
    model = MLP()
    miner = OnlineMiner(model, layers="fc2", dim=16, seed=0)
    miner.observe(torch.randn(4, 12), torch.randint(0, 4, (4,)), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="seed"):
        OnlineMiner(model, layers="fc2", dim=16, seed=1).load_state_dict(miner.state_dict())
    with pytest.raises(ValueError, match="not a hardmine OnlineMiner state"):
        miner.load_state_dict({"step": 3})


def test_keep_gradients_and_string_ids_survive_a_weights_only_round_trip():
    model = MLP()
    miner = OnlineMiner(model, layers="fc2", dim=16, seed=0, keep_gradients=True)
    x = torch.randn(6, 12)
    a = miner.observe(x[:4], torch.tensor([0, 1, 2, 3]), ["a", "b", "c", "d"])
    b = miner.observe(x[2:], torch.tensor([2, 3, 0, 1]), ["c", "d", "e", "f"])
    ids, grads = miner.gradients()
    assert ids.tolist() == ["a", "b", "c", "d", "e", "f"]
    assert_close(torch.from_numpy(grads), torch.cat([a.z[:2], b.z]))  # c, d: their last observation
    buf = io.BytesIO()
    torch.save(miner.state_dict(), buf)
    buf.seek(0)
    again = OnlineMiner(model, layers="fc2", dim=16, seed=0, keep_gradients=True)
    again.load_state_dict(torch.load(buf, weights_only=True))
    pd.testing.assert_frame_equal(again.manifest(), miner.manifest())
    assert np.array_equal(again.gradients()[1], grads)
    with pytest.raises(ValueError, match="keep_gradients"):
        OnlineMiner(model, layers="fc2", dim=16, seed=0).gradients()


# ------------------------------------------------------------------------------------------- hygiene
def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(m._backward_pre_hooks)
        for m in model.modules()
    )


class Boom(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.fc2(self.act(self.fc1(x)))
        raise RuntimeError("user code failed after the hooked layer ran")


def test_nothing_left_on_the_model_and_training_without_the_miner_works():
    torch.manual_seed(0)
    model = InplaceNet()
    model.train()
    before_attrs = set(vars(model)) | {k for m in model.modules() for k in vars(m)}
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    miner = OnlineMiner(model, layers=None, dim=12, seed=0)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    miner.observe(x, y, list(range(16)))  # no backward: the state is untouched
    assert _hooks(model) == 0
    with miner.capture():
        # hooks exist only inside capture(): one per selected module, one on the model reading the batch size
        assert _hooks(model) == 3
        model(x)
    assert _hooks(model) == 0
    with miner.capture(batch_size=16):
        assert _hooks(model) == 2  # the batch size given: no pre-hook
        model(x)
    assert _hooks(model) == 0
    miner.close()
    assert _hooks(model) == 0 and model.training
    assert set(vars(model)) | {k for m in model.modules() for k in vars(m)} == before_attrs
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_state[k])
    with pytest.raises(ValueError, match="closed"):
        miner.observe(x, y)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = None
    for _ in range(20):
        loss = F.cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < first
    # A forward that raises inside observe() leaves no hook behind either.
    boom = Boom()
    with pytest.raises(RuntimeError, match="user code failed"):
        OnlineMiner(boom, layers="fc2", dim=16, seed=0).observe(torch.randn(2, 12), torch.tensor([0, 1]))
    assert _hooks(boom) == 0


# --------------------------------------------------------------------------------------- bad input
def test_bad_input_raises_value_error_naming_the_value():
    model = MLP()
    x, y = torch.randn(4, 12), torch.randint(0, 4, (4,))
    cases = [
        (lambda: OnlineMiner(model, layers="nope"), "nope"),
        (lambda: OnlineMiner(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), layers="1"), "BatchNorm1d"),
        (lambda: OnlineMiner(model, num_classes=0), "num_classes=0"),
        (lambda: OnlineMiner(model, loss_fn="hinge"), "hinge"),
        (lambda: OnlineMiner(model, weighting={"strength": -1}), "strength=-1"),
        (lambda: OnlineMiner(model, weighting={"momentum": 1.0}), "momentum=1.0"),
        (lambda: OnlineMiner(model, weighting={"min_weight": 2.0}), "min_weight=2.0"),
        (lambda: OnlineMiner(model, weighting={"warmup": 3}), "warmup"),
        (lambda: OnlineMiner(model, dim=17), "dim=17"),
        (lambda: solve_weights(np.array([1.0, -1.0]), 0.5, 2.0), "raw weights"),
        (lambda: solve_weights(np.array([1.0, 2.0]), 1.5, 2.0), "min_weight=1.5"),
        (lambda: OnlineMiner(model, layers="fc2").observe(x, y, [1, 2, 3]), "3 sample ids for a batch of 4"),
        (
            lambda: OnlineMiner(model, layers="fc2").observe(x, y, [1, 2, "a", 4]),
            "all integers or all strings",
        ),
        (lambda: OnlineMiner(model, layers="fc2", loss_fn="cross_entropy").observe(x, y.double()), "integer"),
        (lambda: OnlineMiner(model, layers="fc2").observe(x, torch.tensor([0, 1, 2, 9])), "label 9"),
        # the boundary: label == number of logits is out of range (a ValueError, not torch's IndexError)
        (lambda: OnlineMiner(model, layers="fc2").observe(x, torch.tensor([0, 1, 2, 4])), r"label 4 is out of range"),
        (lambda: OnlineMiner(model, layers="fc2").observe(x, torch.tensor([0, -1, 2, 3])), r"label -1 is out of range"),
        (lambda: OnlineMiner(model, layers="fc2", num_classes=5).observe(x, y), "returned 4 logit.*num_classes=5"),
        (  # a single logit is a binary model: the message says what the model returned, and why 2 classes
            lambda: OnlineMiner(nn.Linear(12, 1), num_classes=3).observe(x, y % 2),
            r"returned 1 logit\(s\) per sample \(a single logit: a binary model, 2 classes\) but num_classes=3",
        ),
        (lambda: OnlineMiner(model, layers="fc2").observe(x, y[:3]), "3"),
        (lambda: OnlineMiner(model, layers="fc2").observe_output(model(x), y), "capture"),
        (lambda: OnlineMiner(model, layers="fc2").manifest(), "no sample has been observed"),
    ]
    for fn, text in cases:
        with pytest.raises(ValueError, match=text):
            fn()
    edges = OnlineMiner(model, layers="fc2").observe(x, torch.tensor([0, 3, 3, 0]))  # both ends are valid
    assert edges.loss.shape == (4,)
    miner = OnlineMiner(model, layers=None)
    with torch.no_grad(), pytest.raises(ValueError, match="no_grad"):
        miner.observe(x, y)
    miner = OnlineMiner(model, layers="fc2")
    miner.observe(x, y, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="ints"):
        miner.observe(x, y, ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="hardness weight for 'bogus'"):
        miner.manifest(weights={"bogus": 1.0})
    with pytest.raises(ValueError, match="top="):
        miner.manifest(top=2.0)


@pytest.mark.parametrize("host", [True, False])
def test_a_batch_refused_for_its_id_type_changes_nothing(host, monkeypatch):
    # On either path (NumPy on the host, tensors on the device), ids of another type than earlier batches' are
    # refused before the step counts or the directions move: the same batch with the right ids then gives
    # what it gives without the refused attempt.
    monkeypatch.setattr(online_dynamics, "HOST_STATS_DEVICES", ("cpu",) if host else ())
    x, y = torch.randn(6, 12, generator=torch.Generator().manual_seed(0)), torch.arange(6) % 4
    runs = []
    for refused in (False, True):
        torch.manual_seed(0)
        miner = OnlineMiner(MLP(), layers="fc2", dim=16, weighting={"warmup_steps": 1})
        miner.observe(x, y, list(range(6)))
        if refused:
            with pytest.raises(ValueError, match="ints in earlier batches and are strs now"):
                miner.observe(x, y, list("abcdef"))
        stats = miner.observe(x, y, list(range(6, 12)))
        runs.append((miner.step, stats.weights, stats.warmup, miner._dirs.dirs.clone(), miner.n_samples))
    (step, w, warm, dirs, n), want = runs[1], runs[0]
    assert (step, warm, n) == (want[0], want[2], want[4]) == (2, False, 12)
    assert_close(w, want[1])
    assert_close(dirs, want[3])


# -------------------------------------------------------------------------------------------- sampler
def test_miner_sampler_uniform_then_weighted_and_reproducible():
    s = MinerSampler(50, seed=3)
    s.set_epoch(0)
    first = list(s)
    assert sorted(first) == list(range(50))  # a permutation before the first refresh
    s.set_epoch(1)
    assert list(s) != first
    s.set_epoch(0)
    assert list(s) == first
    manifest = pd.DataFrame({"sample_id": np.arange(40), "weight": np.r_[np.full(4, 9.0), np.full(36, 0.0)]})
    s.refresh(manifest)  # ids 40..49 were never observed: weight 1
    s.set_epoch(2)
    draws = np.array(list(s) + [i for e in range(3, 40) for i in (s.set_epoch(e) or list(s))])
    freq = np.bincount(draws, minlength=50) / len(draws)
    # 50 draws x 38 epochs = 1900 draws: the binomial std of a frequency near 0.78 is ~0.0095.
    assert freq[:4].sum() == pytest.approx(36 / 46, abs=0.04)
    assert freq[4:40].sum() == 0
    assert freq[40:].sum() == pytest.approx(10 / 46, abs=0.04)
    t = MinerSampler(50, seed=3)
    t.load_state_dict(s.state_dict())
    t.set_epoch(5)
    s.set_epoch(5)
    assert list(t) == list(s)
    with pytest.raises(ValueError, match="dataset indices"):
        s.refresh(pd.DataFrame({"sample_id": [60], "weight": [1.0]}))


# ------------------------------------------------------------------------------------ scripts
@pytest.mark.skipif(
    not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST is not installed (make data)",
)
def test_example_training_loop_quick_runs(tmp_path):
    out = tmp_path / "m.parquet"
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "example_training_loop.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "planted flips" in res.stdout and "hardest 10" in res.stdout
    df = read_manifest(out)
    assert len(df) == 2000 and df.attrs["hardmine"]["source"]["door"] == "online"


def test_bench_callbacks_quick_runs(tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_callbacks.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    import json

    rows = json.loads(out.read_text())["rows"]
    assert {(r["model"], r["method"]) for r in rows} == {  # the *_graphs methods run by default on a GPU only
        (m, k) for m in ("mlp", "cnn") for k in ("plain", "last_layer", "multi_layer")
    }
    paths = {(r["model"], r["method"]): r["path"] for r in rows}
    assert paths[("mlp", "last_layer")] == "analytic" and paths[("cnn", "multi_layer")] == "autograd"
    assert all(r["ratio_to_plain"] > 0 for r in rows)
    assert out.with_suffix(".md").is_file()
    res = subprocess.run(  # asked for on the CPU: they run (eagerly there) and say why graphs are off
        [sys.executable, str(ROOT / "scripts" / "bench_callbacks.py"), "--quick", "--models", "mlp", "--methods",
         "last_layer_graphs", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"plain", "last_layer_graphs"}
    assert rows["last_layer_graphs"]["cuda_graphs"]["off"] == "the model is on cpu, not a CUDA device"


def test_bench_dispatch_quick_runs(tmp_path):
    out = tmp_path / "dispatch.json"
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_dispatch.py"), "--quick", "--models", "mlp", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    import json

    data = json.loads(out.read_text())
    rows = {(r["group"], r["method"]): r for r in data["rows"]}
    graphed = {("training loop", "last_layer_graphs"), ("training loop", "multi_layer_graphs")}
    assert set(rows) == {("extraction", "train_step"), ("extraction", "factored"), ("training loop", "plain"),
                         ("training loop", "last_layer"), ("training loop", "multi_layer"), *graphed}
    # the miner's GPU path ran (its packed statistics are one stack), and every step launched kernels
    assert rows["training loop", "last_layer"]["kernel_ops"].get("aten::hypot") == 1
    assert all(r["kernels_per_step"] > 0 for r in rows.values())
    # every row timed: the graphed ones with replays that do nothing (the host's share of a replayed step)
    assert all(r["ms_per_step"] > 0 and r["ratio"] > 0 for r in rows.values())
    for k in graphed:  # the stand-in replay counted as the one launch of a graph, the statistics inside it
        ops = rows[k]["kernel_ops"]
        assert ops["cudaGraphLaunch"] == 1 and "aten::hypot" not in ops, ops
        assert rows[k]["kernels_per_step"] < rows["training loop", k[1].removesuffix("_graphs")]["kernels_per_step"]
        # the host's dispatches include the views and detaches a kernel count leaves out
        assert rows[k]["host_ops_per_step"] > rows[k]["kernels_per_step"]
    assert rows["extraction", "train_step"]["extra_kernels"] == 0 and data["settings"]["hardmine"]
    assert out.with_suffix(".md").is_file()
