"""Standard Hugging Face models scan with the default settings: every trainable parameter, ``engine="auto"``,
no vmap fallback, and the result equals the per-sample autograd loop.

Each model is built from a tiny random config (hidden 16, 2 layers, vocab 60, up to 8 tokens). What it
exercises: learned position embeddings called on ``(1, T)`` (BERT, DistilBERT, GPT-2: broadcast inputs),
``transformers``' ``Conv1D`` (GPT-2), weight-only RMSNorm and rotary positions (Llama), and tied weights
(GPT-2's and Llama's LM head sharing the input embedding). Exactness is checked in float64 against
``reference_per_sample_grads`` projected with the explicit ``kron(P_out, P_in)``, on batch 1 and larger.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

transformers = pytest.importorskip("transformers")

from hardmine.engine import GradientExtractor  # noqa: E402
from hardmine.extract import reference_per_sample_grads  # noqa: E402
from hardmine.factored import (  # noqa: E402
    GradFactors,
    ProjectionLayout,
    factored_pass,
    factors_inner,
    plan_factored,
    rule_for,
)
from hardmine.factored.conv1d import Conv1DRule  # noqa: E402
from hardmine.factored.rmsnorm import WeightOnlyNormRule  # noqa: E402
from hardmine.params import select_parameters  # noqa: E402
from hardmine.project import random_matrix  # noqa: E402

VOCAB = 60
PAD = 0  # padding id of every tiny config (real ids are drawn from 1..VOCAB-1)
CLASSES = 3


# ------------------------------------------------------------------------------------------- models
def _bert() -> nn.Module:
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=CLASSES, pad_token_id=PAD,
    )
    return transformers.BertForSequenceClassification(cfg)


def _roberta() -> nn.Module:
    # RoBERTa numbers positions from padding_idx + 1, so it needs T + 2 position rows.
    cfg = transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=CLASSES, pad_token_id=PAD, bos_token_id=2, eos_token_id=3,
    )
    return transformers.RobertaForSequenceClassification(cfg)


def _distilbert() -> nn.Module:
    cfg = transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=16,
        num_labels=CLASSES, pad_token_id=PAD,
    )
    return transformers.DistilBertForSequenceClassification(cfg)


def _gpt2_config() -> transformers.GPT2Config:
    return transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=16, num_labels=CLASSES,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=1,
    )


def _gpt2() -> nn.Module:
    return transformers.GPT2ForSequenceClassification(_gpt2_config())


def _gpt2_lm() -> nn.Module:
    return transformers.GPT2LMHeadModel(_gpt2_config())


def _llama(tied: bool) -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, max_position_embeddings=16, tie_word_embeddings=tied, pad_token_id=PAD,
        bos_token_id=1, eos_token_id=1,
    )
    return transformers.LlamaForCausalLM(cfg)


CLASSIFIERS = {"bert": _bert, "roberta": _roberta, "distilbert": _distilbert, "gpt2": _gpt2}
CAUSAL_LMS = {"gpt2_lm": _gpt2_lm, "llama_tied": lambda: _llama(True), "llama_untied": lambda: _llama(False)}


def _build(factory, dtype: torch.dtype = torch.float64, seed: int = 0, attn: str | None = None) -> nn.Module:
    """The model in eval mode, with the default attention implementation (sdpa) unless ``attn`` is given."""
    torch.manual_seed(seed)
    model = factory()
    if attn is not None:
        model.config._attn_implementation = attn
    return model.to(dtype).eval()


def _tokens(b: int, t: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Ids in 1..VOCAB-1 with right padding (PAD, mask 0) of random length; sample 0 is never padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, t), generator=g)
    lengths = torch.randint(2, t + 1, (b,), generator=g)
    lengths[0] = t
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()  # (B, T)
    return {"input_ids": ids * mask + PAD * (1 - mask), "attention_mask": mask}


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample mean next-token cross-entropy over shifted labels, -100 ignored: ``(B, T, V) -> (B,)``."""
    pred, gold = logits[:, :-1], labels[:, 1:]  # (B, T-1, V), (B, T-1)
    tok = F.cross_entropy(pred.transpose(1, 2), gold, ignore_index=-100, reduction="none")  # (B, T-1)
    keep = (gold != -100).to(tok.dtype)  # (B, T-1)
    return (tok * keep).sum(1) / keep.sum(1).clamp_min(1.0)  # (B,)


