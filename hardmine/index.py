"""FAISS index of the projected gradients (unit vectors, inner product = cosine), built shard by shard.

Kinds (``IndexKind``), and what ``"auto"`` picks:

===========  ==========================================================================================
``flat``     exact ``IndexFlatIP``. Chosen by ``auto`` when ``N <= FLAT_MAX_ROWS`` (20,000) and the
             vectors fit in ``FLAT_MAX_BYTES`` (512 MiB). The scoring pass asks for the neighbours of
             *every* sample, which costs N² similarity evaluations with an exact index, so exact search
             stops at 20k (the measured cost by N: ``scripts/results/index_choice.md``).
``ivf``      ``IndexIVFFlat`` with ``nlist = round(4·sqrt(N))`` lists (at most ``N / 40``), trained on a
             seeded sample of ``min(N, 16·nlist)`` rows (``IVF_TRAIN_NITER`` k-means iterations),
             searched with ``nprobe = NPROBE`` (16) lists.
             Recall@10 against exact search by nprobe, on the output-layer gradients of the demo MLP on
             Fashion-MNIST (60k): ``scripts/results/index_choice.md`` (``scripts/measure_index.py``); the
             scan benchmark (``scripts/bench_scan.py``) re-measures it at up to 1M samples. Chosen by ``auto``
             above the flat limits. Each shard is added to its own copy of the trained index and written to
             disk; the parts are merged into memory-mapped on-disk inverted lists (``index.ivfdata`` beside
             ``index.faiss``), so neither the build nor the search holds all vectors in RAM.
``hnsw``     ``IndexHNSWFlat`` (M=32, efConstruction=80, efSearch=max(128, k+1)); only on request. Built
             in RAM (graph + vectors), so it is *not* memory-bounded.
===========  ==========================================================================================

Zero gradients stay zero vectors (similarity 0 to everything). The scoring pass gets every sample's
neighbours from ``knn_all`` (one similarity matrix per group of queries serves both the signed and the
``|cos|`` ranking; for IVF a self-join over the inverted lists in which every member keeps its own
``nprobe`` lists for ``u`` and for ``-u``), never as an N x N matrix; ``knn_block`` answers queries. ``index.faiss`` is written atomically; for IVF the
merge runs in a child process because FAISS prints progress lines to the C ``stdout``, which would corrupt
a caller's machine-readable output (``hardmine ... --json``).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ._io import TMP_PREFIX, atomic_path, atomic_write_bytes
from .checks import positive_int
from .enums import IndexKind, parse_choice
from .score import KnnResult, unit_rows

__all__ = [
    "FLAT_MAX_ROWS",
    "FLAT_MAX_BYTES",
    "NPROBE",
    "HNSW_M",
    "INDEX_FILE",
    "IVFDATA_FILE",
    "IVFDATA_PATH_FILE",
    "INDEX_FILES",
    "IndexInfo",
    "choose_index_kind",
    "ivf_nlist",
    "build_index",
    "open_index",
    "search",
    "knn_block",
    "JOIN_SHORTLIST",
    "knn_all",
]

logger = logging.getLogger(__name__)

FLAT_MAX_ROWS = 20_000
FLAT_MAX_BYTES = 512 * 2**20
NPROBE = 16
IVF_MIN_LIST_ROWS = 40  # nlist is capped at N / 40: lists of a few rows would make the probe pointless
# k-means sample per list: 16 rows per centroid gave the same Recall@10 as 40 on a 100k-sample scan
# (out_dim 272), at 2.5x less training time (the training cost is rows x nlist x D per iteration).
IVF_TRAIN_PER_LIST = 16
# k-means iterations of the IVF training (FAISS's default is 25): on a 100k-sample scan (out_dim 272, nlist
# 1265, nprobe 16) 10 iterations gave the same Recall@11 as 25 (0.993) at a third of the training time, which
# was most of the index build; scripts/bench_scan.py re-measures the recall of the index it builds.
IVF_TRAIN_NITER = 10
HNSW_M = 32
JOIN_SHORTLIST = 4  # knn_all: each member's probe is chosen among JOIN_SHORTLIST * nprobe lists
JOIN_QUERY_ROWS = 1024  # knn_all (flat, hnsw): query rows per search
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
INDEX_FILE = "index.faiss"
IVFDATA_FILE = "index.ivfdata"
IVFDATA_PATH_FILE = "index.ivfdata.path"  # the absolute path stored inside index.faiss, to detect moves
INDEX_FILES = (INDEX_FILE, IVFDATA_FILE, IVFDATA_PATH_FILE)  # every file an index build writes
_PARTS_DIR = TMP_PREFIX + "index-parts"

Block = tuple[int, np.ndarray]


@dataclass
class IndexInfo:
    """How the index was built (stored in ``scan.json``)."""

    kind: str
    n: int
    dim: int
    seed: int
    nlist: int | None = None
    nprobe: int | None = None
    train_rows: int | None = None
    hnsw_m: int | None = None
    ef_search: int | None = None
    build_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexInfo:
        return cls(**d)


def choose_index_kind(n: int, dim: int, kind: IndexKind | str = IndexKind.AUTO) -> IndexKind:
    """Resolve ``auto`` by size (see the module docstring); other kinds are returned as given."""
    k = parse_choice(IndexKind, kind, "index")
    if k is not IndexKind.AUTO:
        return k
    return IndexKind.FLAT if n <= FLAT_MAX_ROWS and n * dim * 4 <= FLAT_MAX_BYTES else IndexKind.IVF


def ivf_nlist(n: int) -> int:
    """``round(4·sqrt(N))`` lists, at most ``N / IVF_MIN_LIST_ROWS``."""
    return max(1, min(round(4 * math.sqrt(n)), n // IVF_MIN_LIST_ROWS))


def _unit32(z: np.ndarray) -> np.ndarray:
    u, _ = unit_rows(z)
    return np.ascontiguousarray(u, dtype=np.float32)  # (b, D)


def build_index(
    blocks: Callable[[], Iterable[Block]],
    n: int,
    dim: int,
    directory: str | os.PathLike[str],
    *,
    kind: IndexKind | str = IndexKind.AUTO,
    seed: int = 0,
    on_block: Callable[[int], None] | None = None,
) -> IndexInfo:
    """Build the index from ``blocks()`` (a fresh iterator of ``(first_row, z)`` per call) and write it to
    ``directory/index.faiss``. Vectors are added shard by shard; ids are row positions."""
    if n < 1:
        raise ValueError("cannot build an index over 0 samples.")
    t0 = time.perf_counter()
    kind = choose_index_kind(n, dim, kind)
    directory = Path(directory)
    if on_block is not None:
        on_block(0)  # the phase starts now (IVF training comes before the first block is added)
    for name in INDEX_FILES:
        (directory / name).unlink(missing_ok=True)
    info = IndexInfo(kind=kind.value, n=n, dim=dim, seed=seed)
    if kind is IndexKind.IVF:
        _build_ivf(blocks, n, dim, directory, seed, info, on_block)
    else:
        if kind is IndexKind.FLAT:
            index: Any = faiss.IndexFlatIP(dim)
        else:
            index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            info.hnsw_m, info.ef_search = HNSW_M, HNSW_EF_SEARCH
        for start, z in blocks():
            index.add(_unit32(z))
            if on_block is not None:
                on_block(start + len(z))
        with atomic_path(directory / INDEX_FILE) as tmp:
            faiss.write_index(index, str(tmp))
    info.build_s = time.perf_counter() - t0
    logger.info("built %s index over %d x %d in %.2fs", kind.value, n, dim, info.build_s)
    return info


def _training_sample(blocks: Callable[[], Iterable[Block]], n: int, n_train: int, seed: int) -> np.ndarray:
    rows = np.sort(np.random.default_rng(seed).choice(n, size=n_train, replace=False))
    parts = []
    for start, z in blocks():
        lo, hi = np.searchsorted(rows, [start, start + len(z)])
        if hi > lo:
            parts.append(_unit32(np.asarray(z[rows[lo:hi] - start])))  # (picked, D)
    return np.concatenate(parts)  # (n_train, D)


# The merge runs in a child process: FAISS's OnDiskInvertedLists prints "resizing ..." on the C stdout.
_MERGE_CODE = """
import sys, faiss
from faiss.contrib.ondisk import merge_ondisk
trained, ivfdata, out, *parts = sys.argv[1:]
index = faiss.read_index(trained)
merge_ondisk(index, parts, ivfdata)
faiss.write_index(index, out)
"""

_RELOCATE_CODE = """
import sys, faiss
src, out = sys.argv[1:]
faiss.write_index(faiss.read_index(src, faiss.IO_FLAG_ONDISK_SAME_DIR), out)
"""


def _run_child(code: str, *args: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"FAISS child process failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")


def _build_ivf(
    blocks: Callable[[], Iterable[Block]],
    n: int,
    dim: int,
    directory: Path,
    seed: int,
    info: IndexInfo,
    on_block: Callable[[int], None] | None,
) -> None:
    nlist = ivf_nlist(n)
    n_train = min(n, IVF_TRAIN_PER_LIST * nlist)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed  # k-means initialisation
    index.cp.min_points_per_centroid = IVF_TRAIN_PER_LIST  # FAISS warns below its own 39 otherwise
    index.cp.niter = IVF_TRAIN_NITER
    index.train(_training_sample(blocks, n, n_train, seed))
    info.nlist, info.nprobe, info.train_rows = nlist, min(NPROBE, nlist), n_train
    parts_dir = directory / _PARTS_DIR
    shutil.rmtree(parts_dir, ignore_errors=True)
    parts_dir.mkdir()
    try:
        trained = parts_dir / "trained.faiss"
        faiss.write_index(index, str(trained))
        parts = []
        for start, z in blocks():
            part = faiss.clone_index(index)
            part.add_with_ids(_unit32(z), np.arange(start, start + len(z), dtype=np.int64))
            path = parts_dir / f"part-{len(parts):05d}.faiss"
            faiss.write_index(part, str(path))
            parts.append(str(path))
            del part
            if on_block is not None:
                on_block(start + len(z))
        ivfdata = (directory / IVFDATA_FILE).resolve()
        with atomic_path(directory / INDEX_FILE) as tmp:
            _run_child(_MERGE_CODE, str(trained), str(ivfdata), str(tmp), *parts)
        atomic_write_bytes(directory / IVFDATA_PATH_FILE, str(ivfdata).encode())
    finally:
        shutil.rmtree(parts_dir, ignore_errors=True)


def open_index(directory: str | os.PathLike[str], info: IndexInfo) -> Any:
    """Read ``directory/index.faiss`` with its search parameters set. IVF lists stay memory-mapped; a scan
    directory that was moved or copied has its on-disk list path updated first (in a child process)."""
    directory = Path(directory)
    path = directory / INDEX_FILE
    if not path.is_file():
        raise ValueError(f"{path} does not exist; the scan's index was not built (rerun the scan).")
    if info.kind == IndexKind.IVF.value:
        here = str((directory / IVFDATA_FILE).resolve())
        stored = (directory / IVFDATA_PATH_FILE).read_text() if (directory / IVFDATA_PATH_FILE).is_file() else ""
        flags = 0
        if stored != here:
            logger.info("scan directory moved: pointing %s at %s", INDEX_FILE, here)
            try:
                with atomic_path(path) as tmp:
                    _run_child(_RELOCATE_CODE, str(path), str(tmp))
                atomic_write_bytes(directory / IVFDATA_PATH_FILE, here.encode())
            except OSError as exc:  # a read-only copy: let FAISS resolve the path (it prints one line)
                logger.warning("cannot update %s (%s); reading it with IO_FLAG_ONDISK_SAME_DIR", path, exc)
                flags = faiss.IO_FLAG_ONDISK_SAME_DIR
        index = faiss.read_index(str(path), flags)
        index.nprobe = int(info.nprobe or NPROBE)
    else:
        index = faiss.read_index(str(path))
    return index


def search(index: Any, info: IndexInfo, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` by inner product for unit ``queries (b, D)``: ``(sims, rows)``, NaN / -1 where missing."""
    if info.kind == IndexKind.HNSW.value:
        index.hnsw.efSearch = max(int(info.ef_search or HNSW_EF_SEARCH), k + 1)
    elif info.kind == IndexKind.IVF.value:
        index.nprobe = int(info.nprobe or NPROBE)
    d, i = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)  # (b, k) each
    sims = np.where(i >= 0, d, np.nan).astype(np.float64)
    return sims, i.astype(np.int64)


