"""Projected vectors never change silently: fixed model/batch/seed outputs are compared with stored references.

A refactor of the engine, the projection or the online miner must keep these vectors. A change that alters
the projection definition on purpose must rewrite the references (``python tests/test_pinned_vectors.py
--write``), update ``REFERENCE_SHA`` *and* say so (changelog / manifest format): the file's hash is pinned
here, so the references cannot move without an edit of this test.
Exactness against the per-sample autograd loop lives in test_factored.py / test_extract.py; this file only
guards what users have already written to disk.

Why references and a tolerance rather than hashes of the vectors' bytes: torch's CPU kernels round
differently on different instruction sets (``torch.randn`` and ``nn.Linear``'s initialisation included),
so the same code gave other bytes on an AVX-512 machine than on the machines the hashes were taken on,
differing by about 1e-7. A change of the projection itself (a seed, a key, a block's kind or order) moves
the vectors by their own size, a million times the tolerance below.

References: written on 2026-11-30 from the code the byte hashes had pinned (commit ``4f019e0``, unchanged
since those hashes were taken but for the attention blocks, which the hashes were updated for on purpose), on
an AVX-512 machine, one thread (``_pinned_threads``). The two ``tokens`` cases (a class token and a position
embedding, factored under auto since ``hardmine/factored/parameter.py``, by vmap under vmap) were added the
same day, the other arrays kept byte for byte.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from models import CNN, MLP, TinyTransformer, token_batch

from hardmine.engine import GradientExtractor
from hardmine.online import OnlineMiner

REFERENCES = Path(__file__).resolve().parent / "data" / "pinned_vectors.npz"
# sha256 (first 16 hex digits) of the references' arrays, by name and bytes (see _arrays_sha)
REFERENCE_SHA = "9caed9ac2a86c789"
# Rounding across instruction sets moved the vectors by at most 4e-7 (their entries are up to ~3 in size).
RTOL, ATOL = 1e-5, 1e-5


@pytest.fixture(autouse=True)
def _pinned_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _arrays_sha(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(np.ascontiguousarray(arrays[key], dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


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
    elif name == "tokens":  # a class token and a position embedding used without a module (factored/parameter.py)
        from test_factored_parameter import Tokens

        torch.manual_seed(4)
        model = Tokens().eval()
        batch = (torch.randn(5, 4, 5, generator=g), torch.randint(0, 3, (5,), generator=g))
    else:
        torch.manual_seed(3)
        model = TinyTransformer().eval()
        batch = (token_batch(6, seed=4), torch.randint(0, 3, (6,), generator=g))
    return model, batch


# (engine, model) cases of the extractor (dim 16, seed 5, all layers). ("factored", "transformer") selects
# every layer type but the attention (pinned before its rule existed; auto/vmap cover it).
EXTRACT_CASES = [
    ("auto", "tokens"),
    ("auto", "transformer"),
    ("factored", "cnn"),
    ("factored", "mlp"),
    ("factored", "transformer"),
    ("vmap", "cnn"),
    ("vmap", "mlp"),
    ("vmap", "tokens"),
    ("vmap", "transformer"),
]
ONLINE_CASES = ["cnn", "mlp"]


def extract_vectors(engine: str, name: str) -> np.ndarray:
    model, (inputs, y) = _case(name)
    layers = ["embed", "norm", "encoder.linear*", "encoder.norm*", "classifier"]
    layers = layers if (engine, name) == ("factored", "transformer") else None
    z = GradientExtractor(model, layers=layers, dim=16, seed=5, engine=engine)((inputs, y)).z
    assert z.dtype == torch.float32
    return z.numpy()


def online_vectors(name: str) -> tuple[np.ndarray, np.ndarray]:
    """OnlineMiner.observe's vectors: (output layer only, all layers)."""
    model, (inputs, y) = _case(name)
    last = "fc2" if name == "mlp" else "fc"
    got = []
    for layers in (last, None):
        miner = OnlineMiner(model, layers=layers, dim=16, seed=5, keep_gradients=True)
        with miner.capture():
            out = model(inputs)
        miner.observe_output(out, y, ids=torch.arange(len(y)))
        _, z = miner.gradients()
        got.append(np.asarray(z, dtype=np.float32))
    return got[0], got[1]


def all_vectors() -> dict[str, np.ndarray]:
    arrays = {f"extract-{e}-{n}": extract_vectors(e, n) for e, n in EXTRACT_CASES}
    for n in ONLINE_CASES:
        arrays[f"online-{n}-last"], arrays[f"online-{n}-all"] = online_vectors(n)
    return arrays


@pytest.fixture(scope="module")
def references() -> dict[str, np.ndarray]:
    with np.load(REFERENCES) as f:
        arrays = {k: f[k] for k in f.files}
    assert _arrays_sha(arrays) == REFERENCE_SHA, "the reference vectors changed: see the module docstring"
    assert sorted(arrays) == sorted(
        [f"extract-{e}-{n}" for e, n in EXTRACT_CASES]
        + [f"online-{n}-{w}" for n in ONLINE_CASES for w in ("last", "all")]
    )
    return arrays


@pytest.mark.parametrize("engine,name", EXTRACT_CASES)
def test_extractor_vectors_are_pinned(engine, name, references):
    np.testing.assert_allclose(extract_vectors(engine, name), references[f"extract-{engine}-{name}"], RTOL, ATOL)


@pytest.mark.parametrize("name", ONLINE_CASES)
def test_online_vectors_are_pinned(name, references):
    last, every = online_vectors(name)
    np.testing.assert_allclose(last, references[f"online-{name}-last"], RTOL, ATOL)
    np.testing.assert_allclose(every, references[f"online-{name}-all"], RTOL, ATOL)
    # The online pass over every layer is the offline factored pass on the same batch: the same vectors.
    np.testing.assert_array_equal(every, extract_vectors("factored", name))


def test_the_tolerance_sees_a_changed_projection(references):
    """A projection seeded differently (one seed more) is far outside the tolerance: the pins can fail."""
    model, (inputs, y) = _case("mlp")
    z = GradientExtractor(model, dim=16, seed=6, engine="factored")((inputs, y)).z.numpy()
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(z, references["extract-factored-mlp"], RTOL, ATOL)


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    torch.set_num_threads(1)
    vectors = all_vectors()
    REFERENCES.parent.mkdir(exist_ok=True)
    np.savez(REFERENCES, **vectors)
    print(f"wrote {REFERENCES}; set REFERENCE_SHA = {_arrays_sha(vectors)!r}")