def _classification_batch(b: int, seed: int = 0):
    return (_tokens(b, seed=seed), torch.randint(0, CLASSES, (b,), generator=torch.Generator().manual_seed(seed)))


def _lm_batch(b: int, seed: int = 0):
    tokens = _tokens(b, seed=seed)
    labels = tokens["input_ids"].masked_fill(tokens["attention_mask"] == 0, -100)  # (B, T)
    return tokens, labels


# ------------------------------------------------------------------------------------------ checks
def _expected(layout: ProjectionLayout, grad: torch.Tensor, name: str) -> torch.Tensor:
    """The exact per-sample gradient of ``name`` projected with the explicit Kronecker matrix (float64)."""
    blk = layout.blocks[name]
    a, b = blk.factors
    rows, cols = blk.matrix_shape
    p_out = random_matrix(rows, a, seed=layout.seed, key=f"{name}:out").double()
    p_in = random_matrix(cols, b, seed=layout.seed, key=f"{name}:in").double()
    return grad.double().reshape(grad.shape[0], -1) @ torch.kron(p_out, p_in)  # (B, a*b)


def _check_exact(model: nn.Module, batch, loss_fn=None, dim: int = 16) -> None:
    """Default layers, engine="auto": the plan is all factored, and the factored pass (float64) and the
    extractor's vectors (float32) equal the reference loop's gradients, projected."""
    names = select_parameters(model, None)
    ext = GradientExtractor(model, dim=dim, seed=3, engine="auto", loss_fn=loss_fn)
    res = ext(batch)
    plan = ext.metadata()["plan"]
    assert set(plan) == set(names)
    assert [n for n, e in plan.items() if e != "factored"] == [], ext.metadata()["plan_reasons"]

    ref = reference_per_sample_grads(model, batch, loss_fn=loss_fn)
    layout = ext.layout
    fg = factored_pass(model, batch, layout, loss_fn)
    tol = {"rtol": 1e-7, "atol": 1e-9}  # float64 throughout: only summation order differs
    for name, blk in layout.blocks.items():
        if blk.kind == "kron":
            want = _expected(layout, ref.grads[name], name)
            assert_close(fg.kron[name], want, **tol, msg=lambda m, n=name: f"{n}: {m}")
        else:
            want = ref.grads[name].reshape(ref.batch_size, -1) @ layout.dense_matrix(name).double()
            assert_close(fg.vectors[name], ref.grads[name], **tol, msg=lambda m, n=name: f"{n}: {m}")
        got = res.z[:, blk.offset : blk.offset + blk.width]
        assert_close(got, want.float(), rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"z[{n}]: {m}")
    assert_close(fg.sq_norm.sqrt(), ref.grad_norm, **tol)
    assert_close(res.grad_norm, ref.grad_norm, **tol)
    assert_close(res.loss, ref.loss, **tol)
    assert_close(fg.output, ref.output, **tol)


# --------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("b", [1, 5])
@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_sequence_classifiers_scan_factored_and_exact(name, b):
    _check_exact(_build(CLASSIFIERS[name]), _classification_batch(b, seed=b))


@pytest.mark.parametrize("b", [1, 4])
@pytest.mark.parametrize("name", list(CAUSAL_LMS))
def test_causal_lms_scan_factored_and_exact(name, b):
    _check_exact(_build(CAUSAL_LMS[name]), _lm_batch(b, seed=b), loss_fn=lm_loss)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama_tied"])
