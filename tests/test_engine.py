import pytest
import torch
from models import MLP, TinyTransformer, token_batch
from torch import nn
from torch.testing import assert_close

from hardmine.engine import GradientExtractor, ProjectedBatch
from hardmine.extract import reference_per_sample_grads
from hardmine.project import random_matrix


def test_vmap_extractor_projects_exact_grads():
    model = MLP().double()
    batch = (torch.randn(5, 12, dtype=torch.float64), torch.randint(0, 4, (5,)))
    ext = GradientExtractor(model, layers="fc2", dim=8, seed=3, engine="vmap")
    out = ext(batch)
    ref = reference_per_sample_grads(model, batch, params="fc2")
    # fc2.weight (4 x 16): Kronecker 2 x 4 = 8 coordinates; fc2.bias: dense, 2 (the smaller factor).
    assert out.z.shape == (5, ext.out_dim) == (5, 10)
    p_out = random_matrix(4, 2, seed=3, key="fc2.weight:out").double()
    p_in = random_matrix(16, 4, seed=3, key="fc2.weight:in").double()
    want_w = ref.grads["fc2.weight"].reshape(5, -1) @ torch.kron(p_out, p_in)  # (5, 8)
    want_b = ref.grads["fc2.bias"] @ random_matrix(4, 2, seed=3, key="fc2.bias").double()  # (5, 2)
    assert_close(out.z, torch.cat([want_w, want_b], dim=1).float())
    assert_close(out.grad_norm, ref.grad_norm)
    assert ext.metadata()["plan"] == {"fc2.weight": "vmap", "fc2.bias": "vmap"}


@pytest.mark.parametrize("engine", ["auto", "factored", "vmap"])
def test_extractor_interface_for_the_streaming_driver(engine):
    model = MLP()
    ext = GradientExtractor(model, dim=16, seed=1, engine=engine)
    meta = ext.metadata()
    for key in ("engine", "plan", "params", "dim", "out_dim", "seed", "projection", "layout"):
        assert key in meta
    assert meta["engine"] == engine and meta["out_dim"] == ext.out_dim
    x, y = torch.randn(8, 12), torch.randint(0, 4, (8,))
    zs, norms = [], []
    for lo, hi in ((0, 3), (3, 4), (4, 8)):  # several batches of different sizes (1 included) through one extractor
        b = hi - lo
        res = ext((x[lo:hi], y[lo:hi]))
        assert isinstance(res, ProjectedBatch)
        assert res.z.shape == (b, ext.out_dim) and res.z.dtype == torch.float32
        assert res.loss.shape == res.grad_norm.shape == (b,) and res.output.shape == (b, 4)
        zs.append(res.z)
        norms.append(res.grad_norm)
    assert ext.metadata()["plan_checked"]
    # A sample's vector does not depend on the batch it came in: the same 8 samples in one batch agree.
    whole = ext((x, y))
    assert_close(torch.cat(zs), whole.z)
    assert_close(torch.cat(norms), whole.grad_norm)
    assert not torch.equal(whole.z[0], whole.z[1])  # and the vectors are per sample, not one shared vector


@pytest.mark.parametrize("engine", ["auto", "factored", "vmap"])
@pytest.mark.parametrize(
    ("bad", "pattern"),
    [
        ((torch.randn(3, 12), torch.tensor([0, 1, 4])), r"label 4 is out of range.*4 outputs"),
        ((torch.randn(3, 12), torch.tensor([0, -1, 2])), r"label -1 is out of range"),
        ((torch.randn(2, 5), torch.tensor([0, 1])), r"forward failed.*\(5,\)"),
        ((torch.tensor([[float("nan")] * 12] * 2), torch.tensor([0, 1])), r"NaN/inf"),
    ],
)
def test_bad_later_batch_is_still_a_clear_error(engine, bad, pattern):
    # Only the first batch gets the one-sample probe forward; later batches are checked on the pass's own
    # output. A bad batch after a good one must still be refused with the same clear message.
    ext = GradientExtractor(MLP(), dim=16, seed=1, engine=engine)
    ext((torch.randn(4, 12), torch.randint(0, 4, (4,))))
    with pytest.raises(ValueError, match=pattern):
        ext(bad)
    ok = ext((torch.randn(2, 12), torch.tensor([3, 0])))  # and the extractor keeps working afterwards
    assert torch.isfinite(ok.z).all()


