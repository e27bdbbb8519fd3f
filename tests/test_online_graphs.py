"""``OnlineMiner(cuda_graphs=True)``: the step's device part (``hardmine.online.device_step``) replayed from a
graph, checked on the CPU.

As in ``tests/test_cuda_graphs.py``, a stand-in backend (``Rerun``: a replay calls the captured function
again on the static inputs) takes the place of a CUDA graph, and the CPU takes the GPU's path
(``dynamics.HOST_STATS_DEVICES`` emptied). What is checked is everything around the capture: the values equal
the eager step's (weights, statistics, directions, manifest, gradients) on every path and task, which steps
are captured, that each step's own tensors reach the replay, and the fallbacks. The real capture on a GPU is
checked in ``tests/test_host_syncs.py`` (``test_on_a_gpu_the_online_miner_with_cuda_graphs_*``).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch
from test_cuda_graphs import Rerun, skew
from torch import nn

from hardmine.online import OnlineMiner, WeightingConfig
from hardmine.online import dynamics as online_dynamics

FIELDS = ("loss", "weights", "z", "grad_norm", "agreement", "global_agreement", "confidence", "margin",
          "logit_margin", "correct")


@pytest.fixture(autouse=True)
def device_path(monkeypatch):
    monkeypatch.setattr(online_dynamics, "HOST_STATS_DEVICES", ())


def _model(classes: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, classes))


def _miner(model: nn.Module, graphs: bool, backend=None, **kw) -> OnlineMiner:
    kw.setdefault("weighting", WeightingConfig(warmup_steps=1, momentum=0.8))
    miner = OnlineMiner(model, dim=8, keep_gradients=True, cuda_graphs=graphs, **kw)
    if graphs:
        miner._device_step.graphs.backend = backend if backend is not None else Rerun()
    return miner


def _steps(task: str, classes: int, sizes, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    for i, b in enumerate(sizes):
        x = torch.randn(b, 12, generator=g)
        if task == "regression":
            y = torch.randn(b, classes, generator=g)
        else:
            y = torch.randint(0, 2 if task == "binary" else classes, (b,), generator=g)
        yield x, y, [(i * 7 + j) % 23 for j in range(b)]  # ids repeat across batches


def _observe_all(miner: OnlineMiner, steps) -> list:
    return [miner.observe(x, y, ids) for x, y, ids in steps]


def _assert_same(got, want) -> None:
    for a, b in zip(got, want, strict=True):
        for f in FIELDS:
            x, y = getattr(a, f), getattr(b, f)
            assert (x is None) == (y is None), f
            if x is not None:
                torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9, msg=f)
        assert (a.step, a.warmup, a.path) == (b.step, b.warmup, b.path)


def _assert_same_miners(got: OnlineMiner, want: OnlineMiner) -> None:
    torch.testing.assert_close(got._dirs.dirs, want._dirs.dirs, rtol=1e-6, atol=1e-9)
    assert torch.equal(got._dirs.seen, want._dirs.seen)
    pd.testing.assert_frame_equal(got.manifest(), want.manifest(), rtol=1e-6, atol=1e-9)
    (ids_g, z_g), (ids_w, z_w) = got.gradients(), want.gradients()
    assert (ids_g == ids_w).all()
    np.testing.assert_allclose(z_g, z_w, rtol=1e-6, atol=1e-9)


# The defaults' bounds, which no weight can reach (the solve is one scaling), and bounds that weights do reach
# (the breakpoint search inside the graph), with the global agreement setting the weight.
WEIGHTINGS = {"defaults": WeightingConfig(warmup_steps=1, momentum=0.8),
              "clipped": WeightingConfig(warmup_steps=1, momentum=0.8, strength=8.0, min_weight=0.5, max_weight=1.5,
                                         by_class=False)}


@pytest.mark.parametrize("weighting", list(WEIGHTINGS))
@pytest.mark.parametrize(
    ("task", "classes", "layers"),
    [("class", 4, "2"), ("class", 4, None), ("class", 70, "2"), ("binary", 1, "2"), ("regression", 3, "2"),
     ("regression", 3, None)],
)
def test_a_graphed_miner_equals_the_eager_one(task, classes, layers, weighting):
    # The output layer alone (analytic path: the closed-form gradient inside the graph) and every layer
    # (autograd path: the gradients at the outputs copied in); 70 classes gather the agreement and scatter the
    # update; a single logit is the binary model; regression has no output statistics.
    sizes = [10] * 7
    loss = "mse" if task == "regression" else None
    cfg = WEIGHTINGS[weighting]
    eager, graphed = (_miner(_model(classes), g, layers=layers, loss_fn=loss, weighting=cfg) for g in (False, True))
    want = _observe_all(eager, _steps(task, classes, sizes))
    got = _observe_all(graphed, _steps(task, classes, sizes))
    _assert_same(got, want)
    _assert_same_miners(graphed, eager)
    # step 1 is the warm-up (never captured), 2 and 3 eager, 4 captured, 5 to 7 replayed (5 compared)
    assert graphed.cuda_graph_state() == {"requested": True, "captured": 1, "replayed": 4, "off": None}
    assert {s.path for s in got} == {"analytic" if layers == "2" else "autograd"}
    last = graphed.manifest()["last_step"]  # filled in on the host: a graph does not freeze the step
    assert last.notna().all() and last.max() == 7 and last.min() >= 5
    weights = torch.stack([s.weights for s in got[1:]])
    at_bound = bool(((weights - 1.5).abs() < 1e-6).any() or ((weights - 0.5).abs() < 1e-6).any())
    assert at_bound == (weighting == "clipped")  # the clipped solution was reached (and replayed)


@pytest.mark.parametrize(("task", "classes", "bad"), [("class", 4, 4), ("class", 4, -1), ("binary", 1, 2)])
def test_a_label_out_of_range_in_a_replayed_step_is_refused_and_changes_nothing(task, classes, bad):
    # The labels' range check runs inside the step (its graph), its flag read as the other deferred checks
    # are: on the CPU at once, so the bad batch changes nothing (on a GPU a later observe raises); a single
    # logit is the binary model (labels 0 and 1)
    graphed = _miner(_model(classes), True, layers="2")
    _observe_all(graphed, _steps(task, classes, [10] * 6))
    assert graphed.cuda_graph_state()["replayed"] == 3  # checked replays: the flag comes from the graph
    x, y, ids = next(_steps(task, classes, [10], seed=5))
    before = (graphed.step, graphed.n_samples, graphed._dirs.dirs.clone(), graphed.manifest())
    y_bad = y.clone()
    y_bad[3] = bad
    with pytest.raises(ValueError, match=rf"label {bad} is out of range"):
        graphed.observe(x, y_bad, [100 + i for i in range(10)])
    assert graphed.cuda_graph_state()["replayed"] == 4 and graphed.cuda_graph_state()["off"] is None
    assert (graphed.step, graphed.n_samples) == before[:2]
    assert torch.equal(graphed._dirs.dirs, before[2])
    pd.testing.assert_frame_equal(graphed.manifest(), before[3])
    graphed.observe(x, y, ids)  # the miner keeps working, still replayed
    assert graphed.cuda_graph_state()["replayed"] == 5 and graphed.step == before[0] + 1
    # the labels as given go into the graph: a column of a label matrix (another stride) is read by value
    x2, y2, ids2 = next(_steps(task, classes, [10], seed=6))
    eager = _miner(_model(classes), False, layers="2")
    _observe_all(eager, _steps(task, classes, [10] * 6))
    eager.observe(x, y, ids)
    strided = graphed.observe(x2, torch.stack([y2, y2], 1)[:, 0], ids2)
    _assert_same([strided], [eager.observe(x2, y2, ids2)])
    assert graphed.cuda_graph_state()["replayed"] == 6 and graphed.cuda_graph_state()["off"] is None


def test_each_step_reaches_the_replay_and_a_result_never_changes_afterwards():
    graphed = _miner(_model(4), True, layers="2")
    stats, copies = [], []
    for x, y, ids in _steps("class", 4, [10] * 8):
        stats.append(graphed.observe(x, y, ids))
        copies.append({f: getattr(stats[-1], f).clone() for f in FIELDS})
    assert graphed.cuda_graph_state()["replayed"] == 5
    for s, copy in zip(stats, copies):  # what a step handed out was not overwritten by the later replays
        assert all(torch.equal(getattr(s, f), copy[f]) for f in FIELDS)
    for late, early in zip(copies[5:], copies[4:-1]):  # consecutive replays hold their own batch's values
        assert not torch.equal(late["z"], early["z"]) and not torch.equal(late["weights"], early["weights"])
    eager = _miner(_model(4), False, layers="2")
    _assert_same(stats, _observe_all(eager, _steps("class", 4, [10] * 8)))


def test_warm_up_steps_are_never_captured():
    graphed = _miner(_model(4), True, layers="2", weighting=WeightingConfig(warmup_steps=5))
    stats = _observe_all(graphed, _steps("class", 4, [10] * 5))
    assert all(s.warmup for s in stats) and graphed.cuda_graph_state()["captured"] == 0
    _observe_all(graphed, _steps("class", 4, [10] * 3, seed=2))
    assert graphed.cuda_graph_state()["captured"] == 1  # the third step past the warm-up
    never = _miner(_model(4), True, layers="2", weighting=WeightingConfig(warmup_steps=0, strength=0.0))
    _observe_all(never, _steps("class", 4, [10] * 5))  # strength 0: weights 1 for good, nothing to capture
    assert never.cuda_graph_state()["captured"] == 0


def test_the_last_shorter_batch_gets_a_graph_of_its_own_and_a_third_shape_runs_eagerly():
    sizes = [10, 10, 10, 10, 4, 4, 4, 10, 6, 6, 6, 6, 4]
    eager, graphed = _miner(_model(4), False, layers="2"), _miner(_model(4), True, layers="2")
    _assert_same(_observe_all(graphed, _steps("class", 4, sizes)), _observe_all(eager, _steps("class", 4, sizes)))
    state = graphed.cuda_graph_state()
    assert state["captured"] == 2 and state["off"] is None  # 10 and 4; 6 is past max_graphs
    assert sorted(k[1][0][0] for k in graphed._device_step.graphs.graphs._graphs) == [4, 10]  # the batch size leads
    _assert_same_miners(graphed, eager)


def test_a_failed_capture_switches_graphs_off_and_the_step_runs_eagerly(caplog):
    eager = _miner(_model(4), False, layers="2")
    graphed = _miner(_model(4), True, Rerun(fail=RuntimeError("operation not permitted when stream is capturing")),
                     layers="2")
    with caplog.at_level(logging.WARNING, logger="hardmine.factored.graphs"):
        _assert_same(_observe_all(graphed, _steps("class", 4, [10] * 6)),
                     _observe_all(eager, _steps("class", 4, [10] * 6)))
    off = graphed.cuda_graph_state()["off"]
    assert off.startswith("the capture failed (RuntimeError: operation not permitted")
    said = [r.getMessage() for r in caplog.records if "switched off" in r.getMessage()]
    assert said == [f"cuda_graphs: switched off, running the online miner's step eagerly: {off}"]
    _assert_same_miners(graphed, eager)


class SkewLater(Rerun):
    """A graph that froze something it should not have: its replay on the captured step is right (as a real
    graph's is), later ones are off by ``late``."""

    def __init__(self, late: float) -> None:
        super().__init__()
        self.late = late

    def capture(self, fn):
        replay, out = super().capture(fn)
        calls = []

        def skewed() -> None:
            replay()
            if calls:
                for o in out:
                    skew(o, self.late)
            calls.append(1)

        return skewed, out


def test_a_replay_that_differs_from_the_eager_step_is_dropped_for_the_eager_values(caplog):
    eager = _miner(_model(4), False, layers="2")
    graphed = _miner(_model(4), True, SkewLater(1e-2), layers="2")
    with caplog.at_level(logging.WARNING, logger="hardmine.factored.graphs"):
        _assert_same(_observe_all(graphed, _steps("class", 4, [10] * 7)),
                     _observe_all(eager, _steps("class", 4, [10] * 7)))
    state = graphed.cuda_graph_state()
    assert state["off"].startswith("a replayed pass differed from the eager pass") and state["replayed"] == 2
    _assert_same_miners(graphed, eager)


def test_replaced_weights_are_captured_again():
    # A graph holds the selected modules' tensors by storage (a rule may read them): a weight replaced, not
    # updated in place as an optimiser does, means a new capture.
    model = _model(4)
    graphed = _miner(model, True, layers="2")
    _observe_all(graphed, _steps("class", 4, [10] * 5))
    assert graphed.cuda_graph_state()["captured"] == 1
    with torch.no_grad():
        model[2].weight.add_(0.1)  # in place: the graph still holds the right storage
    _observe_all(graphed, _steps("class", 4, [10] * 2, seed=3))
    assert graphed.cuda_graph_state()["captured"] == 1
    model[2].weight = nn.Parameter(model[2].weight.detach() * 2)
    _observe_all(graphed, _steps("class", 4, [10] * 3, seed=4))
    assert graphed.cuda_graph_state()["captured"] == 2


def test_a_restored_state_is_read_by_the_next_replay():
    # load_state_dict gives the miner new directions: the replay reads them (copied in), not those it captured.
    src, cont_eager = _miner(_model(4), False, layers="2"), _miner(_model(4), False, layers="2")
    graphed = _miner(_model(4), True, layers="2")
    _observe_all(src, _steps("class", 4, [10] * 6, seed=7))
    _observe_all(graphed, _steps("class", 4, [10] * 6))
    assert graphed.cuda_graph_state()["captured"] == 1
    graphed.load_state_dict(src.state_dict())
    cont_eager.load_state_dict(src.state_dict())
    _assert_same(_observe_all(graphed, _steps("class", 4, [10] * 3, seed=8)),
                 _observe_all(cont_eager, _steps("class", 4, [10] * 3, seed=8)))
    assert graphed.cuda_graph_state()["replayed"] >= 5
    _assert_same_miners(graphed, cont_eager)


def test_graphs_apply_only_on_a_cuda_device_and_are_off_by_default():
    cpu = OnlineMiner(_model(4), layers="2", dim=8, cuda_graphs=True, weighting={"warmup_steps": 0})
    _observe_all(cpu, _steps("class", 4, [10] * 4))
    assert cpu.cuda_graph_state() == {
        "requested": True, "captured": 0, "replayed": 0, "off": "the model is on cpu, not a CUDA device",
    }
    with pytest.MonkeyPatch.context() as mp:  # the CPU's own path (NumPy statistics): no graph either
        mp.setattr(online_dynamics, "HOST_STATS_DEVICES", ("cpu",))
        host = OnlineMiner(_model(4), layers="2", dim=8, cuda_graphs=True, weighting={"warmup_steps": 0})
        _observe_all(host, _steps("class", 4, [10] * 4))
    assert host.cuda_graph_state() == cpu.cuda_graph_state()
    plain = OnlineMiner(_model(4), layers="2", dim=8)
    assert plain.cuda_graph_state() == {"requested": False, "captured": 0, "replayed": 0, "off": None}
    with pytest.raises(ValueError, match="cuda_graphs"):
        OnlineMiner(_model(4), cuda_graphs="yes")


def test_the_state_follows_the_device_during_the_warm_up_too(monkeypatch):
    # a miner whose model moves from the CPU (the host's NumPy path) to a GPU (here: the device path with a
    # stand-in backend) stops saying "on cpu" at its next step, warm-up or not
    miner = _miner(_model(4), True, layers="2", weighting=WeightingConfig(warmup_steps=10))
    steps = list(_steps("class", 4, [10] * 3))
    with monkeypatch.context() as mp:
        mp.setattr(online_dynamics, "HOST_STATS_DEVICES", ("cpu",))
        miner.observe(*steps[0])
    assert miner.cuda_graph_state()["off"] == "the step runs on the host (NumPy)"  # a stand-in backend is set
    miner.observe(*steps[1])
    assert miner.cuda_graph_state() == {"requested": True, "captured": 0, "replayed": 0, "off": None}


def test_projections_regenerated_per_step_are_not_captured(monkeypatch):
    graphed = _miner(_model(4), True, layers="2")
    monkeypatch.setattr(type(graphed.layout), "uncached_dense", lambda self: (1, ["2.weight"]))
    _observe_all(graphed, _steps("class", 4, [10] * 5))
    assert graphed.cuda_graph_state()["off"] == (
        "some projection matrices are regenerated per step (past the projector's cache)"
    )


def test_a_causal_lm_step_does_not_copy_its_logits_into_the_graph():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=60, n_positions=8, n_embd=16, n_layer=1, n_head=2, pad_token_id=0,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

    def run(graphs: bool):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(cfg).eval()
        miner = _miner(model, graphs)
        g = torch.Generator().manual_seed(0)
        stats = []
        for _ in range(6):
            ids = torch.randint(1, 60, (4, 8), generator=g)
            stats.append(miner.observe({"input_ids": ids}, ids.masked_fill(torch.arange(8) < 3, -100), range(4)))
        return miner, stats

    (eager, want), (graphed, got) = run(False), run(True)
    for a, b in zip(got, want):
        for f in ("loss", "weights", "z", "grad_norm", "agreement"):
            torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=1e-5, atol=1e-7, msg=f)
    assert graphed.cuda_graph_state() == {"requested": True, "captured": 1, "replayed": 3, "off": None}
    (graph,) = graphed._device_step.graphs.graphs._graphs.values()
    shapes = [tuple(t.shape) for t in graph.static]
    # the logits are not among its inputs (an empty slice stands in); the head's output gradient is
    assert (4, 0, 60) in shapes and shapes.count((4, 8, 60)) == 1
    _assert_same_miners(graphed, eager)