def test_eager_attention_too(name):
    lm = name in CAUSAL_LMS
    model = _build({**CLASSIFIERS, **CAUSAL_LMS}[name], attn="eager")
    assert model.config._attn_implementation == "eager"
    batch = _lm_batch(3, seed=9) if lm else _classification_batch(3, seed=9)
    _check_exact(model, batch, loss_fn=lm_loss if lm else None)


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_float32_models_match_the_reference(name):
    # float32 takes the fused one-position Linear route (pooler, classifier) and the in-place writes; the
    # comparison is against the float64 reference of the same weights.
    model = _build(CLASSIFIERS[name], torch.float32, seed=1)
    batch = _classification_batch(6, seed=2)
    ext = GradientExtractor(model, dim=16, seed=3)
    res = ext(batch)
    assert set(ext.metadata()["plan"].values()) == {"factored"}
    ref = reference_per_sample_grads(model.double(), batch)
    layout = ext.layout
    for pname, blk in layout.blocks.items():
        if blk.kind == "kron":
            want = _expected(layout, ref.grads[pname], pname)
        else:
            want = ref.grads[pname].reshape(6, -1) @ layout.dense_matrix(pname).double()
        got = res.z[:, blk.offset : blk.offset + blk.width]
        assert_close(got.double(), want, rtol=1e-3, atol=1e-4, msg=lambda m, n=pname: f"{n}: {m}")
    assert_close(res.grad_norm.double(), ref.grad_norm, rtol=1e-4, atol=1e-6)


def test_tied_embedding_is_one_block_summing_both_uses():
    model = _build(CAUSAL_LMS["gpt2_lm"])
    assert model.lm_head.weight is model.transformer.wte.weight
    ext = GradientExtractor(model, dim=16, loss_fn=lm_loss)
    blocks = [blk["param"] for blk in ext.metadata()["layout"]]
    assert "transformer.wte.weight" in blocks and "lm_head.weight" not in blocks  # counted once
    batch = _lm_batch(3, seed=7)
    ref = reference_per_sample_grads(model, batch, loss_fn=lm_loss)
    res = ext(batch)
    blk = ext.layout.blocks["transformer.wte.weight"]
    want = _expected(ext.layout, ref.grads["transformer.wte.weight"], "transformer.wte.weight")
    assert_close(res.z[:, blk.offset : blk.offset + blk.width].double(), want, rtol=1e-5, atol=1e-6)
    assert_close(res.grad_norm.double(), ref.grad_norm, rtol=1e-6, atol=1e-8)
    units, rejected = plan_factored(model, select_parameters(model, None))
    assert not rejected
    assert units["lm_head"].params == ["transformer.wte.weight"]
    assert units["lm_head"].held_params == ["lm_head.weight"]