def test_auto_plan_is_recorded_in_metadata():
    model = TinyTransformer()
    # an attention configuration outside the factored rule (add_bias_kv) goes to vmap, with the reason
    model.encoder.self_attn = torch.nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True)
    ext = GradientExtractor(model, dim=4, engine="auto")
    ext((token_batch(2), torch.tensor([0, 1])))
    meta = ext.metadata()
    assert meta["plan"]["encoder.linear1.weight"] == "factored"
    assert meta["plan"]["encoder.self_attn.in_proj_weight"] == "vmap"
    assert "MultiheadAttention with add_bias_kv=True" in meta["plan_reasons"]["encoder.self_attn.in_proj_weight"]
    assert set(meta["plan_reasons"]) == {n for n, v in meta["plan"].items() if v == "vmap"}


def test_out_of_memory_in_the_pass_is_not_turned_into_an_input_error():
    # Callers catch OOM to retry with a smaller batch; it must not come back as a ValueError about shapes.
    class Big(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(12, 4)

        def forward(self, x):
            if x.shape[0] > 2:
                raise torch.OutOfMemoryError("simulated: out of memory")
            return self.fc(x)

    ext = GradientExtractor(Big(), dim=4, engine="factored")
    with pytest.raises(torch.OutOfMemoryError):
        ext((torch.randn(8, 12), torch.randint(0, 4, (8,))))
    assert ext((torch.randn(2, 12), torch.tensor([0, 3]))).z.shape == (2, ext.out_dim)


@pytest.mark.parametrize("engine", ["factored", "vmap"])
def test_the_projected_batch_is_built_on_the_models_device(engine, monkeypatch):
    """``z`` is allocated where the pass computes (the first selected parameter's device, looked up per call):
    an output on the host while the pass runs on a GPU made every block's write a copy back and a wait, which
    the CPU cannot show by timing, so the device handed to the allocation is checked here (on a GPU,
    ``tests/test_host_syncs.py`` counts the waits)."""
    from hardmine.factored.layout import ProjectionLayout

    seen: list[torch.device] = []
    inner = ProjectionLayout.new_output

    def recorded(self, batch_size, device):
        seen.append(torch.device(device))
        return inner(self, batch_size, device)

    monkeypatch.setattr(ProjectionLayout, "new_output", recorded)
    torch.manual_seed(0)
    model = MLP(d_in=6, hidden=8, n_classes=3).eval()
    ext = GradientExtractor(model, dim=4, engine=engine)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    for _ in range(2):  # the checked first batch and a steady-state one
        assert ext((x, y)).z.device == next(model.parameters()).device
    assert set(seen) == {next(model.parameters()).device} and len(seen) >= 2  # (the first batch's check too)
    # The model moved after the extractor was built: the next output follows it (meta: a device without data).
    ext.model.to("meta")
    assert ext._device() == torch.device("meta")


def test_a_batch_whose_checks_are_pending_keeps_no_output_data(monkeypatch):
    """Until a batch's device check flag has landed, its recheck is kept: with the output's shape and dtype
    only (a data-less stand-in), not the output itself (a causal LM's (B, T, vocab) logits)."""
    from hardmine.batches import DeferredChecks

    torch.manual_seed(0)
    ext = GradientExtractor(MLP(d_in=6, hidden=8, n_classes=3).eval(), dim=4, engine="factored")
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    ext((x, y))  # the first batch is checked on the host
    monkeypatch.setattr(DeferredChecks, "poll", lambda self, wait=False: None)  # as if the flag had not landed
    pb = ext((x, y))
    ((_, _, recheck),) = ext._checks._pending
    assert recheck.output.device.type == "meta"
    assert recheck.output.shape == pb.output.shape and recheck.output.dtype == pb.output.dtype


def test_a_model_split_across_devices_is_refused_up_front():
    """Selected parameters on several devices (a model loaded with a device_map) would fail mid-pass with a
    device mismatch (both engines sum each sample's squared norm over every selected parameter); the extractor,
    whatever its engine, and the online miner refuse them when built, naming the devices. (meta stands in for a
    second device here.) Selected layers on one device are fine."""
    from hardmine.online import OnlineMiner

    torch.manual_seed(0)
    model = MLP(d_in=6, hidden=8, n_classes=3)
    model.fc1.to("meta")
    builds = [lambda e=e: GradientExtractor(model, dim=4, engine=e) for e in ("auto", "factored", "vmap")]
    for build in [*builds, lambda: OnlineMiner(model, dim=4)]:
        with pytest.raises(ValueError, match=r"on several devices \(cpu, meta\).*Move the model to one device"):
            build()
    GradientExtractor(model, layers="fc2", dim=4, engine="factored")  # the selected layers on one device
    OnlineMiner(model, layers="fc2", dim=4)


def test_a_projection_matrix_regenerated_every_batch_is_said(caplog):
    """A parameter without a factored rule is projected densely; when its matrix does not fit the projector's
    cache (nn.MultiheadAttention's in_proj_weight at dim 256 is several hundred MiB) its blocks are made again
    from their seeds every batch: a slowdown the extractor names when built, instead of leaving it silent."""

    class Big(nn.Module):  # no rule: a (600, 500) matrix of which the forward uses a corner
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(600, 500))

        def forward(self, x):
            return x * self.scale[0, : x.shape[1]]

    model = nn.Sequential(nn.Linear(6, 8), Big(), nn.Linear(8, 3))
    with caplog.at_level("WARNING", logger="hardmine.params"):
        GradientExtractor(model, dim=256, engine="auto")
    assert "1.scale" in caplog.text and "regenerated from their seeds on every batch" in caplog.text
    assert "about 37 MiB" in caplog.text  # 300,000 x 256 float32 is 293 MiB, of which 256 fit the cache
    caplog.clear()
    with caplog.at_level("WARNING", logger="hardmine.params"):
        GradientExtractor(model, dim=16, engine="auto")  # 18 MiB: cached
        GradientExtractor(model, layers="0,2", dim=256, engine="auto")  # the big one left out
    assert "regenerated" not in caplog.text


