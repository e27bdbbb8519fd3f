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

import pytest
import torch
from torch import nn

from hardmine.engine import GradientExtractor
from hardmine.factored.graphs import PACK_ALIGN, PACK_BYTES, RESULT_PACK_BYTES, PassGraphs, batch_signature


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5))

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))

    def forward(self, x):
        return self.net(x)


class Tokens(nn.Module):  # mapping inputs, padded tokens: a batch of two tensors besides the target
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.norm, self.head = nn.Embedding(30, 8), nn.LayerNorm(8), nn.Linear(8, 5)

    def forward(self, input_ids, attention_mask):
        h = self.norm(self.emb(input_ids)) * attention_mask[..., None]
        return self.head(h.sum(1) / attention_mask.sum(1, keepdim=True))


MODELS = {"mlp": MLP, "cnn": CNN, "tokens": Tokens}


def build(name: str, b: int, seed: int):
    """A batch of ``b`` samples for model ``name``, drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 5, (b,), generator=g)
    if name == "mlp":
        return torch.randn(b, 20, generator=g), y
    if name == "cnn":
        return torch.randn(b, 3, 8, 8, generator=g), y
    ids = torch.randint(1, 30, (b, 7), generator=g)
    mask = (torch.arange(7)[None, :] < torch.randint(2, 8, (b,), generator=g)[:, None]).long()  # (B, T)
    return {"input_ids": ids * mask, "attention_mask": mask}, y


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
                o.copy_(new)
                if self.skew:
                    skew(o, self.skew)

        return replay, out


def skew(out: torch.Tensor, by: float) -> None:
    """A replay's output made wrong: floats off by ``by``; a buffer of packed small results (uint8, whatever
    their dtypes) with the lowest bit of every byte flipped (every result in it differs)."""
    if torch.is_floating_point(out):
        out.add_(by)
    elif out.dtype == torch.uint8:
        out.bitwise_xor_(1)


class Frozen(Rerun):
    """A stand-in closer to a real graph: a replay runs the pass with the extractor's plan as it was at capture
    (its units and protected outputs), whatever the plan is now."""

    def __init__(self, ext: GradientExtractor) -> None:
        super().__init__()
        self.ext = ext

    def capture(self, fn):
        units, protect = dict(self.ext._units), set(self.ext._protect)
        out = fn()

        def replay() -> None:
            saved = self.ext._units, self.ext._protect
            self.ext._units, self.ext._protect = units, protect
            try:
                new = fn()
            finally:
                self.ext._units, self.ext._protect = saved
            for o, n in zip(out, new):
                o.copy_(n)

        return replay, out


def _pair(model: nn.Module, backend: Rerun | None = None, **kw):
    eager = GradientExtractor(model, dim=16, engine="factored", loss_fn="cross_entropy", **kw)
    graphed = GradientExtractor(model, dim=16, engine="factored", loss_fn="cross_entropy", cuda_graphs=True, **kw)
    graphed._graphs.backend = backend if backend is not None else Rerun()
    return eager, graphed


def _batches(name: str, sizes):
    return [build(name, b, seed=s + 1) for s, b in enumerate(sizes)]


def _captured_mlp():
    """``(eager, graphed, batches)``: an MLP extractor whose batch shape was captured by ``batches[:4]`` (the
    plan check, two eager warm-ups, the capture), so that its next call is the first replay, the compared one."""
    eager, graphed = _pair(MLP().eval())
    batches = _batches("mlp", [4, 6, 6, 6, 6])
    for b in batches[:4]:
        graphed(b)
    return eager, graphed, batches


def _second_pass_raises(graphed, exc: Exception) -> None:
    """The extractor's pass raises ``exc`` on its second run from now: on the first replay, the stand-in's
    replay runs the pass first and the eager comparison second."""
    real, calls = graphed._factored, []

    def pass_(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise exc
        return real(*args, **kwargs)

    graphed._factored = pass_


def _same(a, b) -> None:
    for f in ("z", "loss", "output", "grad_norm"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_replayed_batches_equal_the_eager_pass_and_keep_their_results(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    eager, graphed = _pair(model)
    # first batch (plan check), two eager warm-ups of size 6, then capture + replays, and a short last batch
    batches = _batches(name, [5, 6, 6, 6, 6, 6, 3])
    got = [graphed(b) for b in batches]
    want = [eager(b) for b in batches]
    for g, w in zip(got, want):
        _same(g, w)  # each batch's own data reached the pass, and no later batch overwrote a result
    state = graphed.cuda_graph_state()
    assert state == {"requested": True, "captured": 1, "replayed": 3, "off": None}
    assert graphed._graphs.backend.captures == 1


def test_each_batch_shape_gets_its_own_graph_up_to_two():
    model = MLP().eval()
    eager, graphed = _pair(model)
    sizes = [4] + [5] * 3 + [7] * 4 + [9] * 4 + [5]
    batches = _batches("mlp", sizes)
    for b in batches:
        _same(graphed(b), eager(b))
    state = graphed.cuda_graph_state()
    # 5 and 7 captured on their third batch; 9 stays eager (two graphs kept at most)
    assert state["captured"] == 2 and state["replayed"] == 1 + 2 + 1


def test_a_bad_label_in_a_replayed_batch_is_still_refused():
    model = MLP().eval()
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
    model = MLP().eval()
    eager, graphed = _pair(model, Rerun(fail=RuntimeError("operation not permitted when stream is capturing")))
    with caplog.at_level(logging.WARNING, logger="hardmine.factored.graphs"):
        for b in _batches("mlp", [4, 6, 6, 6, 6]):
            _same(graphed(b), eager(b))
    off = graphed.cuda_graph_state()["off"]
    assert off.startswith("the capture failed (RuntimeError: operation not permitted")
    said = [r.getMessage() for r in caplog.records if "switched off" in r.getMessage()]
    assert said == [f"cuda_graphs: switched off, running the factored pass eagerly: {off}"]
    assert "operation not permitted when stream is capturing" in said[0]


def test_a_replay_that_differs_from_the_eager_pass_switches_graphs_off(caplog):
    model = MLP().eval()
    eager, graphed = _pair(model, Rerun(skew=0.5))  # a graph that froze something it should not have
    with caplog.at_level(logging.WARNING, logger="hardmine.factored.graphs"):
        for b in _batches("mlp", [4, 6, 6, 6, 6, 6]):
            got, want = graphed(b), eager(b)
    _same(got, want)  # batches after the check run eagerly
    state = graphed.cuda_graph_state()
    assert state["off"].startswith("a replayed pass differed from the eager pass of the same batch (output ")
    assert any("switched off" in r.message for r in caplog.records)


def test_replacing_a_weight_drops_the_graphs_and_captures_again():
    model = MLP().eval()
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
        ext._graphs.backend = Rerun()
    x, y = torch.randn(6, 8), torch.arange(6) % 3
    for _ in range(5):
        ext((x, y))
    assert ext.cuda_graph_state() == {"requested": True, "captured": 0, "replayed": 0, "off": why}


def test_cuda_graphs_must_be_a_bool():
    with pytest.raises(ValueError, match=r"cuda_graphs='yes' must be True or False"):
        GradientExtractor(MLP(), cuda_graphs="yes")
    assert GradientExtractor(MLP()).cuda_graph_state() == {
        "requested": False, "captured": 0, "replayed": 0, "off": None
    }


def test_signature_tells_shapes_dtypes_and_values_apart():
    a, b = torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64)
    assert batch_signature([a, 1], "s") == batch_signature([torch.ones(2, 3), 1], "s")
    assert batch_signature([a, 1], "s") != batch_signature([a, 2], "s")
    assert batch_signature([a], "s") != batch_signature([b], "s")
    assert batch_signature([a], "s") != batch_signature([torch.zeros(3, 3)], "s")
    assert batch_signature([a], "s") != batch_signature([a], "t")
    assert batch_signature([torch.zeros(2, 3).requires_grad_()], "s") is None
    assert batch_signature([[1]], "s") is None  # unhashable: never captured
    assert batch_signature([a, True], "s") != batch_signature([a, 1], "s")  # equal and same hash, not the same


def test_pass_graphs_warm_up_capture_then_replay_with_fresh_outputs():
    calls = []

    def fn(leaves):
        calls.append(leaves[0])
        return (leaves[0] * 2,)

    graphs = PassGraphs(Rerun(), what="the test pass", warmup=1)
    key = batch_signature([torch.zeros(3)], "k")
    x1, x2, x3 = torch.ones(3), torch.full((3,), 2.0), torch.full((3,), 3.0)
    assert graphs(fn, [x1], key, (1,))[0].tolist() == [2, 2, 2]  # eager warm-up
    assert calls[-1] is x1
    out2 = graphs(fn, [x2], key, (1,))[0]  # captured: fn saw the static copy, not x2
    assert calls[-1] is not x2 and out2.tolist() == [4, 4, 4]
    out3 = graphs(fn, [x3], key, (1,))[0]  # replay + the one eager comparison
    assert out3.tolist() == [6, 6, 6] and out2.tolist() == [4, 4, 4]
    assert graphs.captured == 1 and graphs.replayed == 2 and graphs.disabled is None
    n = len(calls)  # the stand-in's replays call fn; the eager comparison ran once, on the first replay only
    out4 = graphs(fn, [torch.full((3,), 4.0)], key, (1,))[0]
    assert out4.tolist() == [8, 8, 8] and len(calls) == n + 1


def test_pass_graphs_without_a_key_always_run_eagerly_on_the_batch():
    graphs = PassGraphs(Rerun(), what="the test pass", warmup=0)
    for v in (1.0, 2.0, 3.0):
        x = torch.full((2,), v)
        assert graphs(lambda leaves: (leaves[0] + 1,), [x], None, None)[0].tolist() == [v + 1, v + 1]
    assert graphs.captured == 0 and graphs.replayed == 0


def test_pass_graphs_reset_drops_the_graphs_and_takes_the_new_backend():
    first, second = Rerun(), Rerun()
    graphs = PassGraphs(first, what="the test pass", warmup=0)
    key = batch_signature([torch.zeros(2)], "k")
    graphs(lambda leaves: (leaves[0] * 2,), [torch.ones(2)], key, None)
    graphs.reset(second)
    assert graphs(lambda leaves: (leaves[0] * 3,), [torch.ones(2)], key, None)[0].tolist() == [3.0, 3.0]
    assert (first.captures, second.captures, graphs.captured) == (1, 1, 2)
    graphs.reset()  # the same backend
    graphs(lambda leaves: (leaves[0] * 3,), [torch.ones(2)], key, None)
    assert second.captures == 2


def test_first_line_of_an_error():
    from hardmine.factored.graphs import _first_line

    assert _first_line(RuntimeError()) == "RuntimeError: "
    assert _first_line(ValueError("a\nb")) == "ValueError: a"


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
        assert isinstance(g, Graph)
        log.append(("capture", pool, stream.name, capture_error_mode))
        active.append(stream.name + "(capturing)")
        try:
            yield
        finally:
            active.pop()

    dev = torch.device("cuda", 0)

    def on_device(value, device):
        assert device == dev  # the backend's own device, not the current one
        return value

    monkeypatch.setattr(torch.cuda, "Stream", lambda device: on_device(side, device))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: on_device(current, device))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    monkeypatch.setattr(torch.cuda, "stream", on_stream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)

    def fn():
        log.append(("run on", active[-1]))
        return (torch.ones(2),)

    backend = graphs_mod.CudaGraphs(dev)
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


def test_a_plan_changed_by_a_later_batch_drops_the_graphs_of_the_old_plan():
    """Under auto, a later batch that the swapped class token and position embedding cannot take (a longer
    input, interpolated) moves them to vmap: a graph captured with them factored must not be replayed, or their
    norms would be counted twice."""
    from test_factored_parameter import Tokens as ViT
    from test_factored_parameter import _batch

    torch.manual_seed(0)
    model = ViT(use="interp").double()
    ext = GradientExtractor(model, dim=16, cuda_graphs=True)
    ext._graphs.backend = Frozen(ext)
    ext(_batch(3))
    for _ in range(4):
        ext(_batch(5))
    assert ext.cuda_graph_state() == {"requested": True, "captured": 1, "replayed": 2, "off": None}
    ext(_batch(3, 6))  # the swapped pass fails on the longer input: cls and pos go to vmap
    assert ext.plan["cls"] == ext.plan["pos"] == "vmap"
    got = ext(_batch(5))
    want = GradientExtractor(model, dim=16, engine="vmap")(_batch(5))
    torch.testing.assert_close(got.grad_norm, want.grad_norm)
    torch.testing.assert_close(got.z, want.z)
    assert ext.cuda_graph_state()["off"] == "part of the plan runs by vmap"


def test_a_nan_batch_on_the_first_replay_is_refused_as_without_graphs():
    _, graphed, _ = _captured_mlp()
    x, y = _batches("mlp", [6])[0]
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/inf values in 1 sample\(s\) \(first at batch position 0\)"):
        graphed((x, y))
    assert graphed.cuda_graph_state()["off"] is None  # NaN where the eager pass has it too: no difference


def test_an_eager_check_that_fails_switches_graphs_off_and_reruns_the_batch(caplog):
    eager, graphed, batches = _captured_mlp()
    _second_pass_raises(graphed, torch.cuda.OutOfMemoryError("CUDA out of memory (a stand-in)"))
    with caplog.at_level(logging.WARNING, logger="hardmine.factored.graphs"):
        _same(graphed(batches[4]), eager(batches[4]))
    assert graphed.cuda_graph_state()["off"] == (
        "the eager pass checking the first replay failed (OutOfMemoryError: CUDA out of memory (a stand-in))"
    )
    assert any("OutOfMemoryError" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("change", ["frozen", "hook", "autocast"])
def test_what_a_graph_freezes_besides_the_batch_makes_it_capture_again(change):
    torch.manual_seed(0)
    model = MLP().eval()
    _, graphed = _pair(model)
    batches = _batches("mlp", [4, 6, 6, 6])
    for b in batches:
        graphed(b)
    assert graphed.cuda_graph_state()["captured"] == 1
    if change == "frozen":
        model.net[0].weight.requires_grad_(False)
    elif change == "hook":
        model.net[0].register_forward_hook(lambda m, a, o: None)
    for b in batches[1:]:
        if change == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):  # the same numerics: no new graph
                graphed(b)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                graphed(b)
        else:
            graphed(b)
    assert graphed.cuda_graph_state()["captured"] == 2


def test_a_batch_left_on_another_device_than_the_model_runs_eagerly(monkeypatch):
    model = MLP().eval()
    eager, graphed = _pair(model)
    batches = _batches("mlp", [4, 6, 6, 6, 6])
    real = GradientExtractor._graph_key

    def elsewhere(self, leaves, spec, kind):  # every batch tensor "on another device" than the model
        monkeypatch.setattr(self, "_device", lambda: torch.device("meta"))
        try:
            return real(self, leaves, spec, kind)
        finally:
            monkeypatch.delattr(self, "_device")

    monkeypatch.setattr(GradientExtractor, "_graph_key", elsewhere)
    for b in batches:
        _same(graphed(b), eager(b))
    assert graphed.cuda_graph_state()["captured"] == 0


def _captured_after(graphed, batches, change) -> int:
    for b in batches:
        graphed(b)
    assert graphed.cuda_graph_state()["captured"] == 1
    change()
    for b in batches[1:]:
        graphed(b)
    return graphed.cuda_graph_state()["captured"]


def test_a_new_protected_output_or_device_sets_the_graphs_up_again(monkeypatch):
    model = MLP().eval()
    _, graphed = _pair(model)
    batches = _batches("mlp", [4, 6, 6, 6])
    assert _captured_after(graphed, batches, lambda: graphed._protect.add("net.2")) == 2
    made = []
    monkeypatch.setattr("hardmine.factored.graphs.CudaGraphs", lambda device: made.append(device) or Rerun())
    graphed._graphs.backend = None  # the default backend, one per device
    monkeypatch.setattr(graphed, "_device", lambda: torch.device("cuda", 1))  # the model moved: only the plan is read
    graphed._graph_runner()
    assert made == [torch.device("cuda", 1)] and graphed._graphs.graphs._graphs == {}


@pytest.mark.parametrize("setting", ["matmul_precision", "conv_fp32_precision", "loss"])
def test_settings_the_pass_runs_under_are_part_of_the_key(setting, monkeypatch):
    model = MLP().eval()
    _, graphed = _pair(model)
    batches = _batches("mlp", [4, 6, 6, 6])

    conv = getattr(torch.backends.cudnn, "conv", None)
    if setting == "conv_fp32_precision" and not hasattr(conv, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    old = torch.get_float32_matmul_precision(), getattr(conv, "fp32_precision", None)

    def change() -> None:
        if setting == "matmul_precision":
            torch.set_float32_matmul_precision("high")
        elif setting == "conv_fp32_precision":
            conv.fp32_precision = "ieee"  # reading the legacy allow_tf32 now raises
        else:
            graphed.loss_fn = lambda out, y: torch.nn.functional.cross_entropy(out, y, reduction="none")

    try:
        assert _captured_after(graphed, batches, change) == 2
    finally:
        torch.set_float32_matmul_precision(old[0])
        if old[1] is not None:
            conv.fp32_precision = old[1]


def test_a_plan_left_with_no_factored_unit_drops_its_graphs():
    from test_factored_parameter import Tokens as ViT
    from test_factored_parameter import _batch

    torch.manual_seed(0)
    ext = GradientExtractor(ViT(use="interp").double(), layers=["cls", "pos"], dim=16, cuda_graphs=True)
    ext._graphs.backend = Frozen(ext)
    for b in (3, 5, 5, 5):
        ext(_batch(b))
    assert ext.cuda_graph_state()["captured"] == 1
    ext(_batch(3, 6))  # cls and pos go to vmap: nothing is factored any more
    assert ext.plan == {"cls": "vmap", "pos": "vmap"}
    assert ext.cuda_graph_state()["off"] == "part of the plan runs by vmap" and ext._graphs.graphs._graphs == {}


def test_a_batch_error_raised_by_the_eager_check_is_the_batchs_and_graphs_stay_on():
    _, graphed, batches = _captured_mlp()
    _second_pass_raises(graphed, ValueError("this batch is bad"))
    with pytest.raises(ValueError, match="this batch is bad"):
        graphed(batches[4])
    assert graphed.cuda_graph_state()["off"] is None


def test_a_first_replay_with_nan_results_is_checked_again_on_the_next():
    _, graphed, batches = _captured_mlp()
    x, y = batches[4]
    x = x.clone()
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        graphed((x, y))
    (graph,) = graphed._graphs.graphs._graphs.values()
    assert not graph.checked
    graphed(batches[4])
    assert graph.checked


def test_graphs_that_never_settle_are_switched_off(caplog):
    model = MLP().eval()
    eager, graphed = _pair(model)
    batches = _batches("mlp", [4] + [6] * 40)
    with caplog.at_level(logging.WARNING, logger="hardmine.factored.graphs"):
        for i, b in enumerate(batches):
            if i % 3 == 0:  # a new hook every third batch: captured each time, replayed once at most
                model.net[0].register_forward_hook(lambda m, a, o: None)
            _same(graphed(b), eager(b))
    state = graphed.cuda_graph_state()
    assert state["captured"] == 8
    assert state["off"] == (
        "8 captures so far: the batch signatures or what the pass reads (weights, hooks, settings) keep changing"
    )


def test_difference_tells_what_differs():
    from hardmine.factored.graphs import _difference

    a = torch.tensor([1.0, 2.0, float("nan"), float("inf")])
    assert _difference((a,), (a.clone(),)) is None  # NaN and inf where the other has them: equal
    assert _difference((a, a), (a,)) == "2 outputs instead of 1"
    assert _difference((a,), (a[:3],)) == "output 0: (4,) torch.float32 instead of (3,) torch.float32"
    assert _difference((a,), (a.double(),)) == "output 0: (4,) torch.float32 instead of (4,) torch.float64"
    assert _difference((torch.tensor([True]),), (torch.tensor([False]),)) == "output 0 differs"
    assert _difference((torch.tensor([3]),), (torch.tensor([3]),)) is None
    # an equal integer output does not end the comparison: a later output that differs is found
    assert _difference((torch.tensor([3]), a + 1), (torch.tensor([3]), a)) == "output 1: max difference 1 at scale 2"
    big = torch.tensor([1000.0, 1.0])
    assert _difference((big + torch.tensor([0.0, 0.005]),), (big,)) is None  # within 1e-5 of the scale
    assert _difference((big + torch.tensor([0.0, 0.02]),), (big,)) == "output 0: max difference 0.02 at scale 1e+03"
    assert _difference((big + torch.tensor([0.0, 0.0095]),), (big,)) is None  # atol = rtol / 10 of the scale
    # bf16: four rounding steps of the dtype are tolerated, five are not
    one = torch.ones(2, dtype=torch.bfloat16)
    step = torch.finfo(torch.bfloat16).eps
    assert _difference((one + 4 * step,), (one,)) is None
    assert _difference((one + 5 * step,), (one,)).startswith("output 0: max difference")
    small = torch.tensor([1e-3, 2e-3])
    assert _difference((small * 1.001,), (small,)).startswith("output 0: max difference")  # rtol 1e-4 at any scale
    assert _difference((small * 1.00005,), (small,)) is None
    # NaN and infinities leave the tolerance to the finite values: none of them widens it
    for odd in (float("nan"), float("inf"), -float("inf")):
        want = torch.tensor([odd, 1e-3])
        assert _difference((torch.tensor([odd, 1.002e-3]),), (want,)).startswith("output 0: max difference 2e-06")
        assert _difference((torch.tensor([odd, 1e-3]),), (want,)) is None
    assert _difference((torch.tensor([float("nan"), 1.0]),), (torch.tensor([0.0, 1.0]),)) == (
        "output 0: max difference inf at scale 1"
    )
    # one inf in the reference does not widen the tolerance of the finite values
    with_inf = torch.tensor([float("inf"), 1.0])
    assert _difference((torch.tensor([float("inf"), 1.1]),), (with_inf,)).startswith("output 0: max difference")
    assert _difference((torch.zeros(0),), (torch.zeros(0),)) is None


def test_pass_graphs_keep_leaves_that_are_not_tensors_as_they_are():
    seen = []

    def fn(leaves):
        seen.append(leaves[1])
        return (leaves[0] * leaves[1],)

    graphs = PassGraphs(Rerun(), what="the test pass", warmup=1)
    key = batch_signature([torch.zeros(2), 3], "k")
    for v in (1.0, 2.0, 4.0):
        out = graphs(fn, [torch.full((2,), v), 3], key, None)[0]
        assert out.tolist() == [3 * v, 3 * v]
    assert graphs.captured == 1 and seen == [3] * len(seen)


# ------------------------------------------------------------------------- what a graph's key and state read
def _fake_torch(fp32_api: bool = True, sdp_cudnn: bool = True):
    """A stand-in for the torch module numerics() reads: every setting a known value."""
    from types import SimpleNamespace as NS

    cuda = NS(matmul=NS(fp32_precision="ieee", allow_bf16_reduced_precision_reduction=True,
                        allow_fp16_reduced_precision_reduction=False, allow_tf32="legacy-matmul"),
              flash_sdp_enabled=lambda: "flash", mem_efficient_sdp_enabled=lambda: "mem",
              math_sdp_enabled=lambda: "math")
    if sdp_cudnn:
        cuda.cudnn_sdp_enabled = lambda: "cudnn-sdp"
    backends = NS(cuda=cuda, cudnn=NS(conv=NS(fp32_precision="conv-tf32"), rnn=NS(fp32_precision="rnn-ieee"),
                                      deterministic="det", benchmark="bench", allow_tf32="legacy-cudnn"))
    if fp32_api:
        backends.fp32_precision = "global"
    return NS(backends=backends, is_autocast_enabled=lambda d: d == "cuda", get_autocast_dtype=lambda d: f"dt-{d}",
              get_float32_matmul_precision=lambda: "high", are_deterministic_algorithms_enabled=lambda: "algos")


def test_numerics_reads_every_setting_that_chooses_a_pass_s_kernels(monkeypatch):
    from hardmine.factored import graphs

    monkeypatch.setattr(graphs, "torch", _fake_torch())
    calls = ("high", "algos", "flash", "mem", "math", "cudnn-sdp")
    settings = ("global", "ieee", "conv-tf32", "rnn-ieee", True, False, "det", "bench")
    assert graphs.numerics("cuda") == graphs.Numerics()("cuda") == ((True, "dt-cuda"), *settings, *calls)
    assert graphs.numerics("cpu")[0] == (False, "dt-cpu")
    # a torch without one of the calls: None in its place, the rest still read
    monkeypatch.setattr(graphs, "torch", _fake_torch(sdp_cudnn=False))
    assert graphs.numerics("cuda") == graphs.Numerics()("cuda") == ((True, "dt-cuda"), *settings, *calls[:-1], None)
    # torch < 2.9 (no fp32_precision API): the legacy TF32 flags are read too
    monkeypatch.setattr(graphs, "torch", _fake_torch(fp32_api=False))
    legacy = ((True, "dt-cuda"), None, *settings[1:], *calls, "legacy-matmul", "legacy-cudnn")
    assert graphs.numerics("cuda") == graphs.Numerics()("cuda") == legacy
    # a reader made once reads the values at each call (only the settings' owners are looked up once)
    fake = _fake_torch()
    monkeypatch.setattr(graphs, "torch", fake)
    read = graphs.Numerics()
    fake.backends.cudnn.conv.fp32_precision, fake.backends.cudnn.deterministic = "conv-ieee", "det2"
    fake.get_float32_matmul_precision = lambda: "highest"  # a call replaced after the reader was made
    assert read("cuda") == graphs.numerics("cuda")
    assert read("cuda")[3] == "conv-ieee" and read("cuda")[7] == "det2"
    # a setting that raises when read: no key (the pass runs eagerly), as numerics() says
    fake.is_autocast_enabled = None
    assert read("cuda") is None and graphs.numerics("cuda") is None
    assert graphs._lookup("backends.no_such_module.flag") is None


def test_numerics_of_the_real_torch_follow_its_settings():
    from hardmine.factored.graphs import Numerics, numerics

    precision = torch.get_float32_matmul_precision()
    read = Numerics()  # made before the settings change: what a PlanGraphs holds
    try:  # (setting a precision also moves torch's fp32_precision fields: compare like with like)
        torch.set_float32_matmul_precision("high")
        high = numerics("cpu")
        assert read("cpu") == high
        torch.set_float32_matmul_precision("medium")
        assert numerics("cpu") != high and read("cpu") == numerics("cpu")
        torch.set_float32_matmul_precision("high")
        assert numerics("cpu") == high == read("cpu")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert numerics("cpu")[0] == (True, torch.bfloat16) and numerics("cpu")[1:] == high[1:]
            assert read("cpu") == numerics("cpu")
        deterministic = torch.backends.cudnn.deterministic
        try:
            torch.backends.cudnn.deterministic = not deterministic
            assert read("cpu") != high and read("cpu") == numerics("cpu")
        finally:
            torch.backends.cudnn.deterministic = deterministic
        conv = getattr(torch.backends.cudnn, "conv", None)
        if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9
            old = conv.fp32_precision
            try:
                conv.fp32_precision = "ieee" if old != "ieee" else "tf32"
                assert read("cpu") != high and read("cpu") == numerics("cpu")
            finally:
                conv.fp32_precision = old
        assert read("cpu") == high
    finally:
        torch.set_float32_matmul_precision(precision)


def test_numerics_reads_torch_s_flags_through_their_getters():
    # The shortcut (a property's getter, a cuDNN fp32_precision's getter) is taken where this torch has it, and
    # reads what the attribute says; an attribute it cannot read that way is read as an attribute.
    from hardmine.factored.graphs import _reader

    cudnn = torch.backends.cudnn
    read = _reader(cudnn, "deterministic")
    assert read is type(cudnn).__dict__["deterministic"].getter and read() == cudnn.deterministic
    conv = getattr(cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        read = _reader(conv, "fp32_precision")
        assert read.func is torch._C._get_fp32_precision_getter and read() == conv.fp32_precision
    ns = type("Flags", (), {})()
    ns.flag = "value"
    assert _reader(ns, "flag")() == "value" and _reader(None, "flag")() is None

    class Prop:  # a property whose getter reads another value than the attribute (or fails)
        def __init__(self, getter):
            self.getter = getter

        def __get__(self, obj, cls):
            return "attribute"

    owner = type("Owner", (), {"same": Prop(lambda: "attribute"), "other": Prop(lambda: "getter"),
                               "fails": Prop(lambda: 1 / 0)})()
    assert _reader(owner, "same") is vars(type(owner))["same"].getter
    for name in ("other", "fails"):  # not taken: read as an attribute
        read = _reader(owner, name)
        assert read is not vars(type(owner))[name].getter and read() == "attribute"


def test_autocast_state_reads_the_device_type_s_own_settings(monkeypatch):
    from hardmine.factored.graphs import autocast_state

    was = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("xpu")
    try:  # settable without the device: the xpu answer must not be CUDA's (nor the default's)
        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("xpu", torch.bfloat16)
        assert autocast_state("xpu") == (False, torch.bfloat16)
        assert autocast_state("cuda") == (True, torch.get_autocast_dtype("cuda"))
    finally:
        torch.set_autocast_enabled("cuda", was[0])
        torch.set_autocast_dtype("xpu", was[1])
    # torch < 2.4: no device-type argument; the CPU and the GPU have calls of their own
    real = torch.is_autocast_enabled

    def old_api(*args):
        if args:
            raise TypeError("is_autocast_enabled() takes no arguments")
        return real("cuda")

    with torch.autocast("cpu", dtype=torch.bfloat16):  # entered (and left) with the real call
        with monkeypatch.context() as mp:
            mp.setattr(torch, "is_autocast_enabled", old_api)
            assert autocast_state("cpu") == (True, torch.bfloat16)
            assert autocast_state("cuda") == (False, torch.get_autocast_dtype("cuda"))


def test_module_state_holds_every_tensor_and_counts_every_kind_of_hook():
    from hardmine.factored.graphs import module_state

    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    model[0].bias.requires_grad_(False)
    tensors = [(t.data_ptr(), t.dtype, t.requires_grad)
               for t in (model[0].weight, model[0].bias, model[1].weight, model[1].bias, model[1].running_mean,
                         model[1].running_var, model[1].num_batches_tracked)]
    assert module_state(model.modules()) == (tuple(tensors), 0, -1)
    handles = [model[0].register_forward_hook(lambda *a: None), model[1].register_forward_pre_hook(lambda *a: None),
               model[0].register_full_backward_hook(lambda *a: None),
               model[1].register_full_backward_pre_hook(lambda *a: None)]
    assert module_state(model.modules()) == (tuple(tensors), 4, max(h.id for h in handles))
    handles[3].remove()  # a backward pre-hook removed: the count moves
    assert module_state(model.modules())[1:] == (3, max(h.id for h in handles[:3]))


def test_plan_graphs_set_up_per_plan_and_say_why_they_are_off(caplog):
    from hardmine.factored.graphs import PassGraphs, PlanGraphs

    cpu = torch.device("cpu")
    assert PlanGraphs(False, "a pass").for_plan("p", cpu, lambda: None) is None  # not asked for
    slot = PlanGraphs(True, "the test pass")
    with caplog.at_level(logging.INFO, logger="hardmine.factored.graphs"):
        assert slot.for_plan(None, cpu, lambda: None) is None  # no CUDA device and no stand-in backend
    assert [r.getMessage() for r in caplog.records] == [
        "cuda_graphs=True does not apply: the model is on cpu, not a CUDA device; the test pass runs eagerly"
    ]
    first, second = Rerun(), Rerun()
    for plan in (None, ""):  # any plan, even a falsy one, is set up once
        slot = PlanGraphs(True, "the test pass")
        slot.backend = first
        graphs = slot.for_plan(plan, cpu, lambda: None)
        assert isinstance(graphs, PassGraphs) and graphs.backend is first
        assert slot.for_plan(plan, cpu, lambda: "not asked again for the same plan") is graphs
    slot.backend = second  # a new plan: the same graphs object, reset with the backend of now
    assert slot.for_plan("other", cpu, lambda: None) is graphs and graphs.backend is second
    # a plan graphs do not apply to, after graphs were made: none, and the reason in the state
    assert slot.for_plan("vmap part", cpu, lambda: "part of the plan runs by vmap") is None
    assert slot.state() == {"requested": True, "captured": 0, "replayed": 0, "off": "part of the plan runs by vmap"}
    assert slot.for_plan("other", cpu, lambda: None) is graphs and slot.state()["off"] is None
    graphs.disable("a replay differed")  # switched off for good: none, whatever the plan
    assert slot.for_plan("other", cpu, lambda: None) is None and slot.state()["off"] == "a replay differed"


# ------------------------------------------------------------------------ small tensors copied in/out together
def _mixed_pass(leaves):
    """A pass over small and large leaves of several dtypes with small, large, 0-d, empty and non-contiguous
    results."""
    x, m, big, ids, flag, scalar = leaves
    return (
        x * 2,  # small float32
        (x @ m).T,  # small float32, not contiguous
        big + 1,  # float32 larger than PACK_BYTES: an output of its own
        x.sum(),  # 0-d float32
        x[:, :0],  # empty float32
        (ids + 1).double(),  # small float64
        flag & (x[:, 0] > 0),  # small bool
        x[:, 0] > scalar,  # small bool
        m.double().sum(0),  # small float64
        big[: RESULT_PACK_BYTES // 4 + 1] * scalar,  # float32 just over RESULT_PACK_BYTES: an output of its own
        big[: RESULT_PACK_BYTES // 4] * 2,  # float32 of exactly RESULT_PACK_BYTES: packed
        x[:, None, :] * 3,  # (5, 1, 3): a dimension of one inside
    )


def _mixed_leaves(seed: int):
    g = torch.Generator().manual_seed(seed)
    big = torch.randn(PACK_BYTES // 4 + 7, generator=g)  # float32: just over PACK_BYTES
    m = torch.randn(7, 3, generator=g).T  # (3, 7), not contiguous
    return [torch.randn(5, 3, generator=g), m, big,
            torch.randint(0, 9, (5,), generator=g), torch.rand(5, generator=g) > 0.5, torch.tensor(0.1)]


def test_small_leaves_and_results_are_copied_in_and_out_together_whatever_their_dtypes():
    graphs = PassGraphs(Rerun(), what="the test pass", warmup=1)
    key = batch_signature(_mixed_leaves(0), "k")
    got = [graphs(_mixed_pass, _mixed_leaves(seed), key, None) for seed in range(5)]
    assert graphs.captured == 1 and graphs.replayed == 4 and graphs.disabled is None
    for seed, out in enumerate(got):
        want = _mixed_pass(_mixed_leaves(seed))
        assert len(out) == len(want)
        for a, b in zip(out, want, strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    (graph,) = graphs._graphs.values()
    # in: the small contiguous leaves (float32 x, int64 ids, bool flag and the 0-d float32 scalar) in one byte
    # buffer, each at an aligned offset; m (not contiguous: its copy keeps its strides, as the eager pass reads
    # it) and big (too large) copied on their own
    ((pack,),) = [graph.packs]
    assert pack.members == (0, 3, 4, 5) and pack.buffer.dtype == torch.uint8
    assert pack.offsets == (0, 64, 128, 192) and pack.buffer.numel() == 256
    assert sorted(i for _, i in graph.copies) == [1, 2]
    leaves = _mixed_leaves(0)
    assert [(tuple(t.shape), t.dtype) for t in graph.static] == [(tuple(t.shape), t.dtype) for t in leaves]
    assert graph.static[1].stride() == leaves[1].stride() == (1, 3)
    for i in pack.members:  # the static inputs are views of the one buffer
        assert graph.static[i].untyped_storage().data_ptr() == pack.buffer.untyped_storage().data_ptr()
    # out: one byte buffer of every small result (float32, float64 and bool); big and the result just over
    # RESULT_PACK_BYTES on their own; a replay views the buffer once per dtype
    assert [o.dtype for o in graph.outputs] == [torch.uint8, torch.float32, torch.float32]
    assert [o.numel() for o in graph.outputs[1:]] == [PACK_BYTES // 4 + 7, RESULT_PACK_BYTES // 4 + 1]
    assert graph.outputs[0].numel() >= RESULT_PACK_BYTES  # the result of exactly RESULT_PACK_BYTES is in
    assert graph.views == ((0, torch.float32), (0, torch.float64), (0, torch.bool))
    # every small result starts on an aligned address of its step's own buffer
    last = got[-1]
    small = (*last[:2], *last[3:9], *last[10:])
    for r in small:
        assert r.data_ptr() % PACK_ALIGN == 0 and r.is_contiguous()
    assert len({r.untyped_storage().data_ptr() for r in small}) == 1
    # a step's results are its own: writing into one changes neither its neighbours nor the next step's
    before = [r.clone() for r in last]
    last[0].fill_(123.0)
    for a, b in zip(last[1:], before[1:], strict=True):
        assert torch.equal(a, b)
    nxt = graphs(_mixed_pass, _mixed_leaves(7), key, None)
    torch.testing.assert_close(nxt[0], _mixed_pass(_mixed_leaves(7))[0], rtol=0, atol=0)
    assert (last[0] == 123.0).all() and torch.equal(last[8], before[8])


def test_a_replay_reads_each_step_s_own_small_leaves():
    # the packed leaves are copied in at every replay (not only at capture): a pass of their sum
    graphs = PassGraphs(Rerun(), what="the test pass", warmup=1)
    key = batch_signature([torch.zeros(3), torch.zeros(2), torch.zeros(())], "k")
    for v in range(1, 6):
        leaves = [torch.full((3,), float(v)), torch.full((2,), 10.0 * v), torch.tensor(100.0 * v)]
        (out,) = graphs(lambda ls: (ls[0].sum() + ls[1].sum() + ls[2],), leaves, key, None)
        assert out.item() == 3 * v + 20 * v + 100 * v
    assert graphs.replayed == 4


def test_leaves_and_results_of_any_strides_go_through_the_byte_buffers():
    # Strides are not in a graph's key: a small leaf that flattens to another stride at a replay (a column of a
    # matrix, one element with stride 2) is copied in by value; a strided or conjugate result is packed by value
    def pass_(ls):
        x, ids, one = ls
        c = (x * 1j)[:, 0]
        return (x * 3)[:, 0], c.conj(), (ids * 2)[::2], one + 1, x.sum()

    def leaves(seed, strided):
        g = torch.Generator().manual_seed(seed)
        x, ids = torch.randn(4, 3, generator=g), torch.randint(0, 9, (6,), generator=g)
        one = torch.randn(1, generator=g)
        if strided:  # the same values, as views with other strides
            ids = torch.stack([ids, ids], 1)[:, 0]
            one = torch.stack([one, one], 1)[:, 0]
        return [x, ids, one]

    graphs = PassGraphs(Rerun(), what="the test pass", warmup=1)
    key = batch_signature(leaves(0, False), "k")
    for seed in range(6):
        got = graphs(pass_, leaves(seed, seed >= 3), key, None)
        for a, b in zip(got, pass_(leaves(seed, False)), strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(a.resolve_conj(), b.resolve_conj(), rtol=0, atol=0)
    assert graphs.captured == 1 and graphs.replayed == 5 and graphs.disabled is None
    (graph,) = graphs._graphs.values()
    assert graph.packs[0].members == (0, 1, 2) and [o.dtype for o in graph.outputs] == [torch.uint8]


def test_as_bytes_views_what_flattens_to_unit_stride_and_copies_the_rest():
    from hardmine.factored.graphs import _as_bytes

    x = torch.arange(6, dtype=torch.int32)
    assert _as_bytes(x).data_ptr() == x.data_ptr() and _as_bytes(x).shape == (24,)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Ops() as ops:  # a 1-D tensor's bytes are its dtype view alone (a reshape first is an op for nothing)
        _as_bytes(x)
    with Ops() as bare:
        x.view(torch.uint8)
    assert ops.ops == bare.ops and "aten.view.dtype" in ops.ops
    assert torch.equal(_as_bytes(torch.tensor(7.0)), torch.tensor(7.0).reshape(1).view(torch.uint8))
    col = torch.arange(6.0).reshape(3, 2)[:, 1]
    assert torch.equal(_as_bytes(col), torch.tensor([1.0, 3.0, 5.0]).view(torch.uint8))
    z = torch.tensor([1 + 2j, 3 - 1j])
    assert torch.equal(_as_bytes(z.conj()), z.conj().resolve_conj().view(torch.uint8))
    assert torch.equal(_as_bytes(torch._neg_view(x.double())), (-x.double()).view(torch.uint8))


def test_packs_group_small_tensors_by_device_in_order_at_aligned_byte_offsets():
    from hardmine.factored.graphs import _packs

    ts = [torch.zeros(3, dtype=torch.int64), torch.zeros(2), torch.zeros(5, dtype=torch.float64), torch.zeros(()),
          torch.zeros(2, dtype=torch.bool), torch.zeros(40), torch.zeros(8, dtype=torch.float64)]
    packs = _packs(ts, 100, contiguous=True)
    # every dtype in one byte buffer, in order; 40 floats (160 bytes) are over the limit of 100; each member
    # starts on a multiple of 64 bytes (8 float64 are 64 bytes: no gap after them)
    assert [(p.members, p.offsets) for p in packs] == [((0, 1, 2, 3, 4, 6), (0, 64, 128, 192, 256, 320))]
    (pack,) = packs
    assert pack.buffer.dtype == torch.uint8 and pack.buffer.numel() == 384
    assert [None if g is None else g.numel() for g in pack.pads] == [40, 56, 24, 60, 62, None]
    assert pack.view(64, ts[1]).shape == (2,) and pack.view(64, ts[1]).dtype == torch.float32
    assert pack.view(128, ts[2]).data_ptr() == pack.buffer.data_ptr() + 128
    exact = _packs([torch.zeros(25), torch.zeros(1)], 100, contiguous=True)  # 100 bytes: in
    assert [p.members for p in exact] == [(0, 1)] and exact[0].pads[0] is not None
    aligned = _packs([torch.zeros(16), torch.zeros(16)], 100, contiguous=True)
    assert aligned[0].pads == (None, None) and aligned[0].offsets == (0, 64)
    alone = _packs([torch.zeros(3), torch.zeros(40), torch.zeros(7, 2).T], 100, contiguous=True)
    assert alone == []  # one small contiguous tensor: nothing to pack it with (copied on its own)
    # one pack per device, its buffer and gaps on that device ("meta" stands in for a GPU)
    mixed = [torch.zeros(3), torch.zeros(3, device="meta"), torch.zeros(2, dtype=torch.int64),
             torch.zeros(5, dtype=torch.bool, device="meta")]
    by_device = _packs(mixed, 100, contiguous=True)
    assert [(p.members, p.buffer.device.type) for p in by_device] == [((0, 2), "cpu"), ((1, 3), "meta")]
    assert all(g.device.type == "meta" for g in by_device[1].pads if g is not None)
    needs_grad = _packs([torch.zeros(3), torch.zeros(3, requires_grad=True), torch.zeros(2)], 100, contiguous=False)
    assert [p.members for p in needs_grad] == [(0, 2)]  # its bytes would come back detached: a copy of its own
    lone_first = _packs([torch.zeros(3, device="meta"), torch.zeros(3), torch.zeros(2)], 100, contiguous=True)
    assert [p.members for p in lone_first] == [(1, 2)]  # a device with one small tensor does not stop the next
    # a pack's fill writes each member's bytes at its offset, the views read them back
    vals = [torch.arange(3), torch.tensor([1.5, -2.0]), torch.tensor([True, False, True])]
    (p,) = _packs(vals, 100, contiguous=True)
    p.fill(vals)
    for o, v in zip(p.offsets, vals):
        assert torch.equal(p.view(o, v), v)


