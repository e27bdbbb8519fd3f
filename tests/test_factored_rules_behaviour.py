"""The factored layer rules, layout, plan, registry and rule application: behaviour the mutation runs asked
for (issue #18 for conv2d, layout, plan, registry, apply and capture)."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from models import Branch, branch_batches
from test_factored import _check_pass, _expected, _layout, _Shapes
from torch import nn
from torch.testing import assert_close

import hardmine.factored.conv2d as conv2d_rule
import hardmine.factored.registry as registry
from hardmine.engine import GradientExtractor
from hardmine.extract import reference_per_sample_grads
from hardmine.factored import ProjectionLayout, factored_pass
from hardmine.factored.conv1d import Conv1DRule
from hardmine.factored.registry import Call, RuleRequest, rule_for
from hardmine.factored.rmsnorm import WeightOnlyNormRule


def _reason(module: nn.Module, x: torch.Tensor, batch_size: int) -> str | None:
    """Why the factored pass would refuse this call of ``module`` on ``x`` (None: it attributes it per sample)."""
    rule = rule_for(module)
    with torch.no_grad():
        out = module(x)
    return rule.check_call(module, x, out, batch_size)


# ----------------------------------------------------------------------------------------- LayerNorm
def test_layernorm_refuses_an_unbatched_call_and_quotes_its_shape():
    ln = nn.LayerNorm(4)
    assert _reason(ln, torch.randn(3, 4), 3) is None  # (B, d): one position per sample
    assert _reason(ln, torch.randn(3, 5, 4), 3) is None  # (B, T, d)
    why = _reason(ln, torch.randn(4), 4)  # (d,): no batch dimension (its 4 features look like a batch of 4)
    assert why is not None and "unbatched" in why and "(4,)" in why
    ln2 = nn.LayerNorm((2, 3))
    assert _reason(ln2, torch.randn(5, 2, 3), 5) is None
    why = _reason(ln2, torch.randn(2, 3), 2)  # exactly the normalised shape: unbatched
    assert why is not None and "(2, 3)" in why


# ------------------------------------------------------------------------------------ weight-only norms
def test_rmsnorm_refuses_an_unbatched_call_and_quotes_its_shape():
    norm = nn.RMSNorm(4)
    assert _reason(norm, torch.randn(3, 4), 3) is None
    why = _reason(norm, torch.randn(4), 4)
    assert why is not None and "unbatched" in why and "(4,)" in why


class _NamedNorm(nn.Module):
    """A module named like an RMSNorm (so the name pattern claims it), with a configurable forward."""

    def __init__(self, forward, weight=None, extra=False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4)) if weight is None else weight
        if extra:
            self.bias = nn.Parameter(torch.zeros(4))
        self._f = forward

    def forward(self, x):
        return self._f(self, x)


_NamedNorm.__name__ = _NamedNorm.__qualname__ = "ToyRMSNorm"


def _rms(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def test_a_weight_only_norm_is_claimed_and_checked():
    good = _NamedNorm(_rms)
    rule = rule_for(good)
    assert isinstance(rule, WeightOnlyNormRule)
    assert rule.unsupported_reason(good) is None


def test_a_norm_with_more_than_a_weight_is_refused_naming_its_parameters():
    norm = _NamedNorm(lambda self, x: _rms(self, x) + self.bias, extra=True)
    why = rule_for(norm).unsupported_reason(norm)
    assert why is not None and "['weight', 'bias']" in why


@pytest.mark.parametrize(
    ("forward", "expected"),
    [
        (lambda self, x: x * (1.0 + self.weight), "(1 + weight)"),  # a different scaling
        (lambda self, x: x.sum() * self.weight, "not one tensor of its input's shape"),  # wrong shape
        (lambda self, x: (x * self.weight, x), "not one tensor of its input's shape"),  # not a tensor
        (lambda self, x: x @ torch.ones(3, 3) * self.weight, "a forward that fails on a test input of shape (2, 3, 4)"),
    ],
)
def test_a_norm_whose_maths_differ_is_refused_with_the_reason(forward, expected):
    norm = _NamedNorm(forward)
    why = rule_for(norm).unsupported_reason(norm)
    assert why is not None and expected in why


def test_the_failing_forward_reason_names_the_error():
    def boom(self, x):
        raise RuntimeError("no luck")

    norm = _NamedNorm(boom)
    why = rule_for(norm).unsupported_reason(norm)
    assert why is not None and "RuntimeError: no luck" in why


def test_a_norm_whose_weight_cannot_be_tried_is_refused():
    ints = _NamedNorm(_rms, weight=nn.Parameter(torch.ones(4, dtype=torch.int64), requires_grad=False))
    why = rule_for(ints).unsupported_reason(ints)
    assert why is not None and "torch.int64" in why and "cannot check its maths" in why
    meta = _NamedNorm(_rms, weight=nn.Parameter(torch.ones(4, device="meta")))
    why = rule_for(meta).unsupported_reason(meta)
    assert why is not None and "meta" in why


def test_a_weight_only_norm_in_half_precision_passes_its_check():
    # The check's tolerance allows half-precision rounding of the same maths (and nothing looser).
    for dtype in (torch.float16, torch.bfloat16):
        good = _NamedNorm(_rms).to(dtype)
        assert rule_for(good).unsupported_reason(good) is None, dtype
        bad = _NamedNorm(lambda self, x: x * (1.0 + self.weight)).to(dtype)
        assert rule_for(bad).unsupported_reason(bad) is not None, dtype


# ---------------------------------------------------------------------------------------- Embedding
def test_embedding_configurations_the_maths_does_not_cover_are_refused_with_the_reason():
    assert rule_for(nn.Embedding(10, 4)).unsupported_reason(nn.Embedding(10, 4)) is None
    e = nn.Embedding(10, 4, max_norm=1.0)
    assert "max_norm" in rule_for(e).unsupported_reason(e)
    e = nn.Embedding(10, 4, scale_grad_by_freq=True)
    assert "scale_grad_by_freq=True" in rule_for(e).unsupported_reason(e)


def test_embedding_refuses_float_inputs_naming_the_dtype():
    e = nn.Embedding(10, 4)
    rule = rule_for(e)
    ids = torch.tensor([[1, 2], [3, 4]])
    assert rule.check_call(e, ids, e(ids), 2) is None
    x = torch.zeros(2, 2)
    why = rule.check_call(e, x, torch.zeros(2, 2, 4), 2)
    assert why is not None and "torch.float32" in why and "not integer token ids" in why
    why = rule.check_call(e, x.to(torch.complex64), torch.zeros(2, 2, 4), 2)
    assert why is not None and "complex64" in why


# ------------------------------------------------------------------------------------ Conv1D (GPT-2)
def test_conv1d_rule_refuses_a_module_without_a_2d_weight():
    rule = Conv1DRule()
    ok = nn.Module()
    ok.weight = nn.Parameter(torch.zeros(3, 4))
    assert rule.unsupported_reason(ok) is None
    flat = nn.Module()
    flat.weight = nn.Parameter(torch.zeros(3))
    assert "no 2-D weight" in rule.unsupported_reason(flat)
    assert "no 2-D weight" in rule.unsupported_reason(nn.Module())  # no weight at all
    plain = nn.Module()
    plain.weight = [[0.0]]  # not a tensor
    assert "no 2-D weight" in rule.unsupported_reason(plain)


# ------------------------------------------------------------------------------- modules called twice
class _NormTwice(nn.Module):
    """One norm module applied twice (its per-sample gradient is the sum over both calls), on (B, T, d)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norm = norm
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # (B, T, 4)
        h = self.norm(torch.tanh(self.fc(x)))
        return self.head(self.norm(torch.tanh(h) * 2.0).mean(1))


