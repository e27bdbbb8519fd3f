"""The factored engine against the slow per-sample autograd loop, layer rule by layer rule.

Every check compares the factored pass (one batched forward + backward through hooks) with the exact
per-sample gradients of ``reference_per_sample_grads`` projected by an explicit ``torch.kron(P_out, P_in)``,
in float64, on batch size 1 and larger.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from models import CNN, MLP, TinyTransformer, as_float64, token_batch
from torch import nn
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

import hardmine.factored.conv2d as conv2d_rule
import hardmine.factored.registry as registry
from hardmine.engine import GradientExtractor
from hardmine.extract import reference_per_sample_grads
from hardmine.factored import (
    LayerRule,
    ProjectionLayout,
    RuleResult,
    factored_pass,
    kron_factors,
    register_layer_rule,
)
from hardmine.factored.capture import _lowest
from hardmine.factored.registry import outer_sum_sq_norm
from hardmine.params import select_parameters
from hardmine.project import random_matrix

ROOT = Path(__file__).resolve().parents[1]


def _layout(model, layers=None, dim=12, seed=5):
    return ProjectionLayout(model, select_parameters(model, layers), dim=dim, seed=seed)


def _expected(layout: ProjectionLayout, ref, name: str) -> torch.Tensor:
    """The exact per-sample gradient of ``name`` projected with the explicit Kronecker matrix (float64)."""
    blk = layout.blocks[name]
    a, b = blk.factors
    rows, cols = blk.matrix_shape
    p_out = random_matrix(rows, a, seed=layout.seed, key=f"{name}:out").double()
    p_in = random_matrix(cols, b, seed=layout.seed, key=f"{name}:in").double()
    g = ref.grads[name]
    return (g.double().reshape(g.shape[0], -1) @ torch.kron(p_out, p_in)).to(g.dtype)  # (B, a*b)


def _check_pass(model, batch, layers=None, dim=12):
    """factored_pass == reference for every selected parameter; returns the pass result."""
    layout = _layout(model, layers, dim=dim)
    fg = factored_pass(model, batch, layout)
    ref = reference_per_sample_grads(model, batch, params=layers)
    for name, blk in layout.blocks.items():
        if blk.kind == "kron":
            assert_close(fg.kron[name], _expected(layout, ref, name), msg=lambda m, n=name: f"{n}: {m}")
        else:
            assert_close(fg.vectors[name], ref.grads[name], msg=lambda m, n=name: f"{n}: {m}")
    assert_close(fg.sq_norm.sqrt(), ref.grad_norm)
    assert_close(fg.loss, ref.loss)
    assert_close(fg.output, ref.output)
    return fg, ref


# ------------------------------------------------------------------------------------------ models
class TokenMLP(nn.Module):
    """Embedding(padding_idx) -> LayerNorm -> token-wise Linear (B, T, d) -> masked mean -> Linear."""

    def __init__(self, vocab: int = 20, d: int = 6, hidden: int = 7, n_classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d, padding_idx=0)
        self.norm = nn.LayerNorm(d)
        self.tok = nn.Linear(d, hidden)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.tok(self.norm(self.embed(input_ids))))  # (B, T, hidden)
        m = attention_mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1.0))  # (B, C)


class ConvNet(nn.Module):
    def __init__(self, **conv) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, **conv)
        with torch.no_grad():
            n = self.conv(torch.zeros(1, 4, 9, 9)).numel()
        self.fc = nn.Linear(n, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def _tokens(b, t=7, vocab=20, seed=0):
    return (token_batch(b, t=t, vocab=vocab, seed=seed), torch.randint(0, 3, (b,)))


# ---------------------------------------------------------------------------------- exactness per rule
@pytest.mark.parametrize("b", [1, 7])
def test_linear_2d_inputs(b):
    model = MLP().double()
    fg, _ = _check_pass(model, (torch.randn(b, 12, dtype=torch.float64), torch.randint(0, 4, (b,))))
    assert fg.kron["fc1.weight"].shape == (b, 12)  # dim 12 = 3 x 4


@pytest.mark.parametrize("b", [1, 6])
def test_linear_token_inputs_with_one_position(b, monkeypatch):
    # (B, 1, d) inputs take the one-position route of 2-D inputs. That route needs the pass's dtype to be
    # the projection matrices' (float32), so the model is float32 here; the count of route calls proves it
    # was taken for both layers (the (B, 1, 5) one and the 2-D head), and the result is still exact.
    import hardmine.factored.linear as linear_rule

    calls = []
    route = linear_rule._one_position_with_bias

    def spy(delta, *args, **kwargs):
        calls.append(tuple(delta.shape))
        return route(delta, *args, **kwargs)

    monkeypatch.setattr(linear_rule, "_one_position_with_bias", spy)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 4)
            self.h = nn.Linear(4, 3)

        def forward(self, x):
            return self.h(torch.tanh(self.a(x)).mean(1))

    _check_pass(Net(), (torch.randn(b, 1, 5), torch.randint(0, 3, (b,))))
    assert sorted(calls) == [(b, 3), (b, 4)]


@pytest.mark.parametrize("b", [1, 6])
def test_token_inputs_with_padding_embedding_layernorm(b):
    model = TokenMLP().double()
    batch = _tokens(b, seed=b)
    assert (batch[0]["input_ids"] == 0).any() or b == 1  # padding positions are present
    _check_pass(model, batch, dim=16)


def test_embedding_padding_rows_get_no_gradient_and_repeated_ids_pair_up():
    model = TokenMLP(vocab=5).double()
    ids = torch.tensor([[1, 1, 2, 0, 0], [3, 3, 3, 3, 3], [0, 4, 0, 4, 1]])
    batch = ({"input_ids": ids, "attention_mask": (ids != 0).long()}, torch.tensor([0, 1, 2]))
    _, ref = _check_pass(model, batch, layers="embed", dim=9)
    assert ref.grads["embed.weight"][:, 0].abs().max() == 0  # padding_idx row
    # Long inputs over a tiny table take the materialising branch of the ghost norm (N^2 > V*d).
    small = TokenMLP(vocab=3, d=3).double()  # d=3: LayerNorm over 2 features would pass no gradient back
    ids = torch.randint(0, 3, (4, 12))
    _check_pass(
        small, ({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.randint(0, 3, (4,))), dim=4
    )


@pytest.mark.parametrize("vocab, d, t", [(20, 6, 7), (3, 2, 9)])  # ghost form / materialising (T^2 > V*d)
def test_embedding_padding_positions_that_receive_gradient_are_ignored(vocab, d, t):
    # An unmasked mean sends gradient to padding positions too; nn.Embedding's backward drops it for
    # padding_idx, and so must the factored rule (projection and norm).
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, d, padding_idx=1)
            self.fc = nn.Linear(d, 3)

        def forward(self, ids):
            return self.fc(torch.tanh(self.embed(ids)).mean(1))

    model = Net().double()
    ids = torch.randint(0, vocab, (5, t), generator=torch.Generator().manual_seed(vocab))
    ids[:, -2:] = 1  # padding present in every sample
    ids[0] = 1  # and one sample that is all padding
    fg, ref = _check_pass(model, (ids, torch.randint(0, 3, (5,))), layers="embed", dim=4)
    assert ref.grads["embed.weight"][:, 1].abs().max() == 0
    assert fg.kron["embed.weight"][0].abs().max() == 0 and fg.sq_norm[0] == 0


def test_layernorm_with_multidimensional_normalized_shape():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm((4, 5))
            self.fc = nn.Linear(60, 2)

        def forward(self, x):
            return self.fc(self.norm(x).flatten(1))

    model = Net().double()
    with torch.no_grad():
        model.norm.weight.normal_()
        model.norm.bias.normal_()
    _check_pass(model, (torch.randn(5, 3, 4, 5, dtype=torch.float64), torch.randint(0, 2, (5,))))


CONV_CONFIGS = [
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, padding=2, dilation=2, groups=2),
    dict(kernel_size=(2, 3), padding="same", padding_mode="reflect"),
    dict(kernel_size=(2, 3), padding="same"),
    dict(kernel_size=3, padding=1, padding_mode="circular", stride=(1, 2)),
    dict(kernel_size=2, padding="valid", groups=2, bias=False),
]


@pytest.mark.parametrize("b", [1, 5])
@pytest.mark.parametrize("conv", CONV_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_conv2d_stride_padding_dilation_groups(conv, b):
    model = ConvNet(**conv).double()
    _check_pass(model, (torch.randn(b, 4, 9, 9, dtype=torch.float64), torch.randint(0, 3, (b,))), dim=16)


@pytest.mark.parametrize("conv", CONV_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_conv2d_grouped_route(conv, monkeypatch):
    # Layers with many channels per group build per-sample gradients with one grouped convolution backward;
    # force that route on the small test layers (and small chunks, so it runs chunk by chunk).
    monkeypatch.setattr(conv2d_rule, "GROUPED_MIN_CHANNELS", 1)
    monkeypatch.setattr(registry, "CHUNK_ELEMENTS", 2500)
    model = ConvNet(**conv).double()
    chunks = []
    real = conv2d_rule._grouped_weight_grads

    def counting(module, x, delta):
        chunks.append(len(x))
        return real(module, x, delta)

    monkeypatch.setattr(conv2d_rule, "_grouped_weight_grads", counting)
    _check_pass(model, (torch.randn(5, 4, 9, 9, dtype=torch.float64), torch.randint(0, 3, (5,))), dim=16)
    assert sum(chunks) == 5 and max(chunks) > 1  # taken, several samples per grouped call


def test_cnn_and_small_chunks(monkeypatch):
    # A tiny chunk budget forces every rule through its batch-chunked code paths.
    monkeypatch.setattr(registry, "CHUNK_ELEMENTS", 64)
    model = CNN().double()
    _check_pass(model, (torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (6,))))
    _check_pass(TokenMLP().double(), _tokens(5), dim=16)


def test_module_called_twice_sums_both_calls():
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 5)
            self.b = nn.Linear(5, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))

    _check_pass(Reuse().double(), (torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))))


class NoGradBranch(nn.Module):
    """``b`` runs under ``torch.no_grad``: selected, but no gradient reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.h = nn.Linear(4, 5), nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = self.b(x)  # selected, but no gradient reaches it
        return self.h(torch.tanh(self.a(x)) + t)


