"""One rule application for every factored pass (hardmine.factored.capture.apply_rules / RuleRunner), the
online miner's `projection=` keyword, and where the online pieces live."""

from __future__ import annotations

import warnings

import pytest
import torch
from models import MLP
from torch import nn
from torch.testing import assert_close

import hardmine.online
import hardmine.sampler
from hardmine.enums import ProjectionKind
from hardmine.factored import (
    LayerRule,
    ProjectionLayout,
    RuleResult,
    apply_rules,
    capture_calls,
    check_calls,
    plan_factored,
    register_layer_rule,
)
from hardmine.online import OnlineMiner


def _captured(model: nn.Module, layers: list[str], x: torch.Tensor, y: torch.Tensor):
    layout = ProjectionLayout(model, layers, dim=16, seed=2)
    units, rejected = plan_factored(model, layout.names)
    assert not rejected
    with capture_calls(units) as rec:
        out = model(x)
    problems, modified = check_calls(units, rec, x.shape[0])
    assert problems == {} and modified == set()
    loss = nn.functional.cross_entropy(out, y, reduction="none")
    return layout, units, rec, out, loss


def test_given_output_gradients_and_autograd_give_the_same_projection():
    torch.manual_seed(0)
    model = MLP().double()
    x, y = torch.randn(5, 12, dtype=torch.float64), torch.randint(0, 4, (5,))
    layers = ["fc2.weight", "fc2.bias"]
    layout, units, rec, out, loss = _captured(model, layers, x, y)
    # (B, C): d CE / d logits, in closed form
    delta = torch.softmax(out.detach(), dim=1) - nn.functional.one_hot(y, 4).double()
    given = apply_rules(units, rec, loss, out, layout, 5, deltas={"fc2": [delta]})
    layout2, units2, rec2, out2, loss2 = _captured(model, layers, x, y)
    auto = apply_rules(units2, rec2, loss2, out2, layout2, 5)
    z1, z2 = layout.new_output(5, "cpu"), layout2.new_output(5, "cpu")
    given.write_to(z1, layout)
    auto.write_to(z2, layout2)
    assert_close(z1, z2)
    assert_close(given.sq_norm, auto.sq_norm)


class Doubler(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


@register_layer_rule(Doubler)
class WrongShapeRule(LayerRule):
    """A broken rule: its projection has one row too few."""

    matrix_param = "weight"
    vector_params = ()

    def compute(self, module, calls, request):
        p_out, p_in = request.matrix
        b = calls[0].delta.shape[0]
        return RuleResult(
            matrix_proj=torch.zeros(b - 1, p_out.shape[1], p_in.shape[1]), matrix_sq_norm=torch.zeros(b)
        )


def test_a_rule_result_of_the_wrong_shape_is_refused_online_and_offline():
    model = nn.Sequential(Doubler(), nn.Linear(3, 2))
    x, y = torch.randn(4, 4), torch.tensor([0, 1, 1, 0])
    layout = ProjectionLayout(model, ["0.weight"], dim=16, seed=0)
    units, _ = plan_factored(model, layout.names)
    with capture_calls(units) as rec:
        out = model(x)
    loss = nn.functional.cross_entropy(out, y, reduction="none")
    with pytest.raises(ValueError, match="WrongShapeRule returned no/wrong-shaped projection"):
        apply_rules(units, rec, loss, out, layout, 4)
    with pytest.raises(ValueError, match="WrongShapeRule returned no/wrong-shaped projection"):
        OnlineMiner(model, layers="0", dim=16).observe(x, y)


def test_projection_keyword_and_deprecated_kind():
    model = MLP()
    x, y = torch.randn(6, 12), torch.randint(0, 4, (6,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the canonical name warns about nothing
        new = OnlineMiner(model, layers="fc2", dim=16, seed=1, projection="gaussian")
        assert OnlineMiner(model, layers="fc2", dim=16).layout.kind is ProjectionKind.RADEMACHER
    with pytest.warns(DeprecationWarning, match=r"OnlineMiner\(kind=...\) is deprecated; pass projection="):
        old = OnlineMiner(model, layers="fc2", dim=16, seed=1, kind="gaussian")
    assert new.layout.kind is old.layout.kind is ProjectionKind.GAUSSIAN
    assert torch.equal(new.observe(x, y).z, old.observe(x, y).z)
    assert old.state_dict()["config"] == new.state_dict()["config"]  # saved states keep their format
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="kind='rademacher' disagree"):
        OnlineMiner(model, layers="fc2", projection="gaussian", kind="rademacher")
    with pytest.raises(ValueError, match="bogus"):
        OnlineMiner(model, layers="fc2", projection="bogus")


def test_miner_sampler_lives_beside_manifest_sampler():
    assert hardmine.online.MinerSampler is hardmine.sampler.MinerSampler
    assert "MinerSampler" in hardmine.sampler.__all__


class LoudShift(nn.Module):
    """Adds a learned shift; its rule (below) reports the shift's gradient in float16, scaled up."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift


@register_layer_rule(LoudShift)
class LoudShiftRule(LayerRule):
    """A vector-only rule giving a float16 gradient whose squared norm is beyond float16's range (65504)."""

    matrix_param = None
    vector_params = ("shift",)

    def compute(self, module, calls, request):
        b = calls[0].delta.shape[0]
        return RuleResult(vectors={"shift": torch.full((b, 4), 200.0, dtype=torch.float16)})


def test_vector_gradients_norms_are_summed_together_without_overflow():
    # Every vector gradient without a norm from its rule goes into one norm at the end of the pass: the
    # squared norm of several parameters is the sum of theirs, and half-precision ones are squared in float32.
    model = nn.Sequential(nn.Linear(3, 4), LoudShift(), nn.LayerNorm(4), LoudShift())
    x, y = torch.randn(2, 3), torch.tensor([0, 3])
    for layers in (["1.shift", "3.shift"], ["1.shift", "2.weight", "2.bias", "3.shift"]):
        layout, units, rec, out, loss = _captured(model, layers, x, y)
        fg = apply_rules(units, rec, loss, out, layout, 2)
        ln = sum(fg.vectors[n].pow(2).sum(1) for n in layers if n.startswith("2."))
        assert fg.sq_norm.dtype == torch.float32  # the output's
        # two shifts of four float16 entries at 200 (320000, beyond float16's range), and the norm's float32 ones
        assert_close(fg.sq_norm, torch.full((2,), 2 * 4 * 200.0**2) + ln, msg=str(layers))


class WideScale(nn.Module):
    """Scales its input; its rule (below) hands back the scale's squared norm in float64."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


@register_layer_rule(WideScale)
class WideScaleRule(LayerRule):
    matrix_param = None
    vector_params = ("scale",)

    def compute(self, module, calls, request):
        d, x = calls[0].delta, calls[0].x
        g = (d * x).reshape(d.shape[0], -1, 4).sum(1)  # (B, 4)
        return RuleResult(vectors={"scale": g}, vector_sq_norm={"scale": g.double().pow(2).sum(1)})


def test_the_squared_norm_is_in_the_output_dtype_whatever_the_rules_return():
    model = nn.Sequential(nn.Linear(3, 4), WideScale())
    x, y = torch.randn(5, 3), torch.randint(0, 4, (5,))
    layout, units, rec, out, loss = _captured(model, ["1.scale"], x, y)
    fg = apply_rules(units, rec, loss, out, layout, 5)
    assert fg.sq_norm.dtype == torch.float32  # the model's output dtype, not the rule's float64
    assert_close(fg.sq_norm, fg.vectors["1.scale"].pow(2).sum(1))