@pytest.mark.parametrize("norm", [nn.LayerNorm(4), nn.RMSNorm(4)], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("b", [1, 3])
def test_a_norm_called_twice_sums_both_calls(norm, b):
    torch.manual_seed(0)
    model = _NormTwice(norm).double()
    with torch.no_grad():
        for p in model.norm.parameters():
            p.uniform_(0.5, 1.5)  # not the initial ones/zeros, so every factor shows
    _check_pass(model, (torch.randn(b, 5, 4, dtype=torch.float64), torch.randint(0, 3, (b,))))


def test_layernorm_refuses_a_call_whose_batch_is_not_on_dimension_0():
    ln = nn.LayerNorm(4)
    why = _reason(ln, torch.randn(5, 3, 4), 3)  # (T, B, d): sequence first
    assert why is not None and "not on dimension 0" in why


def test_rmsnorm_refuses_a_call_whose_batch_is_not_on_dimension_0():
    norm = nn.RMSNorm(4)
    why = _reason(norm, torch.randn(5, 3, 4), 3)  # (T, B, d): sequence first
    assert why is not None and "not on dimension 0" in why


def _rms_weight_first(self, x):
    # the same maths as _rms, multiplied in another order: in half precision the rounding differs (~1e-3)
    return x * (self.weight * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_the_norm_check_allows_half_precision_rounding_only_in_half_precision():
    for dtype in (torch.float16, torch.bfloat16):
        norm = _NamedNorm(_rms_weight_first).to(dtype)
        assert rule_for(norm).unsupported_reason(norm) is None, dtype  # rounding is not another maths
    for dtype in (torch.float32, torch.float64):
        norm = _NamedNorm(_rms_weight_first).to(dtype)
        assert rule_for(norm).unsupported_reason(norm) is None, dtype
        # A scaling ~0.5% away from weight * g(x) (w (1 + 0.01 w), w in [0.5, 1.5]) is another maths in full
        # precision, where the tolerance is 1e-4, though within half precision's 2e-2.
        off = _NamedNorm(lambda self, x: _rms(self, x) * (1 + 0.01 * self.weight)).to(dtype)
        why = rule_for(off).unsupported_reason(off)
        assert why is not None and "not weight * f(input)" in why, dtype


class _Conv1DTwice(nn.Module):
    """GPT-2's Conv1D (weight stored (d_in, d_out)) applied ``calls`` times to two-position inputs (B, 2, 4)."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c = Conv1D(4, 4)  # (nf, nx): d_out 4, d_in 4
        self.head = nn.Linear(4, 3)
        self.calls = calls

    def forward(self, x):  # (B, 2, 4)
        for _ in range(self.calls):
            x = self.c(torch.tanh(x))
        return self.head(x.mean(1))


@pytest.mark.parametrize("calls", [1, 2])
@pytest.mark.parametrize("b", [1, 3])
def test_a_conv1d_on_two_positions_once_or_twice_is_exact(b, calls):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = _Conv1DTwice(calls).double()
    with torch.no_grad():
        model.c.bias.uniform_(-0.5, 0.5)
    _check_pass(model, (torch.randn(b, 2, 4, dtype=torch.float64), torch.randint(0, 3, (b,))))


# ------------------------------------------------------------------------------------------- Linear
@pytest.mark.parametrize("with_out", [False, True])
def test_linear_rule_one_position_with_bias_follows_the_rule_contract(with_out):
    """RuleRequest.out is optional ("or None"): with or without it the one-position route returns the exact
    projections, norms and bias parts, and warns about nothing (no output resized)."""
    torch.manual_seed(0)
    lin = nn.Linear(5, 4)
    x, delta = torch.randn(3, 5), torch.randn(3, 4)  # (B, d_in), (B, d_out)
    p_out, p_in, bias_mat = torch.randn(4, 2), torch.randn(5, 3), torch.randn(4, 6)
    out = torch.empty(3, 2, 3) if with_out else None
    req = RuleRequest(matrix=(p_out, p_in), vectors=("bias",), out=out, vector_mats={"bias": bias_mat})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = rule_for(lin).compute(lin, [Call(x, delta)], req)
    assert_close(res.matrix_proj, torch.einsum("bo,oa,bi,ic->bac", delta, p_out, x, p_in))  # P_out^T d x^T P_in
    assert_close(res.matrix_sq_norm, (delta.norm(dim=1) * x.norm(dim=1)) ** 2)  # ||d x^T||_F^2
    assert_close(res.vectors["bias"], delta)
    assert_close(res.vector_proj["bias"], delta @ bias_mat)
    if "bias" in res.vector_sq_norm:  # optional: the caller computes it when the rule does not give it
        assert_close(res.vector_sq_norm["bias"], delta.norm(dim=1) ** 2)


class _TokenScalar(nn.Module):
    """A Linear with a single output feature on token inputs: (B, T, 4) -> (B, T, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 1)
        self.head = nn.Linear(3, 3)

    def forward(self, x):  # (B, 3, 4)
        return self.head(torch.tanh(self.fc(x)).squeeze(-1))  # (B, 3) -> (B, 3)


@pytest.mark.parametrize("b", [1, 4])
def test_linear_with_one_output_feature_on_token_inputs_is_exact(b):
    # Its bias gradient sums over the positions even though each position has a single output.
    torch.manual_seed(0)
    _check_pass(_TokenScalar().double(), (torch.randn(b, 3, 4, dtype=torch.float64), torch.randint(0, 3, (b,))))


# ---------------------------------------------------------------------------------------- Embedding
class _EmbedTwice(nn.Module):
    """One embedding (with a padding id) looked up twice, on two token tensors of different lengths."""

    def __init__(self, vocab: int = 12, d: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.head = nn.Linear(d, 3)

    def forward(self, ids):  # (B, 7): the first 4 and the last 3 tokens are looked up separately
        a, b = self.emb(ids[:, :4]), self.emb(ids[:, 4:])  # (B, 4, d), (B, 3, d)
        return self.head(torch.tanh(a).mean(1) + b.sum(1))


@pytest.mark.parametrize("b", [1, 3])
def test_an_embedding_looked_up_twice_is_exact(b):
    torch.manual_seed(0)
    ids = torch.randint(0, 12, (b, 7))
    ids[0, 1] = 0  # a padding token
    ids[0, 5] = ids[0, 2]  # the same id in both lookups: its two gradients meet in one row
    _check_pass(_EmbedTwice().double(), (ids, torch.randint(0, 3, (b,))))


def test_embedding_norms_of_a_float64_model_are_float64_exact():
    torch.manual_seed(0)
    model = _EmbedTwice().double()
    batch = (torch.randint(1, 12, (3, 7)), torch.randint(0, 3, (3,)))
    layout = ProjectionLayout(model, ["emb.weight"], dim=12, seed=5)
    fg = factored_pass(model, batch, layout)
    ref = reference_per_sample_grads(model, batch, params=["emb.weight"])
    assert fg.sq_norm.dtype == torch.float64
    assert_close(fg.sq_norm, ref.grad_norm.square(), rtol=1e-12, atol=0.0)  # not float32-rounded


@pytest.mark.parametrize("padding", [None, 0])
def test_embedding_norms_of_long_inputs_over_a_small_table_in_several_chunks(monkeypatch, padding):
    # 12 tokens over a 4 x 3 table: the norm is taken from each sample's scattered (vocab, d) gradient, and a
    # tiny chunk budget makes that one sample per chunk.
    import hardmine.factored.registry as registry

    monkeypatch.setattr(registry, "CHUNK_ELEMENTS", 12)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(4, 3, padding_idx=padding)
            self.head = nn.Linear(3, 3)

        def forward(self, ids):  # (B, 12)
            return self.head(torch.tanh(self.emb(ids)).mean(1))

    torch.manual_seed(0)
    _check_pass(Net().double(), (torch.randint(0, 4, (4, 12)), torch.randint(0, 3, (4,))))


# ------------------------------------------------------------------------------------------- Conv2d
class _ConvTwice(nn.Module):
    """One Conv2d applied to the full image and to a half-resolution copy: its gradient sums both calls,
    which see different numbers of output positions."""

    def __init__(self, c_in: int, c_out: int, **conv) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1, **conv)
        self.head = nn.Linear(2 * c_out, 3)

    def forward(self, x):  # (B, c_in, 8, 8)
        full = torch.tanh(self.conv(x)).mean((2, 3))  # (B, c_out)
        half = torch.tanh(self.conv(x[..., ::2, ::2])).amax((2, 3))  # (B, c_out)
        return self.head(torch.cat([full, half], 1))


@pytest.mark.parametrize(
    ("c_in", "c_out", "conv"),
    [(3, 4, {}), (3, 4, dict(bias=False)), (16, 2, {}), (3, 1, {})],
    ids=["bias", "nobias", "16-channels", "one-output-channel"],
)
@pytest.mark.parametrize("b", [1, 3])
def test_a_conv2d_called_twice_on_different_sizes_sums_both_calls(c_in, c_out, conv, b):
    # 16 input channels: the layer the CPU would give the grouped-convolution route if it were called once.
    torch.manual_seed(0)
    model = _ConvTwice(c_in, c_out, **conv).double()
    _check_pass(model, (torch.randn(b, c_in, 8, 8, dtype=torch.float64), torch.randint(0, 3, (b,))), dim=16)


@pytest.mark.parametrize("c_in", [3, 16], ids=["unfold", "grouped"])
def test_a_single_output_channel_conv2d_is_exact(c_in):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(c_in, 1, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(64, 3)).double()
    _check_pass(model, (torch.randn(3, c_in, 8, 8, dtype=torch.float64), torch.randint(0, 3, (3,))), dim=16)


class _AutocastConv(nn.Module):
    """A convolution the model runs under CPU autocast: it sees a float32 input and returns bfloat16."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.conv(x)  # (B, 4, 8, 8) bfloat16
        return self.head(torch.tanh(h.float()).mean((2, 3)))


@pytest.mark.parametrize("c_in", [3, 16], ids=["unfold", "grouped"])
def test_a_conv2d_under_autocast_gets_its_bfloat16_gradients(c_in):
    # The input arrives in float32 and the output gradient in bfloat16: the rule computes in the gradient's
    # dtype, so the projection and the norm are the reference's up to bfloat16 rounding.
    torch.manual_seed(0)
    model = _AutocastConv(c_in)
    batch = (torch.randn(3, c_in, 8, 8), torch.randint(0, 3, (3,)))
    layout = _layout(model, "conv", dim=16)
    fg = factored_pass(model, batch, layout)
    ref = reference_per_sample_grads(model, batch, params="conv")
    assert fg.kron["conv.weight"].dtype == torch.bfloat16
    assert fg.sq_norm.dtype == torch.float32  # summed in the model output's dtype
    assert_close(fg.kron["conv.weight"].float(), _expected(layout, ref, "conv.weight").float(), rtol=0.05, atol=0.02)
    assert_close(fg.vectors["conv.bias"].float(), ref.grads["conv.bias"], rtol=0.05, atol=0.01)
    assert_close(fg.sq_norm.float(), ref.grad_norm.square(), rtol=0.03, atol=1e-4)


def test_conv2d_refuses_an_unbatched_call_and_quotes_its_shape():
    # nn.Conv2d accepts one unbatched (C, H, W) image; here C_in == C_out == the batch size, so only the
    # dimension count tells that the first dimension is not the batch.
    conv = nn.Conv2d(3, 3, 3, padding=1)
    why = _reason(conv, torch.randn(3, 8, 8), 3)
    assert why is not None and "(3, 8, 8)" in why and "(B, C, H, W)" in why
    assert _reason(conv, torch.randn(3, 3, 8, 8), 3) is None


def test_conv2d_refuses_a_call_whose_batch_is_not_on_dimension_0():
    conv = nn.Conv2d(3, 4, 3)
    why = _reason(conv, torch.randn(5, 3, 8, 8), 3)  # a 4-D input, but 5 rows for a batch of 3
    assert why is not None and "not on dimension 0" in why


@pytest.mark.parametrize("route", ["unfold", "grouped"])
def test_conv2d_temporaries_stay_within_the_chunk_budget(route, monkeypatch):
    # Whichever route a layer takes, its per-sample temporaries (unfolded patches, the padded input, per-sample
    # gradients) come a bounded chunk of samples at a time: none exceeds CHUNK_ELEMENTS.
    budget = 4400  # one sample per chunk on either route (2448 and 2752 elements per sample)
    monkeypatch.setattr(registry, "CHUNK_ELEMENTS", budget)
    b, c_in = 16, (16 if route == "grouped" else 4)
    if route == "unfold":
        monkeypatch.setattr(conv2d_rule, "GROUPED_MIN_CHANNELS", 10**6)
    model = nn.Sequential(nn.Conv2d(c_in, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 64, 3))
    batch = (torch.randn(b, c_in, 8, 8), torch.randint(0, 3, (b,)))
    layout = _layout(model, "0", dim=16)
    cols, positions = c_in * 9, 64
    with _Shapes() as mode:
        fg = factored_pass(model, batch, layout)
    per_sample = {
        (c_in, 10, 10),  # the padded input of the grouped route, per sample
        (cols, positions),  # unfolded patches
        (positions, cols),
        (4, cols),  # per-sample weight gradients
    }
    chunked = [s for s in mode.shapes if len(s) >= 3 and any(s[-len(p):] == p for p in per_sample)]
    assert chunked and max(math.prod(s) for s in chunked) <= budget
    ref = reference_per_sample_grads(model, batch, params="0")
    assert_close(fg.sq_norm.sqrt(), ref.grad_norm, rtol=1e-4, atol=1e-6)


def test_conv2d_takes_the_grouped_route_only_on_the_devices_listed(monkeypatch):
    # A layer with many input channels takes the grouped route on the CPU, and the unfold route on a device not
    # in GROUPED_DEVICES (a GPU, until measured): seen here by which temporaries the pass makes.
    model = nn.Sequential(nn.Conv2d(16, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 64, 3))
    batch = (torch.randn(4, 16, 8, 8), torch.randint(0, 3, (4,)))
    layout = _layout(model, "0", dim=16)
    unfolded = (16 * 9, 64)  # (cols, positions): patches of the unfold route
    taken = {}
    for devices in (frozenset({"cpu"}), frozenset({"cuda"})):
        monkeypatch.setattr(conv2d_rule, "GROUPED_DEVICES", devices)
        with _Shapes() as mode:
            fg = factored_pass(model, batch, layout)
        taken[devices] = any(s[-2:] == unfolded for s in mode.shapes if len(s) >= 2)
        ref = reference_per_sample_grads(model, batch, params="0")
        assert_close(fg.sq_norm.sqrt(), ref.grad_norm, rtol=1e-4, atol=1e-6)
    assert taken == {frozenset({"cpu"}): False, frozenset({"cuda"}): True}


@pytest.mark.parametrize("api", ["fp32_precision", "legacy"])
def test_grouped_convolutions_on_a_gpu_run_in_float32_and_restore_the_setting(api, monkeypatch):
    cudnn = torch.backends.cudnn
    if api == "legacy":
        monkeypatch.setattr(cudnn, "conv", None, raising=False)  # a torch before the fp32_precision API

        def read():
            return cudnn.allow_tf32
    else:
        if not hasattr(getattr(cudnn, "conv", None), "fp32_precision"):
            pytest.skip("this torch has no fp32_precision API")

        def read():
            return cudnn.conv.fp32_precision
    before = read()
    with conv2d_rule._float32_convolutions(torch.device("cpu")):
        assert read() == before  # nothing changes off a GPU
    with pytest.raises(RuntimeError, match="inside"):
        with conv2d_rule._float32_convolutions(torch.device("cuda", 0)):
            assert read() == (False if api == "legacy" else "ieee")
            raise RuntimeError("inside")
    assert read() == before


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
@pytest.mark.parametrize("padding", [(0, 2), (2, 1)])
@pytest.mark.parametrize("c_in", [3, 16], ids=["unfold", "grouped"])
def test_conv2d_with_different_padding_in_height_and_width_is_exact(padding, padding_mode, c_in):
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, 4, 3, padding=padding, padding_mode=padding_mode)
    with torch.no_grad():
        n = conv(torch.zeros(1, c_in, 7, 9)).numel()
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(n, 3)).double()
    _check_pass(model, (torch.randn(3, c_in, 7, 9, dtype=torch.float64), torch.randint(0, 3, (3,))), dim=16)


# ------------------------------------------------------------------------------------------- layout
def _mlp_layout():
    from models import MLP

    model = MLP()
    return model, _layout(model, dim=16)


def test_assemble_places_every_block_at_its_offset_as_float32():
    # (B, a, b) Kronecker parts and (B, width) dense parts of any float dtype land in their own columns.
    model, layout = _mlp_layout()
    torch.manual_seed(0)
    b = 3
    parts = {}
    for name, blk in layout.blocks.items():
        shape = (b, *blk.factors) if blk.factors is not None else (b, blk.width)
        parts[name] = torch.randn(shape, dtype=torch.float64)
    z = layout.assemble(parts)
    assert z.dtype == torch.float32 and z.shape == (b, layout.out_dim)
    for name, blk in layout.blocks.items():
        assert torch.equal(z[:, blk.offset : blk.offset + blk.width], parts[name].reshape(b, -1).float())
    assert layout.out_dim == sum(blk.width for blk in layout.blocks.values())


def test_assemble_names_the_parameters_it_has_no_projection_for():
    _, layout = _mlp_layout()
    parts = {name: torch.zeros(2, blk.width) for name, blk in layout.blocks.items()}
    del parts["fc2.bias"], parts["fc1.weight"]
    with pytest.raises(ValueError, match=r"no projection for parameter\(s\) \['fc1.weight', 'fc2.bias'\]"):
        layout.assemble(parts)


def test_block_view_is_the_blocks_columns_of_the_output():
    _, layout = _mlp_layout()
    z = torch.zeros(2, layout.out_dim)
    kron, dense = layout.blocks["fc1.weight"], layout.blocks["fc1.bias"]
    view = layout.block_view(z, "fc1.weight")
    assert view.shape == (2, *kron.factors)
    view.fill_(1.0)  # a view: writing it writes the block's columns of z
    col = layout.block_view(z, "fc1.bias")
    assert col.shape == (2, dense.width)
    col.fill_(2.0)
    assert z[:, kron.offset : kron.offset + kron.width].eq(1).all()
    assert z[:, dense.offset : dense.offset + dense.width].eq(2).all()
    assert int(z.eq(0).sum()) == 2 * (layout.out_dim - kron.width - dense.width)


def test_project_exact_returns_float32_for_float64_gradients():
    _, layout = _mlp_layout()
    for name, blk in layout.blocks.items():
        grad = torch.randn(4, *blk.shape, dtype=torch.float64)
        z = layout.project_exact(name, grad)
        assert z.dtype == torch.float32 and z.shape == (4, blk.width), name


@pytest.mark.parametrize(
    ("kernel", "padding", "hw"),
    [(3, 4, (16, 4)), ((2, 1), "same", (10, 6)), ((1, 2), "same", (6, 10))],
    ids=["padded-4", "same-odd-height", "same-odd-width"],
)
@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
def test_the_grouped_route_counts_the_padded_input_in_its_chunks(kernel, padding, hw, monkeypatch):
    # One output channel: the per-sample padded input (16 channels) is the route's largest temporary, so a
    # chunk must be sized by it; "same" with an even kernel pads one side only.
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 1, kernel, padding=padding)
    (h, w), (kh, kw) = hw, conv.kernel_size
    pads = conv2d_rule._pad_amounts(conv)  # [left, right, top, bottom]
    padded = (16, h + pads[2] + pads[3], w + pads[0] + pads[1])
    assert math.prod(padded) > 16 * h * w  # the padding is real
    one_sample = math.prod(padded) + 2 * 16 * kh * kw  # the padded input and two (1, cols) gradients
    budget = 3 * one_sample // 2  # one sample per chunk
    monkeypatch.setattr(registry, "CHUNK_ELEMENTS", budget)
    with torch.no_grad():
        n = conv(torch.zeros(1, 16, h, w)).numel()
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(n, 3))
    batch = (torch.randn(4, 16, h, w), torch.randint(0, 3, (4,)))
    shapes = []
    real = conv2d_rule.Conv2dRule.compute

    def recorded(self, module, calls, request):  # every tensor the rule forms
        with _Shapes() as mode:
            res = real(self, module, calls, request)
        shapes.extend(mode.shapes)
        return res

    monkeypatch.setattr(conv2d_rule.Conv2dRule, "compute", recorded)
    fg = factored_pass(model, batch, _layout(model, "0", dim=16))
    assert any(s[1:] == padded for s in shapes)  # the grouped route padded its input
    assert max(math.prod(s) for s in shapes) <= budget
    ref = reference_per_sample_grads(model, batch, params="0")
    assert_close(fg.sq_norm.sqrt(), ref.grad_norm, rtol=1e-4, atol=1e-6)


def test_describe_records_every_blocks_place_and_seed_keys():
    _, layout = _mlp_layout()  # MLP: fc1 (16 x 12), fc2 (4 x 16); dim 16 = 4 x 4
    assert layout.describe() == [
        {"param": "fc1.weight", "kind": "kron", "shape": [16, 12], "offset": 0, "width": 16, "factors": [4, 4],
         "keys": ["fc1.weight:out", "fc1.weight:in"]},
        {"param": "fc1.bias", "kind": "dense", "shape": [16], "offset": 16, "width": 4, "key": "fc1.bias"},
        {"param": "fc2.weight", "kind": "kron", "shape": [4, 16], "offset": 20, "width": 16, "factors": [4, 4],
         "keys": ["fc2.weight:out", "fc2.weight:in"]},
        {"param": "fc2.bias", "kind": "dense", "shape": [4], "offset": 36, "width": 4, "key": "fc2.bias"},
    ]


def test_asking_a_block_for_the_other_kind_of_matrix_names_the_parameter():
    _, layout = _mlp_layout()
    with pytest.raises(ValueError, match=r"parameter 'fc1.bias' has a dense block, not a Kronecker one"):
        layout.kron_matrices("fc1.bias")
    with pytest.raises(ValueError, match=r"parameter 'fc1.weight' has a Kronecker block, not a dense one"):
        layout.dense_matrix("fc1.weight")


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_kron_matrices_are_the_seeded_matrices_of_the_layouts_kind(kind):
    from hardmine.project import random_matrix

    model = nn.Linear(12, 16)
    layout = ProjectionLayout(model, ["weight"], dim=16, seed=3, kind=kind)
    p_out, p_in = layout.kron_matrices("weight")
    assert torch.equal(p_out, random_matrix(16, 4, seed=3, key="weight:out", kind=kind))
    assert torch.equal(p_in, random_matrix(12, 4, seed=3, key="weight:in", kind=kind))
    p_out64, _ = layout.kron_matrices("weight", torch.float64)
    assert p_out64.dtype == torch.float64 and torch.equal(p_out64, p_out.double())


def test_dense_block_matrix_only_for_a_float32_dense_block_of_one_projector_block():
    from hardmine.project import BLOCK_ROWS

    model = nn.Sequential(nn.Linear(3, BLOCK_ROWS), nn.Linear(3, BLOCK_ROWS + 1))
    layout = ProjectionLayout(model, ["0.weight", "0.bias", "1.bias"], dim=16, seed=0)
    full = layout.dense_block_matrix("0.bias", torch.float32)  # the default device: the CPU
    assert full is not None and torch.equal(full, layout.dense_matrix("0.bias"))  # BLOCK_ROWS rows: one block
    assert layout.dense_block_matrix("0.bias", torch.float64) is None  # another dtype: the caller projects
    assert layout.dense_block_matrix("0.weight", torch.float32) is None  # a Kronecker block
    assert layout.dense_block_matrix("1.bias", torch.float32) is None  # more rows than one block


def test_the_projected_output_is_float32_whatever_the_default_dtype():
    _, layout = _mlp_layout()
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert layout.new_output(2, "cpu").dtype == torch.float32
        parts = {name: torch.zeros(2, blk.width) for name, blk in layout.blocks.items()}
        assert layout.assemble(parts).dtype == torch.float32
    finally:
        torch.set_default_dtype(before)


def test_a_bad_dim_is_refused_with_dims_that_work():
    from hardmine.factored import kron_factors

    with pytest.raises(ValueError, match=r"dim=0 must be a positive integer.*e\.g\. 256 = 16 x 16"):
        kron_factors(0)
    with pytest.raises(ValueError, match=r"1 x 17, too unbalanced.*e\.g\. dim=16 or dim=25\."):
        kron_factors(17)


# ----------------------------------------------------------------------------------------- registry
@pytest.fixture
def fresh_registry(monkeypatch):
    """The registry's tables as they are, copied: what a test registers is gone afterwards."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_BY_NAME", list(registry._BY_NAME))
    monkeypatch.setattr(registry, "_NAME_CACHE", {})
    return registry


class _Thing(nn.Module):
    def forward(self, x):
        return x


class _RuleA(registry.LayerRule):
    pass


class _RuleB(registry.LayerRule):
    pass


class _RuleC(registry.LayerRule):
    pass


def test_rules_by_name_match_the_qualified_class_name_first_registered_first(fresh_registry):
    name = registry.qualified_name(_Thing)
    assert name == f"{__name__}._Thing"
    thing = _Thing()
    assert registry.rule_for(thing) is None  # looked up (and remembered) before any rule exists
    registry.register_layer_rule("*._Thing")(_RuleA)
    assert isinstance(registry.rule_for(thing), _RuleA)  # a later registration is seen
    registry.register_layer_rule(name)(_RuleB)  # also matches, but registered second
    assert isinstance(registry.rule_for(thing), _RuleA)
    assert registry.registered_names()[-2:] == ["*._Thing", name]
    registry.register_layer_rule(_Thing)(_RuleC)  # an exact type wins over every name
    assert isinstance(registry.rule_for(thing), _RuleC)
    assert _Thing in registry.registered_types()
    assert registry.rule_for(nn.Identity()) is None  # another class: no rule


def test_registering_a_rule_twice_or_wrongly_is_refused(fresh_registry):
    registry.register_layer_rule("pkg.mod.Thing")(_RuleA)
    with pytest.raises(ValueError, match=r"for 'pkg.mod.Thing' is already registered \(_RuleA\); there can be only one per name"):
        registry.register_layer_rule("pkg.mod.Thing")(_RuleB)
    registry.register_layer_rule(_Thing)(_RuleA)
    with pytest.raises(ValueError, match=r"for _Thing is already registered \(_RuleA\); there can be only one per module type"):
        registry.register_layer_rule(_Thing)(_RuleB)
    with pytest.raises(ValueError, match=r"needs a module type or a non-empty qualified class name"):
        registry.register_layer_rule("")
    with pytest.raises(ValueError, match=r"needs an nn.Module subclass, got <class 'int'>"):
        registry.register_layer_rule(int)
    with pytest.raises(ValueError, match=r"is not a LayerRule subclass; subclass hardmine.factored.LayerRule"):
        registry.register_layer_rule("pkg.mod.Other")(int)
    assert "pkg.mod.Other" not in registry.registered_names()


def test_the_layout_records_dim_seed_and_kind_as_given():
    from hardmine.enums import ProjectionKind

    layout = ProjectionLayout(nn.Linear(12, 16), ["weight", "bias"], dim=16, seed=3, kind="gaussian")
    assert layout.dim == 16 and type(layout.dim) is int  # scan metadata stores it as a JSON integer
    assert layout.seed == 3 and layout.kind is ProjectionKind.GAUSSIAN
    with pytest.raises(ValueError, match=r"(^|\W)kind='uniform'"):
        ProjectionLayout(nn.Linear(12, 16), ["weight"], dim=16, seed=3, kind="uniform")


class _Plain(nn.Module):
    """A module without a layer rule, holding a matrix and a vector."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(3, 5))
        self.scale = nn.Parameter(torch.randn(5))


def test_dense_blocks_are_a_wide_for_vectors_and_dim_wide_otherwise():
    model = nn.ModuleDict({"plain": _Plain(), "bil": nn.Bilinear(3, 4, 2), "fc": nn.Linear(4, 2)})
    names = ["plain.table", "plain.scale", "bil.weight", "bil.bias", "fc.weight", "fc.bias"]
    layout = ProjectionLayout(model, names, dim=16, seed=0)
    got = {n: (blk.kind, blk.width) for n, blk in layout.blocks.items()}
    assert got == {
        "plain.table": ("dense", 16),  # a matrix without a rule: dim coordinates
        "plain.scale": ("dense", 4),  # vectors: the smaller Kronecker factor
        "bil.weight": ("dense", 16),  # 3-D, no rule
        "bil.bias": ("dense", 4),
        "fc.weight": ("kron", 16),
        "fc.bias": ("dense", 4),
    }


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_dense_blocks_use_the_layouts_seed_and_kind(kind):
    from hardmine.project import Projector

    model = _Plain()
    mats = {}
    for seed in (3, 4):
        layout = ProjectionLayout(model, ["table", "scale"], dim=16, seed=seed, kind=kind)
        for name, width in (("table", 16), ("scale", 4)):
            want = Projector(width, seed=seed, kind=kind).matrix(15 if name == "table" else 5, key=name)
            assert torch.equal(layout.dense_matrix(name), want), (seed, name)
        mats[seed] = layout.dense_matrix("table")
    assert not torch.equal(mats[3], mats[4])


# --------------------------------------------------------------------------------------------- plan
class _TiedConvs(nn.Module):
    """Two Conv2d modules sharing one weight: the Conv2d rule cannot sum a shared weight."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)
        self.b.weight = self.a.weight


def test_a_shared_weight_a_rule_cannot_sum_is_refused_naming_every_holder():
    from hardmine.factored import plan_factored

    units, rejected = plan_factored(_TiedConvs(), ["a.weight", "a.bias"])
    assert set(units) == {"a"} and units["a"].vectors == ("bias",) and units["a"].matrix is None
    assert rejected == {
        "a.weight": "the parameter is shared by ['a.weight', 'b.weight'] (tied weights) and the Conv2d rule "
        "cannot sum a shared 'weight'"
    }
    # The root module as a holder is named by the parameter's local name.
    root = nn.Conv2d(3, 3, 3)
    root.twin = nn.Conv2d(3, 3, 3)
    root.twin.weight = root.weight
    _, rejected = plan_factored(root, ["weight"])
    assert "shared by ['weight', 'twin.weight']" in rejected["weight"]


def test_every_refused_parameter_is_listed_with_its_reason():
    from hardmine.engine import GradientExtractor

    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2), nn.PReLU())
    with pytest.raises(ValueError) as err:
        GradientExtractor(model, dim=16, engine="factored")
    known = r"\(rules exist for [^)]*\bLinear, [^)]*'transformers\.pytorch_utils\.Conv1D', '\*RMSNorm'[^)]*\)"
    refused = [("1.weight", "BatchNorm1d"), ("1.bias", "BatchNorm1d"), ("3.weight", "PReLU")]
    parts = [rf"{re.escape(name)}: {cls} has no factored layer rule {known}" for name, cls in refused]
    assert re.search("cannot handle " + "; ".join(parts) + r"\. Use engine='auto'", str(err.value))