def test_module_run_under_no_grad_has_zero_gradient():
    Frozen = NoGradBranch
    fg, ref = _check_pass(
        Frozen().double(), (torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))
    )
    assert fg.kron["b.weight"].abs().max() == 0 and ref.grads["b.weight"].abs().max() == 0


@pytest.mark.parametrize("n", [1, 3, 12])
def test_outer_sum_sq_norm_both_branches(n):
    delta, x = torch.randn(4, n, 3, dtype=torch.float64), torch.randn(4, n, 2, dtype=torch.float64)
    brute = torch.stack([(delta[i].T @ x[i]).pow(2).sum() for i in range(4)])
    assert_close(outer_sum_sq_norm(delta, x), brute)  # n=12: 144 > 6 takes the materialising branch


# ------------------------------------------------------------------------------- engines agree
def _all_engines(model, batch, dim=16, engines=("vmap", "auto", "factored")):
    ref = reference_per_sample_grads(model, batch)
    out = {}
    for eng in engines:
        ext = GradientExtractor(model, dim=dim, seed=2, engine=eng)
        out[eng] = (ext, ext(batch))
        assert out[eng][1].z.dtype == torch.float32 and out[eng][1].z.shape == (ref.batch_size, ext.out_dim)
        assert_close(out[eng][1].grad_norm, ref.grad_norm)
        assert_close(out[eng][1].loss, ref.loss)
    z_vmap = out["vmap"][1].z
    for eng in engines:
        assert_close(out[eng][1].z, z_vmap, rtol=1e-5, atol=1e-6)
    return out, ref


