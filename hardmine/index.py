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
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ._io import TMP_PREFIX, atomic_path, atomic_write_bytes
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
]

logger = logging.getLogger(__name__)

FLAT_MAX_ROWS = 20_000
FLAT_MAX_BYTES = 512 * 2**20
NPROBE = 16
IVF_TRAIN_PER_LIST = 40  # FAISS's k-means warns below 39 points per centroid
HNSW_M = 32
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