@pytest.mark.parametrize("root", [False, True])
def test_parameters_inside_multihead_attention_are_refused_naming_it(root):
    """Where the attention rule does not cover the configuration, out_proj's parameters are refused with the
    attention's name and the rule's reason; where it does, out_proj is planned under its host."""
    from hardmine.factored import plan_factored

    mha = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    model = mha if root else nn.Sequential(nn.Linear(8, 8), mha)
    name = "out_proj.weight" if root else "1.out_proj.weight"
    units, rejected = plan_factored(model, [name])
    assert units == {}
    where = "'<root>'" if root else "'1'"
    assert rejected[name].startswith(
        f"inside nn.MultiheadAttention {where} (its factored rule does not cover it: add_bias_kv=True), which "
        "passes its submodules'"
    )
    assert "F.multi_head_attention_forward" in rejected[name] and "hooks never fire" in rejected[name]
    covered = nn.MultiheadAttention(8, 2)
    model = covered if root else nn.Sequential(nn.Linear(8, 8), covered)
    units, rejected = plan_factored(model, [name])
    assert rejected == {}
    (unit,) = units.values()
    assert unit.module is covered.out_proj and unit.host is covered and unit.role == "out_proj"


class _TwoParams(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(4))
        self.shift = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return x * self.gain + self.shift


