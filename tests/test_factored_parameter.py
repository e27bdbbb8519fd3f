"""Parameters a model uses without a module (hardmine.factored.parameter): a ViT's class token and position
embedding are factored -- exact against the per-sample autograd loop, the same vectors as the vmap engine --
and a parameter the model does not use row by row, or whose forward fails on the per-sample copy, is refused
with the reason (vmap under auto); nothing is left on the model."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_factored import _check_pass
from torch import nn
from torch.testing import assert_close

from hardmine.engine import GradientExtractor
from hardmine.extract import reference_per_sample_grads
from hardmine.factored import plan_factored
from hardmine.online import OnlineMiner


class Tokens(nn.Module):
    """A ViT in small: patches -> [class token; patches] + position embedding -> LayerNorm -> head, with the
    class token and position embedding as bare parameters (``use`` picks how the model reads them)."""

    def __init__(self, d: int = 6, n: int = 4, use: str = "vit") -> None:
        super().__init__()
        self.use = use
        self.patch = nn.Linear(5, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, n + 1, d))
        if use == "long":
            self.extra = nn.Parameter(torch.randn(1, d))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, n, 5)
        h = self.patch(x)  # (B, n, d)
        b = h.shape[0]
        if self.use == "row0":  # every sample reads the first row of the class token
            cls = self.cls[:1].expand(b, -1, -1)
        elif self.use == "view":  # a reshape that needs the (1, ...) shape
            cls = self.cls.view(1, 1, -1).expand(b, -1, -1)
        else:
            cls = self.cls.expand(b, -1, -1)  # (B, 1, d)
        if self.use == "interp" and h.shape[1] != self.pos.shape[1] - 1:  # (1, n + 1, d) -> (1, T + 1, d)
            pos = self.pos.reshape(1, self.pos.shape[1], -1).transpose(1, 2)  # (1, d, n + 1)
            pos = nn.functional.interpolate(pos, size=h.shape[1] + 1, mode="linear").transpose(1, 2)
        else:
            pos = self.pos
        h = torch.cat([cls, h], 1) + pos  # (B, n + 1, d)
        h = torch.tanh(self.norm(h))
        if self.use == "twice":  # the position embedding read a second time
            h = h * self.pos.sigmoid()
        if self.use == "long" and x.shape[1] > 4:  # a longer input: a third parameter, reshaped as (1, ...)
            h = h + self.extra.reshape(1, 1, -1)
        return self.head(h[:, 0] + h[:, 1:].mean(1))  # (B, 3)


def _batch(b: int, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(b)
    return torch.randn(b, n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (b,), generator=g)


@pytest.mark.parametrize("b", [1, 2, 5])
@pytest.mark.parametrize("use", ["vit", "twice"])
def test_class_token_and_position_embedding_are_exact(use, b):
    torch.manual_seed(0)
    model = Tokens(use=use).double()
    before = {k: v for k, v in model.named_parameters()}
    fg, _ = _check_pass(model, _batch(b))
    assert fg.vectors["cls"].shape == (b, 1, 1, 6) and fg.vectors["pos"].shape == (b, 1, 5, 6)
    # the model holds its own Parameter objects again
    assert dict(model.named_parameters()) == before
    assert all(type(p) is nn.Parameter for p in model.parameters())


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 6), n=st.integers(1, 5), d=st.integers(2, 7))
def test_any_shape_is_exact(b, n, d):
    torch.manual_seed(b * 100 + n * 10 + d)
    _check_pass(Tokens(d=d, n=n).double(), _batch(b, n))


def test_planned_as_units_of_their_own_and_the_same_vectors_as_vmap():
    torch.manual_seed(0)
    model = Tokens().double()
    units, rejected = plan_factored(model, ["cls", "pos", "patch.weight"])
    assert not rejected and set(units) == {"cls", "pos", "patch"}
    assert units["cls"].label == "cls (parameter of Tokens)" and units["cls"].params == ["cls"]
    assert units["pos"].swaps_parameter and not units["patch"].swaps_parameter
    batch = _batch(5)
    auto = GradientExtractor(model, dim=16, seed=3)
    z = auto(batch)
    assert set(auto.plan.values()) == {"factored"} and auto.metadata()["plan_checked"]
    ref = GradientExtractor(model, dim=16, seed=3, engine="vmap")(batch)
    assert_close(z.z, ref.z)
    assert_close(z.grad_norm, ref.grad_norm)
    assert_close(auto(_batch(3)).z, GradientExtractor(model, dim=16, seed=3, engine="vmap")(_batch(3)).z)


def test_a_parameter_inside_a_named_module_is_swapped_there():
    torch.manual_seed(0)
    model = nn.Sequential(Tokens()).double()
    units, rejected = plan_factored(model, None or [n for n, _ in model.named_parameters()])
    assert not rejected and units["0.cls"].module is model[0] and units["0.cls"].label == "0.cls (parameter of Tokens)"
    _check_pass(model, _batch(3))


@pytest.mark.parametrize(
    ("use", "why"),
    [
        (
            "row0",
            "cls (parameter of Tokens): it is a parameter of shape (1, ...) the model broadcasts over the batch, and "
            "sample 1's output depends on other samples' rows of its copy expanded to the batch (the model does not "
            "use it row by row)",
        ),
        (
            "view",
            "cls (parameter of Tokens): it is a parameter of shape (1, ...) the model broadcasts over the batch, and "
            "the model's forward fails when it is expanded to one row per sample (RuntimeError: Sizes of tensors "
            "must match",
        ),
    ],
)
def test_a_parameter_not_used_row_by_row_is_refused_and_goes_to_vmap(use, why, caplog):
    torch.manual_seed(0)
    model = Tokens(use=use).double()
    batch = _batch(3)
    with pytest.raises(ValueError) as err:
        GradientExtractor(model, dim=16, engine="factored")(batch)
    assert f"cannot attribute these modules per sample: {why}" in str(err.value)
    auto = GradientExtractor(model, dim=16)
    z = auto(batch)
    plan = auto.metadata()
    assert plan["plan"]["cls"] == "vmap" and plan["plan_reasons"]["cls"].startswith(why.split(": ", 1)[1])
    # The row check is per parameter: the other one stays factored. A failing forward does not say which
    # copy it failed on, so every parameter swapped in it is refused. The modules stay factored; the mixed
    # plan is exact.
    assert plan["plan"]["pos"] == ("factored" if use == "row0" else "vmap")
    assert plan["plan"]["patch.weight"] == "factored"
    assert_close(z.z, GradientExtractor(model, dim=16, engine="vmap")(batch).z)
    assert_close(z.grad_norm, reference_per_sample_grads(model, batch).grad_norm)
    assert type(model.cls) is nn.Parameter and type(model.pos) is nn.Parameter


class _MyConv(nn.Conv1d):
    pass


class Weights(nn.Module):
    """Parameters that are not tokens: a (1,) scale, torch modules whose weight starts with a 1, one shared."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.conv = _MyConv(4, 1, 3)  # weight (1, 4, 3), a subclass of a torch module
        self.act = nn.PReLU()  # weight (1,)
        self.a = Tokens()
        self.b = Tokens()
        self.b.cls = self.a.cls  # one class token held by two modules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x) + self.act(self.conv(x)).mean((1, 2)).unsqueeze(1) * self.scale