@pytest.mark.parametrize("path", ["host", "device"])
def test_a_step_that_fails_changes_no_state(path, monkeypatch):
    # e.g. out of memory in the projections, which a training loop may catch to skip the batch
    if path == "host":
        monkeypatch.setattr(online_dynamics, "HOST_STATS_DEVICES", ("cpu",))
    miner = _miner(_model(4), path == "device", layers="2")
    steps = list(_steps("class", 4, [10] * 4))
    real = miner._grads.project

    def fails(*a, **kw):
        raise RuntimeError("CUDA out of memory")

    for i in (0, 2):  # the first step (nothing formed yet) and a later one
        monkeypatch.setattr(miner._grads, "project", fails)
        before = (miner.step, miner.task, miner.num_classes, miner._dirs, miner.n_samples)
        dirs = None if miner._dirs is None else miner._dirs.dirs.clone()
        with pytest.raises(RuntimeError, match="out of memory"):
            miner.observe(*steps[i])
        assert (miner.step, miner.task, miner.num_classes, miner._dirs, miner.n_samples) == before
        if dirs is not None:
            assert torch.equal(miner._dirs.dirs, dirs)
        monkeypatch.setattr(miner._grads, "project", real)
        miner.observe(*steps[i + 1])
    assert miner.step == 2 and miner.num_classes == 4