class _GainRule(registry.LayerRule):
    matrix_param = None
    vector_params = ("gain",)


def test_a_parameter_its_rule_does_not_handle_is_refused_by_name(fresh_registry):
    from hardmine.factored import plan_factored

    registry.register_layer_rule(_TwoParams)(_GainRule)
    model = nn.Sequential(_TwoParams())
    units, rejected = plan_factored(model, ["0.gain", "0.shift"])
    assert rejected == {"0.shift": "the _TwoParams rule does not handle parameter 'shift'"}
    assert units["0"].vectors == ("gain",) and units["0"].params == ["0.gain"]


def test_a_model_that_is_itself_a_layer_is_exact():
    # The root module has the name "": its parameters are "weight" and "bias", not ".weight".
    torch.manual_seed(0)
    fg, _ = _check_pass(nn.Linear(5, 3).double(), (torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))))
    assert set(fg.kron) == {"weight"} and set(fg.vectors) == {"bias"}


class _TiedHidden(nn.Module):
    """An embedding whose weight an LM-style head reuses through F.linear: the head's hook never fires."""

    def __init__(self) -> None:
        super().__init__()
        self.e = nn.Embedding(10, 6)
        self.h = nn.Linear(6, 10, bias=False)
        self.h.weight = self.e.weight

    def forward(self, x):
        return nn.functional.linear(self.e(x).mean(1), self.h.weight)


def test_one_unattributable_holder_of_a_tied_weight_refuses_every_holder():
    from hardmine.engine import GradientExtractor

    model = _TiedHidden().double()
    batch = (torch.randint(0, 10, (4, 5)), torch.randint(0, 10, (4,)))
    with pytest.raises(ValueError) as err:
        GradientExtractor(model, dim=9, engine="factored")(batch)
    msg = str(err.value)
    assert "h (Linear): its forward hook never fired" in msg
    assert "e (Embedding): it shares e.weight with h (Linear), where its forward hook never fired" in msg
    auto = GradientExtractor(model, dim=9, engine="auto")
    res = auto(batch)
    assert auto.metadata()["plan"] == {"e.weight": "vmap"}
    assert_close(res.grad_norm, reference_per_sample_grads(model, batch).grad_norm)


def test_a_configuration_outside_the_rules_maths_is_refused_naming_the_module_type():
    from hardmine.factored import plan_factored

    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0))
    _, rejected = plan_factored(model, ["0.weight"])
    assert rejected["0.weight"].startswith("Embedding with max_norm is set")


def test_a_shared_weight_refused_for_another_reason_says_who_shares_it():
    from hardmine.factored import plan_factored

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e = nn.Embedding(3, 5)
            self.p = _Plain()
            self.p.table = self.e.weight  # a module without a rule holds the embedding's weight too

    units, rejected = plan_factored(Shared(), ["e.weight"])
    assert units == {}
    assert re.fullmatch(
        r"_Plain has no factored layer rule \(rules exist for [^)]*\) \(it is shared by \['e.weight', 'p.table'\]\)",
        rejected["e.weight"],
    )


def test_a_shared_gram_is_computed_once_for_its_readers_and_then_let_go():
    computed = []

    def compute():
        computed.append(1)
        return torch.full((2, 2), float(len(computed)))

    cache = registry.GramCache({"x": 2})
    first, second = cache.get("x", compute), cache.get("x", compute)
    assert len(computed) == 1 and second is first  # the second reader gets the first one's Gram
    cache.get("x", compute)  # no reader left: not held, so computed again
    assert len(computed) == 2
    cache.get("y", compute)  # a key nobody counted: computed, not held
    cache.get("y", compute)
    assert len(computed) == 4


def test_a_reader_that_skips_its_gram_releases_it():
    computed = []

    def compute():
        computed.append(1)
        return torch.zeros(1)

    cache = registry.GramCache({"x": 3})
    cache.get("x", compute)  # reader 1
    cache.release("x")  # reader 2 takes another route
    cache.get("x", compute)  # reader 3 still finds it
    assert len(computed) == 1
    cache = registry.GramCache({"x": 2})
    cache.get("x", compute)  # reader 1
    cache.release("x")  # reader 2 will not ask: the Gram is dropped
    cache.get("x", compute)
    assert len(computed) == 3
    cache = registry.GramCache({})
    cache.release("x")  # releasing a key nobody counted is harmless
    cache.get("x", compute)
    assert len(computed) == 4


def test_gram_keys_tell_apart_views_of_one_storage():
    x = torch.randn(4, 6)
    key = registry.GramCache.key
    assert key(x) == key(x)
    assert key(x) != key(x.view(6, 4))  # another shape
    assert key(x) != key(x.t())  # other strides
    assert key(x[:, :3]) != key(x[:, 3:])  # another start
    assert key(x) != key(x.view(torch.int32))  # another dtype


@pytest.mark.parametrize(("batch", "per_sample", "budget", "sizes"), [
    (10, 3, 7, [2, 2, 2, 2, 2]),  # 7 // 3 = 2 samples a chunk
    (5, 100, 7, [1, 1, 1, 1, 1]),  # one sample over the budget: one a chunk
    (5, 0, 7, [5]),  # nothing per sample: the whole batch
    (7, 1, 7, [7]),  # exactly the budget
])
def test_batch_chunks_cover_the_batch_within_the_budget(batch, per_sample, budget, sizes, monkeypatch):
    monkeypatch.setattr(registry, "CHUNK_ELEMENTS", budget)
    chunks = list(registry.batch_chunks(batch, per_sample))
    assert [s.stop - s.start for s in chunks] == sizes
    assert [s.start for s in chunks] == [sum(sizes[:i]) for i in range(len(sizes))] and chunks[-1].stop == batch


def test_the_base_rule_refuses_calls_it_cannot_attribute():
    rule = registry.LayerRule()
    x = torch.randn(3, 4)
    assert rule.check_call(nn.Identity(), (x,), x, 3) == "its input or output is not a single tensor"
    assert rule.check_call(nn.Identity(), x, [x], 3) == "its input or output is not a single tensor"
    why = rule.check_call(nn.Identity(), x, torch.randn(2, 4), 3)
    assert why == "it saw input shape (3, 4) / output shape (2, 4) for a batch of 3, so the batch is not on dimension 0"
    why = rule.check_call(nn.Identity(), torch.randn(2, 4), x, 3)  # only the input's rows are wrong
    assert why == "it saw input shape (2, 4) / output shape (3, 4) for a batch of 3, so the batch is not on dimension 0"
    assert rule.check_call(nn.Identity(), torch.tensor(1.0), x, 3) is not None  # a 0-d input has no batch
    assert rule.check_call(nn.Identity(), x, torch.tensor(1.0), 3) is not None
    assert rule.check_call(nn.Identity(), x, x, 3) is None
    assert rule.handled_params == ("weight", "bias") and not rule.supports_tied
    with pytest.raises(NotImplementedError):
        rule.compute(nn.Identity(), [], registry.RuleRequest(None, ()))


# -------------------------------------------------------------------------------------------- apply
class _Gain(nn.Module):
    """y = x * gain: a vector parameter only."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.gain


def _gain_rule(result):
    """A rule for _Gain whose result is ``result(calls, request)``."""

    class Rule(registry.LayerRule):
        matrix_param = None
        vector_params = ("gain",)

        def compute(self, module, calls, request):
            return result(calls, request)

    return Rule


def _exact_gain(calls):
    return sum(c.delta * c.x for c in calls)  # (B, d)


def _gain_pass(model_dtype=torch.float64):
    model = nn.Sequential(_Gain(), nn.Linear(4, 3)).to(model_dtype)
    batch = (torch.randn(5, 4, dtype=model_dtype), torch.randint(0, 3, (5,)))
    layout = ProjectionLayout(model, ["0.gain"], dim=16, seed=0)
    return model, batch, layout


def test_a_rule_returning_a_vector_of_the_wrong_shape_is_refused(fresh_registry):
    rule = _gain_rule(lambda calls, req: registry.RuleResult(vectors={"gain": _exact_gain(calls)[:, :3]}))
    registry.register_layer_rule(_Gain)(rule)
    model, batch, layout = _gain_pass()
    with pytest.raises(ValueError, match=r"layer rule Rule returned shape \(5, 3\) for '0.gain'"):
        factored_pass(model, batch, layout)


def test_a_rules_own_vector_projection_must_be_the_offered_matrix_shape(fresh_registry):
    # float32: the runner offers the dense matrix of gain, and a rule may return gain @ matrix itself.
    def good(calls, req):
        g = _exact_gain(calls)
        return registry.RuleResult(vectors={"gain": g}, vector_proj={"gain": g @ req.vector_mats["gain"]})

    registry.register_layer_rule(_Gain)(_gain_rule(good))
    model, batch, layout = _gain_pass(torch.float32)
    fg = factored_pass(model, batch, layout)
    ref = reference_per_sample_grads(model, batch, params=["0.gain"])
    assert set(fg.vector_proj) == {"0.gain"}
    assert_close(fg.vector_proj["0.gain"], layout.project_dense("0.gain", ref.grads["0.gain"]), rtol=1e-4, atol=1e-6)

    def bad(calls, req):
        g = _exact_gain(calls)
        return registry.RuleResult(vectors={"gain": g}, vector_proj={"gain": g[:, :3]})  # not (B, width)

    registry._REGISTRY[_Gain] = _gain_rule(bad)()
    with pytest.raises(ValueError, match=r"returned a projection of '0.gain' of shape \(5, 3\) without / unlike the matrix"):
        factored_pass(model, batch, layout)

    def unoffered(calls, req):  # float64: no matrix offered, yet a projection returned
        g = _exact_gain(calls)
        return registry.RuleResult(vectors={"gain": g}, vector_proj={"gain": g.new_zeros(len(g), 4)})

    registry._REGISTRY[_Gain] = _gain_rule(unoffered)()
    model, batch, layout = _gain_pass(torch.float64)
    with pytest.raises(ValueError, match=r"returned a projection of '0.gain' of shape \(5, 4\) without / unlike"):
        factored_pass(model, batch, layout)


def test_a_rules_own_vector_norm_is_what_the_pass_adds(fresh_registry):
    # RuleResult.vector_sq_norm: the rule's squared norm of a vector's gradient is taken as given.
    def with_norm(calls, req):
        g = _exact_gain(calls)
        return registry.RuleResult(vectors={"gain": g}, vector_sq_norm={"gain": g.pow(2).sum(1) + 1.0})

    registry.register_layer_rule(_Gain)(_gain_rule(with_norm))
    model, batch, layout = _gain_pass()
    fg = factored_pass(model, batch, layout)
    ref = reference_per_sample_grads(model, batch, params=["0.gain"])
    assert_close(fg.sq_norm, ref.grad_norm.square() + 1.0)


@pytest.mark.parametrize(("ids_f", "ids_g"), [(False, False), (True, False), (False, True), (True, True)])
def test_factors_inner_over_several_chunks(ids_f, ids_g, monkeypatch):
    # A chunk budget of two samples (2 * N * M elements each): the batch of 5 comes in chunks of 2, 2 and 1.
    monkeypatch.setattr(registry, "CHUNK_ELEMENTS", 2 * 2 * 5 * 6)
    g = torch.Generator().manual_seed(1)
    b, rows, cols = 5, 7, 4

    def factors(n: int, ids: bool):
        c = torch.randn(b, n, cols, generator=g, dtype=torch.float64)
        if ids:
            r = torch.randint(0, rows, (b, n), generator=g)
            dense = nn.functional.one_hot(r, rows).double()  # (B, N, rows)
        else:
            r = dense = torch.randn(b, n, rows, generator=g, dtype=torch.float64)
        return registry.GradFactors(r, c), dense.transpose(1, 2) @ c  # (B, rows, cols)

    f, gf = factors(5, ids_f)
    h, gh = factors(6, ids_g)
    assert_close(registry.factors_inner(f, h), (gf * gh).sum((1, 2)))


class _SharedWithFrozenReader(nn.Module):
    """q, k and v read one input; v runs under no_grad, so it gets no gradient (a counted reader that never
    asks for the shared Gram)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.q, self.k, self.v = (nn.Linear(6, 6) for _ in range(3))
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        h = self.emb(ids)  # (B, T, 6)
        with torch.no_grad():
            v = self.v(h)
        return self.head((self.q(h) * torch.tanh(self.k(h)) + v).mean(1))


