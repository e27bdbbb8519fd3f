"""``GradientExtractor(cuda_graphs=True)``: the bookkeeping of ``hardmine.factored.graphs`` on the CPU.

A CUDA graph needs a CUDA device, so these tests put a stand-in backend in its place (``Rerun``: a "replay"
calls the captured function again on the static inputs and writes the results into the captured outputs,
which is what a graph replay does). What they check is everything around the capture: which batches are
captured or replayed, that each batch's own data reaches the pass (static inputs), that a result never
changes when the next batch runs, the value checks of replayed batches, weights replaced, and the fallbacks
(a failed capture, a replay that differs). The real capture and its host syncs are checked on a GPU in
``tests/test_host_syncs.py`` (``test_on_a_gpu_cuda_graphs_*``).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from hardmine.engine import GradientExtractor
from hardmine.factored.graphs import PassGraphs, batch_signature

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_extract as be  # noqa: E402


class Rerun:
    """A stand-in GraphBackend: replay = run the captured function again, results written in place."""

    def __init__(self, fail: Exception | None = None, skew: float = 0.0) -> None:
        self.fail, self.skew = fail, skew
        self.captures = 0

    def capture(self, fn):
        if self.fail is not None:
            raise self.fail
        self.captures += 1
        out = fn()

        def replay() -> None:
            for o, new in zip(out, fn()):
                o.copy_(new + self.skew if torch.is_floating_point(new) else new)

        return replay, out


def _pair(model: nn.Module, backend: Rerun | None = None, **kw):
    eager = GradientExtractor(model, dim=16, engine="factored", loss_fn="cross_entropy", **kw)
    graphed = GradientExtractor(model, dim=16, engine="factored", loss_fn="cross_entropy", cuda_graphs=True, **kw)
    graphed._graph_backend = backend if backend is not None else Rerun()
    return eager, graphed


def _batches(name: str, sizes):
    return [be.build(name, b, seed=s + 1)[1] for s, b in enumerate(sizes)]


def _same(a, b) -> None:
    for f in ("z", "loss", "output", "grad_norm"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", be.MODELS)
def test_replayed_batches_equal_the_eager_pass_and_keep_their_results(name):
    model, _ = be.build(name, 4)
    model.eval()
    eager, graphed = _pair(model)
    # first batch (plan check), two eager warm-ups of size 6, then capture + replays, and a short last batch
    batches = _batches(name, [5, 6, 6, 6, 6, 6, 3])
    got = [graphed(b) for b in batches]
    want = [eager(b) for b in batches]
    for g, w in zip(got, want):
        _same(g, w)  # each batch's own data reached the pass, and no later batch overwrote a result
    state = graphed.cuda_graph_state()
    assert state == {"requested": True, "captured": 1, "replayed": 3, "off": None}
    assert graphed._graph_backend.captures == 1


def test_each_batch_shape_gets_its_own_graph_up_to_two():
    model = be.MLP().eval()
    eager, graphed = _pair(model)
    sizes = [4] + [5] * 3 + [7] * 4 + [9] * 4 + [5]
    batches = _batches("mlp", sizes)
    for b in batches:
        _same(graphed(b), eager(b))
    state = graphed.cuda_graph_state()
    # 5 and 7 captured on their third batch; 9 stays eager (two graphs kept at most)
    assert state["captured"] == 2 and state["replayed"] == 1 + 2 + 1


def test_a_bad_label_in_a_replayed_batch_is_still_refused():
    model = be.MLP().eval()
    _, graphed = _pair(model)
    for b in _batches("mlp", [4, 6, 6, 6]):
        graphed(b)
    x, y = _batches("mlp", [6])[0]
    with pytest.raises(ValueError, match=r"label 12 is out of range"):
        graphed((x, torch.full_like(y, 12)))
    assert graphed.cuda_graph_state()["replayed"] == 2
    bad = x.clone()
    bad[3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"first at batch position 3"):
        graphed((bad, y))


def test_a_failed_capture_switches_graphs_off_and_the_batch_runs_eagerly(caplog):
    model = be.MLP().eval()
    eager, graphed = _pair(model, Rerun(fail=RuntimeError("operation not permitted when stream is capturing")))
    with caplog.at_level(logging.WARNING, logger="hardmine.factored.graphs"):
        for b in _batches("mlp", [4, 6, 6, 6, 6]):
            _same(graphed(b), eager(b))
    off = graphed.cuda_graph_state()["off"]
    assert off.startswith("the capture failed (RuntimeError: operation not permitted")
    assert sum("switched off" in r.message for r in caplog.records) == 1


def test_a_replay_that_differs_from_the_eager_pass_switches_graphs_off(caplog):
    model = be.MLP().eval()
    eager, graphed = _pair(model, Rerun(skew=0.5))  # a graph that froze something it should not have
    with caplog.at_level(logging.WARNING, logger="hardmine.factored.graphs"):
        for b in _batches("mlp", [4, 6, 6, 6, 6, 6]):
            got, want = graphed(b), eager(b)
    _same(got, want)  # batches after the check run eagerly
    state = graphed.cuda_graph_state()
    assert state["off"].startswith("a replayed pass differed from the eager pass of the same batch (output ")
    assert any("switched off" in r.message for r in caplog.records)


def test_replacing_a_weight_drops_the_graphs_and_captures_again():
    model = be.MLP().eval()
    eager, graphed = _pair(model)
    batches = _batches("mlp", [4, 6, 6, 6, 6])
    for b in batches:
        graphed(b)
    with torch.no_grad():
        model.net[0].weight = nn.Parameter(model.net[0].weight * 2)  # new storage
    eager2, _ = _pair(model)
    for b in batches[1:]:
        _same(graphed(b), eager2(b))
    state = graphed.cuda_graph_state()
    assert state["captured"] == 2 and state["off"] is None
    with torch.no_grad():  # an in-place update keeps the storage: the graph reads the new values
        model.net[0].weight.mul_(0.5)
    _same(graphed(batches[1]), eager(batches[1]))
    assert graphed.cuda_graph_state()["captured"] == 2


class Tail(nn.Module):  # an unsupported module: its parameter goes to vmap under auto
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.fc(x) * self.scale


@pytest.mark.parametrize(
    "case, why",
    [
        ("cpu", "the model is on cpu, not a CUDA device"),
        ("vmap", "part of the plan runs by vmap"),
        ("dropout", "randomness='different' draws random numbers a replay would repeat"),
    ],
)
def test_where_graphs_do_not_apply_the_pass_runs_eagerly_and_says_why(case, why):
    model = Tail().eval()
    kw = {"engine": "auto", "loss_fn": "cross_entropy", "dim": 16, "cuda_graphs": True}
    if case == "vmap":
        ext = GradientExtractor(model, **kw)
    else:
        ext = GradientExtractor(model, layers="fc", randomness="different" if case == "dropout" else "eval", **kw)
    if case != "cpu":
        ext._graph_backend = Rerun()
    x, y = torch.randn(6, 8), torch.arange(6) % 3
    for _ in range(5):
        ext((x, y))
    assert ext.cuda_graph_state() == {"requested": True, "captured": 0, "replayed": 0, "off": why}


def test_cuda_graphs_must_be_a_bool():
    with pytest.raises(ValueError, match=r"cuda_graphs='yes' must be True or False"):
        GradientExtractor(be.MLP(), cuda_graphs="yes")
    assert GradientExtractor(be.MLP()).cuda_graph_state() == {
        "requested": False, "captured": 0, "replayed": 0, "off": None
    }


def test_signature_tells_shapes_dtypes_and_values_apart():
    a, b = torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64)
    assert batch_signature([a, 1], "s") == batch_signature([torch.ones(2, 3), 1], "s")
    assert batch_signature([a, 1], "s") != batch_signature([a, 2], "s")
    assert batch_signature([a], "s") != batch_signature([b], "s")
    assert batch_signature([a], "s") != batch_signature([torch.zeros(3, 3)], "s")
    assert batch_signature([a], "s") != batch_signature([a], "t")
    assert batch_signature([a.requires_grad_()], "s") is None
    assert batch_signature([[1]], "s") is None  # unhashable: never captured


def test_pass_graphs_warm_up_capture_then_replay_with_fresh_outputs():
    calls = []

    def fn(leaves):
        calls.append(leaves[0])
        return (leaves[0] * 2,)

    graphs = PassGraphs(Rerun(), warmup=1)
    key = batch_signature([torch.zeros(3)], "k")
    x1, x2, x3 = torch.ones(3), torch.full((3,), 2.0), torch.full((3,), 3.0)
    assert graphs(fn, [x1], key, (1,))[0].tolist() == [2, 2, 2]  # eager warm-up
    assert calls[-1] is x1
    out2 = graphs(fn, [x2], key, (1,))[0]  # captured: fn saw the static copy, not x2
    assert calls[-1] is not x2 and out2.tolist() == [4, 4, 4]
    out3 = graphs(fn, [x3], key, (1,))[0]  # replay + the one eager comparison
    assert out3.tolist() == [6, 6, 6] and out2.tolist() == [4, 4, 4]
    assert graphs.captured == 1 and graphs.replayed == 2 and graphs.disabled is None


def test_cuda_backend_warms_up_and_captures_on_its_own_stream(monkeypatch):
    """CudaGraphs' calls, recorded with stand-ins for torch.cuda (no device needed): the side stream waits for
    the current one (the static inputs), runs one warm-up pass, then the capture on that stream with the shared
    pool and thread-local error mode, and the current stream waits for the capture's stream."""
    from contextlib import contextmanager

    import hardmine.factored.graphs as graphs_mod

    log: list[tuple] = []

    class Stream:
        def __init__(self, name: str) -> None:
            self.name = name

        def wait_stream(self, other: Stream) -> None:
            log.append(("wait", self.name, other.name))

    side, current = Stream("side"), Stream("current")
    active: list[str] = ["current"]

    @contextmanager
    def on_stream(s):
        active.append(s.name)
        try:
            yield
        finally:
            active.pop()

    class Graph:
        def replay(self) -> None:
            log.append(("replay",))

    @contextmanager
    def graph(g, pool=None, stream=None, capture_error_mode=None):
        log.append(("capture", pool, stream.name, capture_error_mode))
        active.append(stream.name + "(capturing)")
        try:
            yield
        finally:
            active.pop()

    monkeypatch.setattr(torch.cuda, "Stream", lambda device: side)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: current)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    monkeypatch.setattr(torch.cuda, "stream", on_stream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)

    def fn():
        log.append(("run on", active[-1]))
        return (torch.ones(2),)

    backend = graphs_mod.CudaGraphs(torch.device("cuda", 0))
    replay, out = backend.capture(fn)
    assert log == [
        ("wait", "side", "current"),
        ("run on", "side"),
        ("capture", "pool", "side", "thread_local"),
        ("run on", "side(capturing)"),
        ("wait", "current", "side"),
    ]
    assert out[0].tolist() == [1.0, 1.0]
    replay()
    assert log[-1] == ("replay",)
