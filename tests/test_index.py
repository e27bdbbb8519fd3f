"""FAISS index stage: kind selection, exact kNN against brute force, IVF/HNSW recall, moved directories,
and ``Scan.neighbors``."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from models import MLP
from test_scan import planted  # noqa: F401  (module-scoped fixture)

from hardmine.enums import IndexKind
from hardmine.index import (
    FLAT_MAX_ROWS,
    IVFDATA_FILE,
    build_index,
    choose_index_kind,
    ivf_nlist,
    knn_all,
    knn_block,
    open_index,
    search,
)
from hardmine.scan import scan


def _clustered(n: int, d: int, seed: int = 0, clusters: int = 20) -> np.ndarray:
    g = np.random.default_rng(seed)
    centers = g.normal(size=(clusters, d))
    z = centers[g.integers(0, clusters, n)] + 0.3 * g.normal(size=(n, d))
    return z.astype(np.float32)


def _blocks(z: np.ndarray, size: int):
    return lambda: ((i, z[i : i + size]) for i in range(0, len(z), size))


def _brute(z: np.ndarray, k: int, absolute: bool = False, q: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k neighbours (self excluded) of rows ``q`` (default all) by cosine or |cosine|: (sims, rows)."""
    q = np.arange(len(z)) if q is None else q
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    u = (z / np.where(norms > 0, norms, 1)).astype(np.float64)
    s = u[q] @ u.T  # (len(q), N)
    key = np.abs(s) if absolute else s.copy()
    key[np.arange(len(q)), q] = -np.inf
    rows = np.argsort(-key, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(key, rows, axis=1), rows


def test_auto_kind_by_size():
    assert choose_index_kind(1000, 64) is IndexKind.FLAT
    assert choose_index_kind(FLAT_MAX_ROWS, 64) is IndexKind.FLAT
    assert choose_index_kind(FLAT_MAX_ROWS + 1, 64) is IndexKind.IVF
    assert choose_index_kind(50_000, 4096) is IndexKind.IVF  # 800 MB of vectors: above the flat byte limit
    assert choose_index_kind(10, 4, "hnsw") is IndexKind.HNSW
    with pytest.raises(ValueError, match="'flat', 'ivf', 'hnsw'"):
        choose_index_kind(10, 4, "lsh")
    assert ivf_nlist(1_000_000) == 4000 and ivf_nlist(4000) == 100 and ivf_nlist(10) == 1


def test_flat_knn_is_exact_and_excludes_self(tmp_path):
    z = _clustered(600, 12)
    z[5] = z[6]  # an exact duplicate: self must still be the one removed
    z[7] = 0.0  # a zero gradient: similarity 0 to everything
    info = build_index(_blocks(z, 128), len(z), 12, tmp_path, kind="flat")
    index = open_index(tmp_path, info)
    k = 8
    res = knn_block(index, info, _unit(z), np.arange(len(z)), k)
    assert not (res.rows == np.arange(len(z))[:, None]).any()
    exp_sims, _ = _brute(z, k)
    np.testing.assert_allclose(res.sims, exp_sims, atol=1e-5)
    exp_abs, _ = _brute(z, k, absolute=True)
    u = _unit(z).astype(np.float64)
    got_abs = np.abs(np.einsum("id,ikd->ik", u, u[res.abs_rows]))
    np.testing.assert_allclose(np.sort(got_abs, axis=1), np.sort(exp_abs, axis=1), atol=1e-5)
    assert 6 in res.rows[5] and (res.abs_rows >= 0).all()
    np.testing.assert_allclose(res.sims[7], 0.0, atol=1e-7)


def test_anti_aligned_neighbours_are_found_by_abs_search(tmp_path):
    # Two groups pointing in opposite directions: by |cos| each sample's neighbours include the other group.
    g = np.random.default_rng(1)
    base = g.normal(size=(1, 8))
    z = np.concatenate([base + 0.05 * g.normal(size=(10, 8)), -base + 0.05 * g.normal(size=(30, 8))]).astype(np.float32)
    info = build_index(_blocks(z, 16), len(z), 8, tmp_path, kind="flat")
    res = knn_block(open_index(tmp_path, info), info, _unit(z), np.arange(40), 20)
    assert (res.rows[:10] < 10).sum(axis=1).max() == 9  # signed: only the 9 other same-direction samples
    assert (res.abs_rows[:10] >= 10).sum(axis=1).min() >= 11  # |cos|: the 30 opposite ones fill the rest


def _unit(z: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(z, axis=1, keepdims=True)
    return (z / np.where(n > 0, n, 1)).astype(np.float32)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_have_high_recall(tmp_path, kind):
    z = _clustered(4000, 16, seed=2)
    info = build_index(_blocks(z, 1000), len(z), 16, tmp_path, kind=kind, seed=0)
    index = open_index(tmp_path, info)
    k = 10
    q = np.arange(0, 4000, 8)
    res = knn_block(index, info, _unit(z[q]), q, k)
    _, exact = _brute(z, k, q=q)
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(res.rows, exact)])
    assert recall >= 0.9, recall
    if kind == "ivf":
        assert info.nlist == 100 and info.nprobe == 16 and (tmp_path / IVFDATA_FILE).is_file()