def test_a_reader_without_gradient_lets_the_shared_gram_go(gram_caches):
    caches = gram_caches
    torch.manual_seed(0)
    batch = (torch.randint(0, 20, (4, 5)), torch.randint(0, 3, (4,)))
    fg, _ = _check_pass(_SharedWithFrozenReader().double(), batch, dim=9)  # exact
    assert fg.kron["v.weight"].abs().max() == 0 and fg.vectors["v.bias"].abs().max() == 0
    (cache,) = caches
    assert cache._grams == {}  # nothing held after the pass


@pytest.mark.parametrize("hw", [3, 4], ids=["one-position", "ghost"])
@pytest.mark.parametrize(("c_in", "c_out", "groups"), [(4, 4, 2), (2, 2, 2)], ids=["grouped", "depthwise"])
def test_a_grouped_conv2d_on_few_positions_is_exact(hw, c_in, c_out, groups):
    # Few output positions take the one-position or the ghost route, where P_out is applied group by group.
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, 3, groups=groups)
    n = c_out * (hw - 2) ** 2
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(n, 3)).double()
    _check_pass(model, (torch.randn(3, c_in, hw, hw, dtype=torch.float64), torch.randint(0, 3, (3,))), dim=16)


class _Allocations(_Shapes):
    """Records the shape of every tensor an op allocates (views of existing tensors left out)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize(("t", "budget"), [(1, 64), (8, 128), (20, 512)], ids=["one-position", "ghost", "explicit"])
def test_linear_temporaries_stay_within_the_chunk_budget(t, budget, monkeypatch):
    # A 16 -> 16 Linear on 32 samples of t positions: each route's per-sample temporaries (the (a,) and (b,)
    # factor products of one position, the (t, t) Gram matrices, the (16, 16) gradients) come a few samples
    # at a time; only the (B, a, b) result and (B,) norms span the batch.
    import hardmine.factored.linear as linear_rule

    monkeypatch.setattr(registry, "CHUNK_ELEMENTS", budget)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Flatten(), nn.Linear(16 * t, 3)).double()
    b = 32
    batch = (torch.randn(b, t, 16, dtype=torch.float64), torch.randint(0, 3, (b,)))
    shapes = []
    real = linear_rule.LinearRule.compute

    def recorded(self, module, calls, request):
        with _Allocations() as mode:
            res = real(self, module, calls, request)
        shapes.extend(mode.shapes)
        return res

    monkeypatch.setattr(linear_rule.LinearRule, "compute", recorded)
    layout = _layout(model, "0", dim=16)
    fg = factored_pass(model, batch, layout)
    temporaries = [s for s in shapes if s not in {(b, 4, 4), (b,), (b, 16)}]  # results: projection, norm, bias
    assert temporaries and max(math.prod(s) for s in temporaries) <= budget
    monkeypatch.setattr(linear_rule.LinearRule, "compute", real)
    ref = reference_per_sample_grads(model, batch, params="0")
    assert_close(fg.sq_norm.sqrt(), ref.grad_norm)


def test_linear_refuses_an_unbatched_vector_and_quotes_its_shape():
    # nn.Linear accepts one (d_in,) vector; with d_in == d_out == the batch size only its dimension count
    # tells that it carries no batch.
    lin = nn.Linear(3, 3)
    assert _reason(lin, torch.randn(3), 3) == "it was called on an unbatched input of shape (3,)"


class _TiedFrozenHead(nn.Module):
    """An embedding and a head sharing one weight; the head runs under no_grad, so only the embedding's use
    has a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.e = nn.Embedding(10, 6)
        self.h = nn.Linear(6, 10, bias=False)
        self.h.weight = self.e.weight
        self.fc = nn.Linear(6, 3)

    def forward(self, ids):
        pooled = self.e(ids).mean(1)  # (B, 6)
        with torch.no_grad():
            aux = self.h(pooled)[:, :3]  # (B, 3): no gradient reaches the head
        return self.fc(torch.tanh(pooled)) + aux


@pytest.mark.parametrize("b", [1, 3])
def test_a_tied_weight_whose_other_holder_gets_no_gradient_is_exact(b):
    torch.manual_seed(0)
    _check_pass(_TiedFrozenHead().double(), (torch.randint(0, 10, (b, 5)), torch.randint(0, 3, (b,))), layers=["e", "fc"])


class _SharedWithOtherReaders(nn.Module):
    """q and k read one input, and so does a LayerNorm, whose rule takes no Gram: only q and k count as the
    Gram's readers."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.q, self.k = nn.Linear(6, 6), nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        h = self.emb(ids)  # (B, T, 6): read by q, k and the norm
        return self.head((self.q(h) * torch.tanh(self.k(h)) + self.norm(h)).mean(1))


def test_only_modules_that_take_the_shared_gram_hold_it(gram_caches):
    caches = gram_caches
    torch.manual_seed(0)
    batch = (torch.randint(0, 20, (4, 5)), torch.randint(0, 3, (4,)))
    _check_pass(_SharedWithOtherReaders().double(), batch, dim=9)  # exact
    (cache,) = caches
    assert cache._grams == {}  # let go once q and k have taken it


def test_two_selected_modules_reading_one_input_share_its_gram(gram_computations):
    from test_factored import SharedInput

    computed = gram_computations
    torch.manual_seed(0)
    batch = (torch.randint(0, 20, (3, 5)), torch.randint(0, 3, (3,)))  # T=5: 25 <= 6*6, the ghost form
    _check_pass(SharedInput().double(), batch, layers=["q", "k"], dim=9)  # exact
    assert computed == [(3, 5, 6)]  # q and k: one Gram, computed once


@pytest.mark.parametrize("b", [1, 4])
def test_a_float32_tied_weight_is_the_sum_of_both_uses(b):
    # float32: projections are written straight into the output where they can be; a tied weight's block is
    # the sum of its holders' parts, so neither may write it alone.
    from test_factored import Tied

    from hardmine.engine import GradientExtractor

    torch.manual_seed(0)
    model = Tied()
    batch = (torch.randint(0, 10, (b, 7)), torch.randint(0, 3, (b,)))
    fact = GradientExtractor(model, dim=9, engine="factored")(batch)
    vm = GradientExtractor(model, dim=9, engine="vmap")(batch)
    assert_close(fact.z, vm.z, rtol=1e-4, atol=1e-5)
    assert_close(fact.grad_norm, vm.grad_norm, rtol=1e-4, atol=1e-6)


def test_a_single_selected_layer_without_gradient_is_all_zeros():
    from test_factored import NoGradBranch as Frozen

    torch.manual_seed(0)
    fg, _ = _check_pass(Frozen().double(), (torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 3, (3,))), layers=["b"])
    assert fg.kron["b.weight"].abs().max() == 0 and fg.vectors["b.bias"].abs().max() == 0 and fg.sq_norm.abs().max() == 0


class _MatVec(nn.Module):
    """y = x @ weight.T without a bias, a module type of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return x @ self.weight.T


class _OwnTensorRule(registry.LayerRule):
    """An exact rule for _MatVec that ignores ``request.out`` (it is optional) and returns its own tensors."""

    vector_params = ()

    def compute(self, module, calls, request):
        (call,) = calls
        p_out, p_in = request.matrix
        delta, x = call.delta, call.x.to(call.delta.dtype)  # (B, 3), (B, 4)
        proj = torch.einsum("bo,oa,bi,ic->bac", delta, p_out, x, p_in)  # P_out^T (delta x^T) P_in
        return registry.RuleResult(matrix_proj=proj, matrix_sq_norm=delta.pow(2).sum(1) * x.pow(2).sum(1))


def test_a_rule_that_returns_its_own_projection_gets_it_written(fresh_registry):
    from hardmine.engine import GradientExtractor

    registry.register_layer_rule(_MatVec)(_OwnTensorRule)
    torch.manual_seed(0)
    model = nn.Sequential(_MatVec(), nn.Tanh(), nn.Linear(3, 2))  # float32: the output block is offered
    batch = (torch.randn(5, 4), torch.randint(0, 2, (5,)))
    fact = GradientExtractor(model, layers="0", dim=16, engine="factored")(batch)
    vm = GradientExtractor(model, layers="0", dim=16, engine="vmap")(batch)
    assert_close(fact.z, vm.z, rtol=1e-4, atol=1e-5)
    assert_close(fact.grad_norm, vm.grad_norm, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ capture
def test_factored_pass_refuses_what_it_cannot_do_and_says_what_to_do():
    from models import MLP

    model = MLP()
    batch = (torch.randn(4, 12), torch.randint(0, 4, (4,)))
    layout = _layout(model, dim=16)
    with pytest.raises(ValueError) as err:
        factored_pass(model, batch, layout, randomness="same")
    assert str(err.value) == (
        "randomness='same' (one dropout mask shared by the batch) needs the vmap engine; use "
        "randomness='eval' or 'different' with the factored engine."
    )
    with pytest.raises(ValueError, match=r"(^|\W)randomness='bogus'"):
        factored_pass(model, batch, layout, randomness="bogus")
    with pytest.raises(ValueError) as err:
        factored_pass(model, (batch[0], [0, 1, 2, 3]), layout)
    assert str(err.value) == "target is a list, not a torch.Tensor; convert it with torch.as_tensor."
    bn = nn.Sequential(nn.Linear(12, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError) as err:
        factored_pass(bn, batch, _layout(bn, dim=16))
    assert re.fullmatch(
        r"the factored engine cannot handle 1\.weight: BatchNorm1d has no factored layer rule \([^)]*\); "
        r"1\.bias: BatchNorm1d has no factored layer rule \([^)]*\)\. Use engine='auto' to send these "
        r"parameters to the vmap engine\.",
        str(err.value),
    )


def test_factored_pass_runs_a_training_model_in_eval_mode_by_default():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 3)).double().train()
    batch = (torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,)))
    fg = factored_pass(model, batch, _layout(model, dim=16))
    assert model.training  # restored
    ref = reference_per_sample_grads(model.eval(), batch)  # no dropout
    assert_close(fg.sq_norm.sqrt(), ref.grad_norm)
    assert_close(fg.output, ref.output)