@pytest.mark.parametrize("b", [1, 6])
def test_engines_agree_on_mlp_and_cnn(b):
    _all_engines(MLP().double(), (torch.randn(b, 12, dtype=torch.float64), torch.randint(0, 4, (b,))))
    out, _ = _all_engines(
        CNN().double(), (torch.randn(b, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (b,)))
    )
    assert set(out["factored"][0].metadata()["plan"].values()) == {"factored"}


def test_transformer_auto_sends_attention_to_vmap(caplog):
    model = TinyTransformer()
    # an attention configuration outside its factored rule (hardmine.factored.attention): add_bias_kv
    model.encoder.self_attn = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True)
    model = model.double()
    batch = (token_batch(5, seed=4), torch.randint(0, 3, (5,)))
    with caplog.at_level(logging.INFO, logger="hardmine.engine"):
        out, ref = _all_engines(model, batch, engines=("vmap", "auto"))
    ext, res = out["auto"]
    plan = ext.metadata()["plan"]
    attn = [n for n in plan if n.startswith("encoder.self_attn.")]
    assert attn and all(plan[n] == "vmap" for n in attn)
    assert all(v == "factored" for n, v in plan.items() if n not in attn)
    reason = ext.metadata()["plan_reasons"]["encoder.self_attn.out_proj.weight"]
    assert "multi_head_attention_forward" in reason and "add_bias_kv=True" in reason
    assert any(
        "factored layers:" in r.message and "encoder.linear1 (Linear)" in r.message for r in caplog.records
    )
    # The concatenated vector is the exact gradient projected block by block.
    layout = ext.layout
    for blk in layout.blocks.values():
        got = res.z[:, blk.offset : blk.offset + blk.width]
        if blk.kind == "kron":
            want = _expected(layout, ref, blk.param)
        else:
            want = ref.grads[blk.param].reshape(5, -1) @ layout.dense_matrix(blk.param).double()
        assert_close(got, want.float(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"engine='factored' cannot handle.*self_attn.*engine='auto'"):
        GradientExtractor(model, engine="factored")


def test_layout_dims_and_metadata():
    model = TokenMLP().double()
    ext = GradientExtractor(model, dim=16, engine="auto")
    widths = {blk["param"]: blk["width"] for blk in ext.metadata()["layout"]}
    # weights: 4 x 4 = 16; biases and LayerNorm vectors: 4 (the smaller factor)
    assert widths == {
        "embed.weight": 16,
        "norm.weight": 4,
        "norm.bias": 4,
        "tok.weight": 16,
        "tok.bias": 4,
        "head.weight": 16,
        "head.bias": 4,
    }
    assert ext.out_dim == sum(widths.values()) == ext.metadata()["out_dim"]
    json.dumps(ext.metadata())  # JSON-ready
    assert kron_factors(256) == (16, 16) and kron_factors(512) == (16, 32) and kron_factors(12) == (3, 4)


def test_kronecker_projection_preserves_squared_norms_in_expectation():
    # E[||kron(P_out, P_in)^T vec(G)||^2] = ||G||^2: averaged over 300 fixed seeds the ratio is near 1.
    g = torch.randn(3, 6, 8, dtype=torch.float64)  # three (6 x 8) "gradients"
    model = nn.Linear(8, 6)
    ratios = []
    for seed in range(300):
        layout = ProjectionLayout(model, ["weight"], dim=16, seed=seed)
        z = layout.project_exact("weight", g).double()  # (3, 16)
        ratios.append(z.pow(2).sum(1) / g.pow(2).sum((1, 2)))
    mean = torch.stack(ratios).mean(0)
    assert_close(mean, torch.ones(3, dtype=torch.float64), rtol=0, atol=0.15)


def test_same_seed_same_matrices_any_batch_size():
    model = TokenMLP().double()
    ids = token_batch(6, seed=9)
    y = torch.randint(0, 3, (6,))
    big = GradientExtractor(model, dim=16, seed=7, engine="factored")(({k: v for k, v in ids.items()}, y))
    one = GradientExtractor(model, dim=16, seed=7, engine="factored")(
        ({k: v[:1] for k, v in ids.items()}, y[:1])
    )
    assert_close(one.z[0], big.z[0], rtol=1e-5, atol=1e-6)
    l1, l2 = _layout(model, dim=16, seed=7), _layout(model, dim=16, seed=7)
    for m1, m2 in zip(l1.kron_matrices("tok.weight"), l2.kron_matrices("tok.weight"), strict=True):
        assert torch.equal(m1, m2)
    other = GradientExtractor(model, dim=16, seed=8, engine="factored")(
        ({k: v[:1] for k, v in ids.items()}, y[:1])
    )
    assert not torch.allclose(other.z, one.z)


# -------------------------------------------------------------------- what the hooks cannot see
class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.tanh(F.linear(x, self.a.weight, self.a.bias)))


class SeqFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):  # (B, T, 5)
        return self.b(self.a(x.transpose(0, 1)).mean(0))  # a sees (T, B, 5)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.e = nn.Embedding(10, 6)
        self.h = nn.Linear(6, 10, bias=False)
        self.h.weight = self.e.weight

    def forward(self, x):
        return self.h(self.e(x).mean(1))


@pytest.mark.parametrize(
    ("cls", "x", "pattern"),
    [
        (Functional, torch.randn(4, 5), r"a \(Linear\): its forward hook never fired"),
        (SeqFirst, torch.randn(4, 7, 5), r"a \(Linear\): it saw input shape \(7, 3, 5\).*not on dimension 0"),
    ],
)
def test_unattributable_modules_fall_back_under_auto_and_fail_under_factored(cls, x, pattern):
    model = cls().double()
    x = x.double() if x.is_floating_point() else x
    batch = (x, torch.randint(0, 3, (4,)))
    ref = reference_per_sample_grads(model, batch)
    auto = GradientExtractor(model, dim=9, engine="auto")
    res = auto(batch)
    assert "vmap" in auto.metadata()["plan"].values()
    assert_close(res.grad_norm, ref.grad_norm)
    assert_close(res.z, GradientExtractor(model, dim=9, engine="vmap")(batch).z, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=pattern):
        GradientExtractor(model, dim=9, engine="factored")(batch)


@pytest.mark.parametrize("b", [1, 4])
def test_tied_weights_are_factored_once_and_exact(b):
    # An Embedding and a Linear sharing one weight (input embedding = LM head): one block, the sum of both uses.
    model = Tied().double()
    batch = (torch.randint(0, 10, (b, 7)), torch.randint(0, 3, (b,)))
    auto = GradientExtractor(model, dim=9, engine="auto")
    res = auto(batch)
    assert set(auto.metadata()["plan"].values()) == {"factored"} and list(auto.metadata()["plan"]) == ["e.weight"]
    ref = reference_per_sample_grads(model, batch)
    assert_close(res.grad_norm, ref.grad_norm)
    assert_close(res.z, GradientExtractor(model, dim=9, engine="vmap")(batch).z, rtol=1e-5, atol=1e-6)


def test_output_modified_in_place_is_protected():
    class InplaceCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.r = nn.ReLU(inplace=True)
            self.fc = nn.Linear(64, 3)

        def forward(self, x):
            return self.fc(self.r(self.c(x)).flatten(1))

    model = InplaceCNN().double()
    _all_engines(model, (torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (5,))))


def test_embedding_max_norm_goes_to_vmap():
    model = TokenMLP().double()
    model.embed.max_norm = 1.0
    ext = GradientExtractor(model, engine="auto", dim=4)
    assert ext.metadata()["plan"]["embed.weight"] == "vmap"
    assert "max_norm" in ext.metadata()["plan_reasons"]["embed.weight"]


def test_a_new_layer_type_is_one_registered_class():
    class Scale(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(d))

        def forward(self, x):
            return x * self.weight

    @register_layer_rule(Scale)
    class ScaleRule(LayerRule):
        matrix_param = None
        vector_params = ("weight",)

        def compute(self, module, calls, request):
            b = calls[0].delta.shape[0]
            g = sum((c.delta * c.x).reshape(b, -1, module.weight.numel()).sum(1) for c in calls)  # (B, d)
            return RuleResult(vectors={"weight": g})

    model = nn.Sequential(nn.Linear(4, 5), Scale(5), nn.Tanh(), nn.Linear(5, 2)).double()
    fg, _ = _check_pass(model, (torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 2, (6,))))
    assert "1.weight" in fg.vectors
    with pytest.raises(ValueError, match=r"already registered"):
        register_layer_rule(nn.Linear)(ScaleRule)


def test_randomness_different_draws_per_sample_masks():
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 2)).double().train()
    x = torch.randn(1, 6, dtype=torch.float64).repeat(8, 1)
    out = GradientExtractor(model, dim=4, engine="factored", randomness="different")(
        (x, torch.zeros(8, dtype=torch.long))
    )
    assert not torch.allclose(out.z[0], out.z[1])
    assert model.training


# --------------------------------------------------------------------------- model left untouched
def test_model_untouched_and_usable_afterwards():
    model = TinyTransformer(dropout=0.1).double()
    model.train()
    modes = {n: m.training for n, m in model.named_modules()}
    attrs = {n: set(vars(m)) for n, m in model.named_modules()}
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batch = (token_batch(4), torch.randint(0, 3, (4,)))
    GradientExtractor(model, dim=9, engine="auto")(batch)
    with pytest.raises(ValueError):  # a failing pass removes its hooks too
        GradientExtractor(model, dim=9, engine="auto", loss_fn=lambda out, y: out.sum())(batch)
    for n, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks, n
        assert set(vars(m)) == attrs[n], n
        assert m.training == modes[n], n
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in model.parameters())
    # A normal training step still works.
    model.zero_grad()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(5)  # the same dropout masks for the step and for the autograd reference below
    loss = F.cross_entropy(model(**batch[0]), batch[1])
    loss.backward()
    # The step's gradients are plain autograd's for the same loss: nothing left behind alters them.
    torch.manual_seed(5)
    params = list(model.parameters())
    want = torch.autograd.grad(F.cross_entropy(model(**batch[0]), batch[1]), params)
    for p, g in zip(params, want):
        assert p.grad is not None and torch.equal(p.grad, g)
    opt.step()
    assert not torch.equal(model.classifier.weight, state["classifier.weight"])


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out

    @property
    def largest(self) -> int:
        return max(math.prod(s) for s in self.shapes)