class Conv1DNet(nn.Module):
    """GPT-2's Conv1D on 2-D, one-position and token inputs; tiny widths so every route is taken."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c = Conv1D(d_out, d_in)  # (nf, nx)
        self.head = Conv1D(3, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.c(x))
        return self.head(h if h.ndim == 2 else h.mean(1))


@pytest.mark.parametrize(
    ("shape", "d_out"),
    [((1, 5), 4), ((6, 5), 4), ((6, 1, 5), 4), ((1, 7, 5), 4), ((6, 7, 5), 4), ((6, 8, 3), 2)],
)
def test_conv1d_rule_is_exact_on_every_route(shape, d_out):
    # (6, 8, 3) -> 2: N^2 = 64 > d_in * d_out = 6 takes the explicit route, (B, 5) the one-position route,
    # (B, 7, 5) the ghost route.
    torch.manual_seed(0)
    model = Conv1DNet(shape[-1], d_out).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    _check_exact(model, (torch.randn(shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))))


@pytest.mark.parametrize(("ids_f", "ids_g"), [(False, False), (True, False), (False, True), (True, True)])
def test_factors_inner_equals_the_inner_product_of_the_gradients(ids_f, ids_g):
    g = torch.Generator().manual_seed(0)
    b, rows, cols = 3, 7, 4

    def factors(n: int, ids: bool) -> tuple[GradFactors, torch.Tensor]:
        c = torch.randn(b, n, cols, generator=g, dtype=torch.float64)
        if ids:
            r = torch.randint(0, rows, (b, n), generator=g)
            dense = F.one_hot(r, rows).double()  # (B, N, rows)
        else:
            r = dense = torch.randn(b, n, rows, generator=g, dtype=torch.float64)
        return GradFactors(r, c), dense.transpose(1, 2) @ c  # (B, rows, cols)

    f, gf = factors(5, ids_f)
    h, gh = factors(6, ids_g)
    assert_close(factors_inner(f, h), (gf * gh).sum((1, 2)))


def test_rules_are_found_by_name_and_checked_on_the_instance():
    gpt2 = _build(_gpt2)
    assert isinstance(rule_for(gpt2.transformer.h[0].attn.c_attn), Conv1DRule)
    llama = _build(CAUSAL_LMS["llama_untied"])
    norm = llama.model.norm
    assert isinstance(rule_for(norm), WeightOnlyNormRule)
    assert rule_for(norm).unsupported_reason(norm) is None
    assert isinstance(rule_for(nn.RMSNorm(8)), WeightOnlyNormRule)

    class GemmaStyleRMSNorm(nn.Module):  # (1 + weight) scaling: the name matches, the maths does not
        def __init__(self, d: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(d))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + self.weight)

    gemma = GemmaStyleRMSNorm(8)
    assert "(1 + weight)" in rule_for(gemma).unsupported_reason(gemma)


def test_torch_rmsnorm_and_a_weight_only_norm_are_exact():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5, 8)
            self.norm = nn.RMSNorm(8, eps=1e-5)
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 5)
            return self.head(self.norm(torch.tanh(self.fc(x))).mean(1))

    torch.manual_seed(0)
    model = Net().double()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    for b in (1, 4):
        _check_exact(model, (torch.randn(b, 6, 5, dtype=torch.float64), torch.randint(0, 3, (b,))))


# ----------------------------------------------------------------------------- broadcast inputs
class Positional(nn.Module):
    """Token + learned position embeddings, the position lookup called on ``(1, T)``."""

    def __init__(self, row: int | None = None) -> None:
        super().__init__()
        self.tok = nn.Embedding(20, 6)
        self.pos = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 3)
        self.row = row  # misuse: every sample reads this row of the (expanded) position output

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        pos = self.pos(torch.arange(t).unsqueeze(0))  # (1, T, 6)
        if self.row is not None:
            pos = pos[self.row : self.row + 1]  # (1, T, 6) taken from one sample's row
        return self.head(torch.tanh(self.tok(input_ids) + pos).mean(1))


@pytest.mark.parametrize("b", [1, 2, 6])
def test_module_called_on_a_broadcast_input_is_exact(b):
    torch.manual_seed(0)
    model = Positional().double()
    batch = (torch.randint(0, 20, (b, 5)), torch.randint(0, 3, (b,)))
    _check_exact(model, batch)


def test_broadcast_output_not_used_row_by_row_goes_to_vmap(caplog):
    torch.manual_seed(0)
    model = Positional(row=0).double()
    batch = (torch.randint(0, 20, (4, 5)), torch.randint(0, 3, (4,)))
    ext = GradientExtractor(model, dim=16)
    with caplog.at_level(logging.WARNING, logger="hardmine.engine"):
        res = ext(batch)
    assert ext.metadata()["plan"]["pos.weight"] == "vmap"
    assert "row by row" in ext.metadata()["plan_reasons"]["pos.weight"]
    ref = reference_per_sample_grads(model, batch)
    assert_close(res.grad_norm.double(), ref.grad_norm, rtol=1e-6, atol=1e-8)


def test_broadcast_seen_only_after_a_one_sample_first_batch_is_checked_again_not_expanded_unchecked():
    # A first batch of one sample cannot show a broadcast input, so the plan is checked again on the first batch
    # of several samples: the expansion is approved there (never taken unchecked) and its vectors are exact.
    torch.manual_seed(0)
    model = Positional().double()
    ext = GradientExtractor(model, dim=16, engine="factored")
    first = (torch.randint(0, 20, (1, 5)), torch.randint(0, 3, (1,)))
    assert_close(ext(first).grad_norm, reference_per_sample_grads(model, first).grad_norm)
    for b in (4, 3):
        batch = (torch.randint(0, 20, (b, 5)), torch.randint(0, 3, (b,)))
        assert_close(ext(batch).grad_norm, reference_per_sample_grads(model, batch).grad_norm)
        assert_close(ext(batch).z, GradientExtractor(model, dim=16, engine="vmap")(batch).z)
    assert ext._checked_rows == 4  # checked once more, on the first larger batch only
    # A first batch of several samples approves it, and a last batch of one sample needs no expansion.
    ext = GradientExtractor(model, dim=16)
    for b in (4, 1):
        batch = (torch.randint(0, 20, (b, 5)), torch.randint(0, 3, (b,)))
        assert_close(ext(batch).grad_norm, reference_per_sample_grads(model, batch).grad_norm)


class BatchStatistic(nn.Module):
    """A Linear called on the batch mean (1, d): it mixes samples, so it must stay off the factored engine."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.ctx = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 4)
        h = torch.tanh(self.fc(x))  # (B, 4)
        return self.head(h + self.ctx(h.mean(0, keepdim=True)))  # ctx sees (1, 4)