class _WithUnused(nn.Module):
    """a feeds the output; u is called but its output is never used; f runs under no_grad."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.u, self.f, self.h = nn.Linear(4, 5), nn.Linear(4, 5), nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        self.u(x)  # computed, never used
        with torch.no_grad():
            t = self.f(x)
        return self.h(torch.tanh(self.a(x)) + t)


@pytest.mark.parametrize("layers", [["a", "u", "f", "h"], ["f"]], ids=["all", "frozen-only"])
def test_keeping_the_graph_gives_the_same_projections_and_leaves_it_usable(layers):
    from hardmine.factored import apply_rules, capture_calls, plan_factored

    torch.manual_seed(0)
    model = _WithUnused().double()
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    results = []
    for retain in (False, True):
        layout = ProjectionLayout(model, [n for n, _ in model.named_parameters() if n.split(".")[0] in layers], dim=16, seed=2)
        units, _ = plan_factored(model, layout.names)
        with capture_calls(units) as rec:
            out = model(x)
        loss = nn.functional.cross_entropy(out, y, reduction="none")
        fg = apply_rules(units, rec, loss, out, layout, 4, retain_graph=retain)
        z = layout.new_output(4, "cpu")
        fg.write_to(z, layout)
        results.append((z, fg.sq_norm))
        if retain:
            model.zero_grad()
            loss.sum().backward()  # the caller's own backward still works
            assert model.a.weight.grad is not None
    assert_close(results[1][0], results[0][0])
    assert_close(results[1][1], results[0][1])
    ref = reference_per_sample_grads(model, (x, y), params=[n for n, _ in model.named_parameters() if n.split(".")[0] in layers])
    assert_close(results[1][1].sqrt(), ref.grad_norm)


def test_factored_pass_names_every_module_it_cannot_attribute():
    class TwoFunctional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.h = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            x = torch.tanh(nn.functional.linear(x, self.a.weight, self.a.bias))
            return self.h(torch.tanh(nn.functional.linear(x, self.b.weight, self.b.bias)))

    model = TwoFunctional()
    never = (
        "its forward hook never fired: the model uses its parameters without calling the module "
        "(e.g. F.linear(x, m.weight))"
    )
    with pytest.raises(ValueError) as err:
        factored_pass(model, (torch.randn(3, 4), torch.randint(0, 3, (3,))), _layout(model, ["a", "b"], dim=16))
    assert str(err.value) == (
        f"the factored engine cannot attribute these modules per sample: a (Linear): {never}; b (Linear): "
        f"{never}. Use engine='auto' to send them to the vmap engine."
    )


# ------------------------------------------------------------------------------ capture: broadcast inputs
from hardmine.factored.capture import CapturedCall, broadcast_problems, compute_factored  # noqa: E402
from hardmine.factored.plan import plan_factored  # noqa: E402
from hardmine.losses import resolve_loss  # noqa: E402

_ROW_BY_ROW = (
    "it was called on an input of shape (1, ...) broadcast over the batch, and sample {c}'s output depends on "
    "other samples' rows of its output (the model does not use it row by row)"
)


def _bcast(e: torch.Tensor, broadcast: bool = True) -> CapturedCall:
    """A recorded call whose output ``e`` was expanded to the batch (what the hooks record)."""
    return CapturedCall(e, e, e, None, None, broadcast=broadcast)


def _expanded(n: int = 3, d: int = 4) -> torch.Tensor:
    w = torch.randn(1, d, requires_grad=True)
    return (w * 2).expand(n, d)


def test_broadcast_check_skips_an_unused_output_and_still_checks_the_next():
    unused, bad = _expanded(), _expanded()
    output = bad[:1].expand(3, 4) * 3.0  # every sample reads row 0
    problems = broadcast_problems(output, {"unused": [_bcast(unused)], "bad": [_bcast(bad)]}, 3)
    assert problems == {"bad": _ROW_BY_ROW.format(c=1)}


def test_broadcast_check_sees_a_sample_reading_the_next_row():
    e = _expanded()
    output = torch.cat([e[1:2], e[1:]])  # sample 0 reads row 1, the others their own
    assert broadcast_problems(output, {"pos": [_bcast(e)]}, 3) == {"pos": _ROW_BY_ROW.format(c=0)}
    assert broadcast_problems(e * 1.0, {"pos": [_bcast(e)]}, 3) == {}  # row by row: no problem


def test_broadcast_check_ignores_outputs_without_gradient_and_unbroadcast_calls():
    frozen = torch.zeros(1, 4).expand(3, 4)  # a broadcast output that needs no gradient
    e = _expanded()
    plain = torch.randn(3, 4, requires_grad=True) * 1.0  # an ordinary call: not this check's business
    output = e * 1.0 + plain.mean(0)
    rec = {"frozen": [_bcast(frozen)], "plain": [_bcast(plain, broadcast=False)]}
    assert broadcast_problems(output, rec, 3) == {}
    assert broadcast_problems(output, {**rec, "pos": [_bcast(e)]}, 3) == {}


def test_broadcast_check_refuses_an_output_that_cannot_show_row_by_row_use():
    e = _expanded()
    why = "its input is broadcast over the batch and the model output does not show it is used sample by sample"
    rec = {"pos": [_bcast(e)]}
    assert broadcast_problems(torch.randn(3, 4), rec, 3) == {"pos": why}  # no gradient
    assert broadcast_problems(torch.cat([e, e[:1]]) * 1.0, rec, 3) == {"pos": why}  # 4 rows for 3 samples
    assert broadcast_problems((e * 1.0).long(), rec, 3) == {"pos": why}  # not floating point


def test_the_offline_probe_refuses_a_broadcast_output_its_gradient_reaches_only_as_zeros():
    """A zero layer above (a zero-initialised head) makes every probe gradient zero: the row check then shows
    nothing, so the offline probe (own_rows) refuses the module; an unused output (no gradient at all) is not
    refused, and the online check, which runs on a user's first training step, keeps the old rule."""
    e, unused = _expanded(), _expanded()
    zero = (e * 0.0).sum(1)  # (3,): reaches every row of e with a zero gradient
    rec = {"pos": [_bcast(e)], "unused": [_bcast(unused)]}
    why = (
        "it was called on an input of shape (1, ...) broadcast over the batch, and on the first batch no gradient "
        "reached sample 0's own row of its output, so how the model reads it could not be checked"
    )
    assert broadcast_problems(zero, rec, 3, own_rows=True) == {"pos": why}
    assert broadcast_problems(zero, rec, 3) == {}
    assert broadcast_problems(e * 1.0, rec, 3, own_rows=True) == {}  # every sample reaches its own row
    half = torch.cat([e[:1] * 1.0, e[1:] * 0.0])  # sample 0 reaches its row, 1 and 2 only zeros
    assert broadcast_problems(half, rec, 3, own_rows=True) == {"pos": why.replace("sample 0", "sample 1")}


def test_a_position_embedding_behind_a_zero_head_goes_to_vmap_and_stays_exact():
    from hardmine.engine import GradientExtractor

    torch.manual_seed(0)
    model = _Positions()
    with torch.no_grad():
        model.head.weight.zero_()
    batch = (torch.randn(5, 2, 4), torch.randint(0, 3, (5,)))
    ext = GradientExtractor(model, dim=16)
    ext(batch)
    assert ext.plan["pos.weight"] == "vmap" and "no gradient reached sample 0's own row" in (
        ext.metadata()["plan_reasons"]["pos.weight"]
    )
    with torch.no_grad():
        model.head.weight.normal_()  # training moved the head
    assert_close(ext(batch).z, GradientExtractor(model, dim=16, engine="vmap")(batch).z)


class _OneToken(nn.Module):
    """A learned token looked up with ids of shape (1,) and added to every sample (a (1, d) output)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.cls, self.head = nn.Linear(4, 4), nn.Embedding(2, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.tok(x) + self.cls(torch.ones(1, dtype=torch.long))))


def test_a_token_looked_up_with_one_id_is_expanded_and_exact():
    torch.manual_seed(0)
    model = _OneToken()
    _check_pass(model, (torch.randn(5, 4), torch.randint(0, 3, (5,))), dim=16)


class _Positions(nn.Module):
    """Position embeddings looked up for ids (1, T) and added to every sample; ``check`` sees what was added."""

    def __init__(self, check=None) -> None:
        super().__init__()
        self.tok, self.pos, self.head = nn.Linear(4, 4), nn.Embedding(2, 4), nn.Linear(4, 3)
        self.check = check

    def forward(self, x):
        p = self.pos(torch.arange(2).unsqueeze(0))  # (1, 2, 4)
        if self.check is not None:
            self.check(p)
        return self.head(torch.tanh(self.tok(x) + p)).mean(1)


def _fails_expanded(exc):
    def check(p):
        if p.shape[0] != 1:
            raise exc

    return check


@pytest.mark.parametrize(
    "exc, quoted",
    [
        (RuntimeError("expects one row\nsecond line"), "RuntimeError: expects one row"),
        (RuntimeError(), "RuntimeError"),
        (KeyError("k" * 300), "KeyError: '" + "k" * 199),
    ],
    ids=["first-line", "no-message", "long"],
)
def test_a_forward_failing_on_the_expanded_output_refuses_the_module_quoting_the_error(exc, quoted):
    model = _Positions(_fails_expanded(exc))
    batch = (torch.randn(4, 2, 4), torch.randint(0, 3, (4,)))
    with pytest.raises(ValueError) as err:
        factored_pass(model, batch, _layout(model, ["pos", "tok"], dim=16))
    assert (
        "pos (Embedding): it was called on an input of shape (1, ...) broadcast over the batch, and the model's "
        f"forward fails when its output is expanded to one row per sample ({quoted}). Use engine='auto'"
    ) in str(err.value)


def test_expanded_modules_are_logged(caplog):
    model = _Positions()
    with caplog.at_level("DEBUG", logger="hardmine.factored.capture"):
        _check_pass(model, (torch.randn(4, 2, 4), torch.randint(0, 3, (4,))), layers=["pos", "tok"], dim=16)
    assert "inputs broadcast over the batch, expanded per sample: pos" in caplog.messages


# ------------------------------------------------------------------------- capture: checks of every pass
class _ChangesOnBigBatches(nn.Module):
    """Behaves on the probe's first samples, and differently on a batch of more than three."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.a, self.h = nn.Linear(4, 4), nn.Linear(4, 3)
        self.how = how

    def forward(self, x):
        big = x.shape[0] > 3
        if big and self.how == "fail":
            raise RuntimeError("boom")
        if self.how == "never":  # `a` not called
            h = x
        elif big and self.how == "broadcast":  # `a` called once on a (1, 4) input the model broadcasts
            h = self.a(torch.ones(1, 4, dtype=x.dtype)) + x
        else:
            h = self.a(x)
        if big and self.how == "inplace":
            h.mul_(2)
        out = self.h(torch.tanh(h))
        return out.unsqueeze(-1) if big and self.how == "3d" else out


def _big_batch_error(how: str) -> str:
    model = _ChangesOnBigBatches(how)
    with pytest.raises(ValueError) as err:
        factored_pass(model, (torch.randn(5, 4), torch.randint(0, 3, (5,))), _layout(model, ["a"], dim=16))
    return str(err.value)


def test_a_module_the_probe_never_saw_called_is_refused():
    model = _ChangesOnBigBatches("never")  # `a` never called, even by the probe
    batch = (torch.randn(2, 4), torch.randint(0, 3, (2,)))
    with pytest.raises(ValueError, match=r"a \(Linear\): its forward hook never fired"):
        factored_pass(model, batch, _layout(model, ["a"], dim=16))


def test_a_broadcast_call_the_probe_did_not_see_is_refused_not_expanded_unchecked():
    msg = _big_batch_error("broadcast")
    assert msg.startswith("module a (Linear): it saw input shape (1, 4) / output shape (1, 4) for a batch of 5")


def test_a_forward_failing_on_the_full_batch_quotes_the_input_shapes():
    msg = _big_batch_error("fail")
    assert "per-sample input shapes" in msg and "(4,)" in msg and msg.endswith(": boom")


def test_an_output_modified_in_place_only_on_the_full_batch_is_refused():
    assert _big_batch_error("inplace") == (
        "module a (Linear): its output was modified in place, which the probe batch did not show. The factored "
        "engine needs each selected module to see the batch on dimension 0 as the probe batch did; use "
        "engine='vmap'."
    )


def test_the_full_batch_output_is_checked_against_the_loss():
    assert "cross-entropy needs (B, num_classes) logits" in _big_batch_error("3d")


def test_out_of_range_labels_are_flagged_not_raised_when_flags_are_asked_for():
    torch.manual_seed(0)
    model = _ChangesOnBigBatches("none")
    x, y = torch.randn(3, 4), torch.tensor([0, 7, 2])  # label 7 of 3 classes
    layout = _layout(model, ["a"], dim=16)
    units, _ = plan_factored(model, layout.names)
    fn, kind = resolve_loss(None, y)
    with pytest.raises(ValueError, match="7"):
        compute_factored(model, x, y, fn, kind, units, layout, set(), 3)
    flags: list[torch.Tensor] = []
    compute_factored(model, x, y, fn, kind, units, layout, set(), 3, flags=flags)
    assert len(flags) == 1 and bool(flags[0].any())


def test_a_class_target_of_the_wrong_shape_is_refused_before_the_pass():
    model = _ChangesOnBigBatches("none")
    batch = (torch.randn(5, 4), torch.randint(0, 3, (5, 1)))
    with pytest.raises(ValueError, match=re.escape("classification targets must be 1-D (B,), got shape (5, 1).")):
        factored_pass(model, batch, _layout(model, ["a"], dim=16), "cross_entropy")


@pytest.mark.parametrize(
    "loss, said",
    [(torch.zeros(3, 1), "torch.Size([3, 1])"), (1.5, "float"), ([0.0, 1.0, 2.0], "list")],
    ids=["2-D", "float", "list"],
)
def test_a_loss_that_is_not_one_per_sample_is_refused_saying_what_it_was(loss, said):
    from hardmine.factored.capture import check_per_sample_loss

    check_per_sample_loss(torch.zeros(3), 3)  # one loss per sample: fine
    with pytest.raises(ValueError) as err:
        check_per_sample_loss(loss, 3)
    assert str(err.value) == f"the loss function returned {said}; it must return one loss per sample, shape (3,)."


