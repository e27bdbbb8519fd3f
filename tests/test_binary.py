"""Single-logit binary models (trained with BCE-with-logits): scanned, mined online and scored as the
two-class model ``[0, z]`` — the same loss, exact gradients, labels 0 and 1."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_cli import _scan, invoke  # noqa: F401
from torch import nn
from torch.testing import assert_close

from hardmine.engine import GradientExtractor
from hardmine.extract import reference_per_sample_grads
from hardmine.losses import class_count, class_logits, cross_entropy_per_sample
from hardmine.manifest import read_manifest
from hardmine.online import OnlineMiner


class Binary(nn.Module):
    def __init__(self, squeeze: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.out = nn.Linear(8, 1)
        self.squeeze = squeeze

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.out(torch.tanh(self.fc1(x)))  # (B, 1)
        return z.squeeze(-1) if self.squeeze else z


def binary():
    return Binary()


def _data(n: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] + 0.3 * torch.randn(n, generator=g) > 0).long()
    return x, y


@pytest.mark.parametrize("squeeze", [False, True])
def test_the_loss_is_bce_with_logits(squeeze):
    z = torch.randn(5, 1) if not squeeze else torch.randn(5)
    y = torch.tensor([0, 1, 1, 0, 1])
    want = F.binary_cross_entropy_with_logits(z.reshape(5), y.double().float(), reduction="none")
    assert_close(cross_entropy_per_sample(z, y), want)


@pytest.mark.parametrize("shape", [(5,), (5, 1), (5, 2), (5, 7), (1, 3), (0, 4)])
def test_class_count_is_the_width_of_class_logits_from_the_shape_alone(shape):
    out = torch.randn(shape)
    assert class_count(out) == class_logits(torch.randn(max(shape[0], 1), *shape[1:])).shape[1]
    with torch.profiler.profile() as prof:  # read from the shape: no op on the output
        class_count(out)
    assert not [e.name for e in prof.events() if e.name.startswith("aten::")]


@pytest.mark.parametrize("engine", ["factored", "vmap"])
@pytest.mark.parametrize("b", [1, 7])
@pytest.mark.parametrize("squeeze", [False, True])
def test_per_sample_gradients_are_exact(engine, b, squeeze):
    torch.manual_seed(0)
    model = Binary(squeeze).double()
    x, y = _data(b)
    ext = GradientExtractor(model, dim=8, engine=engine)
    res = ext((x.double(), y))
    ref = reference_per_sample_grads(model, (x.double(), y))
    assert_close(res.grad_norm, ref.grad_norm)
    want = torch.stack([F.binary_cross_entropy_with_logits(model(x[i : i + 1].double()).reshape(1),
                                                           y[i : i + 1].double()) for i in range(b)])
    assert_close(res.loss, want)


def test_online_output_layer_path_matches_autograd():
    torch.manual_seed(0)
    model = Binary()
    x, y = _data(16)
    ids = torch.arange(16)
    a = OnlineMiner(model, layers="out", dim=8, keep_gradients=True)
    sa = a.observe(x, y, ids)
    assert sa.path == "analytic"
    b = OnlineMiner(model, layers="out", dim=8, keep_gradients=True, loss_fn=lambda o, t: cross_entropy_per_sample(o, t))
    sb = b.observe(x, y, ids)
    assert sb.path == "autograd"
    assert_close(sa.z, sb.z)
    assert_close(sa.confidence, torch.where(y == 1, torch.sigmoid(sa.output[:, 0]), 1 - torch.sigmoid(sa.output[:, 0])).to(sa.confidence.dtype))


def test_cli_scans_a_single_logit_binary_model(tmp_path):
    torch.manual_seed(0)
    model = Binary()
    x, y = _data(60)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(50):
        loss = F.binary_cross_entropy_with_logits(model(x).squeeze(1), y.float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    np.savez(tmp_path / "data.npz", X=x.numpy(), y=y.numpy())
    res = _scan(tmp_path, model="test_binary:binary")
    assert res.exit_code == 0, res.output
    m = read_manifest(tmp_path / "scan").sort_values("sample_id")
    assert m.attrs["hardmine"]["num_classes"] == 2 and set(m["label"]) == {0, 1}
    with torch.no_grad():
        p1 = torch.sigmoid(model(x)[:, 0]).double().numpy()
    np.testing.assert_allclose(m["confidence"], np.where(y.numpy() == 1, p1, 1 - p1), rtol=1e-5)
    assert (m["pred"].to_numpy() == (p1 > 0.5)).all()
    bad = y.clone()
    bad[3] = 2
    np.savez(tmp_path / "bad.npz", X=x.numpy(), y=bad.numpy())
    res = _scan(tmp_path, model="test_binary:binary", data="bad.npz", out="b")
    assert res.exit_code == 2 and "label 2 is out of range for a model with 1 output (a binary model)" in " ".join(
        res.output.split())
