"""Projected vectors never change silently: sha256 of the float32 bytes of fixed model/batch/seed outputs.

A refactor of the engine, the projection or the online miner must keep these hashes. A change that alters
the projection definition on purpose must update the pins *and* say so (changelog / manifest format).
Exactness against the per-sample autograd loop lives in test_factored.py / test_extract.py; this file only
guards bit-identity of what users have already written to disk.

The hashes are of a single process on this project's CPU machines (torch's CPU kernels are deterministic
for a fixed thread count); ``_pinned_threads`` fixes the count so the pins do not depend on ``nproc``.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from models import CNN, MLP, TinyTransformer, token_batch

from hardmine.engine import GradientExtractor
from hardmine.online import OnlineMiner


@pytest.fixture(autouse=True)
def _pinned_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _sha(t: torch.Tensor | np.ndarray) -> str:
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t
    a = np.ascontiguousarray(a, dtype=np.float32)
    return hashlib.sha256(a.tobytes()).hexdigest()[:16]


def _case(name: str):
    g = torch.Generator().manual_seed(11)
    if name == "mlp":
        torch.manual_seed(1)
        model = MLP().eval()
        batch = (torch.randn(9, 12, generator=g), torch.randint(0, 4, (9,), generator=g))
    elif name == "cnn":
        torch.manual_seed(2)
        model = CNN().eval()
        batch = (torch.randn(5, 3, 8, 8, generator=g), torch.randint(0, 5, (5,), generator=g))
    else:
        torch.manual_seed(3)
        model = TinyTransformer().eval()
        batch = (token_batch(6, seed=4), torch.randint(0, 3, (6,), generator=g))
    return model, batch


# engine -> model -> hash of ProjectedBatch.z (dim 16, seed 5, all layers); recorded before the
# architecture refactor (issue "One factored engine, one batch contract").
PINNED_EXTRACT = {
    ("factored", "mlp"): "b42b736060eed9d7",
    ("factored", "cnn"): "65ad3c1287a3e007",
    ("factored", "transformer"): "fad14b0589084f97",
    ("vmap", "mlp"): "891ab88570a56594",
    ("vmap", "cnn"): "84d58837c0258b68",
    # Changed on purpose (2026-11-30, the nn.MultiheadAttention rule): the attention's in_proj_weight and
    # out_proj.weight are now Kronecker blocks (P_out ⊗ P_in, like every matrix with a rule) where they were
    # dense blocks of the same width; every other block is unchanged (the factored pin above, which selects
    # them all but attention, did not move). A scan of such a model written before cannot be resumed into
    # (its configuration's layout differs, and the resume check names it).
    ("vmap", "transformer"): "34d3c3a961558af8",
    ("auto", "transformer"): "1e807649db73fd60",
}
# model -> (hash of the output-layer-only vectors, hash of the all-layer vectors) of OnlineMiner.observe
PINNED_ONLINE = {
    "mlp": ("546d382db36c7b1e", "b42b736060eed9d7"),
    "cnn": ("c640e8bbf2034f16", "65ad3c1287a3e007"),
}


@pytest.mark.parametrize("engine,name", sorted(PINNED_EXTRACT))
def test_extractor_vectors_are_pinned(engine, name):
    model, (inputs, y) = _case(name)
    # Every layer type but the attention (pinned before its rule existed; auto/vmap cover it).
    layers = ["embed", "norm", "encoder.linear*", "encoder.norm*", "classifier"]
    layers = layers if (engine, name) == ("factored", "transformer") else None
    ext = GradientExtractor(model, layers=layers, dim=16, seed=5, engine=engine)
    z = ext((inputs, y)).z
    assert z.dtype == torch.float32
    assert _sha(z) == PINNED_EXTRACT[(engine, name)], (engine, name, _sha(z))


@pytest.mark.parametrize("name", sorted(PINNED_ONLINE))
def test_online_vectors_are_pinned(name):
    model, (inputs, y) = _case(name)
    last = "fc2" if name == "mlp" else "fc"
    got = []
    for layers in (last, None):
        miner = OnlineMiner(model, layers=layers, dim=16, seed=5, keep_gradients=True)
        with miner.capture():
            out = model(inputs)
        miner.observe_output(out, y, ids=torch.arange(len(y)))
        _, z = miner.gradients()
        got.append(_sha(z))
    assert tuple(got) == PINNED_ONLINE[name], (name, got)