def test_an_input_modified_in_place_after_its_layer_is_refused_by_name():
    class Rewrites(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            h = self.a(x) * 1.0
            y = self.b(h)
            h.add_(1.0)  # b's input changes after b ran
            return y

    model = Rewrites()
    with pytest.raises(ValueError) as err:
        factored_pass(model, (torch.randn(3, 4), torch.randint(0, 3, (3,))), _layout(model, ["b"], dim=16))
    assert str(err.value) == (
        "the factored engine cannot attribute these modules per sample: b (Linear): its input is modified in "
        "place after the layer ran. Use engine='auto' to send them to the vmap engine."
    )


class _BatchMean(nn.Module):
    """A Linear fed the batch mean (a (1, ...) input that changes with the batch's samples)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.ctx, self.h = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.h(torch.tanh(self.a(x) + self.ctx(x.mean(0, keepdim=True))))


def test_a_broadcast_input_that_is_a_batch_statistic_is_refused():
    model = _BatchMean()
    with pytest.raises(ValueError) as err:
        factored_pass(model, (torch.randn(4, 4), torch.randint(0, 3, (4,))), _layout(model, ["ctx"], dim=16))
    assert (
        "ctx (Linear): it was called on an input of shape (1, ...) that changes with the batch's samples (e.g. a "
        "batch statistic), so it cannot be attributed per sample. Use engine='auto'"
    ) in str(err.value)


def test_a_layer_called_with_its_input_as_a_keyword_is_exact():
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.h = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.h(torch.tanh(self.a(input=x)))

    torch.manual_seed(0)
    _check_pass(Keyword(), (torch.randn(4, 4), torch.randint(0, 3, (4,))), dim=16)


def test_a_deep_residual_stack_below_the_selected_layers_is_exact():
    """Forty residual blocks under the selected layers: 2**40 paths through the graph, each node visited once."""

    class Deep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre, self.a, self.h = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            z = self.pre(x)
            for _ in range(40):
                z = z + 0.01 * torch.tanh(z)
            return self.h(torch.tanh(self.a(z)))

    torch.manual_seed(0)
    _check_pass(Deep(), (torch.randn(4, 4), torch.randint(0, 3, (4,))), layers=["a", "h"], dim=16)


def test_units_the_callers_gradients_leave_out_get_zero_gradients():
    from hardmine.factored.capture import apply_rules, capture_calls

    torch.manual_seed(0)
    model = _ChangesOnBigBatches("none")
    x, y = torch.randn(3, 4), torch.randint(0, 3, (3,))
    layout = _layout(model, ["a"], dim=16)
    units, _ = plan_factored(model, layout.names)
    with capture_calls(units) as rec, torch.enable_grad():
        output = model(x)
    loss = nn.functional.cross_entropy(output, y, reduction="none")
    fg = apply_rules(units, rec, loss, output, layout, 3, deltas={})  # the caller computed none for "a"
    assert torch.equal(fg.sq_norm, torch.zeros(3, dtype=fg.sq_norm.dtype))
    assert all(not bool(v.any()) for v in fg.kron.values())


# ------------------------------------------------------------------------------------------- devices
# The test machines have no GPU; fake tensors stand in for one. Made on "meta" under torch's FakeTensorMode,
# they carry shapes, dtypes and devices but no data, and an op that mixes them with a CPU tensor fails, as it
# fails on a GPU. So "given inputs on device D, the results are on D" is checked without a GPU: a tensor left
# on the default device (the CPU) either breaks an op or shows in the result's device.
_META = torch.device("meta")


def _fake_mode():
    return pytest.importorskip("torch._subclasses.fake_tensor").FakeTensorMode()


def _devices(fg) -> set[str]:
    """The device types of everything a factored pass returned."""
    ts = [*fg.kron.values(), *fg.vectors.values(), *fg.vector_proj.values(), fg.sq_norm]
    return {t.device.type for t in ts}


def test_the_layout_builds_its_matrices_and_outputs_on_the_asked_device():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    layout = _layout(model, dim=4)
    with _fake_mode():
        for dtype in (torch.float32, torch.float64):
            p_out, p_in = layout.kron_matrices("0.weight", dtype, "meta")
            assert (p_out.device, p_in.device, p_out.dtype, p_in.dtype) == (_META, _META, dtype, dtype)
        assert layout.dense_block_matrix("0.bias", torch.float32, "meta").device == _META
        assert layout.new_output(3, _META).device == _META
        parts = {n: torch.randn(3, blk.width, device=_META) for n, blk in layout.blocks.items()}
        z = layout.assemble(parts)  # (B, out_dim)
        assert (z.device, tuple(z.shape)) == (_META, (3, layout.out_dim))
        grad = torch.randn(3, 3, 4, device=_META)  # (B, *weight.shape)
        assert layout.project_exact("0.weight", grad).device == _META


def test_tied_weight_and_outer_product_norms_are_computed_on_the_factors_device():
    with _fake_mode():
        dense = registry.GradFactors(torch.randn(2, 3, 5, device=_META), torch.randn(2, 3, 4, device=_META))
        ids = registry.GradFactors(torch.zeros(2, 6, dtype=torch.long, device=_META), torch.randn(2, 6, 4, device=_META))
        for f, g in ((dense, ids), (ids, dense), (dense, dense), (ids, ids)):
            assert registry.factors_inner(f, g).device == _META
        delta, x = torch.randn(2, 3, 5, device=_META), torch.randn(2, 3, 4, device=_META)  # (B, N, p), (B, N, q)
        assert registry.outer_sum_sq_norm(delta, x).device == _META


@pytest.mark.parametrize("n", [2, 9], ids=["ghost", "per-sample-table"])  # N^2 <= vocab * d, or not
def test_an_embedding_norm_is_computed_on_the_gradient_device(n):
    emb = nn.Embedding(5, 2, padding_idx=0)
    layout = _layout(nn.Sequential(emb), dim=4)
    with _fake_mode():
        ids = torch.zeros(3, n, dtype=torch.long, device=_META)
        request = RuleRequest(layout.kron_matrices("0.weight", torch.float32, _META), ())
        res = rule_for(emb).compute(emb, [Call(ids, torch.randn(3, n, 2, device=_META))], request)
        assert res.matrix_sq_norm.device == _META and res.matrix_proj.device == _META


def _runner(model, layer, device, out=None, output_device=None):
    """A rule runner for one selected Linear whose input is on ``device``; the model output (the default for a
    layer without gradient) on ``output_device`` (default: the same)."""
    from hardmine.factored.apply import RuleRunner

    layout = _layout(model, [layer], dim=4)
    units, _ = plan_factored(model, layout.names)
    x = torch.randn(3, 4, device=device)  # (B, d_in) captured input of the one selected Linear
    runner = RuleRunner(units, {layer: [x]}, layout, 3, torch.float32, output_device or device, out=out)
    return runner, layout


def test_a_layer_on_another_device_than_the_model_output_is_computed_on_its_own():
    # Model parallel: the output (the runner's default device) is on the CPU, this layer's input and output
    # gradient on the "GPU". Its matrices must be made for the layer's device, not the output's.
    model = nn.Sequential(nn.Linear(4, 3))
    with _fake_mode():
        runner, _ = _runner(model, "0", _META, output_device=torch.device("cpu"))
        runner.run("0", {0: torch.randn(3, 3, device=_META)})
        fg = runner.result(torch.zeros(3), torch.zeros(3, 3))
        assert set(fg.kron) == {"0.weight"} and set(fg.vectors) == {"0.bias"}
        assert _devices(fg) == {"meta"}


def test_a_layer_without_gradient_gets_zeros_on_the_output_device():
    model = nn.Sequential(nn.Linear(4, 3))
    with _fake_mode():
        runner, _ = _runner(model, "0", _META)
        runner.run("0", {})  # no gradient reached it
        fg = runner.result(torch.zeros(3, device=_META), torch.zeros(3, 3, device=_META))
        assert set(fg.kron) == {"0.weight"} and set(fg.vectors) == {"0.bias"}
        assert _devices(fg) == {"meta"}


def test_a_projection_is_written_straight_into_an_output_on_its_device_only():
    model = nn.Sequential(nn.Linear(4, 3))
    torch.manual_seed(0)
    # Same device and dtype: the rule writes its projection into the caller's output, and says so.
    z = torch.full((3, 8), float("nan"))  # (B, out_dim): 4 for the weight block, 2 + 2 for the bias
    runner, layout = _runner(model, "0", torch.device("cpu"), out=z)
    runner.run("0", {0: torch.randn(3, 3)})
    fg = runner.result(torch.zeros(3), torch.zeros(3, 3))
    assert fg.written == {"0.weight"}
    assert torch.equal(layout.block_view(z, "0.weight").reshape(3, -1), fg.kron["0.weight"])
    # An output on another device is not written into: the projection stays on the layer's device.
    with _fake_mode():
        runner, _ = _runner(model, "0", _META, out=torch.zeros(3, 8))
        runner.run("0", {0: torch.randn(3, 3, device=_META)})
        fg = runner.result(torch.zeros(3, device=_META), torch.zeros(3, 3, device=_META))
        assert fg.written == set() and _devices(fg) == {"meta"}


def test_the_norm_check_runs_its_test_input_on_the_weight_device():
    # A norm on a GPU must be checked on the GPU (a test input left on the CPU would make its forward fail and
    # the norm be refused). Fake "cuda" tensors stand in for the GPU: the forward sees devices, not values.
    fake = pytest.importorskip("torch._subclasses.fake_tensor")
    seen = []

    def recording(self, x):
        seen.append((x.device.type, self.weight.device.type))
        return _rms(self, x)

    with fake.FakeTensorMode():
        norm = _NamedNorm(recording, weight=nn.Parameter(torch.ones(4, device="cuda")))
        try:
            rule_for(norm).unsupported_reason(norm)
        except fake.DataDependentOutputException:
            pass  # comparing the outputs' values is all that fake tensors cannot do
    assert seen == [("cuda", "cuda")] * 2  # at the random weight and at weight 1


def test_the_norm_check_tolerates_rounding_both_relative_and_absolute():
    # bfloat16 nn.RMSNorm normalises in float32 and rounds once, so weight * g(x) (rounded twice) is off by up
    # to one bfloat16 step, 0.03 on outputs of size 4-8: within the relative tolerance, beyond the absolute.
    norm = nn.RMSNorm(64, dtype=torch.bfloat16)
    assert rule_for(norm).unsupported_reason(norm) is None
    # float16 outputs ~1e-5 (a huge eps) are subnormal: a step of 6e-8 is a large relative error there,
    # within the absolute tolerance.
    tiny = nn.RMSNorm(16, eps=1e10, dtype=torch.float16)
    assert rule_for(tiny).unsupported_reason(tiny) is None


# ------------------------------------------------------------------------------------------- autocast
class _AutocastTokens(nn.Module):
    """A token-wise Linear the model runs under CPU autocast: it sees a float32 (B, T, d) input and returns
    bfloat16, so its output gradient is bfloat16 while the captured input is float32."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.tok(x)  # (B, T, 5) bfloat16
        return self.head(torch.tanh(h.float()).mean(1))


@pytest.mark.parametrize("t", [3, 40], ids=["ghost", "per-sample-gradients"])  # N^2 <= 5 * 6, or not
def test_a_token_linear_under_autocast_gets_its_bfloat16_gradients(t):
    # The rule computes in the output gradient's dtype (the input cast to it, as autocast cast it for the
    # forward): the projection and the norm are the reference's up to bfloat16 rounding.
    torch.manual_seed(0)
    model = _AutocastTokens()
    batch = (torch.randn(3, t, 6), torch.randint(0, 3, (3,)))
    layout = _layout(model, "tok", dim=16)
    fg = factored_pass(model, batch, layout)
    ref = reference_per_sample_grads(model, batch, params="tok")
    assert fg.kron["tok.weight"].dtype == torch.bfloat16
    assert_close(fg.kron["tok.weight"].float(), _expected(layout, ref, "tok.weight").float(), rtol=0.05, atol=0.02)
    assert_close(fg.vectors["tok.bias"].float(), ref.grads["tok.bias"], rtol=0.05, atol=0.01)
    assert_close(fg.sq_norm.float(), ref.grad_norm.square(), rtol=0.03, atol=1e-4)


def test_a_layernorm_fed_bfloat16_with_a_float32_gradient_normalises_in_float32():
    # CUDA autocast runs layer_norm in float32: a LayerNorm after a bfloat16 layer sees a bfloat16 input and
    # returns float32 (CPU autocast keeps it in bfloat16, so this is planted). Its weight gradient
    # sum_t delta_t * x_hat_t must use x_hat in float32, as the forward did: bfloat16 would be off by ~1e-2.
    torch.manual_seed(0)
    ln = nn.LayerNorm(8)
    x = torch.randn(3, 5, 8).to(torch.bfloat16)  # (B, T, d)
    delta = torch.randn(3, 5, 8)  # (B, T, d) float32
    res = rule_for(ln).compute(ln, [Call(x, delta)], RuleRequest(None, ("weight", "bias")))
    x_hat = nn.functional.layer_norm(x.double(), (8,), eps=ln.eps)  # (B, T, d)
    assert_close(res.vectors["weight"].double(), (delta.double() * x_hat).sum(1), rtol=1e-5, atol=1e-5)
    assert_close(res.vectors["bias"], delta.sum(1))


class _AutocastTied(_TiedHidden):
    """An LM-style tied embedding / output head (``_TiedHidden``'s modules), the head called as a module under
    CPU autocast (bfloat16 output), the embedding not (autocast leaves embeddings in float32): the holders'
    gradients differ in dtype."""

    def forward(self, x):
        z = self.e(x).mean(1)  # (B, 6) float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.h(z).float()  # (B, 10)


def test_a_tied_weight_whose_holders_differ_in_dtype_is_the_sum_of_both_uses():
    torch.manual_seed(0)
    model = _AutocastTied()
    batch = (torch.randint(0, 10, (4, 7)), torch.randint(0, 10, (4,)))
    layout = _layout(model, dim=9)
    fg = factored_pass(model, batch, layout)
    ref = reference_per_sample_grads(model, batch)
    assert_close(fg.kron["e.weight"].float(), _expected(layout, ref, "e.weight").float(), rtol=0.05, atol=0.02)
    assert_close(fg.sq_norm.float(), ref.grad_norm.square(), rtol=0.03, atol=1e-4)


class _TiedEmbeddingTwice(nn.Module):
    """An embedding called on two token spans (4 and 3 positions) whose weight is also the output head's."""

    def __init__(self, padding_idx=None) -> None:
        super().__init__()
        self.e = nn.Embedding(10, 6, padding_idx=padding_idx)
        self.h = nn.Linear(6, 10, bias=False)
        self.h.weight = self.e.weight

    def forward(self, x):
        return self.h(self.e(x[:, :4]).mean(1) * self.e(x[:, 4:]).mean(1))


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_a_tied_embedding_called_twice_counts_both_calls_in_the_cross_terms(padding_idx):
    # The tied weight's norm needs the cross term <G_embedding, G_head>, and the embedding's G is the sum over
    # the positions of both its calls: each sample's two spans are joined along the positions.
    torch.manual_seed(0)
    batch = (torch.tensor([[0, 3, 3, 5, 0, 3, 9], [1, 2, 0, 0, 7, 7, 1], [4, 4, 4, 4, 0, 8, 2]]), torch.tensor([3, 0, 7]))
    _check_pass(_TiedEmbeddingTwice(padding_idx).double(), batch, dim=9)


# --------------------------------------------------------------------------------------- capture, again
def test_a_broadcast_batch_mean_is_refused_even_where_one_sample_would_match_it():
    # The batch-statistic check runs the model again on one sample fewer. Here the mean of the three probe
    # samples (1, 0, 2) equals the first sample's value but not the mean of the first two: only a batch of two
    # shows that the (1, ...) input changes with the samples.
    model = _BatchMean()
    x = torch.tensor([1.0, 0.0, 2.0, 5.0]).unsqueeze(1).expand(4, 4).contiguous()  # (B, 4)
    with pytest.raises(ValueError, match=r"ctx \(Linear\): it was called on an input of shape \(1, \.\.\.\) that changes"):
        factored_pass(model, (x, torch.randint(0, 3, (4,))), _layout(model, ["ctx"], dim=16))


class _Score(nn.Module):
    """One score per sample, ``y = x @ weight.T`` squeezed to ``(B,)``: a 1-D output, a module type of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, 4))

    def forward(self, x):
        return (x @ self.weight.T).squeeze(-1)  # (B,)


class _ScoreRule(registry.LayerRule):
    """An exact rule for _Score: sample b's weight gradient is delta_b x_b^T, one position."""

    vector_params = ()

    def compute(self, module, calls, request):
        (call,) = calls
        b = call.delta.shape[0]
        delta = call.delta.reshape(b, 1, 1, 1)  # (B, G=1, N=1, p=1)
        x = call.x.reshape(b, 1, 1, -1).to(delta.dtype)  # (B, 1, 1, 4)
        p_out, p_in = request.matrix
        proj, sq = registry.project_and_norm(delta, x, p_out[None], p_in)
        return registry.RuleResult(matrix_proj=proj, matrix_sq_norm=sq)


def test_a_broadcast_call_with_a_one_dimensional_output_is_expanded_and_exact(fresh_registry):
    # A learned (1, 4) token scored once for the whole batch: input (1, 4), output (1,). It is broadcast like
    # any (1, ...) call: expanded to one row per sample, each sample's gradient its own row.
    registry.register_layer_rule(_Score)(_ScoreRule)

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Parameter(torch.randn(1, 4))
            self.score, self.h = _Score(), nn.Linear(4, 3)

        def forward(self, x):
            return self.h(x) * torch.sigmoid(self.score(self.tok)).unsqueeze(1)  # (B, 3)

    torch.manual_seed(0)
    model = Gated().double()
    _check_pass(model, (torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))), layers=["score"], dim=4)