def _all_neighbours(index, info, k):
    """``knn_all``'s groups put back in row order; checks that every row is covered exactly once."""
    n = info.n
    seen = np.zeros(n, dtype=int)
    sims, rows, abs_rows = np.full((n, k), np.nan), np.full((n, k), -1), np.full((n, k), -1)
    for r, res in knn_all(index, info, k):
        seen[r] += 1
        sims[r], rows[r], abs_rows[r] = res.sims, res.rows, res.abs_rows
    assert (seen == 1).all()
    return sims, rows, abs_rows


def test_knn_all_flat_is_exact_for_both_rankings(tmp_path):
    z = _clustered(700, 12)
    z[:350] *= -1  # half the samples point the opposite way: |cos| neighbours differ from signed ones
    z[5] = z[6]  # an exact duplicate: self must still be the one removed
    z[7] = 0.0  # a zero gradient: similarity 0 to everything
    info = build_index(_blocks(z, 128), len(z), 12, tmp_path, kind="flat")
    k = 8
    sims, rows, abs_rows = _all_neighbours(open_index(tmp_path, info), info, k)
    assert not (rows == np.arange(len(z))[:, None]).any() and not (abs_rows == np.arange(len(z))[:, None]).any()
    exp_sims, _ = _brute(z, k)
    np.testing.assert_allclose(np.sort(sims, axis=1)[:, ::-1], exp_sims, atol=1e-5)
    exp_abs, _ = _brute(z, k, absolute=True)
    u = _unit(z).astype(np.float64)
    got_abs = np.abs(np.einsum("id,ikd->ik", u, u[abs_rows]))
    np.testing.assert_allclose(np.sort(got_abs, axis=1)[:, ::-1], exp_abs, atol=1e-5)
    assert 6 in rows[5] and (abs_rows >= 0).all()
    np.testing.assert_allclose(sims[7], 0.0, atol=1e-7)


def test_knn_all_flat_with_fewer_samples_than_k(tmp_path):
    z = _clustered(4, 6)
    info = build_index(_blocks(z, 2), len(z), 6, tmp_path, kind="flat")
    sims, rows, abs_rows = _all_neighbours(open_index(tmp_path, info), info, 5)
    assert (rows[:, 3:] == -1).all() and np.isnan(sims[:, 3:]).all() and (abs_rows[:, 3:] == -1).all()
    assert {int(r) for r in rows[0, :3]} == {1, 2, 3}


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_knn_all_recall_at_10_on_planted_clusters(tmp_path, kind):
    # Planted clusters wide enough that neighbours cross list boundaries (probing one list gets ~0.4), a
    # random half flipped so that the |cos| ranking needs the anti-aligned lists too.
    g = np.random.default_rng(3)
    centers = g.normal(size=(10, 16))
    z = (centers[g.integers(0, 10, 6000)] + g.normal(size=(6000, 16))).astype(np.float32)
    z[g.random(len(z)) < 0.5] *= -1
    info = build_index(_blocks(z, 1000), len(z), 16, tmp_path, kind=kind, seed=0)
    k = 10
    _, rows, abs_rows = _all_neighbours(open_index(tmp_path, info), info, k)
    q = np.arange(0, len(z), 10)
    _, exact = _brute(z, k, q=q)
    _, exact_abs = _brute(z, k, absolute=True, q=q)
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(rows[q], exact)])
    recall_abs = np.mean([len(set(a) & set(b)) / k for a, b in zip(abs_rows[q], exact_abs)])
    assert recall >= 0.95 and recall_abs >= 0.95, (recall, recall_abs)