class Repeats(nn.Module):
    """A learned token projected on (1, 1, d) and then repeated B times: the model needs the (1, ...) shape."""

    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 4))
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 4)
        cls = self.proj(self.cls).repeat(x.shape[0], 1, 1)  # (B, 1, 4); fails if proj's output has B rows
        return self.head(torch.cat([cls, x], 1).mean(1))


@pytest.mark.parametrize(
    ("cls", "x", "module", "why"),
    [
        (BatchStatistic, torch.randn(5, 4), "ctx", "changes with the batch's samples"),
        (Repeats, torch.randn(5, 3, 4), "proj", "fails when its output is expanded"),
    ],
)
def test_broadcast_inputs_the_maths_does_not_cover_go_to_vmap(cls, x, module, why):
    torch.manual_seed(0)
    model = cls().double()
    batch = (x.double(), torch.randint(0, 3, (5,)))
    ext = GradientExtractor(model, dim=16)
    res = ext(batch)
    meta = ext.metadata()
    assert meta["plan"][f"{module}.weight"] == "vmap" and why in meta["plan_reasons"][f"{module}.weight"]
    if cls is BatchStatistic:
        # the model mixes samples: no engine but the per-sample loop can match it, so the first batch's exactness
        # check sends the layers after the mixing to vmap as well
        assert meta["plan"]["head.weight"] == "vmap" and "differ from the exact ones" in meta["plan_reasons"]["head.weight"]
        return
    assert meta["plan"]["head.weight"] == "factored"
    vmap = GradientExtractor(model, dim=16, engine="vmap")(batch)
    assert_close(res.z, vmap.z, rtol=1e-5, atol=1e-6)
    assert_close(res.grad_norm, vmap.grad_norm)


def test_tied_embedding_and_linear_without_transformers():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e = nn.Embedding(10, 6, padding_idx=0)
            self.h = nn.Linear(6, 10, bias=False)
            self.h.weight = self.e.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.h(self.e(x).mean(1))

    torch.manual_seed(0)
    model = Tied().double()
    for b in (1, 4):
        _check_exact(model, (torch.randint(0, 10, (b, 7)), torch.randint(0, 3, (b,))))


def test_registering_the_conv1d_rule_does_not_import_transformers():
    code = "import sys, hardmine, hardmine.factored; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_nothing_is_left_on_the_model():
    model = _build(CAUSAL_LMS["llama_tied"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    GradientExtractor(model, dim=16, loss_fn=lm_loss)(_lm_batch(3))
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not model.training


# ------------------------------------------------------------------------------------ end to end
def test_scan_of_a_bert_classifier_with_default_settings(tmp_path):
    from hardmine.scan import scan

    model = _build(_bert, torch.float32)
    batches = [_classification_batch(4, seed=s) for s in range(3)]
    data = [{**tokens, "labels": labels} for tokens, labels in batches]
    result = scan(model, data, out=tmp_path / "bert", dim=16)
    plan = result.engine_metadata["plan"]
    assert plan and "vmap" not in plan.values()
    assert result.n_samples == 12 and len(result.manifest()) == 12