def test_only_token_shaped_parameters_of_the_models_own_modules_held_once_are_planned():
    model = Weights()
    units, rejected = plan_factored(model, [n for n, _ in model.named_parameters()])
    assert {k for k, u in units.items() if u.swaps_parameter} == {"a.pos", "b.pos"}
    assert "Weights has no factored layer rule" in rejected["scale"]  # (1,): a scalar
    assert "_MyConv has no factored layer rule" in rejected["conv.weight"]
    assert "PReLU has no factored layer rule" in rejected["act.weight"]
    assert "shared by ['a.cls', 'b.cls']" in rejected["a.cls"]
    x = torch.randn(3, 4, 5)
    batch = (x.double(), torch.randint(0, 3, (3,)))
    model = model.double()
    ext = GradientExtractor(model, dim=16)
    assert_close(ext(batch).z, GradientExtractor(model, dim=16, engine="vmap")(batch).z)


@pytest.mark.parametrize("engine", ["factored", "auto"])
def test_a_first_batch_of_one_sample_is_checked_again_on_the_first_larger_batch(engine):
    # One sample cannot show that cls/pos are broadcast over the batch: the first batch of several samples is
    # probed again, and the copies it approves give exact vectors (no refusal, nothing moved to vmap).
    torch.manual_seed(0)
    model = Tokens().double()
    ext = GradientExtractor(model, dim=16, engine=engine)
    one = ext(_batch(1))
    assert_close(one.grad_norm, reference_per_sample_grads(model, _batch(1)).grad_norm)
    assert_close(ext(_batch(1, 4)).z, GradientExtractor(model, dim=16, engine="vmap")(_batch(1)).z)
    for b in (3, 4):
        z = ext(_batch(b))
        assert_close(z.z, GradientExtractor(model, dim=16, engine="vmap")(_batch(b)).z)
        assert_close(z.grad_norm, reference_per_sample_grads(model, _batch(b)).grad_norm)
    assert ext.plan["cls"] == ext.plan["pos"] == "factored"
    assert type(model.cls) is nn.Parameter