def test_ivf_index_survives_moving_the_scan_directory(tmp_path):
    z = _clustered(2000, 8, seed=3)
    src = tmp_path / "a"
    src.mkdir()
    info = build_index(_blocks(z, 500), len(z), 8, src, kind="ivf", seed=0)
    q = _unit(z[:50])
    before = search(open_index(src, info), info, q, 5)
    dst = tmp_path / "b"
    shutil.copytree(src, dst)
    shutil.rmtree(src)
    after = search(open_index(dst, info), info, q, 5)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_allclose(before[0], after[0])


def test_index_build_is_deterministic(tmp_path):
    z = _clustered(2000, 8, seed=4)
    out = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        info = build_index(_blocks(z, 700), len(z), 8, tmp_path / name, kind="ivf", seed=5)
        out.append(knn_block(open_index(tmp_path / name, info), info, _unit(z), np.arange(2000), 5))
    np.testing.assert_array_equal(out[0].rows, out[1].rows)
    np.testing.assert_array_equal(out[0].abs_rows, out[1].abs_rows)


# ------------------------------------------------------------------------------------ Scan.neighbors
def test_neighbors_by_id_and_vector(planted):  # noqa: F811
    sc, _ = planted
    z = sc.gradients()
    k = 5
    nb = sc.neighbors([3, 10], k=k)
    exp_sims, _ = _brute(z, k, q=np.array([3, 10]))
    assert nb.sample_ids.shape == (2, k) and 3 not in nb.sample_ids[0] and 10 not in nb.sample_ids[1]
    np.testing.assert_allclose(nb.similarities, exp_sims, atol=1e-5)
    single = sc.neighbors(3, k=k)
    np.testing.assert_array_equal(single.sample_ids, nb.sample_ids[:1])
    by_vec = sc.neighbors(torch.from_numpy(z[3]), k=k)
    assert by_vec.sample_ids[0, 0] == 3 and by_vec.similarities[0, 0] == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_array_equal(by_vec.sample_ids[0, 1:], nb.sample_ids[0, : k - 1])
    np.testing.assert_array_equal(sc.neighbors(np.array([3, 10]), k=k).rows, nb.rows)


def test_neighbors_bad_queries(planted):  # noqa: F811
    sc, _ = planted
    with pytest.raises(ValueError, match="sample_id 99999 is not in the scan"):
        sc.neighbors([99999], k=3)
    with pytest.raises(ValueError, match="k=0"):
        sc.neighbors([1], k=0)
    with pytest.raises(ValueError, match="k=2000 is larger"):
        sc.neighbors([1], k=2000)
    with pytest.raises(ValueError, match="columns"):
        sc.neighbors(np.zeros(7, dtype=np.float32), k=3)
    with pytest.raises(ValueError, match="NaN"):
        sc.neighbors(np.full(sc.dim, np.nan, dtype=np.float32), k=3)
    with pytest.raises(ValueError, match="empty"):
        sc.neighbors([], k=3)


def test_scan_with_string_ids_and_ivf(tmp_path):
    model = MLP(d_in=4, hidden=6, n_classes=3).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(400, 4, generator=g), torch.randint(0, 3, (400,), generator=g)
    ids = [f"s{i}" for i in range(400)]
    data = [(x[i : i + 100], y[i : i + 100], ids[i : i + 100]) for i in range(0, 400, 100)]
    sc = scan(model, data, out=tmp_path / "s", dim=4, engine="vmap", index="ivf", shard_rows=150)
    assert sc.index_info.kind == "ivf" and sc.index_info.nlist == 10
    nb = sc.neighbors(["s0", "s5"], k=4)
    assert nb.sample_ids.dtype == object and "s0" not in nb.sample_ids[0].tolist()
    assert all(isinstance(v, str) for v in nb.sample_ids.ravel())