def _drop_self(sims: np.ndarray, rows: np.ndarray, self_rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own row from its (b, k+1) results; where it is absent drop the last column."""
    keep = rows != self_rows[:, None]  # (b, k+1)
    keep[keep.all(axis=1), -1] = False  # exactly one entry dropped per query
    b = len(rows)
    return sims[keep].reshape(b, -1)[:, :k], rows[keep].reshape(b, -1)[:, :k]  # (b, k)


def knn_block(index: Any, info: IndexInfo, u: np.ndarray, self_rows: np.ndarray, k: int) -> KnnResult:
    """Neighbours of a block of unit vectors that are themselves rows ``self_rows`` of the index (excluded).

    ``sims/rows``: the k nearest by signed cosine. ``abs_rows``: the k nearest by ``|cos|``, found by
    searching ``u`` and ``-u`` and merging (see ``hardmine.score`` for why label agreement needs them).
    """
    n = info.n
    kk = min(k + 1, n)
    s1, r1 = search(index, info, u, kk)  # (b, kk) most aligned
    s2, r2 = search(index, info, -u, kk)  # (b, kk) most anti-aligned; s2 = -cos
    sims, rows = _drop_self(s1, r1, self_rows, k)
    if sims.shape[1] < k:  # fewer than k other samples in the scan
        pad = k - sims.shape[1]
        sims = np.pad(sims, ((0, 0), (0, pad)), constant_values=np.nan)
        rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
    cand_rows = np.concatenate([r1, r2], axis=1)  # (b, 2kk)
    cand_abs = np.abs(np.concatenate([s1, s2], axis=1))
    bad = (cand_rows < 0) | (cand_rows == self_rows[:, None]) | ~np.isfinite(cand_abs)
    # A row can come back from both searches (cosine near 0 with tiny N): keep one copy.
    order = np.argsort(cand_rows, axis=1, kind="stable")
    sorted_rows = np.take_along_axis(cand_rows, order, axis=1)
    dup_sorted = np.zeros_like(sorted_rows, dtype=bool)
    dup_sorted[:, 1:] = sorted_rows[:, 1:] == sorted_rows[:, :-1]
    dup = np.zeros_like(dup_sorted)
    np.put_along_axis(dup, order, dup_sorted, axis=1)
    score = np.where(bad | dup, -1.0, cand_abs)
    # Highest |cos| first; ties by row id so the result does not depend on which search found it.
    pick = _top_by(score, cand_rows, k)  # (b, k)
    abs_rows = np.take_along_axis(cand_rows, pick, axis=1)
    abs_rows = np.where(np.take_along_axis(score, pick, axis=1) >= 0, abs_rows, -1)
    if abs_rows.shape[1] < k:
        abs_rows = np.pad(abs_rows, ((0, 0), (0, k - abs_rows.shape[1])), constant_values=-1)
    return KnnResult(sims=sims, rows=rows, abs_rows=abs_rows)


def _top_by(score: np.ndarray, tie: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` largest ``score`` per row, ties by smaller ``tie``: ``(b, k)``."""
    by_tie = np.argsort(tie, axis=1, kind="stable")  # (b, m)
    by_score = np.argsort(-np.take_along_axis(score, by_tie, axis=1), axis=1, kind="stable")  # stable keeps ties
    return np.take_along_axis(by_tie, by_score, axis=1)[:, :k]


# ------------------------------------------------------------------------------ every sample's neighbours
def knn_all(index: Any, info: IndexInfo, k: int) -> Iterator[tuple[np.ndarray, KnnResult]]:
    """Neighbours of *every* row of the index (self excluded), as ``(rows (b,), KnnResult)`` groups that
    together cover each row once, in no particular order. Same meaning as ``knn_block`` (signed top-``k``
    and top-``k`` by ``|cos|``, ties by row id):

    * ``ivf``: a self-join over the inverted lists: the members of each list are compared, in one matmul
      whose similarities serve both rankings,
      with the union of their own probes, each member's ``nprobe`` lists for ``u`` and for ``-u`` (where
      anti-aligned neighbours live) chosen as FAISS would among the ``JOIN_SHORTLIST · nprobe`` lists
      nearest to the list's centroid (and to its negation), so a member sees the lists FAISS would search
      for it, and more. Recall@10 against exact search is measured by ``scripts/bench_scan.py`` and
      tested on planted data.
    * ``flat`` and ``hnsw``: ``knn_block`` on blocks of ``JOIN_QUERY_ROWS`` rows (FAISS's exact search is a
      blocked matmul with a heap already: a numpy matmul + partial sort was no faster).
    """
    k = positive_int(k, "k")
    if info.kind == IndexKind.IVF.value:
        return _knn_all_ivf(index, info, k)
    return _knn_all_search(index, info, k)


def _knn_all_search(index: Any, info: IndexInfo, k: int) -> Iterator[tuple[np.ndarray, KnnResult]]:
    for start in range(0, info.n, JOIN_QUERY_ROWS):
        rows = np.arange(start, min(start + JOIN_QUERY_ROWS, info.n), dtype=np.int64)
        u = index.reconstruct_n(int(start), len(rows))  # (b, D) unit vectors as stored
        yield rows, knn_block(index, info, u, rows, k)


def _list_members(invlists: Any, lst: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids ``(m,)`` and float32 vectors ``(m, D)`` of one inverted list (copied out of FAISS's memory)."""
    m = invlists.list_size(lst)
    if m == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, dim), dtype=np.float32)
    ids = np.array(faiss.rev_swig_ptr(invlists.get_ids(lst), m), dtype=np.int64)  # (m,)
    codes = faiss.rev_swig_ptr(invlists.get_codes(lst), m * dim * 4)  # (m * D * 4,) bytes
    return ids, np.frombuffer(codes, dtype=np.float32).reshape(m, dim).copy()  # (m, D)


def _knn_all_ivf(index: Any, info: IndexInfo, k: int) -> Iterator[tuple[np.ndarray, KnnResult]]:
    ivf = faiss.extract_index_ivf(index)
    nlist, dim = ivf.nlist, info.dim
    invlists = ivf.invlists
    centroids = ivf.quantizer.reconstruct_n(0, nlist)  # (nlist, D)
    nprobe = min(int(info.nprobe or NPROBE), nlist)
    shortlist = min(JOIN_SHORTLIST * nprobe, nlist)
    sizes = np.array([invlists.list_size(i) for i in range(nlist)], dtype=np.int64)
    for lo in range(0, nlist, 256):  # centroid similarities 256 lists at a time: never nlist x nlist
        g = centroids[lo : lo + 256] @ centroids.T  # (b, nlist)
        near = np.argpartition(-g, shortlist - 1, axis=1)[:, :shortlist]  # (b, P) most aligned lists
        far = np.argpartition(g, shortlist - 1, axis=1)[:, :shortlist]  # (b, P) most anti-aligned
        for j, lst in enumerate(range(lo, min(lo + 256, nlist))):
            if sizes[lst] == 0:
                continue
            q_rows, q = _list_members(invlists, lst, dim)
            # Each member's own probe, as FAISS would choose it for u and for -u, but among the shortlist
            # of lists nearest to its list's centroid (and to its negation); the list's candidates are the
            # union of its members' probes, so every member sees at least its own nprobe lists.
            probe = [np.array([lst])]
            for lists, sign in ((near[j], 1.0), (far[j], -1.0)):
                gq = sign * (q @ centroids[lists].T)  # (m, P)
                top = np.argpartition(-gq, nprobe - 1, axis=1)[:, :nprobe] if nprobe < len(lists) else None
                probe.append(lists if top is None else lists[np.unique(top)])
            cand_lists = np.unique(np.concatenate(probe))
            cand_lists = cand_lists[(sizes[cand_lists] > 0) & (cand_lists != lst)]
            members = [(q_rows, q)] + [_list_members(invlists, int(c), dim) for c in cand_lists]
            cand_rows = np.concatenate([m[0] for m in members])  # (C,)
            cand = np.concatenate([m[1] for m in members])  # (C, D)
            yield q_rows, _join(q, q_rows, cand, cand_rows, k)


def _join(q: np.ndarray, q_rows: np.ndarray, cand: np.ndarray, cand_rows: np.ndarray, k: int) -> KnnResult:
    """Top-``k`` of candidates ``cand (C, D)`` for queries ``q (b, D)`` by signed and by absolute cosine,
    ties by row id; missing entries row -1 (and similarity NaN). The queries must be the first ``b``
    candidates, in order (so query ``i``'s own row is column ``i``, excluded)."""
    own = np.arange(len(q))
    return _finish(_ends(q @ cand.T, own, k, 0), own, cand_rows, k)  # (b, C) similarities, two ends kept


_TIE_SLACK = 4  # extra columns kept by the partial sorts so ties at the k-th place are broken by row id
Ends = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # high cols, high values, low cols, low values


def _ends(s: np.ndarray, own: np.ndarray, k: int, offset: int) -> Ends:
    """Columns (plus ``offset``) and values of the ``k + _TIE_SLACK`` largest and of the as many smallest
    entries of each row of ``s (b, c)``, query ``i``'s own column ``own[i]`` (if in range) set to -inf
    first. The k largest by ``|cos|`` are among the two ends, so no ``|s|`` matrix is needed."""
    b, c = s.shape
    inside = (own >= 0) & (own < c)
    s[np.flatnonzero(inside), own[inside]] = -np.inf  # self: never among the largest
    kk = min(k + _TIE_SLACK, c)
    if 2 * kk < c:  # two single-kth partial sorts (numpy's multi-kth argpartition is several times slower)
        high = np.argpartition(s, c - kk, axis=1)[:, c - kk :]  # (b, kk)
        low = np.argpartition(s, kk - 1, axis=1)[:, :kk]  # (b, kk), disjoint from high
    else:  # every column once, as "high"
        high, low = np.broadcast_to(np.arange(c), (b, c)), np.zeros((b, 0), dtype=np.int64)
    return (high + offset, np.take_along_axis(s, high, axis=1), low + offset, np.take_along_axis(s, low, axis=1))


def _finish(ends: Ends, self_cols: np.ndarray, cand_rows: np.ndarray, k: int) -> KnnResult:
    """``KnnResult`` from the kept ends (self at -inf): signed top-``k`` from the high end, ``|cos|``
    top-``k`` from both."""
    high_c, high_v, low_c, low_v = ends
    at = _rank(high_c, high_v, cand_rows, k)  # (b, k) positions in high_c, -1 where missing
    ok = at >= 0
    safe = np.maximum(at, 0)
    sims = np.where(ok, np.take_along_axis(high_v, safe, axis=1).astype(np.float64), np.nan)
    rows = np.where(ok, cand_rows[np.take_along_axis(high_c, safe, axis=1)], -1)
    cols = np.concatenate([high_c, low_c], axis=1)  # (b, w)
    v_abs = np.abs(np.concatenate([high_v, low_v], axis=1))
    v_abs[cols == self_cols[:, None]] = -np.inf  # self (its -inf became +inf)
    at = _rank(cols, v_abs, cand_rows, k)
    abs_rows = np.where(at >= 0, cand_rows[np.take_along_axis(cols, np.maximum(at, 0), axis=1)], -1)
    return KnnResult(sims=sims, rows=rows, abs_rows=abs_rows)


def _rank(cols: np.ndarray, values: np.ndarray, tie: np.ndarray, k: int) -> np.ndarray:
    """Positions ``(b, k)`` in ``cols (b, w)`` of the ``k`` largest finite ``values``, largest first, ties by
    smaller ``tie[col]`` (exact unless more than ``_TIE_SLACK`` extra values tie with the k-th); -1 where a
    row has fewer than ``k`` finite values."""
    b, w = cols.shape
    out = np.full((b, k), -1, dtype=np.int64)
    if b == 0 or w == 0:
        return out
    order = np.lexsort((tie[cols], -values), axis=1)[:, :k]  # (b, min(k, w))
    finite = np.isfinite(np.take_along_axis(values, order, axis=1))
    out[:, : order.shape[1]] = np.where(finite, order, -1)
    return out