@pytest.mark.parametrize("tokens", [False, True])
def test_no_per_sample_weight_gradient_is_formed(tokens):
    b, d_in, d_out = 32, 48, 40
    model = nn.Sequential(nn.Linear(d_in, d_out), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(b, 4, d_in) if tokens else torch.randn(b, d_in)
    model(x)  # materialise the lazy layer
    layout = _layout(model, "0", dim=64)
    with _Shapes() as mode:
        factored_pass(model, (x, torch.randint(0, 3, (b,))), layout)
    assert mode.largest < b * d_out * d_in // 4  # every tensor of the pass is far below one (B, d_out*d_in)


def test_conv_per_sample_gradients_only_in_bounded_chunks(monkeypatch):
    # conv2 here has few weights and many positions, so its exact norm goes through per-sample gradients
    # (16 x 36 each): they must come a bounded chunk of samples at a time, never for the whole batch.
    monkeypatch.setattr(registry, "CHUNK_ELEMENTS", 12_000)
    b = 32
    model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(16 * 64, 3))
    batch = (torch.randn(b, 4, 8, 8), torch.randint(0, 3, (b,)))
    layout = _layout(model, "0", dim=16)
    with _Shapes() as mode:
        fg = factored_pass(model, batch, layout)
    per_sample = [s for s in mode.shapes if s[-2:] == (16, 36)]
    assert per_sample and max(math.prod(s) for s in per_sample) <= 12_000 < b * 16 * 36
    ref = reference_per_sample_grads(model, batch, params="0")
    assert_close(fg.sq_norm.sqrt(), ref.grad_norm, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("which", ["mlp", "cnn", "tokens"])
def test_float32_models_write_in_place_and_match_vmap(which):
    # float32 models take the in-place path (projections written straight into the output).
    if which == "mlp":
        model, batch = MLP(), (torch.randn(9, 12), torch.randint(0, 4, (9,)))
    elif which == "cnn":
        model, batch = CNN(), (torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,)))
    else:
        model, batch = TokenMLP(), _tokens(7)
    fact = GradientExtractor(model, dim=16, engine="factored")(batch)
    vm = GradientExtractor(model, dim=16, engine="vmap")(batch)
    assert_close(fact.z, vm.z, rtol=1e-4, atol=1e-5)
    assert_close(fact.grad_norm, vm.grad_norm, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("b", [1, 5])
def test_float32_linear_projects_its_bias_fused_with_p_out(b):
    # 2-D float32 inputs: the Linear rule projects the bias itself, in one matmul with P_out. The result must
    # be the layout's own dense projection of the exact bias gradient.
    model = MLP()
    batch = (torch.randn(b, 12), torch.randint(0, 4, (b,)))
    layout = _layout(model, dim=16)
    fg = factored_pass(model, batch, layout)
    biases = [n for n, blk in layout.blocks.items() if blk.kind == "dense"]
    assert biases and set(fg.vector_proj) == set(biases)
    ref = reference_per_sample_grads(model, batch)
    for name in biases:
        assert_close(fg.vector_proj[name], layout.project_dense(name, ref.grads[name]), rtol=1e-4, atol=1e-6)
    assert_close(fg.sq_norm.sqrt(), ref.grad_norm, rtol=1e-4, atol=1e-6)
    # float64 models keep the caller's dense projection (no rule-side projection offered).
    assert factored_pass(model.double(), (batch[0].double(), batch[1]), layout).vector_proj == {}


class SharedInput(nn.Module):
    """Three Linear layers read one token input, like attention's q/k/v."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.q, self.k, self.v = (nn.Linear(6, 6) for _ in range(3))
        self.head = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)  # (B, T, 6): one input for q, k and v
        y = self.q(h) * torch.tanh(self.k(h)) + self.v(h)
        return self.head(y.mean(1))


@pytest.mark.parametrize("b", [1, 4])
def test_modules_reading_one_input_share_its_gram_and_stay_exact(b, gram_computations):
    computed = gram_computations
    torch.manual_seed(0)
    batch = (torch.randint(0, 20, (b, 5)), torch.randint(0, 3, (b,)))  # T=5: 25 <= 6*6, the ghost form
    _check_pass(SharedInput().double(), batch, dim=9)  # exact against the per-sample autograd loop
    assert computed == [(b, 5, 6)]  # q/k/v: one Gram of their shared input, computed once


class NarrowKV(SharedInput):
    """Grouped-query-like: k and v are narrow, so their ghost route does not apply (T^2 > p*q)."""

    def __init__(self) -> None:
        super().__init__()
        self.k, self.v = nn.Linear(6, 2), nn.Linear(6, 2)
        self.head = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)  # (B, T, 6)
        y = self.q(h) + torch.tanh(self.k(h) * self.v(h)).sum(-1, keepdim=True)
        return self.head(y.mean(1))


def test_a_counted_reader_that_skips_the_shared_gram_releases_it(gram_caches):
    caches = gram_caches
    torch.manual_seed(0)
    batch = (torch.randint(0, 20, (4, 5)), torch.randint(0, 3, (4,)))
    _check_pass(NarrowKV().double(), batch, dim=9)  # exact
    (cache,) = caches
    assert cache._grams == {}  # nothing left held after the pass (k/v took the explicit route)


# --------------------------------------------------------------------------------------- bad options
@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(dim=17), r"dim=17 only splits into Kronecker factors 1 x 17.*dim=16"),
        (dict(dim=0), r"dim=0 must be a positive integer"),
        (dict(engine="fast"), r"engine='fast' is not a valid choice.*'factored'"),
        (dict(randomness="same", engine="factored"), r"randomness='same'.*vmap"),
        (dict(chunk_size=0), r"chunk_size=0"),
        (dict(loss_fn="hinge"), r"loss='hinge'"),
        (dict(seed=-1), r"seed=-1"),
        (dict(kind="uniform"), r"kind='uniform'"),
        (dict(layers="nope"), r"'nope' matches no trainable parameter"),
    ],
)
def test_bad_options_are_clear_value_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        GradientExtractor(MLP(), **kwargs)


def test_bad_loss_shape_and_model():
    with pytest.raises(ValueError, match=r"one loss per sample, shape \(3,\)"):
        GradientExtractor(MLP(), engine="factored", loss_fn=lambda o, y: o.sum())(
            (torch.randn(3, 12), torch.tensor([0, 1, 2]))
        )
    with pytest.raises(ValueError, match=r"model must be a torch.nn.Module"):
        GradientExtractor("model")
    with pytest.raises(ValueError, match=r"nn.Module subclass"):
        register_layer_rule(int)


# ------------------------------------------------------------------------------------ benchmark smoke
def test_bench_quick_writes_rows(tmp_path):
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_extract.py"),
            "--quick",
            "--out",
            str(out),
            "--md",
            str(md),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert {(r["model"], r["method"]) for r in rows} == {
        (m, k)
        for m in ("mlp", "cnn", "transformer")
        for k in ("train_step", "naive_loop", "vmap_dense", "factored")
    }
    for r in rows:
        assert set(r) == {
            "model",
            "method",
            "samples_per_s",
            "ratio_to_train_step",
            "peak_extra_mb",
            "proj_dim",
        }
        assert r["samples_per_s"] > 0 and r["peak_extra_mb"] >= 0
    assert "| model |" in md.read_text() and "factored" in proc.stdout


def test_bench_keep_heap_needs_worker_processes(tmp_path):
    # The allocator switches are environment variables read at process start: an in-process run cannot
    # honour them.
    script = str(ROOT / "scripts" / "bench_extract.py")
    proc = subprocess.run(
        [sys.executable, script, "--quick", "--keep-heap", "--out", str(tmp_path / "b.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--keep-heap" in proc.stderr and not (tmp_path / "b.json").exists()


def test_bench_chunk_elements_and_split_products_reach_the_rules_in_worker_processes(tmp_path):
    # --chunk-elements sets the rules' budget in the worker processes too: at one element per chunk every
    # sample is its own chunk, which the run note reports; a budget below one is refused. --split-products
    # reaches them the same way (a worker that ran without it would stop the run).
    script = str(ROOT / "scripts" / "bench_extract.py")
    out = tmp_path / "b.json"
    args = ["--models", "cnn", "--methods", "train_step,factored", "--batch", "3", "--target-dim", "16",
            "--min-time", "0", "--min-iters", "1", "--warmup", "0", "--warmup-time", "0", "--repeats", "1",
            "--threads", "1", "--out", str(out)]
    proc = subprocess.run([sys.executable, script, *args, "--chunk-elements", "1", "--split-products"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (
        "the rules' chunk budget 1 elements (--chunk-elements); the rules' large float32 products as bfloat16 "
        "pieces on cpu (--split-products)."
    ) in out.with_suffix(".md").read_text()
    bad = subprocess.run([sys.executable, script, *args, "--chunk-elements", "0"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "--chunk-elements=0 must be at least 1" in bad.stderr


def test_lowest_captured_outputs_in_a_branching_graph():
    # The pass asks autograd for gradients at the lowest captured outputs only; every other captured output
    # must lie above one of them, or its hook would never fire.
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(4, 4, requires_grad=True)
    a = x @ w  # lowest
    b = torch.tanh(a) @ w  # above a
    c = (x * 2) @ w  # a parallel branch: lowest
    d = (b + c).sin()  # above a, b and c
    e = torch.relu(x) + 1  # its own branch: lowest
    f = d * e + b  # above everything, reached along several paths
    got = _lowest([f, d, a, b, c, e])
    assert [id(t) for t in got] == [id(a), id(c), id(e)]


def test_a_tied_head_is_selected_by_its_own_name_too():
    from hardmine.params import select_parameters

    model = Tied()
    assert select_parameters(model, "h") == ["e.weight"] == select_parameters(model, "e")  # one parameter
    assert select_parameters(model, ["h", "e"]) == ["e.weight"]  # counted once


def test_bench_scan_records_its_device_and_refuses_one_it_cannot_use(tmp_path):
    # scripts/bench_scan.py --device: the JSON and the Markdown name the device the models ran on, and a device
    # this machine lacks is a usage error before any child runs or any result file is written.
    script = str(ROOT / "scripts" / "bench_scan.py")
    out = tmp_path / "scan.json"
    common = ["--n", "3000", "--repeats", "1", "--no-demo", "--no-neighbor-scores", "--json-out", str(out)]
    proc = subprocess.run(
        [sys.executable, script, *common, "--device", "cpu"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["settings"]["device"] == "cpu"
    assert [(r["series"], r["n"]) for r in res["runs"]] == [("synthetic", 3000)]
    md = out.with_suffix(".md").read_text()
    assert "| synthetic MLP | 3,000 |" in md and "Models on device" not in md and str(out) in md
    out.unlink()
    out.with_suffix(".md").unlink()
    missing = "nonsense" if torch.cuda.is_available() else "cuda"
    proc = subprocess.run(
        [sys.executable, script, *common, "--device", missing], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and f"--device={missing}" in proc.stderr.replace("'", "")
    assert not out.exists() and not out.with_suffix(".md").exists()


# ------------------------------------------------------------------- large products as bfloat16 pieces
# float32 numbers below bfloat16's largest (about 3.39e38; a larger one would round to infinity)
finite32 = st.floats(-(2.0**127), 2.0**127, width=32)


@given(finite32)
def test_bf16_pieces_are_bfloat16_and_add_up_to_the_float32(x):
    t = torch.tensor([x], dtype=torch.float32)
    pieces = registry._bf16_pieces(t)
    assert [p.dtype for p in pieces] == [torch.bfloat16] * 3
    total = sum(p.double() for p in pieces).item()
    if abs(x) >= 2.0**-100:
        assert total == x  # 8 + 8 + 8 significant bits hold float32's 24
    else:  # below, a piece may fall under bfloat16's smallest subnormal (2^-133): lost, never more
        assert abs(total - x) <= 2.0**-133
    # each piece rounds what the ones before leave: at most half a bfloat16 step of the rest (2^-9)
    p0, p1, p2 = (abs(p.double().item()) for p in pieces)
    assert p1 <= 2**-8 * p0 and p2 <= 2**-8 * p1


@given(st.floats(-(2.0**60), 2.0**60, width=32), st.floats(-(2.0**60), 2.0**60, width=32))
def test_split_product_of_two_numbers_is_their_float32_product(x, y):
    # One term: the three piece products left out are about 2^-23 of |x y| together, so the result is the
    # exact product within a few float32 steps (2^-21 of it). A missing piece product (2^-18 of |x y| or
    # more) or a piece in the wrong place fails.
    a = torch.tensor([[[x]]], dtype=torch.float32)  # (1, 1, 1)
    b = torch.tensor([[[y]]], dtype=torch.float32)
    got = registry.split_product(a, b)
    assert got.shape == (1, 1, 1) and got.dtype == torch.float32
    exact = x * y  # float64: exact for two float32 numbers
    # plus what bfloat16 cannot hold of a float32 subnormal (below 2^-133) and float32's own underflow
    floor = 2.0**-133 * (abs(x) + abs(y)) + 2.0**-149
    assert abs(got.item() - exact) <= 2**-21 * abs(exact) + floor


@pytest.mark.parametrize(
    "lead, m, k, n", [((), 1, 1, 1), ((3,), 5, 64, 7), ((2, 3), 4, 9, 6), ((1, 1), 16, 300, 1), ((4,), 1, 2, 9)]
)
def test_split_product_matches_float32_matmul_to_rounding(lead, m, k, n):
    # Against float64: the split's error is float32 rounding of the sums (as a float32 matmul's), over a wide
    # range of magnitudes.
    a = torch.randn(*lead, m, k) * torch.exp(3 * torch.randn(*lead, m, k))
    b = torch.randn(*lead, k, n) * torch.exp(3 * torch.randn(*lead, k, n))
    scale = a.abs().double() @ b.abs().double()  # (..., m, n) what rounding is relative to
    exact = a.double() @ b.double()
    got = registry.split_product(a, b)
    assert got.shape == (*lead, m, n) and got.dtype == torch.float32
    err = ((got.double() - exact).abs() / scale).max().item()
    plain = (((a @ b).double() - exact).abs() / scale).max().item()
    assert err <= max(4 * plain, 2**-22)


def test_large_product_splits_only_float32_on_the_listed_devices(monkeypatch):
    calls = []
    real = registry.split_product
    monkeypatch.setattr(registry, "split_product", lambda a, b: calls.append(a.dtype) or real(a, b))
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    assert registry.SPLIT_DEVICES == frozenset()  # the library's default: no device until measured
    assert torch.equal(registry.large_product(a, b), a @ b) and calls == []
    monkeypatch.setattr(registry, "SPLIT_DEVICES", frozenset({"cpu"}))
    assert_close(registry.large_product(a, b), a @ b)
    assert calls == [torch.float32]
    assert torch.equal(registry.large_product(a.double(), b.double()), a.double() @ b.double())
    assert calls == [torch.float32]  # float64 operands keep their own product
    monkeypatch.setattr(registry, "SPLIT_DEVICES", frozenset({"cuda"}))
    assert torch.equal(registry.large_product(a, b), a @ b) and calls == [torch.float32]  # not this device


class GhostConv(nn.Module):
    """A convolution whose per-sample norms take the ghost route (16 positions: 16^2 <= 8 * 72) and one whose
    gradients are formed (64 positions), grouped, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Conv2d(8, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 4, 3, padding=1, groups=2)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 8, 8, 8)
        h = torch.tanh(self.wide(F.avg_pool2d(x, 2)))  # (B, 8, 4, 4)
        h = F.interpolate(h, scale_factor=2) + x  # (B, 8, 8, 8)
        return self.fc(torch.tanh(self.grouped(h)).flatten(1))