@pytest.mark.parametrize("n", [1, 3])
def test_resnet18_of_the_gpu_benchmark_is_exact_and_all_factored(n):
    """The ResNet-18 that scripts/bench_extract.py measures (torchvision's architecture: a 7x7/2 stem, 3x3 and
    strided 1x1 convolutions without bias, BatchNorm frozen, a linear classifier): every selected parameter is
    factored and its vectors and norms match the per-sample autograd loop (batch 1 included)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench_extract as be

    model, _ = be.build("resnet18", n)
    ext = GradientExtractor(model.eval(), dim=16, seed=0, engine="auto", loss_fn="cross_entropy")
    assert set(ext.plan.values()) == {"factored"} and not any("bn" in p for p in ext.plan)
    rel_z, rel_n = be.check_agreement("resnet18", target=256, n=n)
    assert rel_z < 1e-5 and rel_n < 1e-5, (rel_z, rel_n)


# -------------------------------------------- what the first batch's exactness check catches (uses rules miss)
def _exact_z(model: nn.Module, batch, ext: GradientExtractor) -> torch.Tensor:
    """The reference loop's gradients, projected with the extractor's layout: what ``ext(batch).z`` must be."""
    ref = reference_per_sample_grads(model, batch)
    return ext.layout.assemble({n: ext.layout.project_exact(n, g) for n, g in ref.grads.items()})


class _TiedMatmul(nn.Module):
    """An embedding whose weight is also the output head, written as a matmul (not a call of the module)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte, self.mix = nn.Embedding(9, 6), nn.Linear(6, 6)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T)
        return (torch.tanh(self.mix(self.wte(ids))) @ self.wte.weight.t()).mean(1)  # (B, 9)


