"""nn.MultiheadAttention in the factored engine (hardmine.factored.attention): exact against the per-sample
autograd loop for every configuration the rule covers, refused with the reason (and sent to vmap under auto)
for the others, nothing left on the model, and the same vectors in the training-loop API."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import TinyTransformer, token_batch
from test_factored import _check_pass, _expected
from torch import nn
from torch.testing import assert_close

from hardmine.engine import GradientExtractor
from hardmine.extract import reference_per_sample_grads
from hardmine.factored import plan_factored
from hardmine.factored.attention import attention_forward
from hardmine.online import OnlineMiner

D, H = 8, 2


class Attn(nn.Module):
    """Linear -> MultiheadAttention (self or cross, with the call's options) -> mean over queries -> Linear.

    ``mode``: "self" (query is key is value), "kv" (key is value, another sequence), "qkv" (three inputs)."""

    def __init__(self, mode="self", batch_first=True, bias=True, call=None, mask=None, twice=False, **mha):
        super().__init__()
        self.mode, self.batch_first, self.twice = mode, batch_first, twice
        self.call = dict(call or {})
        self.mask = mask  # a function (x, L, S) -> the call's masks (from each sample's own data), or None
        self.inp = nn.Linear(5, D)
        self.mem = nn.Linear(5, D)
        self.attn = nn.MultiheadAttention(D, H, batch_first=batch_first, bias=bias, **mha)
        self.head = nn.Linear(D, 3)
        _biased(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))  # (B, L, D)
        m = torch.tanh(self.mem(x.flip(1)[:, :4]))  # (B, S=4, D): another sequence for cross-attention
        q = h
        k = v = h if self.mode == "self" else m
        if self.mode == "qkv":
            v = torch.sin(m)
        kw = dict(self.call)
        if self.mask is not None:
            kw.update(self.mask(x, q.shape[1], k.shape[1]))
        if not self.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
            k = q if self.mode == "self" else k
            v = k if self.mode != "qkv" else v
        o, w = self.attn(q, k, v, **kw)
        if self.twice:  # the same module called again on its own output
            o2, _ = self.attn(o, o, o, need_weights=False)
            o = o + o2
        if not self.batch_first:
            o = o.transpose(0, 1)
        y = self.head(o.mean(1))  # (B, 3)
        if w is not None:  # the returned weights reach the loss too
            y = y + w.flatten(1).sum(1, keepdim=True) * 0.1
        return y


def _biased(model: nn.Module) -> nn.Module:
    """torch starts the attention's biases at zero, where a reforward that dropped one would go unseen."""
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention) and m.in_proj_bias is not None:
            with torch.no_grad():
                m.in_proj_bias.normal_(0.0, 0.5)
                m.out_proj.bias.normal_(0.0, 0.5)
    return model