@pytest.mark.parametrize(
    "which, routes",
    [
        ("cnn", {"formed": 2}),  # each conv's chunk of per-sample gradients
        ("ghost_conv", {"ghost": 2, "formed": 1}),  # the wide conv's two Grams, the grouped conv's gradients
        ("shared_input", {"ghost": 4}),  # q/k/v's one shared input Gram and their three output Grams
        ("tokens", {"formed": 1}),  # 7 positions: 49 > 6 * 7
    ],
)
@pytest.mark.parametrize("b", [1, 5])
def test_split_products_keep_every_route_exact(which, routes, b, monkeypatch):
    # With the large products split into bfloat16 pieces (here emulated in float32 on the CPU, as the GPU
    # runs them with float32 accumulation), a float32 pass equals the exact projections to float32
    # rounding, as the unsplit pass does, and both routes are taken where the layers ask for them.
    if which == "cnn":
        model, batch = CNN(), (torch.randn(b, 3, 8, 8), torch.randint(0, 5, (b,)))
    elif which == "ghost_conv":
        model, batch = GhostConv(), (torch.randn(b, 8, 8, 8), torch.randint(0, 3, (b,)))
    elif which == "shared_input":
        model, batch = SharedInput(), (torch.randint(0, 20, (b, 5)), torch.randint(0, 3, (b,)))
    else:
        model, batch = TokenMLP(), _tokens(b)
    layout = _layout(model, dim=16)
    plain = factored_pass(model, batch, layout)
    taken: dict[str, int] = {}
    real = registry.split_product

    def recording(a, c):
        # a Gram's operands are one tensor and its transpose: (.., N, p) @ (.., p, N)
        gram = a.shape[-2] == c.shape[-1] and torch.equal(a, c.transpose(-1, -2))
        taken["ghost" if gram else "formed"] = taken.get("ghost" if gram else "formed", 0) + 1
        return real(a, c)

    monkeypatch.setattr(registry, "split_product", recording)
    monkeypatch.setattr(registry, "SPLIT_DEVICES", frozenset({"cpu"}))
    split = factored_pass(model, batch, layout)
    assert taken == routes
    exact = factored_pass(model.double(), as_float64(batch), layout)  # the same maths in float64
    for name in layout.blocks:
        got = split.kron.get(name, split.vectors.get(name))
        want = exact.kron.get(name, exact.vectors.get(name)).float()
        ref = plain.kron.get(name, plain.vectors.get(name))
        tol = dict(rtol=1e-5, atol=1e-6 * want.abs().max().item())
        assert_close(ref, want, **tol)  # what float32 rounding leaves without the split
        assert_close(got, want, **tol, msg=lambda m, n=name: f"{n}: {m}")
    assert_close(split.sq_norm, exact.sq_norm.float(), rtol=1e-5, atol=0.0)
    assert_close(plain.sq_norm, exact.sq_norm.float(), rtol=1e-5, atol=0.0)


