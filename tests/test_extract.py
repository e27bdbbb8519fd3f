"""The vmap engine against the slow per-sample autograd loop, on several model shapes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from models import CNN, MLP, BNNet, TinyTransformer, TwoInput, token_batch, warm_bn
from torch import nn
from torch.testing import assert_close

from hardmine import per_sample_grads, reference_per_sample_grads


def _compare(model, batch, **kw):
    fast = per_sample_grads(model, batch, **kw)
    ref = reference_per_sample_grads(model, batch, **{k: v for k, v in kw.items() if k != "chunk_size"})
    assert list(fast.grads) == list(ref.grads)
    for name in ref.grads:
        assert_close(fast.grads[name], ref.grads[name], msg=lambda m, n=name: f"{n}: {m}")
    assert_close(fast.loss, ref.loss)
    assert_close(fast.output, ref.output)
    assert_close(fast.grad_norm, ref.grad_norm)
    return fast, ref


@pytest.mark.parametrize("b", [1, 9])
def test_mlp_matches_reference(b):
    model = MLP().double()
    batch = (torch.randn(b, 12, dtype=torch.float64), torch.randint(0, 4, (b,)))
    fast, _ = _compare(model, batch)
    assert fast.grads["fc1.weight"].shape == (b, 16, 12)
    assert fast.flat().shape == (b, sum(p.numel() for p in model.parameters()))


@pytest.mark.parametrize("b", [1, 6])
def test_cnn_with_pooling_matches_reference(b):
    model = CNN().double()
    batch = (torch.randn(b, 3, 8, 8, dtype=torch.float64), torch.randint(0, 5, (b,)))
    _compare(model, batch)


@pytest.mark.parametrize("b", [1, 5])
def test_transformer_with_embedding_layernorm_and_mask(b):
    model = TinyTransformer().double()
    batch = (token_batch(b), torch.randint(0, 3, (b,)))
    _compare(model, batch)


def test_dict_batch_with_labels_key():
    model = TinyTransformer().double()
    batch = {**token_batch(4, seed=3), "labels": torch.randint(0, 3, (4,))}
    _compare(model, batch)


def test_batchnorm_eval_matches_reference():
    model = warm_bn(BNNet().double())
    batch = (torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 3, (7,)))
    _compare(model, batch)
    assert not model.training


def test_batchnorm_train_mode_is_a_clear_error():
    model = BNNet()  # freshly built modules are in training mode
    with pytest.raises(ValueError, match=r"BatchNorm.*\['bn'\].*model\.eval\(\)"):
        per_sample_grads(model, (torch.randn(4, 6), torch.randint(0, 3, (4,))))


def test_several_positional_inputs():
    model = TwoInput().double()
    batch = ((torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)), torch.randint(0, 2, (5,)))
    _compare(model, batch)


def test_regression_mse_and_custom_loss():
    model = MLP(n_classes=1).double()
    x, y = torch.randn(6, 12, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    fast, _ = _compare(model, (x, y))  # float target -> mse
    with torch.no_grad():
        expect = (model(x) - y).pow(2).mean(1)
    assert_close(fast.loss, expect)

    def huber(out, target):
        return F.huber_loss(out, target, reduction="none").mean(1)

    _compare(model, (x, y), loss_fn=huber)


def test_parameter_selection_is_applied_before_differentiation(monkeypatch):
    model = MLP().double()
    batch = (torch.randn(4, 12, dtype=torch.float64), torch.randint(0, 4, (4,)))
    fast, _ = _compare(model, batch, params="fc2.*")
    assert list(fast.grads) == ["fc2.weight", "fc2.bias"]
    # Module-name selection gives the same thing as the glob.
    by_module = per_sample_grads(model, batch, params="fc2")
    assert list(by_module.grads) == ["fc2.weight", "fc2.bias"]
    # Only the selected parameters are handed to grad(): record what it differentiates.
    import hardmine.extract as ex

    seen = {}
    real_grad = ex.grad

    def spy(fn, *a, **k):
        g = real_grad(fn, *a, **k)

        def wrapped(sel, *rest):
            seen["names"] = sorted(sel)
            return g(sel, *rest)

        return wrapped

    monkeypatch.setattr(ex, "grad", spy)
    per_sample_grads(model, batch, params=["fc1.bias"])
    assert seen["names"] == ["fc1.bias"]


def test_unknown_pattern_names_the_pattern_and_lists_modules():
    with pytest.raises(ValueError, match=r"'nope\*'.*fc1\.weight"):
        per_sample_grads(MLP(), (torch.randn(2, 12), torch.randint(0, 4, (2,))), params="nope*")


def test_chunking_gives_the_same_result():
    model = MLP().double()
    batch = (torch.randn(11, 12, dtype=torch.float64), torch.randint(0, 4, (11,)))
    full = per_sample_grads(model, batch)
    chunked = per_sample_grads(model, batch, chunk_size=3)
    for n in full.grads:
        assert_close(chunked.grads[n], full.grads[n])


def test_dropout_off_by_default_and_model_mode_restored():
    model = TinyTransformer(dropout=0.5).double()
    model.train()
    before = {n: m.training for n, m in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    batch = (token_batch(4), torch.randint(0, 3, (4,)))
    a = per_sample_grads(model, batch)
    b = per_sample_grads(model, batch)
    for n in a.grads:  # eval mode: deterministic
        assert torch.equal(a.grads[n], b.grads[n])
    assert {n: m.training for n, m in model.named_modules()} == before
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    assert all(p.grad is None for p in model.parameters())


def test_dropout_randomness_different_changes_samples():
    model = MLP().double()
    model.drop = nn.Dropout(0.5)
    model.forward = lambda x: model.fc2(model.drop(torch.relu(model.fc1(x))))  # noqa: E731
    model.train()
    batch = (torch.randn(1, 12, dtype=torch.float64).repeat(8, 1), torch.zeros(8, dtype=torch.long))
    out = per_sample_grads(model, batch, randomness="different")
    # identical samples, independent masks -> gradients differ across the batch
    assert not torch.allclose(out.grads["fc1.weight"][0], out.grads["fc1.weight"][1])


@settings(max_examples=15, deadline=None)
@given(
    b=st.integers(1, 6),
    d_in=st.integers(1, 7),
    hidden=st.integers(1, 9),
    n_classes=st.integers(2, 5),
)
def test_hypothesis_mlp_shapes(b, d_in, hidden, n_classes):
    model = MLP(d_in, hidden, n_classes).double()
    batch = (torch.randn(b, d_in, dtype=torch.float64), torch.randint(0, n_classes, (b,)))
    _compare(model, batch)


def test_float32_matches_within_float_tolerance():
    model = CNN()
    batch = (torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,)))
    fast = per_sample_grads(model, batch)
    ref = reference_per_sample_grads(model, batch)
    for n in ref.grads:
        assert_close(fast.grads[n], ref.grads[n], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------ bad input at the boundary
@pytest.mark.parametrize(
    ("batch", "pattern"),
    [
        ((torch.randn(3, 12), torch.tensor([0, 1, 4])), r"label 4 is out of range.*4 outputs"),
        ((torch.randn(3, 12), torch.tensor([0, -1, 2])), r"label -1 is out of range"),
        ((torch.randn(3, 12), torch.tensor([0.0, 1.0, 2.0])), r"dtype torch\.float32"),
        ((torch.randn(3, 12), torch.tensor([0, 1])), r"shape \(3, 12\).*2 samples"),
        ((torch.randn(0, 12), torch.zeros(0, dtype=torch.long)), r"empty"),
        ((torch.tensor([[float("nan")] * 12] * 2), torch.tensor([0, 1])), r"NaN/inf.*first at batch position 0"),
        ((torch.randn(2, 5), torch.tensor([0, 1])), r"forward failed.*\(5,\)"),
        (([1, 2, 3], torch.tensor([0, 1, 2])), r"not a torch\.Tensor"),
        ((torch.randn(2, 12), [0, 1]), r"target is a list"),
        ({"x": torch.randn(2, 12)}, r"none of \['labels'"),
    ],
)
def test_bad_input_is_a_clear_value_error(batch, pattern):
    with pytest.raises(ValueError, match=pattern):
        per_sample_grads(MLP(), batch, loss_fn="cross_entropy" if not isinstance(batch, dict) else None)


def test_non_differentiable_output_is_refused():
    class ArgMax(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, x):
            return self.fc(x).argmax(dim=1)

    with pytest.raises(ValueError, match="not differentiable"):
        per_sample_grads(ArgMax(), (torch.randn(2, 3), torch.tensor([0.0, 1.0])), loss_fn="mse")


def test_bad_options():
    batch = (torch.randn(2, 12), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"randomness='sometimes'.*'eval'"):
        per_sample_grads(MLP(), batch, randomness="sometimes")
    with pytest.raises(ValueError, match=r"loss='hinge'.*'cross_entropy'"):
        per_sample_grads(MLP(), batch, loss_fn="hinge")
    with pytest.raises(ValueError, match=r"chunk_size=0"):
        per_sample_grads(MLP(), batch, chunk_size=0)


def test_data_dependent_control_flow_is_a_clear_error():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            if (x > 0).all():  # data-dependent: vmap cannot batch this
                return self.fc(x)
            return self.fc(-x)

    with pytest.raises(ValueError, match=r"cannot run under torch\.func\.vmap.*engine='factored'"):
        per_sample_grads(Branchy(), (torch.randn(3, 3), torch.tensor([0, 1, 0])))


def test_vmap_leaves_a_module_held_under_two_names_on_the_model():
    """A block shared by two attributes (ALBERT-style layer sharing): the vmap pass swaps each attribute once and
    puts the model's own Parameter objects back (torch's weight untying swapped the shared module twice and left
    a plain tensor on it), and the per-sample gradients count both uses."""
    from hardmine.engine import GradientExtractor

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = self.a  # the same module under a second name
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))

    torch.manual_seed(0)
    model = Shared().double()
    ids = {n: id(p) for n, p in model.named_parameters()}
    batch = (torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 2]))
    got = per_sample_grads(model, batch)
    assert {n: id(p) for n, p in model.named_parameters()} == ids
    assert all(type(p) is nn.Parameter for p in model.parameters())
    ref = reference_per_sample_grads(model, batch)
    for n in ref.grads:
        assert_close(got.grads[n], ref.grads[n])
    GradientExtractor(model, dim=16, engine="vmap")(batch)
    assert {n: id(p) for n, p in model.named_parameters()} == ids