def test_under_auto_a_later_batch_the_forward_fails_on_moves_them_to_vmap():
    """A position embedding interpolated to a longer input by ``reshape(1, ...)`` (as Hugging Face's ViT does for
    a new image size): the probe's batch did not need it, a later one does; auto redoes that batch by vmap."""
    torch.manual_seed(0)
    model = Tokens(use="interp").double()
    ext = GradientExtractor(model, dim=16)
    ext(_batch(3))
    assert ext.plan["pos"] == "factored"
    longer = _batch(3, 6)
    z = ext(longer)
    assert ext.plan["cls"] == ext.plan["pos"] == "vmap"
    assert ext.metadata()["plan_reasons"]["pos"].startswith(
        "a later batch failed with it swapped for a per-sample copy (the model's forward failed on per-sample input "
        "shapes {'inputs': (6, 5)}: The size of tensor a (6) must match"
    )
    assert_close(z.z, GradientExtractor(model, dim=16, engine="vmap")(longer).z)
    with pytest.raises(ValueError, match=r"The size of tensor a \(6\) must match"):
        factored = GradientExtractor(model, dim=16, engine="factored")
        factored(_batch(3))
        factored(longer)


def test_under_auto_a_bad_later_batch_is_refused_and_the_plan_kept():
    """A batch that fails without the copies too is not their doing: the pass's error, the plan unchanged."""
    torch.manual_seed(0)
    model = Tokens().double()
    ext = GradientExtractor(model, dim=16)
    ext(_batch(3))
    with pytest.raises(ValueError, match=r"the model's forward failed on per-sample input shapes \{'inputs': \(9, 5\)\}"):
        ext((torch.randn(3, 9, 5, dtype=torch.float64), torch.randint(0, 3, (3,))))  # 9 patches: pos has 5
    assert set(ext.plan.values()) == {"factored"} and not ext.metadata()["plan_reasons"]
    assert_close(ext(_batch(4)).z, GradientExtractor(model, dim=16, engine="vmap")(_batch(4)).z)