class _Learned(nn.Module):
    """A module called with no argument at all: it returns its own (learned) rows."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))

    def forward(self):
        return self.weight * 1.0


def test_a_module_called_without_any_argument_is_refused_by_name(fresh_registry):
    registry.register_layer_rule(_Learned)(_ScoreRule)  # never asked to compute: the call is refused first

    class UsesLearned(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rows, self.h = _Learned(), nn.Linear(4, 3)

        def forward(self, x):
            return self.h(x + self.rows().sum(0))

    model = UsesLearned()
    with pytest.raises(ValueError, match=r"rows \(_Learned\): its input or output is not a single tensor"):
        factored_pass(model, (torch.randn(3, 4), torch.randint(0, 3, (3,))), _layout(model, ["rows"], dim=4))


@pytest.mark.parametrize("ids_f", [False, True], ids=["dense", "ids"])
@pytest.mark.parametrize("low_first", [False, True], ids=["float32-first", "bfloat16-first"])
def test_factors_inner_of_holders_in_two_dtypes_is_computed_in_the_wider(ids_f, low_first):
    # A tied weight's holders run under autocast and outside it: bfloat16 factors beside float32 ones, in
    # either order. The inner product is computed in float32 from the factors as they are (no error).
    g = torch.Generator().manual_seed(3)
    b, rows, cols = 4, 7, 5

    def factors(n: int, ids: bool, dtype: torch.dtype):
        c = torch.randn(b, n, cols, generator=g).to(dtype)
        if ids:
            r = torch.randint(0, rows, (b, n), generator=g)
            dense = nn.functional.one_hot(r, rows).double()  # (B, N, rows)
        else:
            r = torch.randn(b, n, rows, generator=g).to(dtype)
            dense = r.double()
        return registry.GradFactors(r, c), dense.transpose(1, 2) @ c.double()  # (B, rows, cols)

    low, high = torch.bfloat16, torch.float32
    f, gf = factors(3, ids_f, low if low_first else high)
    h, gh = factors(4, False, high if low_first else low)
    got = registry.factors_inner(f, h)
    assert got.dtype == torch.float32
    assert_close(got.double(), (gf * gh).sum((1, 2)), rtol=1e-5, atol=1e-5)


def test_factors_inner_takes_the_batch_in_chunks_as_large_as_the_budget_allows(monkeypatch):
    # Its two (c, N, M) Gram temporaries per chunk: a budget of 2 * N * M * 2 elements means chunks of two
    # samples (fewer, larger products), never more, and never needlessly fewer.
    b, n, m = 6, 3, 4
    monkeypatch.setattr(registry, "CHUNK_ELEMENTS", 2 * n * m * 2)
    g = torch.Generator().manual_seed(4)
    f = registry.GradFactors(torch.randn(b, n, 5, generator=g), torch.randn(b, n, 2, generator=g))
    h = registry.GradFactors(torch.randn(b, m, 5, generator=g), torch.randn(b, m, 2, generator=g))
    with _Allocations() as mode:
        registry.factors_inner(f, h)
    grams = [s for s in mode.shapes if len(s) == 3 and s[1:] == (n, m)]
    assert grams and {s[0] for s in grams} == {2}


class _Free(nn.Module):
    """A module without a factored rule: its parameters are projected densely (width ``dim``, or ``a`` for a
    vector)."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(*shape))


def test_uncached_dense_names_the_dense_blocks_beyond_their_projectors_cache():
    # dim 256: width-256 matrices of 1 KiB a row; the default cache (256 MiB) holds exactly this many rows.
    rows = 256 * 2**20 // (256 * 4)
    model = nn.ModuleDict({
        "lin": nn.Linear(3, 4),  # a Kronecker weight (never counted) and a width-16 bias
        "a": _Free(1, rows - 1),
        "v": _Free(1000),  # a vector: width 16, the other projector's cache, not this one's
        "b": _Free(1, 1),  # fills the width-256 cache exactly: still cached
        "c": _Free(1, 1),  # one row past it
        "d": _Free(1, 2),  # and two more: the bytes of every uncached matrix add up
    })
    names = [n for n, _ in model.named_parameters()]
    layout = ProjectionLayout(model, names, dim=256, seed=0)
    assert layout.uncached_dense() == (["c.w", "d.w"], 3 * 256 * 4)
    small = ProjectionLayout(model, ["lin.weight", "lin.bias", "v.w", "b.w", "c.w", "d.w"], dim=256, seed=0)
    assert small.uncached_dense() == ([], 0)


def _projected_reference(model: nn.Module, batch, ext) -> torch.Tensor:
    """The reference loop's gradients projected with the extractor's layout: what ``ext(batch).z`` must be."""
    ref = reference_per_sample_grads(model, batch)
    return ext.layout.assemble({n: ext.layout.project_exact(n, g) for n, g in ref.grads.items()})


@pytest.mark.parametrize("engine", ["factored", "auto"])
def test_a_module_a_later_batch_skips_has_zero_gradients_not_an_error(engine):
    torch.manual_seed(0)
    model = Branch().double()
    taken, skipped, y = branch_batches()
    ext = GradientExtractor(model, dim=16, seed=3, engine=engine)
    for batch in ((taken, y), (skipped, y), (skipped[:1], y[:1]), (taken, y)):
        res = ext(batch)
        assert_close(res.z, _projected_reference(model, batch, ext), rtol=1e-6, atol=1e-9)
        assert_close(res.grad_norm, reference_per_sample_grads(model, batch).grad_norm)
    assert set(ext.metadata()["plan"].values()) == {"factored"}
    # A first batch without the call cannot tell a skipped module from weights used without calling it
    if engine == "factored":
        with pytest.raises(ValueError, match=r"per sample: b \(Linear\): its forward hook never fired"):
            GradientExtractor(model, dim=16, engine=engine)((skipped, y))
    else:  # sent to vmap, which cannot run this model's branch either: refused, nothing guessed
        with pytest.raises(ValueError, match=r"cannot run under torch\.func\.vmap \(it has data-dependent"):
            GradientExtractor(model, dim=16, engine=engine)((skipped, y))


@pytest.mark.parametrize("engine", ["factored", "auto"])
def test_a_later_batch_using_a_skipped_modules_weights_without_it_is_refused_not_zeroed(engine):
    # The probe saw b called; a later batch's branch uses b's weights through F.linear: its gradients are not zero,
    # and the rule, given no calls, would write zeros: refused
    torch.manual_seed(0)
    model = Branch(functional_else=True).double()
    taken, skipped, y = branch_batches()
    assert reference_per_sample_grads(model, (skipped, y)).grads["b.weight"].abs().amax() > 0
    ext = GradientExtractor(model, dim=16, seed=3, engine=engine)
    assert_close(ext((taken, y)).z, _projected_reference(model, (taken, y), ext), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match=r"module b \(Linear\): its forward hook did not fire on this batch, yet its "
                       r"parameters reach the loss: the model uses them without calling the module \(e\.g\. "
                       r"F\.linear\(x, m\.weight\)\)"):
        ext((skipped, y))
    assert_close(ext((taken, y)).z, _projected_reference(model, (taken, y), ext), rtol=1e-6, atol=1e-9)
    # Only b's bias selected: the weight the other branch uses is not, and the bias's gradient there is zero
    ext = GradientExtractor(model, layers=["a", "b.bias", "head"], dim=16, seed=3, engine=engine)
    for batch in ((taken, y), (skipped, y)):
        ref = reference_per_sample_grads(model, batch)
        want = ext.layout.assemble({n: ext.layout.project_exact(n, ref.grads[n]) for n in ext.param_names})
        assert_close(ext(batch).z, want, rtol=1e-6, atol=1e-9)


class _TiedBranch(nn.Module):
    """b and c share one weight; c is called on every batch, b only where the branch is taken."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.head = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        self.c.weight = self.b.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 4)
        h = torch.tanh(self.a(x))  # (B, 5)
        if bool(x[:, 0].gt(0).all()):
            h = h + torch.tanh(self.b(h))
        return self.head(torch.tanh(self.c(h)))


class _DeepBranch(nn.Module):
    """Thirty residual blocks (2**30 paths through the autograd graph, 90 nodes) before a branch."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(30))
        self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 4)
        h = x
        for block in self.blocks:
            h = h + torch.tanh(block(h))  # (B, 4)
        if bool(x[:, 0].gt(0).all()):
            h = h + torch.tanh(self.b(h))
        return self.head(h)


def test_the_walk_for_a_skipped_modules_weights_visits_each_node_once():
    # A residual stack has exponentially many paths from the loss to its first layer: the walk that looks for a
    # skipped module's weights must visit each node once (else this batch would not finish)
    torch.manual_seed(0)
    model = _DeepBranch().double()
    taken, skipped, y = branch_batches(4)
    ext = GradientExtractor(model, dim=16, seed=3, engine="factored")
    for batch in ((taken, y), (skipped, y)):
        assert_close(ext(batch).z, _projected_reference(model, batch, ext), rtol=1e-6, atol=1e-9)


def test_a_batch_whose_loss_needs_no_gradient_skipping_the_only_trainable_module_has_zero_vectors():
    # Everything but b frozen: a batch that skips b has a loss without autograd history, and b's vectors are zero
    torch.manual_seed(0)
    model = Branch().double()
    for p in (*model.a.parameters(), *model.head.parameters()):
        p.requires_grad_(False)
    taken, skipped, y = branch_batches()
    ext = GradientExtractor(model, dim=16, seed=3, engine="factored")
    assert ext((taken, y)).z.abs().amax() > 0
    res = ext((skipped, y))
    assert torch.equal(res.z, torch.zeros_like(res.z)) and torch.equal(res.grad_norm, torch.zeros_like(res.grad_norm))


def test_a_skipped_module_whose_tied_weight_a_called_module_uses_has_zero_gradients_of_its_own():
    # The shared weight reaches the loss through c, which is called: no evidence against b, whose share is zero
    torch.manual_seed(0)
    model = _TiedBranch().double()
    taken, skipped, y = branch_batches()
    ext = GradientExtractor(model, dim=16, seed=3, engine="factored")
    for batch in ((taken, y), (skipped, y)):
        assert_close(ext(batch).z, _projected_reference(model, batch, ext), rtol=1e-6, atol=1e-9)
