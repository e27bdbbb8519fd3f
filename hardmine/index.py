"""FAISS index of the projected gradients (unit vectors, inner product = cosine), built shard by shard.

Kinds (``IndexKind``), and what ``"auto"`` picks:

===========  ==========================================================================================
``flat``     exact ``IndexFlatIP``. Chosen by ``auto`` when ``N <= FLAT_MAX_ROWS`` (20,000) and the
             vectors fit in ``FLAT_MAX_BYTES`` (512 MiB). The scoring pass asks for the neighbours of
             *every* sample, which costs N² similarity evaluations with an exact index, so exact search
             stops at 20k (the measured cost by N: ``scripts/results/index_choice.md``).
``ivf``      ``IndexIVFFlat`` with ``nlist = round(4·sqrt(N))`` lists (at most ``N / 40``), trained on a
             seeded sample of ``min(N, 40·nlist)`` rows, searched with ``nprobe = NPROBE`` (16) lists.
             Recall@10 against exact search by nprobe, on the output-layer gradients of the demo MLP on
             Fashion-MNIST (60k): ``scripts/results/index_choice.md`` (``scripts/measure_index.py``); the
             scan benchmark (``scripts/bench_scan.py``) re-measures it at up to 1M samples. Chosen by ``auto``
             above the flat limits. Each shard is added to its own copy of the trained index and written to
             disk; the parts are merged into memory-mapped on-disk inverted lists (``index.ivfdata`` beside
             ``index.faiss``), so neither the build nor the search holds all vectors in RAM.
``hnsw``     ``IndexHNSWFlat`` (M=32, efConstruction=80, efSearch=max(128, k+1)); only on request. Built
             in RAM (graph + vectors), so it is *not* memory-bounded.
===========  ==========================================================================================

Zero gradients stay zero vectors (similarity 0 to everything). kNN for every sample is done in blocks of
queries (``knn_block``), never as an N x N matrix. ``index.faiss`` is written atomically; for IVF the
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
IVF_TRAIN_PER_LIST = 40  # FAISS's k-means warns below 39 points per centroid
HNSW_M = 32
JOIN_SHORTLIST = 4  # knn_all: each member's probe is chosen among JOIN_SHORTLIST * nprobe lists
JOIN_QUERY_ROWS = 1024  # query rows per matmul in knn_all (flat)
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
    """``round(4·sqrt(N))`` lists, capped so every list gets ``IVF_TRAIN_PER_LIST`` training points."""
    return max(1, min(round(4 * math.sqrt(n)), n // IVF_TRAIN_PER_LIST))


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
    and top-``k`` by ``|cos|``, ties by row id), but one similarity matrix serves both rankings, computed
    as blocked matmuls instead of one FAISS search per query and per sign:

    * ``flat``: exact; query blocks of ``JOIN_QUERY_ROWS`` rows against all rows.
    * ``ivf``: a self-join over the inverted lists: the members of each list are compared with the members
      of the ``JOIN_PROBE`` lists whose centroids are nearest to its centroid and the ``JOIN_PROBE``
      nearest to its negated centroid (where anti-aligned neighbours live), in one matmul per list. The
      probe is chosen per list, not per query; Recall@10 against exact search is measured by
      ``scripts/bench_scan.py`` and tested on planted data.
    * ``hnsw``: ``knn_block`` on consecutive row blocks.
    """
    k = positive_int(k, "k")
    if info.kind == IndexKind.IVF.value:
        return _knn_all_ivf(index, info, k)
    if info.kind == IndexKind.FLAT.value:
        return _knn_all_flat(index, info, k)
    return _knn_all_search(index, info, k)


def _knn_all_search(index: Any, info: IndexInfo, k: int) -> Iterator[tuple[np.ndarray, KnnResult]]:
    for start in range(0, info.n, JOIN_QUERY_ROWS):
        rows = np.arange(start, min(start + JOIN_QUERY_ROWS, info.n), dtype=np.int64)
        u = index.reconstruct_n(int(start), len(rows))  # (b, D) unit vectors as stored
        yield rows, knn_block(index, info, u, rows, k)


def _knn_all_flat(index: Any, info: IndexInfo, k: int) -> Iterator[tuple[np.ndarray, KnnResult]]:
    x = faiss.rev_swig_ptr(index.get_xb(), info.n * info.dim).reshape(info.n, info.dim)  # (N, D) view
    all_rows = np.arange(info.n, dtype=np.int64)
    for start in range(0, info.n, JOIN_QUERY_ROWS):
        stop = min(start + JOIN_QUERY_ROWS, info.n)
        # The queries first among the candidates (``_join``'s contract), then every other row.
        cand = np.concatenate([x[start:stop], x[:start], x[stop:]])  # (N, D)
        cand_rows = np.concatenate([all_rows[start:stop], all_rows[:start], all_rows[stop:]])
        yield all_rows[start:stop], _join(x[start:stop], all_rows[start:stop], cand, cand_rows, k)


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
    s = q @ cand.T  # (b, C) float32
    b, c = s.shape
    diag = np.arange(b)
    s[diag, diag] = -np.inf  # self: never among the largest; dropped from the smallest below
    kk = min(k + _TIE_SLACK, c)
    if 2 * kk < c:
        # The k largest by |cos| are among the kk largest and the kk smallest signed values: no |s| matrix.
        # (Two single-kth partial sorts: numpy's multi-kth argpartition is several times slower.)
        high = np.argpartition(s, c - kk, axis=1)[:, c - kk :]  # (b, kk)
        low = np.argpartition(s, kk - 1, axis=1)[:, :kk]  # (b, kk)
        both = np.concatenate([high, low], axis=1)  # (b, 2kk)
    else:
        high = both = np.broadcast_to(np.arange(c), (b, c))
    v_high = np.take_along_axis(s, high, axis=1)  # (b, kk)
    sim_cols = _rank(high, v_high, cand_rows, k)  # (b, k), -1 where missing
    ok = sim_cols >= 0
    safe = np.maximum(sim_cols, 0)
    sims = np.where(ok, np.take_along_axis(s, safe, axis=1).astype(np.float64), np.nan)
    rows = np.where(ok, cand_rows[safe], -1)
    v_abs = np.abs(np.take_along_axis(s, both, axis=1))  # (b, 2kk)
    v_abs[both == diag[:, None]] = -np.inf  # self, from the smallest end
    abs_cols = _rank(both, v_abs, cand_rows, k)
    abs_rows = np.where(abs_cols >= 0, cand_rows[np.maximum(abs_cols, 0)], -1)
    return KnnResult(sims=sims, rows=rows, abs_rows=abs_rows)


_TIE_SLACK = 4  # extra columns kept by the partial sort so ties at the k-th place are broken by row id


def _rank(cols: np.ndarray, values: np.ndarray, tie: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` columns with the largest finite ``values`` among ``cols (b, w)``, largest first, ties by
    smaller ``tie[col]`` (exact unless more than ``_TIE_SLACK`` extra values tie with the k-th): ``(b, k)``,
    -1 where a row has fewer than ``k`` finite values."""
    b, w = cols.shape
    out = np.full((b, k), -1, dtype=np.int64)
    if b == 0 or w == 0:
        return out
    order = np.lexsort((tie[cols], -values), axis=1)[:, :k]  # (b, min(k, w))
    top = np.take_along_axis(cols, order, axis=1)
    finite = np.isfinite(np.take_along_axis(values, order, axis=1))
    out[:, : top.shape[1]] = np.where(finite, top, -1)
    return out