class Queries(nn.Module):
    """Learned queries through a Linear of their own, and a position embedding interpolated by ``reshape(1, ...)``
    for a longer input: the retry without the copies must probe again (``qproj`` saw the copy's rows before)."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, 2, d))
        self.qproj = nn.Linear(d, d)
        self.patch = nn.Linear(5, d)
        self.pos = nn.Parameter(torch.randn(1, 4, d))
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 5)
        h = self.patch(x)  # (B, T, d)
        pos = self.pos
        if h.shape[1] != pos.shape[1]:
            pos = pos.reshape(1, pos.shape[1], -1).transpose(1, 2)  # (1, d, 4)
            pos = nn.functional.interpolate(pos, size=h.shape[1], mode="linear").transpose(1, 2)  # (1, T, d)
        q = self.qproj(self.queries).expand(h.shape[0], -1, -1)  # (B, 2, d)
        return self.head(torch.tanh(torch.cat([q, h + pos], 1)).mean(1))  # (B, 3)


def test_under_auto_the_retry_without_the_copies_probes_the_batch_again():
    torch.manual_seed(0)
    model = Queries().double()
    ext = GradientExtractor(model, dim=16)
    ext(_batch(3))
    assert ext.plan["queries"] == ext.plan["pos"] == ext.plan["qproj.weight"] == "factored"
    longer = _batch(3, 6)
    z = ext(longer)
    assert ext.plan["queries"] == ext.plan["pos"] == "vmap" and ext.plan["head.weight"] == "factored"
    assert_close(z.z, GradientExtractor(model, dim=16, engine="vmap")(longer).z)
    assert_close(ext(_batch(4)).z, GradientExtractor(model, dim=16, engine="vmap")(_batch(4)).z)


def test_under_auto_the_retry_raises_the_batchs_own_error_and_keeps_the_plan():
    torch.manual_seed(0)
    model = Queries().double()
    ext = GradientExtractor(model, dim=16)
    ext(_batch(3))
    x, _ = _batch(3, 6)
    with pytest.raises(ValueError, match=r"label 7 is out of range for a model with 3 outputs"):
        ext((x, torch.tensor([0, 7, 1])))  # needs the fallback, and has a bad label
    assert set(ext.plan.values()) == {"factored"}


def test_a_parameter_only_some_probe_samples_read_is_refused():
    """Sample 0 reading row 0 looks like use row by row; the other probe samples, which skip the token, show
    nothing. Every probe sample must reach its own row, or the parameter goes to vmap."""

    class Gated(Tokens):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # the class token only through the gated row 0
            gate = (x[:, 0, :1] > 0).to(x.dtype)  # (B, 1): whether the sample adds the token's first row
            h = torch.tanh(self.norm(self.patch(x) + self.pos[:, 1:]))  # (B, n, d)
            return self.head(h.mean(1) + gate * self.cls[0, 0])  # (B, 3)

    torch.manual_seed(0)
    model = Gated().double()
    x, y = _batch(3)
    x[:, 0, 0] = torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)  # only sample 0 reads it on the probe
    ext = GradientExtractor(model, dim=16)
    ext((x, y))
    assert ext.plan["cls"] == "vmap" and "no gradient reached sample 1's own row" in ext.metadata()["plan_reasons"]["cls"]
    x2, y2 = _batch(4)
    x2[:, 0, 0] = 1.0  # every sample reads row 0 now
    assert_close(ext((x2, y2)).z, GradientExtractor(model, dim=16, engine="vmap")((x2, y2)).z)


def test_a_parameter_no_gradient_reached_in_the_probe_is_refused():
    """Checking row by row proves nothing where the probe's outputs do not reach the copy: a parameter the first
    batch does not use, or one hidden behind a zero-initialised head, goes to vmap."""
    torch.manual_seed(0)
    model = Tokens(use="long").double()
    ext = GradientExtractor(model, dim=16)
    ext(_batch(3, 4))  # 4 patches: `extra` is not used
    why = ext.metadata()["plan_reasons"]["extra"]
    assert why == (
        "it is a parameter of shape (1, ...) the model broadcasts over the batch, and on the first batch no gradient "
        "reached sample 0's own row of its copy, so how the model reads it could not be checked"
    )
    assert ext.plan["cls"] == "factored"
    zero = Tokens(use="row0").double()
    zero.head.weight.data.zero_()  # every gradient below the head is zero on the probe
    ext = GradientExtractor(zero, dim=16)
    ext(_batch(3))
    assert ext.plan["cls"] == ext.plan["pos"] == "vmap"
    zero.head.weight.data.normal_()  # training moves the head: cls, read as row 0 by every sample, stays exact
    assert_close(ext(_batch(3)).z, GradientExtractor(zero, dim=16, engine="vmap")(_batch(3)).z)


def test_a_failing_forward_leaves_the_parameters_on_the_model():
    torch.manual_seed(0)
    model = Tokens().double()
    cls, pos = model.cls, model.pos
    ext = GradientExtractor(model, dim=16, engine="factored")
    ext(_batch(3))
    with pytest.raises(ValueError):
        ext((torch.randn(3, 9, 5, dtype=torch.float64), torch.randint(0, 3, (3,))))  # 9 patches: pos has 5
    assert model.cls is cls and model.pos is pos and type(cls) is nn.Parameter


def test_the_online_miner_refuses_them_with_the_reason():
    model = Tokens()
    with pytest.raises(ValueError, match=r"the online miner cannot project cls: cls \(parameter of Tokens\) is used "
                       r"by the model without a module; only the offline scan"):
        OnlineMiner(model, dim=16)
    OnlineMiner(model, layers=["patch", "norm", "head"], dim=16)  # the rest is fine


def test_a_hugging_face_vit_is_factored_whole_and_exact():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    vit = transformers.ViTForImageClassification(cfg).double().eval()
    with torch.no_grad():  # HF starts the class token at zero, where a dropped gradient would go unseen
        vit.vit.embeddings.cls_token.normal_()

    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = vit

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.m(pixel_values=x).logits

    model = Logits()
    batch = (torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (4,)))
    ext = GradientExtractor(model, dim=16)
    z = ext(batch)
    assert set(ext.plan.values()) == {"factored"}
    ref = reference_per_sample_grads(model, batch)
    assert_close(z.grad_norm, ref.grad_norm)
    assert_close(z.z, GradientExtractor(model, dim=16, engine="vmap")(batch).z)


def test_hardmine_layers_lists_them_as_factored():
    from hardmine.cli.cmd_layers import layer_rows

    rows = {r["layer"]: r for r in layer_rows(Tokens())}
    assert rows["<root>"]["params"] == ["cls", "pos"] and rows["<root>"]["engine"] == "factored"
    assert rows["<root>"]["reason"] is None
    rows = {r["layer"]: r for r in layer_rows(Weights())}
    assert rows["<root>"]["engine"] == "vmap" and "Weights has no factored layer rule" in rows["<root>"]["reason"]
    assert rows["a"]["engine"] == "mixed"  # a.pos factored, the shared a.cls not


def test_bench_parameters_quick_runs(tmp_path):
    from test_factored_attention import quick_bench

    pytest.importorskip("transformers")
    rows, md = quick_bench("bench_parameters", tmp_path)
    assert {r["model"] for r in rows} == {"hf_vit", "torch_vit"}
    for r in rows:
        assert r["all_factored"]
        assert max(r["max_rel_err_grad_norm"].values()) < 1e-5
        assert r["factored_samples_per_s"] > 0 and r["before_samples_per_s"] > 0
    assert "| torch_vit | 16 |" in md


def test_a_parameter_copy_the_probe_did_not_approve_is_refused_not_swapped():
    # capture_calls expands only the units in `expand` (what the probe approved); a parameter unit left out of
    # it on a batch of several samples is recorded as refused, and the model keeps its own parameter
    from hardmine.factored.capture import capture_calls, check_calls

    torch.manual_seed(0)
    model = Tokens().double()
    units, _ = plan_factored(model, ["cls"])
    with capture_calls(units, (), batch_size=3, expand=()) as rec:
        assert type(model.cls) is nn.Parameter  # not swapped
        model(_batch(3)[0])
    (call,) = rec["cls"]
    assert call.x is None and call.problem == (
        "it is used broadcast over the batch, which the probe batch did not show (a probe of one sample cannot), "
        "so no per-sample copy of it was checked"
    )
    problems, _ = check_calls(units, rec, 3, later=torch.zeros(3))
    assert problems == {"cls": call.problem}
    with capture_calls(units, (), batch_size=3, expand=("cls",)) as rec:
        assert model._parameters["cls"].shape == (3, 1, 6)  # the per-sample copy
        model(_batch(3)[0])
    assert rec["cls"][0].problem is None and rec["cls"][0].broadcast
    assert type(model.cls) is nn.Parameter


def test_a_probe_of_one_sample_approves_no_parameter_copy():
    # One sample's copy of a (1, ...) parameter is the parameter's own shape: nothing shows it is broadcast, so
    # the probe does not approve a copy for later batches (they would expand it unchecked); two samples do
    from hardmine.factored.capture import probe_units

    torch.manual_seed(0)
    model = Tokens().double()
    units, _ = plan_factored(model, ["cls"])
    problems, protect = probe_units(model, (_batch(1)[0],), units, 1)
    assert problems == {} and protect == set()
    problems, protect = probe_units(model, (_batch(2)[0],), units, 2)
    assert problems == {} and protect == {"cls"}
