"""The factored layer rules and layout: behaviour the mutation run asked for."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_factored import _check_pass
from torch import nn
from torch.testing import assert_close

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