def test_large_product_under_autocast_keeps_the_autocast_product(monkeypatch):
    # Under autocast the pass's products round to the autocast dtype: nothing to split.
    monkeypatch.setattr(registry, "SPLIT_DEVICES", frozenset({"cpu"}))
    calls = []
    monkeypatch.setattr(registry, "split_product", lambda a, b: calls.append(1))
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = registry.large_product(a, b)
        want = a @ b
    assert calls == [] and got.dtype == torch.bfloat16 and torch.equal(got, want)
    registry.large_product(a, b)
    assert calls == [1]  # outside autocast: split


def test_split_product_on_a_gpu_is_one_bfloat16_product_into_float32(monkeypatch):
    # Off the CPU the six piece products are one batched bfloat16 product with a float32 result; the meta
    # device stands in for a GPU (shapes and dtypes, no values).
    calls = []
    real = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: calls.append((a[0].shape, a[1].shape, k)) or real(*a, **k))
    a, b = torch.empty(2, 3, 4, 5, device="meta"), torch.empty(2, 3, 5, 7, device="meta")
    got = registry.split_product(a, b)
    assert got.shape == (2, 3, 4, 7) and got.dtype == torch.float32
    assert calls == [((6, 4, 30), (6, 30, 7), {"out_dtype": torch.float32})]
    calls.clear()
    got = registry.split_product(a[0], b[0])  # three dimensions: one leading
    assert got.shape == (3, 4, 7) and calls == [((3, 4, 30), (3, 30, 7), {"out_dtype": torch.float32})]
    assert registry.split_product(a[:, :, :0], b).shape == (2, 3, 0, 7)  # no rows
    with pytest.raises(ValueError, match=r"equal leading dimensions, got \(2, 3, 4, 5\) @ \(3, 2, 5, 7\)"):
        registry.split_product(a, b.reshape(3, 2, 5, 7))
    monkeypatch.setattr(registry, "SPLIT_DEVICES", frozenset({"meta"}))
    calls.clear()
    assert registry.large_product(a, b).shape == (2, 3, 4, 7) and calls == []  # no device split_product serves