class _InpAttnHead(nn.Module):
    """Linear -> MultiheadAttention -> Linear; subclasses write the forward under test."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.inp = nn.Linear(5, D)
        self.attn = nn.MultiheadAttention(D, H, batch_first=batch_first)
        self.head = nn.Linear(D, 3)


def _batch(b, t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, 5, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (b,), generator=g)


def _kpm(x, tk):
    """(B, S) padding mask from each sample's own data (a sample's mask must not depend on its place in the
    batch, or the per-sample loop would see another one): the last key is padding where x[b, 0, 0] > 0."""
    pad = torch.zeros(x.shape[0], tk, dtype=torch.bool)
    pad[:, -1] = x[:, 0, 0] > 0
    return pad


def _check(model, b, t=6):
    """Every parameter factored (attention included) and exact; the pass left nothing on the model."""
    model = model.double()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fg, _ = _check_pass(model, _batch(b, t))
    assert {"attn.in_proj_weight", "attn.out_proj.weight"} <= set(fg.kron)
    assert not model.attn._forward_hooks and not model.attn.out_proj._forward_hooks
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    return fg


@pytest.mark.parametrize("b", [1, 5])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mode", ["self", "kv", "qkv"])
def test_self_and_cross_attention_are_exact(mode, batch_first, b):
    torch.manual_seed(0)
    _check(Attn(mode, batch_first), b)


@pytest.mark.parametrize(
    "call",
    [
        {"need_weights": False},
        {"need_weights": True, "average_attn_weights": False},
    ],
    ids=["no-weights", "per-head-weights"],
)
@pytest.mark.parametrize("bias", [True, False])
def test_weights_and_bias_options_are_exact(call, bias):
    torch.manual_seed(1)
    fg = _check(Attn(call=call, bias=bias), 4)
    assert ("attn.in_proj_bias" in fg.vectors) == bias


def _masks(kind):
    def make(x, tq, tk):
        b = x.shape[0]
        causal = torch.triu(torch.ones(tq, tk, dtype=torch.bool), diagonal=1)
        if kind == "kpm":
            return {"key_padding_mask": _kpm(x, tk)}
        if kind == "kpm-float":
            return {"key_padding_mask": _kpm(x, tk).to(x.dtype) * -1e4}
        if kind == "causal":
            return {"attn_mask": causal, "is_causal": True, "need_weights": False}
        if kind == "causal-weights":
            return {"attn_mask": causal, "is_causal": True}
        if kind == "wrong-hint":  # a mask that is not causal with the causal hint: torch follows the hint
            more = causal.clone()
            more[1:, 0] = True
            return {"attn_mask": more, "is_causal": True, "need_weights": False}
        if kind == "float-2d+kpm":
            return {"attn_mask": torch.linspace(-1, 1, tq * tk).reshape(tq, tk).to(x.dtype),
                    "key_padding_mask": _kpm(x, tk), "need_weights": False}
        # a mask per sample (from its data) and head: (B * H, L, S)
        m3 = torch.zeros(b, H, tq, tk, dtype=torch.bool)
        m3[:, 1, :, 0] = x[:, 0, 1, None] > 0
        return {"attn_mask": m3.reshape(b * H, tq, tk)}

    return make


@pytest.mark.parametrize(
    "kind", ["kpm", "kpm-float", "causal", "causal-weights", "wrong-hint", "float-2d+kpm", "3d"]
)
def test_masks_are_exact(kind):
    torch.manual_seed(2)
    _check(Attn(mask=_masks(kind)), 4)


def test_the_causal_hint_is_followed_as_torch_does():
    # With need_weights=False and no padding mask, torch drops attn_mask for is_causal: so does the reforward.
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(D, H, batch_first=True).double()
    x = torch.randn(3, 5, D, dtype=torch.float64)
    not_causal = torch.zeros(5, 5, dtype=torch.bool)  # a wrong hint: torch trusts is_causal
    not_causal[1:, 0] = True  # (and ignores this mask, which is not the causal one)
    want, _ = mha(x, x, x, attn_mask=not_causal, is_causal=True, need_weights=False)
    got, _, _ = attention_forward(mha, x, x, x, attn_mask=not_causal, is_causal=True, need_weights=False)
    assert_close(got, want)
    masked, _ = mha(x, x, x, attn_mask=not_causal, need_weights=False)  # the mask does matter without it
    assert not torch.allclose(masked, want)


def test_a_module_called_twice_sums_both_calls():
    torch.manual_seed(4)
    fg = _check(Attn(twice=True), 3)
    assert fg.kron["attn.in_proj_weight"].abs().sum() > 0


@pytest.mark.parametrize("norm_first", [False, True])
def test_torch_transformer_layers_are_factored_whole(norm_first):
    torch.manual_seed(5)

    class Seq2Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoderLayer(D, H, 16, dropout=0.0, batch_first=True, norm_first=norm_first)
            self.dec = nn.TransformerDecoderLayer(D, H, 16, dropout=0.0, batch_first=True, norm_first=norm_first)
            self.inp = nn.Linear(5, D)
            self.head = nn.Linear(D, 3)

        def forward(self, x):
            mem = self.enc(self.inp(x), src_key_padding_mask=_kpm(x, x.shape[1]))
            tgt = self.inp(x[:, :3])
            mask = nn.Transformer.generate_square_subsequent_mask(3, dtype=torch.float64)
            return self.head(self.dec(tgt, mem, tgt_mask=mask, tgt_is_causal=True).mean(1))

    model = _biased(Seq2Seq()).double()
    fg, _ = _check_pass(model, _batch(4))
    for name in ("enc.self_attn", "dec.self_attn", "dec.multihead_attn"):
        assert {f"{name}.in_proj_weight", f"{name}.out_proj.weight"} <= set(fg.kron)


@pytest.mark.parametrize("layers", ["attn.out_proj", "attn.in_proj_*"])
def test_either_projection_alone(layers):
    torch.manual_seed(6)
    _check_pass(Attn("kv").double(), _batch(3), layers=[layers])


def test_output_modified_in_place_after_attention_is_protected():
    torch.manual_seed(7)

    class InPlace(_InpAttnHead):
        def forward(self, x):
            h = torch.tanh(self.inp(x))
            o, _ = self.attn(h, h, h, need_weights=False)
            o.mul_(2.0)  # the model rewrites the attention output in place
            return self.head(o.mean(1))

    _check_pass(_biased(InPlace()).double(), _batch(3))


@pytest.mark.parametrize(
    "mha, why",
    [
        ({"add_bias_kv": True}, "add_bias_kv=True"),
        ({"add_zero_attn": True}, "add_zero_attn=True"),
        ({"kdim": 6, "vdim": 6}, "kdim=6, vdim=6 unlike embed_dim=8 (separate q/k/v projection weights)"),
    ],
)
def test_configurations_outside_the_rule_are_refused_and_auto_is_exact(mha, why):
    torch.manual_seed(8)
    model = Attn("kv" if "kdim" not in mha else "self", **mha).double()
    if "kdim" in mha:  # key and value of width 6
        model.mem = nn.Linear(5, 6).double()
        model.mode = "kv"
    names = [n for n, _ in model.named_parameters() if n.startswith("attn.")]
    units, rejected = plan_factored(model, names)
    assert units == {}
    covered = [n for n in names if n.split(".", 1)[1] in ("in_proj_weight", "in_proj_bias")]
    assert covered and all(rejected[n] == f"MultiheadAttention with {why}" for n in covered), rejected
    for n in set(names) - set(covered):  # bias_k, q_proj_weight, ...: not parameters the rule has
        assert why in rejected[n] or "rule does not handle parameter" in rejected[n], rejected[n]
    assert "inside nn.MultiheadAttention 'attn' (its factored rule does not cover it" in rejected[
        "attn.out_proj.weight"
    ]
    batch = _batch(3)
    ref = reference_per_sample_grads(model, batch)
    ext = GradientExtractor(model, dim=16, seed=2, engine="auto")
    res = ext(batch)
    plan = ext.metadata()["plan"]
    assert all(plan[n] == "vmap" for n in names) and plan["head.weight"] == "factored"
    assert_close(res.grad_norm, ref.grad_norm)
    with pytest.raises(ValueError, match=r"engine='factored' cannot handle .*" + re.escape(why.split("=")[0])):
        GradientExtractor(model, dim=16, engine="factored")(batch)


def test_a_subclass_is_not_claimed():
    class MyAttention(nn.MultiheadAttention):
        pass

    model = nn.Sequential(nn.Linear(4, D), MyAttention(D, H))
    units, rejected = plan_factored(model, ["1.in_proj_weight", "1.out_proj.weight"])
    assert units == {}
    assert "MyAttention has no factored layer rule" in rejected["1.in_proj_weight"]
    assert rejected["1.out_proj.weight"].startswith("inside nn.MultiheadAttention '1', which passes")


def test_an_unbatched_call_is_refused_and_goes_to_vmap():
    class Unbatched(nn.Module):  # attention over one (L, E) sequence per... the whole batch
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(D, H)
            self.head = nn.Linear(D, 3)

        def forward(self, x):  # x: (B, D); the batch is the attention's sequence: samples are mixed
            o, _ = self.attn(x, x, x)
            return self.head(o)

    model = Unbatched().double()
    batch = (torch.randn(4, D, dtype=torch.float64), torch.randint(0, 3, (4,)))
    with pytest.raises(ValueError, match=r"attn \(MultiheadAttention\): it was called on an unbatched query"):
        GradientExtractor(model, dim=16, engine="factored")(batch)
    ext = GradientExtractor(model, dim=16, engine="auto")
    ext(batch)  # (the model mixes its samples, so no engine's result is a per-sample gradient here)
    assert ext.metadata()["plan"]["attn.in_proj_weight"] == "vmap"
    assert "unbatched query of shape (3, 8)" in ext.metadata()["plan_reasons"]["attn.in_proj_weight"]


def test_engines_agree_on_the_tiny_transformer_whole():
    model = TinyTransformer().double()
    batch = (token_batch(5, seed=4), torch.randint(0, 3, (5,)))
    ref = reference_per_sample_grads(model, batch)
    zs = {}
    for eng in ("vmap", "auto", "factored"):
        ext = GradientExtractor(model, dim=16, seed=2, engine=eng)
        res = ext(batch)
        assert_close(res.grad_norm, ref.grad_norm)
        zs[eng] = res.z
        if eng != "vmap":
            assert set(ext.metadata()["plan"].values()) == {"factored"}
    for eng in ("auto", "factored"):
        assert_close(zs[eng], zs["vmap"], rtol=1e-5, atol=1e-6)
    layout = ext.layout
    blk = layout.blocks["encoder.self_attn.in_proj_weight"]
    assert blk.kind == "kron"
    got = zs["factored"][:, blk.offset : blk.offset + blk.width]
    assert_close(got, _expected(layout, ref, blk.param).float(), rtol=1e-5, atol=1e-6)


def test_online_miner_matches_the_offline_pass_with_attention():
    torch.manual_seed(9)
    model = TinyTransformer().eval()
    inputs, y = token_batch(6, seed=3), torch.randint(0, 3, (6,))
    miner = OnlineMiner(model, dim=16, seed=5, keep_gradients=True)
    stats = miner.observe(inputs, y, ids=torch.arange(6))
    assert stats.path == "autograd"
    offline = GradientExtractor(model, dim=16, seed=5, engine="factored")((inputs, y))
    assert_close(stats.z, offline.z, rtol=1e-5, atol=1e-6)
    # the user's backward still reaches the attention's parameters
    stats.weighted_loss().backward()
    assert model.encoder.self_attn.in_proj_weight.grad is not None
    assert model.encoder.self_attn.out_proj.weight.grad.abs().sum() > 0
    miner.close()


def test_training_mode_with_attention_dropout_runs_and_trains():
    torch.manual_seed(10)
    model = TinyTransformer(dropout=0.3).train()
    inputs, y = token_batch(6, seed=3), torch.randint(0, 3, (6,))
    miner = OnlineMiner(model, dim=16, seed=5)
    stats = miner.observe(inputs, y, ids=torch.arange(6))
    assert torch.isfinite(stats.z).all() and stats.z.abs().sum() > 0
    stats.weighted_loss().backward()
    assert model.encoder.self_attn.in_proj_weight.grad.abs().sum() > 0
    miner.close()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 4),
    t=st.integers(4, 7),
    heads=st.sampled_from([1, 2, 4]),
    mode=st.sampled_from(["self", "kv", "qkv"]),
    need_weights=st.booleans(),
    padded=st.booleans(),
)
def test_shapes_property(b, t, heads, mode, need_weights, padded):
    torch.manual_seed(b * 100 + t)
    model = Attn(mode, call={"need_weights": need_weights}, mask=_masks("kpm") if padded else None)
    model.attn = nn.MultiheadAttention(D, heads, batch_first=True)
    _check(model, b, t)


def test_the_reforward_equals_the_module():
    # attention_forward is the module's own maths: same output and weights, every covered option.
    torch.manual_seed(11)
    mha = _biased(nn.MultiheadAttention(D, H, batch_first=True, dropout=0.0)).double()
    q = torch.randn(3, 5, D, dtype=torch.float64)
    k = torch.randn(3, 4, D, dtype=torch.float64)
    v = torch.randn(3, 4, D, dtype=torch.float64)
    pad = _kpm(torch.randn(3, 1, 1), 4)
    for args, kw in [
        ((q, q, q), {}),
        ((q, q, q), {"need_weights": False}),
        ((q, k, k), {"key_padding_mask": pad}),
        ((q, k, v), {"average_attn_weights": False}),
        ((q, k, v), {"need_weights": False, "key_padding_mask": pad}),
    ]:
        want, want_w = mha(*args, **kw)
        got, got_w, calls = attention_forward(mha, *args, **kw)
        assert_close(got, want)
        if want_w is None:
            assert got_w is None
        else:
            assert_close(got_w, want_w)
        assert got.stride() == want.stride()  # the same memory layout as the module's output
        assert calls["out_proj"].out is got and calls["out_proj"].passed is got
        assert calls[""].out.shape[-1] == 3 * D
        assert (calls[""].x is q) == (args[1] is q)  # self-attention projects the query itself
        # cross-attention projects the query's and each other input's positions once
        assert calls[""].x.shape[1] == 5 + (0 if args[1] is q else 4 if args[2] is args[1] else 8)
    # batch_first=False: (L, B, E) in and out, contiguous as torch's
    mha.batch_first = False
    qt = q.transpose(0, 1).contiguous()
    want, _ = mha(qt, qt, qt, need_weights=False)
    got, _, calls = attention_forward(mha, qt, qt, qt, need_weights=False)
    assert_close(got, want)
    assert got.stride() == want.stride() and calls["out_proj"].out.shape == (3, 5, D)


def test_the_attention_leaves_the_shared_input_grams_to_their_readers(monkeypatch):
    """Two Linears reading one input share its Gram (computed once per pass); an attention reading the same
    tensor is not one of the counted readers and must not release or take their Gram."""
    import hardmine.factored.registry as registry

    computed = []
    real_get = registry.GramCache.get

    def counting_get(self, key, compute):
        return real_get(self, key, lambda: computed.append(key) or compute())

    monkeypatch.setattr(registry.GramCache, "get", counting_get)

    class Shared(_InpAttnHead):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(D, D)
            self.b = nn.Linear(D, D)

        def forward(self, x):
            h = torch.tanh(self.inp(x))  # (B, T, D): read by a, b and the attention
            o, _ = self.attn(h, h, h, need_weights=False)
            return self.head((self.a(h) * self.b(h) + o).mean(1))

    torch.manual_seed(12)
    _check_pass(Shared().double(), _batch(3, t=3))
    assert len(computed) == len(set(computed))  # no Gram made twice (a and b share h's)


def quick_bench(script: str, tmp_path) -> tuple[list[dict], str]:
    """``scripts/<script>.py --quick`` run to the end: its JSON rows and its Markdown table."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / f"{script}.json"
    subprocess.run(
        [sys.executable, str(root / "scripts" / f"{script}.py"), "--quick", "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return json.loads(out.read_text())["rows"], out.with_suffix(".md").read_text()


def test_bench_attention_quick_runs(tmp_path):
    rows, md = quick_bench("bench_attention", tmp_path)
    assert {r["model"] for r in rows} == {"encoder", "seq2seq"}
    for r in rows:
        assert r["all_factored"]
        assert max(r["max_rel_err_grad_norm"].values()) < 1e-5
        assert r["factored_samples_per_s"] > 0 and r["before_samples_per_s"] > 0
    assert "| encoder | 16 |" in md


def test_the_reforward_draws_the_modules_dropout():
    """Under the same random state the reforward draws the masks the module draws (both attention paths)."""
    mha = _biased(nn.MultiheadAttention(D, H, batch_first=True, dropout=0.3)).double().train()
    q = torch.randn(3, 5, D, dtype=torch.float64)
    k = torch.randn(3, 4, D, dtype=torch.float64)
    for args, kw in [((q, q, q), {"need_weights": False}), ((q, k, k), {}), ((q, q, q), {"is_causal": False})]:
        torch.manual_seed(13)
        want, want_w = mha(*args, **kw)
        torch.manual_seed(13)
        got, got_w, _ = attention_forward(mha, *args, **kw)
        assert_close(got, want)
        if want_w is not None:
            assert_close(got_w, want_w)
    torch.manual_seed(13)
    eval_out, _ = mha.eval()(q, q, q)
    assert not torch.allclose(want, eval_out)  # the dropout did act in training mode


def test_attention_dropout_in_eval_mode_is_off_and_exact():
    torch.manual_seed(14)
    _check(Attn(dropout=0.5).eval(), 3)


def test_in_training_mode_the_model_sees_what_it_would_without_hardmine():
    """The reforward restores the random state the module's forward started from: the model's output is the
    one it computes alone with the same seed, and the random stream after the step is the same."""
    torch.manual_seed(15)
    model = _biased(TinyTransformer(dropout=0.3)).train()
    inputs, y = token_batch(6, seed=3), torch.randint(0, 3, (6,))
    torch.manual_seed(16)
    want = model(**inputs)
    after = torch.get_rng_state()
    miner = OnlineMiner(model, dim=16, seed=5)
    torch.manual_seed(16)
    stats = miner.observe(inputs, y, ids=torch.arange(6))
    assert_close(stats.output, want)
    assert torch.equal(torch.get_rng_state(), after)
    miner.close()


def test_out_proj_called_directly_as_well_is_recorded():
    class Direct(_InpAttnHead):
        def forward(self, x):
            h = torch.tanh(self.inp(x))
            o, _ = self.attn(h, h, h, need_weights=False)
            return self.head((o + self.attn.out_proj(h)).mean(1))  # out_proj used outside the attention too

    torch.manual_seed(17)
    model = _biased(Direct()).double()
    _check_pass(model, _batch(3))
    _check_pass(model, _batch(3), layers=["attn.out_proj"])


def test_a_batch_first_false_model_may_view_the_output():
    class Viewing(_InpAttnHead):  # relies on torch's (L, B, E) output being contiguous
        def forward(self, x):
            h = torch.tanh(self.inp(x)).transpose(0, 1)  # (L, B, D)
            o, _ = self.attn(h, h, h, need_weights=False)
            tq, b, d = o.shape
            rows = self.head(o.view(tq * b, d))  # (L*B, 3)
            return rows.view(tq, b, 3).mean(0)  # (B, 3)

    torch.manual_seed(18)
    # (head sees (L*B, D) rows, not the batch on dimension 0: only the layers before it are factored)
    _check_pass(_biased(Viewing(batch_first=False)).double(), _batch(3), layers=["inp", "attn"])


def test_a_users_forward_hook_on_the_attention_still_acts():
    torch.manual_seed(19)
    model = Attn(call={"need_weights": False}).double()
    handle = model.attn.register_forward_hook(lambda mod, args, out: (out[0] * 3.0, out[1]))
    try:
        _check_pass(model, _batch(3))
        assert len(model.attn._forward_hooks) == 1  # the pass's own hooks are gone
    finally:
        handle.remove()


@pytest.mark.parametrize("kind", ["kpm", "kpm-float", "causal-weights", "float-2d+kpm"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_half_precision_with_masks(need_weights, kind):
    """A bfloat16 attention with every mask kind (boolean masks become additive masks in the model's dtype,
    float masks are the model's here) keeps its dtype and matches the module."""
    torch.manual_seed(20)
    masks = _masks(kind)

    def mask(x, tq, tk):
        kw = masks(x, tq, tk)
        kw["need_weights"] = need_weights
        return kw

    model = Attn(mask=mask).to(torch.bfloat16)
    x, y = _batch(4)
    x = x.to(torch.bfloat16)
    ext = GradientExtractor(model, dim=16, engine="factored", loss_fn="cross_entropy")
    res = ext((x, y))
    assert torch.isfinite(res.z).all() and res.output.dtype == torch.bfloat16
    assert_close(res.output.float(), model(x).float(), rtol=0.05, atol=0.05)


def test_the_random_state_is_kept_and_restored_on_a_gpu_too(monkeypatch):
    """The reforward's random state on CUDA (no GPU here: a fake CUDA tensor, and torch.cuda's state functions
    recorded): kept from the call's first tensor argument's device, restored before the reforward, once."""
    from hardmine.factored import capture

    fake = pytest.importorskip("torch._subclasses.fake_tensor")
    seen = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: seen.append(("get", device)) or torch.tensor([7]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: seen.append(("set", int(state), device)))
    with fake.FakeTensorMode():
        x = torch.empty(2, 3, device="cuda")

    class Stub:
        def reforward_problem(self, module, args, kwargs):
            return None

        def reforward(self, module, args, kwargs, output, clone):
            seen.append("reforward")
            return output, {}

    for args, kwargs in [((x,), {}), ((1.0,), {"query": x})]:  # a positional tensor, or a keyword one
        seen.clear()
        rng: dict = {}
        capture._keep_rng(rng, None, args, kwargs)
        assert set(rng) == {"cpu", "cuda"} and rng["cuda"][0] == x.device
        assert capture._record_reforward(Stub(), {}, (), rng, None, args, kwargs, "out") == "out"
        assert seen == [("get", x.device), ("set", 7, x.device), "reforward"] and rng == {}
    rng = {}
    capture._keep_rng(rng, None, (1.0,), {})  # no tensor argument: the CPU state only
    assert set(rng) == {"cpu"}


def test_draws_random_only_for_dropout_in_training_mode():
    from hardmine.factored.attention import MultiheadAttentionRule
    from hardmine.factored.registry import LayerRule

    rule = MultiheadAttentionRule()
    for p, training, want in [(0.3, True, True), (0.3, False, False), (0.0, True, False), (0.0, False, False)]:
        assert rule.draws_random(nn.MultiheadAttention(D, H, dropout=p).train(training)) is want
    assert LayerRule().draws_random(nn.Linear(2, 2)) is False  # a rule that does not reforward draws nothing


def test_the_probe_protects_no_attention_output_the_model_leaves_alone():
    from hardmine.factored.capture import probe_units

    torch.manual_seed(21)
    model = Attn("kv").double()
    units, _ = plan_factored(model, [n for n, _ in model.named_parameters()])
    problems, protect = probe_units(model, _batch(4)[0], units, 4)
    assert problems == {} and protect == set()


def test_a_second_attention_is_planned_after_a_refused_one():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.MultiheadAttention(D, H, batch_first=True, add_bias_kv=True)  # refused
            self.b = nn.MultiheadAttention(D, H, batch_first=True)  # covered

    model = Two()
    units, rejected = plan_factored(model, ["a.out_proj.weight", "b.out_proj.weight"])
    assert set(rejected) == {"a.out_proj.weight"} and set(units) == {"b.out_proj"}
    assert units["b.out_proj"].host is model.b


def test_a_mask_keeps_its_device():
    from hardmine.factored.attention import _additive

    for mask in (torch.ones(2, 3, dtype=torch.bool, device="meta"), torch.ones(2, 3, device="meta")):
        assert _additive(mask, torch.float16).device.type == "meta"


def _auto_is_exact(model, batch):
    ext = GradientExtractor(model, dim=16, engine="auto", loss_fn="cross_entropy")
    res = ext(batch)
    assert_close(res.grad_norm, reference_per_sample_grads(model, batch).grad_norm)
    return ext.metadata()


def test_out_proj_is_refused_when_its_attention_bypasses_the_hooks():
    class Bypass(_InpAttnHead):
        def forward(self, x):
            h = torch.tanh(self.inp(x))
            o, _ = self.attn.forward(h, h, h)  # no hook fires: the attention's use of out_proj is unseen
            return self.head((o + self.attn.out_proj(h)).mean(1))

    torch.manual_seed(23)
    model = _biased(Bypass()).double()
    why = (
        "attn.out_proj (NonDynamicallyQuantizableLinear): its host MultiheadAttention was not seen running (called "
        "through .forward(), or not at all), so the host's use of its weights cannot be told"
    )
    with pytest.raises(ValueError, match=re.escape(why)):
        GradientExtractor(model, layers="attn.out_proj", dim=16, engine="factored")(_batch(3))
    meta = _auto_is_exact(model, _batch(3))
    assert meta["plan"]["attn.out_proj.weight"] == "vmap"


@pytest.mark.parametrize("how", ["two attentions", "another name"])
def test_an_out_proj_held_elsewhere_too_is_refused(how):
    class Shared(_InpAttnHead):
        def __init__(self):
            super().__init__()
            if how == "two attentions":
                self.attn2 = nn.MultiheadAttention(D, H, batch_first=True)
                self.attn2.out_proj = self.attn.out_proj  # one module, two holders
            else:
                self.proj = self.attn.out_proj  # the same module, listed first under another name
                self.proj, self.attn, self.head = self.proj, self.attn, self.head

        def forward(self, x):
            h = torch.tanh(self.inp(x))
            o, _ = self.attn(h, h, h, need_weights=False)
            if how == "two attentions":
                o = o + self.attn2(h, h, h, need_weights=False)[0]
            return self.head(o.mean(1))

    torch.manual_seed(24)
    model = Shared()
    if how == "another name":  # register the shared module first, so named_modules names it "proj"
        model = nn.Module()
        inner = _InpAttnHead()
        model.proj = inner.attn.out_proj
        model.inner = inner
        model.forward = lambda x: inner.head(inner.attn(*(torch.tanh(inner.inp(x)),) * 3, need_weights=False)[0].mean(1))
    model = _biased(model).double()
    names = [n for n, _ in model.named_parameters()]
    units, rejected = plan_factored(model, names)
    held = "attn.out_proj" if how == "two attentions" else "proj"
    other = "attn2.out_proj" if how == "two attentions" else "inner.attn.out_proj"
    assert rejected[f"{held}.weight"] == (
        f"the module is also held as {[other]!r} (shared), and only one holder's uses of it would be recorded"
    )
    _auto_is_exact(model, _batch(3))


def test_attention_inside_activation_checkpointing_is_refused_with_the_reason():
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(_InpAttnHead):
        def forward(self, x):
            h = torch.tanh(self.inp(x))
            o = checkpoint(lambda t: self.attn(t, t, t, need_weights=False)[0], h, use_reentrant=False)
            return self.head(o.mean(1))

    torch.manual_seed(25)
    model = _biased(Checkpointed()).double()
    why = (
        "it runs inside activation checkpointing (torch.utils.checkpoint), whose backward would run its forward "
        "again without the computation its factored rule adds"
    )
    both = f"attn (MultiheadAttention): {why}; attn.out_proj (NonDynamicallyQuantizableLinear): {why}"
    with pytest.raises(ValueError, match=re.escape(both)):
        GradientExtractor(model, dim=16, engine="factored")(_batch(3))
    # auto sends the attention to vmap, which torch.func cannot run under checkpointing: said plainly
    with pytest.raises(ValueError, match=r"uses activation checkpointing .* Turn checkpointing off for the scan"):
        GradientExtractor(model, dim=16, engine="auto")(_batch(3))
    _check_pass(model, _batch(3), layers=["inp", "head"])  # the layers outside the block stay factored
    with pytest.raises(ValueError, match="activation checkpointing"):
        OnlineMiner(model, dim=16, seed=5).observe(*_batch(3), ids=torch.arange(3))


def test_a_refused_call_in_training_mode_draws_what_the_module_drew():
    """An unbatched call is refused without computing it again: the random stream after it is the model's own."""
    from hardmine.factored.capture import capture_calls

    mha = nn.MultiheadAttention(D, H, dropout=0.5).train()
    units, _ = plan_factored(mha, [n for n, _ in mha.named_parameters()])
    q = torch.randn(5, D)  # unbatched (L, E)
    torch.manual_seed(3)
    mha(q, q, q)
    want = torch.get_rng_state()
    torch.manual_seed(3)
    with capture_calls(units) as rec:
        mha(q, q, q)
        assert torch.equal(torch.get_rng_state(), want)
        mha(query=q, key=q, value=q)  # the query by keyword
    assert [c.problem for c in rec[""]] == ["it was called on an unbatched query of shape (5, 8)"] * 2


def test_under_autocast_the_weights_are_those_of_the_module():
    """Under CPU autocast (bfloat16) torch adds a float32 mask to the scores in bfloat16 (baddbmm): so does the
    reforward, and the returned weights have the module's dtype."""
    torch.manual_seed(26)
    mha = _biased(nn.MultiheadAttention(D, H, batch_first=True))
    q = torch.randn(2, 5, D)
    mask = torch.linspace(-1, 1, 25).reshape(5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_w = mha(q, q, q, attn_mask=mask)
        got, got_w, _ = attention_forward(mha, q, q, q, attn_mask=mask)
    assert got_w.dtype == want_w.dtype == torch.bfloat16
    assert_close(got_w, want_w)
    assert got.dtype == want.dtype


def test_the_checkpoint_check_needs_nothing_it_cannot_find(monkeypatch):
    """Other saved-tensor hooks (callable objects, with no __qualname__) and a torch without the private lookup
    leave the attention factored: the check finds no checkpointing instead of failing."""
    from hardmine.factored import capture

    class Pack:
        def __call__(self, t):
            return t

    torch.manual_seed(27)
    model = _biased(Attn(call={"need_weights": False})).double()
    with torch.autograd.graph.saved_tensors_hooks(Pack(), Pack()):
        assert capture._checkpoint_problem() is None
        fg = _check(model, 3)
    assert "attn.in_proj_weight" in fg.kron
    monkeypatch.delattr(torch._C._autograd, "_top_saved_tensors_default_hooks")
    assert capture._checkpoint_problem() is None
    _check(model.float(), 3)


def test_a_scan_of_a_torch_attention_model_is_factored_whole_and_exact(tmp_path):
    """End to end: hardmine.scan with the default engine on a model built of torch's encoder layer plans every
    parameter factored, stores the extractor's vectors and the per-sample loop's losses and gradient norms."""
    from hardmine import scan

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(5, D)
            self.enc = nn.TransformerEncoderLayer(D, H, 16, dropout=0.1, batch_first=True)
            self.head = nn.Linear(D, 3)

        def forward(self, x):
            return self.head(self.enc(self.inp(x), src_key_padding_mask=_kpm(x, x.shape[1])).mean(1))

    torch.manual_seed(28)
    model = _biased(Encoder()).double().eval()
    x, y = _batch(13, seed=5)
    data = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 13, 4)]  # batches of 4, 4, 4, 1
    sc = scan(model, data, out=tmp_path / "s", dim=16)
    plan = sc.engine_metadata["plan"]
    assert set(plan.values()) == {"factored"} and "enc.self_attn.in_proj_weight" in plan
    ext = GradientExtractor(model, dim=16, seed=0)
    assert_close(torch.from_numpy(sc.gradients()), ext((x, y)).z.float(), rtol=1e-5, atol=1e-6)
    ref = reference_per_sample_grads(model, (x, y))
    m = sc.manifest()
    assert_close(torch.tensor(m["loss"].to_numpy()), ref.loss)
    assert_close(torch.tensor(m["grad_norm"].to_numpy()), ref.grad_norm)
    assert model.training is False and not model.enc.self_attn._forward_hooks
