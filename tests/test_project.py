"""Seeded projector: determinism, blockwise == one-shot, JL distortion within a derived bound."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from hardmine.project import BLOCK_ROWS, Projector, block_seed, random_block, random_matrix


def test_same_seed_same_output_and_different_seed_different_matrix():
    x = torch.randn(5, 3000)
    a = Projector(64, seed=7).project(x)
    b = Projector(64, seed=7).project(x)
    assert torch.equal(a, b)
    assert not torch.equal(Projector(64, seed=8).matrix(3000), Projector(64, seed=7).matrix(3000))
    assert not torch.equal(Projector(64, seed=7).matrix(300, key="a"), Projector(64, seed=7).matrix(300, key="b"))


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
@pytest.mark.parametrize("p", [1, 17, BLOCK_ROWS, BLOCK_ROWS + 1, 3 * BLOCK_ROWS - 5])
def test_blockwise_equals_one_shot(kind, p):
    x = torch.randn(4, p, dtype=torch.float64).float()
    proj = Projector(32, seed=3, kind=kind, max_cache_bytes=0)  # force regeneration: nothing cached
    one_shot = x @ random_matrix(p, 32, seed=3, kind=kind)  # (B, k)
    assert_close(proj.project(x), one_shot, rtol=1e-5, atol=1e-5)


def test_matrix_does_not_depend_on_batch_or_chunking():
    proj = Projector(16, seed=1)
    x = torch.randn(9, 5000)
    whole = proj.project(x)
    pieces = torch.cat([proj.project(x[i : i + 2]) for i in range(0, 9, 2)])
    assert_close(pieces, whole, rtol=1e-5, atol=1e-4)  # float32 GEMM order may differ by batch size
    # the cached path and the uncached path give identical rows
    assert torch.equal(Projector(16, seed=1, max_cache_bytes=0).project(x[:3]), Projector(16, seed=1).project(x[:3]))


def test_entries_and_scale():
    m = random_block(100, 50, seed=0, key="", block=0)
    assert set(torch.unique(m * math.sqrt(50)).tolist()) == {-1.0, 1.0}
    g = random_block(2000, 50, seed=0, key="", block=0, kind="gaussian")
    # E[m_ij^2] = 1/k; the sample mean over 100k entries is within a few standard errors
    var = g.pow(2).mean().item() * 50
    assert abs(var - 1.0) < 5 * math.sqrt(2 / g.numel())


def _jl_epsilon(k: int, n_vectors: int, delta: float) -> float:
    """Smallest eps with 2*n_vectors*exp(-k*(eps^2/2 - eps^3/3)/2) <= delta (Achlioptas 2003, norm form)."""
    lo, hi = 1e-6, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if 2 * n_vectors * math.exp(-k * (mid**2 / 2 - mid**3 / 3) / 2) <= delta:
            hi = mid
        else:
            lo = mid
    return hi


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_inner_product_distortion_within_jl_bound(kind):
    n, p, k = 12, 6000, 1024
    x = torch.nn.functional.normalize(torch.randn(n, p, dtype=torch.float64), dim=1).float()
    z = Projector(k, seed=11, kind=kind).project(x)
    # Polarisation: <x,y> = (|x+y|^2 - |x-y|^2)/4, so if the 2*n*(n-1)/2 sums/differences and n vectors keep
    # their squared norms within eps (relative), unit-vector inner products move by at most eps.
    eps = _jl_epsilon(k, n + n * (n - 1), delta=1e-3)
    err = (z @ z.T - x @ x.T).abs().max().item()
    assert err <= eps, (err, eps)
    assert eps < 0.5  # the bound is informative at this k


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 5), p=st.integers(1, 9000), k=st.integers(1, 40), seed=st.integers(0, 2**31))
def test_hypothesis_shapes_and_blockwise(b, p, k, seed):
    x = torch.randn(b, p)
    out = Projector(k, seed=seed).project(x)
    assert out.shape == (b, k)
    assert_close(out, x @ random_matrix(p, k, seed=seed), rtol=1e-4, atol=1e-4)


def test_project_grads_per_layer_and_flat():
    grads = {"a.weight": torch.randn(3, 4, 5), "a.bias": torch.randn(3, 4)}
    proj = Projector(8, seed=0)
    per = proj.project_grads(grads)
    assert per.shape == (3, 16)
    assert_close(per[:, :8], grads["a.weight"].reshape(3, -1) @ proj.matrix(20, key="a.weight"))
    assert_close(per[:, 8:], grads["a.bias"] @ proj.matrix(4, key="a.bias"))
    flat = proj.project_grads(grads, per_layer=False)
    full = torch.cat([grads["a.weight"].reshape(3, -1), grads["a.bias"]], 1)
    assert_close(flat, full @ proj.matrix(24))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [({"dim": 0}, r"k=0"), ({"dim": 4, "seed": -1}, r"seed=-1"), ({"dim": 4, "kind": "sparse"}, r"kind='sparse'")],
)
def test_bad_projector_options(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        Projector(**kwargs)


def test_bad_project_input():
    with pytest.raises(ValueError, match=r"2-D"):
        Projector(4).project(torch.randn(3))


def test_cache_holds_at_most_max_cache_bytes_and_is_reused(monkeypatch):
    import hardmine.project as hp

    calls = []
    real = hp.random_block

    def counting(rows, k, **kw):
        calls.append(kw["block"])
        return real(rows, k, **kw)

    monkeypatch.setattr(hp, "random_block", counting)
    x = torch.randn(2, 3 * BLOCK_ROWS)
    block_bytes = BLOCK_ROWS * 8 * 4  # one (BLOCK_ROWS, 8) float32 block
    for budget, regenerated in ((0, 3), (block_bytes - 1, 3), (block_bytes, 2), (2 * block_bytes, 1),
                                (3 * block_bytes, 0)):
        proj = Projector(8, seed=0, max_cache_bytes=budget)
        first = proj.project(x)
        assert calls == [0, 1, 2], budget
        calls.clear()
        assert torch.equal(proj.project(x), first)  # a cached block is the same block
        assert len(calls) == regenerated, budget  # only blocks within the budget were kept
        calls.clear()


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projection_is_float32_whatever_the_default_dtype(kind):
    x = torch.randn(3, 50)
    expected = Projector(4, seed=0, kind=kind).project(x)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out = Projector(4, seed=0, kind=kind).project(x.double())
        block = random_block(5, 4, seed=0, key="", block=0, kind=kind)
    finally:
        torch.set_default_dtype(old)
    assert out.dtype == torch.float32 and block.dtype == torch.float32
    assert_close(out, expected)


def test_gaussian_projector_matrix_is_the_one_it_projects_with():
    proj = Projector(16, seed=2, kind="gaussian")
    m = proj.matrix(300)
    assert len(torch.unique(m)) > 100  # Gaussian entries, not ±1/sqrt(k)
    x = torch.randn(3, 300)
    assert_close(proj.project(x), x @ m, rtol=1e-5, atol=1e-5)


def test_bad_input_messages_say_what_was_passed():
    with pytest.raises(ValueError, match=r"^project\(\) needs a 2-D \(B, P\) tensor, got torch.Size\(\[3\]\)\.$"):
        Projector(4).project(torch.randn(3))
    with pytest.raises(ValueError, match=r"^project\(\) needs a 2-D \(B, P\) tensor, got list\.$"):
        Projector(4).project([[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"^no gradients to project \(empty mapping\)\.$"):
        Projector(4).project_grads({})


def test_matrix_definition_is_pinned():
    """The matrix is part of every stored scan: these values may only change with a new matrix version."""
    pinned = {(0, "", 0): 3025738645469405972, (1, "", 0): 1342697136549558618,
              (0, "a.weight", 0): 7413022500748630126, (0, "", 1): 2801479230690817136,
              (7, "x", 3): 8754993983597069344, (123, "layer", 2): 19398947122470289,
              (2**31, "", 5): 7298617688409597410, (5, "b", 0): 4942758049239217064}
    for (seed, key, block), value in pinned.items():
        assert block_seed(seed, key, block) == value
        assert 0 <= value < 2**63
    r = torch.sign(random_block(5, 3, seed=0, key="", block=0))
    assert r.tolist() == [[-1, -1, -1], [-1, -1, 1], [-1, -1, -1], [-1, 1, -1], [-1, 1, 1]]
    g = random_block(2, 3, seed=0, key="", block=0, kind="gaussian")
    assert_close(g, torch.tensor([[-0.0783277825, 0.3842376769, -1.0351603031],
                                  [0.0472856276, 0.3848630190, 0.4327030778]]), rtol=0, atol=1e-7)
    assert torch.equal(random_matrix(BLOCK_ROWS + 2, 3, seed=0)[BLOCK_ROWS:],
                       random_block(2, 3, seed=0, key="", block=1))  # row blocks are independent seeds


def test_dimension_checks_and_defaults():
    with pytest.raises(ValueError, match=r"^input dimension 0 must be a positive integer\.$"):
        random_matrix(0, 4, seed=0)
    with pytest.raises(ValueError, match=r"^input dimension 2\.5 must be a positive integer\.$"):
        random_matrix(2.5, 4, seed=0)
    with pytest.raises(ValueError, match=r"^projection dim k=1\.5 must be a positive integer\.$"):
        random_matrix(3, 1.5, seed=0)
    with pytest.raises(ValueError, match=r"^kind='sparse' is not a valid choice"):
        random_block(2, 2, seed=0, key="", block=0, kind="sparse")
    x = torch.randn(2, 10)
    assert torch.equal(Projector(4).project(x), Projector(4, seed=0).project(x))  # the documented default seed
    assert Projector(1).project(x).shape == (2, 1)


def test_a_projection_is_computed_on_the_device_of_its_input():
    # The test machines have no GPU; fake tensors stand in for one. Made on "meta" under torch's FakeTensorMode
    # they carry shapes, dtypes and devices but no data, and an op that mixes them with a CPU tensor fails, as
    # it fails on a GPU. So the result must be allocated on the input's device and every block of the matrix
    # moved there (also when it comes from the cache on the second call).
    fake = pytest.importorskip("torch._subclasses.fake_tensor")
    proj = Projector(dim=6, seed=0)
    with fake.FakeTensorMode():
        x = torch.randn(3, BLOCK_ROWS + 5, device="meta")  # (B, P): two blocks of rows
        for _ in range(2):
            z = proj.project(x)
            assert (z.device.type, tuple(z.shape), z.dtype) == ("meta", (3, 6), torch.float32)
        grads = {"a": torch.randn(3, 2, 2, device="meta"), "b": torch.randn(3, 5, device="meta")}
        for per_layer, width in ((True, 12), (False, 6)):
            z = proj.project_grads(grads, per_layer=per_layer)
            assert (z.device.type, tuple(z.shape)) == ("meta", (3, width))