def test_large_product_splits_on_a_gpu_only_where_it_has_the_bfloat16_product(monkeypatch):
    # A stand-in for a CUDA tensor (its device and dtype are all large_product reads of it): a GPU or a torch
    # without the bfloat16-into-float32 product keeps the float32 product.
    class OnCuda:
        device = torch.device("cuda")
        dtype = torch.float32

        def __matmul__(self, other):
            return "float32 product"

    calls, asked = [], []
    monkeypatch.setattr(registry, "split_product", lambda a, b: calls.append(1) or "split")
    monkeypatch.setattr(registry, "autocast_state", lambda device: (False, None) if device == "cuda" else 1 / 0)
    monkeypatch.setattr(registry, "SPLIT_DEVICES", frozenset({"cuda"}))
    monkeypatch.setattr(registry, "_bf16_tensor_cores", lambda device: asked.append(device) or True)
    assert registry.large_product(OnCuda(), OnCuda()) == "split" and calls == [1]
    assert asked == [torch.device("cuda")]
    monkeypatch.setattr(registry, "_bf16_tensor_cores", lambda device: False)
    assert registry.large_product(OnCuda(), OnCuda()) == "float32 product" and calls == [1]


@pytest.mark.parametrize(
    "has_dtype, capability, expected", [(True, (8, 0), True), (True, (9, 0), True), (True, (7, 5), False),
                                        (False, (9, 0), False)]
)
def test_bf16_tensor_cores_need_torch_2_8_and_compute_capability_8(has_dtype, capability, expected, monkeypatch):
    monkeypatch.setattr(registry, "_BF16_INTO_FLOAT32", has_dtype)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    assert registry._bf16_tensor_cores.__wrapped__(torch.device("cuda", 0)) is expected