class _SequenceFirst(nn.Module):
    """A torch-default encoder layer (batch_first=False) fed (T, B, E): with T equal to the probe's 3 samples, a
    tensor's first dimension is no test of where the batch is."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, E)
        return self.head(self.enc(x.transpose(0, 1)).mean(0))


@pytest.mark.parametrize("case", ["tied_matmul", "user_hook", "sequence_first"])
def test_uses_the_layer_rules_do_not_see_are_caught_on_the_first_batch(case):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if case == "tied_matmul":
        model, moved = _TiedMatmul().double(), "wte.weight"
        batch = (torch.randint(0, 9, (4, 5), generator=g), torch.randint(0, 9, (4,), generator=g))
    elif case == "user_hook":  # a hook of the user's that changes a selected module's output: the rules see its own
        model, moved = MLP(d_in=5, hidden=6, n_classes=3).double(), None
        scale = torch.tensor([0.5, 2.0, 1.0, 1.5, 0.1, 3.0], dtype=torch.float64)
        model.fc1.register_forward_hook(lambda mod, inp, out: out * scale)
        batch = (torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))
    else:
        model, moved = _SequenceFirst().double().eval(), "enc.linear1.weight"
        batch = (torch.randn(3, 3, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (3,), generator=g))
    ext = GradientExtractor(model, dim=16, seed=3)
    res = ext(batch)
    assert_close(res.z, _exact_z(model, batch, ext), rtol=1e-4, atol=1e-6)
    plan, reasons = ext.metadata()["plan"], ext.metadata()["plan_reasons"]
    if moved is None:  # nothing to move: the hook runs after the rules' own
        assert set(plan.values()) == {"factored"}
    else:
        assert plan[moved] == "vmap" and "differ from the exact ones" in reasons[moved], reasons
        with pytest.raises(ValueError, match="differ from the exact ones"):
            GradientExtractor(model, dim=16, seed=3, engine="factored")(batch)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_first_batchs_exactness_check_allows_the_rounding_of_a_pass_under_autocast(dtype):
    # float32 weights, low-precision activations: the factored and the exact vectors differ by the autocast dtype's
    # rounding (0.11 for this model and seed in bfloat16), which must not refuse the factored engine
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 10, (8,), generator=g)
    batch = (torch.randn(8, 784, generator=g), y)
    with torch.autocast("cpu", dtype=dtype):
        ext = GradientExtractor(model, dim=64, seed=0, engine="factored")
        z = ext(batch).z
    assert set(ext.metadata()["plan"].values()) == {"factored"}
    exact = GradientExtractor(model, dim=64, seed=0, engine="vmap")(batch).z
    gap = torch.linalg.vector_norm(z - exact) / torch.linalg.vector_norm(exact)
    assert 0 < gap < 0.25  # rounded, and by no more than the tolerance


def test_batchnorm_without_running_statistics_is_refused_in_eval_mode_too():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.Linear(6, 3)).eval()
    batch = (torch.randn(5, 4), torch.randint(0, 3, (5,)))
    for engine in ("auto", "vmap"):
        with pytest.raises(ValueError, match=r"BatchNorm module\(s\) \['1'\] keep no running statistics"):
            GradientExtractor(model, dim=8, engine=engine)(batch)
    model.train()  # in training mode too, this is what to fix first (model.eval() would not)
    with pytest.raises(ValueError, match=r"BatchNorm module\(s\) \['1'\] keep no running statistics"):
        GradientExtractor(model, dim=8, engine="auto")(batch)


def test_a_first_batch_of_one_sample_is_checked_again_on_the_first_larger_one():
    # One sample cannot show a module called on (1, T) position ids broadcast over the batch: the first larger
    # batch is probed again, so the module is expanded per sample there instead of refused
    class Positions(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok, self.pos, self.head = nn.Embedding(11, 8), nn.Embedding(6, 8), nn.Linear(8, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T)
            p = torch.arange(ids.shape[1])[None]  # (1, T)
            return self.head(torch.tanh(self.tok(ids) + self.pos(p)).mean(1))

    torch.manual_seed(0)
    model = Positions().double().eval()
    g = torch.Generator().manual_seed(1)
    ids, y = torch.randint(0, 11, (4, 6), generator=g), torch.randint(0, 3, (4,), generator=g)
    ext = GradientExtractor(model, dim=16, seed=3)
    first = ext((ids[:1], y[:1]))
    assert_close(first.z, _exact_z(model, (ids[:1], y[:1]), ext), rtol=1e-4, atol=1e-6)
    res = ext((ids, y))
    assert_close(res.z, _exact_z(model, (ids, y), ext), rtol=1e-4, atol=1e-6)
    assert set(ext.metadata()["plan"].values()) == {"factored"}
