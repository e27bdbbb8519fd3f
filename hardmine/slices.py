"""Slices: failure modes as groups. Per-class spherical k-means of unit gradient vectors, and slice statistics.

A *slice* is a cluster of samples of one class in an embedding (``SliceEmbedding``): by default the scan's
unit projected gradients of all selected layers; ``output-layer`` keeps only the columns of the last layer in
the projection layout. Two samples of a class land in the same slice when their gradients point the same
way, i.e. when they would move the model the same way: they fail (or succeed) for the same reason.

Clustering (``fit_slices``), streamed over row blocks like the rest of the scan, in two passes:

1. per class ``c`` with ``n_c`` samples, ``K_c = slice_count(n_c)`` (the rule below);
2. a seeded sample of at most ``SAMPLE_POINTS_PER_SLICE · K_c`` rows of the class (256 per slice, FAISS's own
   ``max_points_per_centroid``: k-means centroids barely move with more points per centroid) is gathered in
   one pass over the blocks (the rows are chosen from the labels before any vector is read); over all classes
   at most ``SAMPLE_BYTES_MAX`` (64 MiB) of float32 vectors, each class's share shrunk in proportion when they
   want more (never below ``SAMPLE_POINTS_MIN_PER_SLICE · K_c`` rows), so memory is bounded whatever ``N``;
3. FAISS spherical k-means (``faiss.Kmeans(spherical=True)``, ``NITER`` iterations, seeded, one thread) on
   those unit vectors gives the ``K_c`` unit centroids;
4. only when the sample had to be shrunk (very wide vectors or very many classes): streamed spherical Lloyd
   iterations refine the centroids on every row (a pass assigns each row to its class's centroid with the
   highest cosine and sums the members' unit vectors; each centroid moves to its normalised sum), until no
   assignment changes or ``NITER`` passes;
5. a last pass assigns every row and records its cosine to its centroid. So a scan reads its vectors twice
   for slicing (the streamed refinement used to run on every scan and, at 1M samples, cost several times the
   extraction; ``scripts/bench_scan.py`` times the slicing). Memory: the sample, the centroids and one
   block, never the ``(N, D)`` vectors. A scan runs steps 1-4 (``fit_slice_centroids``) beside its other
   work and the last pass (``assign_slices``) in both of its threads; that pass also gives the scores' pass 2
   (each row's products with its class's ``directions``, taken from the same product as the centroids'), so
   the scores read the vectors no second time;
6. slices are numbered within their class by size, largest first (ties: lower centroid index), empty ones
   dropped, so the id ``"<label>/<k>"`` is stable for a seed (``"3/0"``: the largest slice of class 3).

The K rule: ``K_c = clip(round(sqrt(n_c / SAMPLES_PER_SLICE_UNIT)), 1, MAX_SLICES)`` with
``SAMPLES_PER_SLICE_UNIT = 10`` and ``MAX_SLICES = 16``. The number of slices grows with the square root of
the class size, so the average slice (``sqrt(10 · n_c)`` samples) grows too: a class of 200 samples gets 4
slices of ~50, one of 500 gets 7 of ~70, one of 2,560 or more gets 16 of 160 or more. A sub-group of a few
percent of a class then has a slice of about its own size to land in, while a small class is not cut into
slices too small to have an error rate. (On the test suite's planted blobs, 500 samples per class with a 4%
sub-cluster, the unit 50 of a first draft gave 3 slices per class and missed the sub-cluster in about a
third of the classes; the unit 10 recovers it; ``tests/test_slices.py``.)

Statistics (``slice_table``), one row per slice: ``slice``, ``label``, ``size``, ``share_of_class``,
``error_rate`` (share of members the model gets wrong), ``mean_loss``, ``mean_confidence`` (mean
``pred_confidence``: how sure the model is of what it predicts), ``ece`` (expected calibration error of the
members: ``Σ_b n_b/n · |acc_b - conf_b|`` over ``ECE_BINS`` equal-width bins of ``pred_confidence``),
``label_issue_rate`` (share of members with ``is_label_issue``), ``representative_ids`` (the
``N_EXAMPLES`` members closest to the slice centroid: medoid-like examples) and ``hardest_ids`` (the
``N_EXAMPLES`` members with the highest ``hardness``).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ._frames import set_column
from ._io import atomic_path
from ._shared_pass import SharedPass
from .checks import non_negative_int, positive_int
from .enums import SliceEmbedding, parse_choice
from .label_issues import DEFAULT_LABEL_ISSUE_METHOD, add_label_issue_columns
from .manifest import float_column

__all__ = [
    "SAMPLES_PER_SLICE_UNIT",
    "MAX_SLICES",
    "NITER",
    "SAMPLE_POINTS_PER_SLICE",
    "SAMPLE_POINTS_MIN_PER_SLICE",
    "SAMPLE_BYTES_MAX",
    "ECE_BINS",
    "N_EXAMPLES",
    "SLICE_COLUMNS",
    "SliceAssignment",
    "slice_count",
    "embedding_columns",
    "fit_slices",
    "slice_ids",
    "expected_calibration_error",
    "slice_table",
    "DEFAULT_SLICE_EMBEDDING",
    "SLICES_FILE",
    "fit_scan_slices",
    "SliceCentroids",
    "AssignedSlices",
    "fit_slice_centroids",
    "assign_slices",
    "annotate_manifest",
    "write_slice_table",
    "read_slice_table",
]

logger = logging.getLogger(__name__)

SAMPLES_PER_SLICE_UNIT = 10  # the K rule: K_c = round(sqrt(n_c / 10)), clipped to [1, MAX_SLICES]
MAX_SLICES = 16
NITER = 20  # FAISS k-means iterations on the sample (and at most this many streamed passes when shrunk)
SAMPLE_POINTS_PER_SLICE = 256  # k-means sample rows of a class, per slice (FAISS's max_points_per_centroid) ...
SAMPLE_BYTES_MAX = 64 * 2**20  # ... and at most this much float32 sample over all classes (bounded memory)
SAMPLE_POINTS_MIN_PER_SLICE = 16  # the least a class keeps per slice when the total is shrunk
ECE_BINS = 10
N_EXAMPLES = 5  # representative_ids / hardest_ids per slice
# Embedding of the scan's slices, chosen by the quality benchmark (docs/benchmarks.md, "Slices").
DEFAULT_SLICE_EMBEDDING = SliceEmbedding.GRADIENTS
SLICES_FILE = "slices.parquet"
_METADATA_KEY = b"hardmine"

SLICE_COLUMNS: tuple[str, ...] = (
    "slice", "label", "size", "share_of_class", "error_rate", "mean_loss", "mean_confidence", "ece",
    "label_issue_rate", "representative_ids", "hardest_ids",
)

Block = tuple[int, np.ndarray]  # (first row, (b, D) vectors)
Blocks = Callable[[], Iterable[Block]]  # a fresh pass over the rows, in order


@dataclass(frozen=True)
class SliceAssignment:
    """Result of ``fit_slices``. ``within``: ``(N,)`` slice number inside the sample's class (0 = largest);
    ``similarity``: ``(N,)`` cosine of the sample to its slice centroid; ``counts``: label -> slices."""

    within: np.ndarray
    similarity: np.ndarray
    counts: Mapping[int, int]
    seed: int
    embedding: str

    def ids(self, labels: np.ndarray) -> np.ndarray:
        """``"<label>/<k>"`` per sample (object array of str)."""
        return slice_ids(labels, self.within)


@dataclass(frozen=True)
class SliceCentroids:
    """Result of ``fit_slice_centroids``: every class's unit centroids, before the last pass assigns each row
    (``assign_slices``). ``centroids``: label -> ``(K_c, d)``; ``columns``: the vector columns clustered
    (``None``: all)."""

    labels: np.ndarray
    centroids: Mapping[int, np.ndarray]
    columns: np.ndarray | None
    seed: int
    embedding: str


class AssignedSlices(NamedTuple):
    """Result of ``assign_slices``: the slices, and with ``directions`` each row's squared norm ``sq`` ``(N,)``
    and its dot products ``dots`` ``(N, e)`` with its class's directions (all columns, float64)."""

    assignment: SliceAssignment
    sq: np.ndarray | None
    dots: np.ndarray | None


# ------------------------------------------------------------------------------------------------ K rule
def slice_count(n: int) -> int:
    """Number of slices of a class with ``n`` samples: ``clip(round(sqrt(n / 10)), 1, 16)`` (and never more
    than ``n``; 0 for an empty class)."""
    n = non_negative_int(n, "n", hint="samples in the class")
    return _compute_slice_count(n)


def _compute_slice_count(n: int) -> int:
    if n == 0:
        return 0
    k = int(round(math.sqrt(n / SAMPLES_PER_SLICE_UNIT)))
    return max(1, min(MAX_SLICES, k, n))


# ------------------------------------------------------------------------------------------ embeddings
def embedding_columns(layout: Sequence[Mapping[str, Any]] | None, embedding: SliceEmbedding | str) -> np.ndarray | None:
    """Columns of the projected gradient that make up ``embedding``: ``None`` (all) for ``gradients``; for
    ``output-layer`` the columns of every layout entry whose module is the last entry's module
    (``classifier.weight`` and ``classifier.bias`` of ``classifier``)."""
    embedding = parse_choice(SliceEmbedding, embedding, "slice embedding")
    if embedding is SliceEmbedding.GRADIENTS:
        return None
    if not layout:
        raise ValueError(f"slice embedding {embedding.value!r} needs the scan's projection layout; it has none.")
    return _compute_output_columns(layout)


def _module_of(param: str) -> str:
    return param.rsplit(".", 1)[0] if "." in param else ""


def _compute_output_columns(layout: Sequence[Mapping[str, Any]]) -> np.ndarray:
    last = _module_of(str(layout[-1]["param"]))
    cols = [
        np.arange(int(e["offset"]), int(e["offset"]) + int(e["width"]))
        for e in layout
        if _module_of(str(e["param"])) == last
    ]
    return np.concatenate(cols)


# ------------------------------------------------------------------------------------------ clustering
def fit_slices(
    blocks: Blocks,
    labels: np.ndarray,
    *,
    seed: int = 0,
    columns: np.ndarray | None = None,
    embedding: SliceEmbedding | str = SliceEmbedding.GRADIENTS,
) -> SliceAssignment:
    """Per-class spherical k-means of the unit rows of the vectors streamed by ``blocks()`` (called twice:
    one pass to gather the training sample, one to assign every row). ``labels``: ``(N,)`` integer class
    per row; ``columns``: the vector columns to use (``None``: all). Deterministic for a seed."""
    return _compute_slices(*_slice_args(blocks, labels, seed, columns, embedding))


def _slice_args(
    blocks: Blocks, labels: np.ndarray, seed: int, columns: np.ndarray | None, embedding: SliceEmbedding | str,
) -> tuple[Blocks, np.ndarray, int, np.ndarray | None, str]:
    """``fit_slices``' arguments checked: ``(blocks, int64 labels, seed, columns or None, embedding value)``."""
    if not callable(blocks):
        raise ValueError(f"blocks={blocks!r} must be a callable returning an iterable of (first_row, vectors).")
    y = np.asarray(labels)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise ValueError(f"labels must be a 1-D integer array, got dtype {y.dtype} and shape {y.shape}.")
    if len(y) == 0:
        raise ValueError("labels is empty; there is nothing to slice.")
    seed = non_negative_int(seed, "seed")
    embedding = parse_choice(SliceEmbedding, embedding, "slice embedding")
    cols = None if columns is None else np.asarray(columns, dtype=np.int64)
    if cols is not None and (cols.ndim != 1 or len(cols) == 0):
        raise ValueError(f"columns must be a non-empty 1-D array of column positions, got shape {cols.shape}.")
    return blocks, y.astype(np.int64), seed, cols, embedding.value


def _unit(z: np.ndarray, cols: np.ndarray | None) -> np.ndarray:
    x = np.asarray(z, dtype=np.float32)
    if cols is not None:
        x = x[:, cols]  # (b, D) -> (b, d)
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (b, 1)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def _training_rows(y: np.ndarray, classes: np.ndarray, ks: Mapping[int, int], seed: int, width: int) -> tuple[np.ndarray, bool]:
    """Sorted rows of the k-means sample, and whether it was shrunk: per class with K > 1, at most
    ``SAMPLE_POINTS_PER_SLICE * K`` rows, shrunk in proportion when all classes together want more than
    ``SAMPLE_BYTES_MAX`` of ``width``-wide float32 rows (never below ``SAMPLE_POINTS_MIN_PER_SLICE * K``),
    drawn from a generator seeded by (seed, class)."""
    members = {int(c): np.flatnonzero(y == c) for c in classes.tolist() if ks[int(c)] > 1}
    want = {c: min(SAMPLE_POINTS_PER_SLICE * ks[c], len(rows)) for c, rows in members.items()}
    total = sum(want.values())
    rows_max = max(1, SAMPLE_BYTES_MAX // (4 * max(width, 1)))
    shrink = min(1.0, rows_max / total) if total else 1.0
    parts = [np.zeros(0, dtype=np.int64)]
    shrunk = False
    for c, rows in members.items():
        cap = max(int(want[c] * shrink), min(SAMPLE_POINTS_MIN_PER_SLICE * ks[c], len(rows)))
        shrunk = shrunk or cap < want[c]
        if len(rows) > cap:
            rng = np.random.default_rng([seed, c])
            rows = rng.choice(rows, size=cap, replace=False)
        parts.append(rows)
    return np.sort(np.concatenate(parts)), shrunk


def _kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``(k, d)`` unit centroids of spherical k-means on unit rows ``x`` (FAISS, seeded, one thread so the
    result does not depend on the machine's core count)."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        km = faiss.Kmeans(
            x.shape[1], k, niter=NITER, spherical=True, seed=int(seed), verbose=False,
            max_points_per_centroid=max(1, int(math.ceil(len(x) / k))), min_points_per_centroid=1,
        )
        km.train(x)
    finally:
        faiss.omp_set_num_threads(threads)
    return _normalise(np.asarray(km.centroids, dtype=np.float64).reshape(k, x.shape[1]))  # (k, d)


def _normalise(c: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(c, axis=1, keepdims=True)  # (k, 1)
    return c / np.where(norms > 0, norms, 1.0)


def _labelled_blocks(blocks: Blocks, n: int) -> Iterator[Block]:
    """The blocks of ``blocks()`` up to the last that ends within the ``n`` labelled rows."""
    return itertools.takewhile(lambda block: block[0] + len(block[1]) <= n, blocks())


def _assign_pass(
    blocks: Blocks, y: np.ndarray, cols: np.ndarray | None, centroids: Mapping[int, np.ndarray], raw: np.ndarray,
) -> tuple[dict[int, np.ndarray], int]:
    """One refinement pass over the rows: assign each to its class's nearest centroid (writing ``raw``) and sum
    the unit vectors per centroid. Returns (sums per class ``(k, d)``, assignments changed)."""
    sums = {c: np.zeros_like(v) for c, v in centroids.items()}
    changed = 0
    for start, z in _labelled_blocks(blocks, len(y)):
        changed += _assign_block(start, z, y, cols, centroids, raw, None, sums)
    return sums, changed


@dataclass
class _Products:
    """The last pass's extra output (``assign_slices(directions=...)``): per class ``(D, e)`` directions, and
    where each row's squared norm ``sq`` ``(N,)`` and dot products ``dots`` ``(N, e)`` land. ``joint``: per class
    the centroids and directions side by side ``(D, K_c + e)``, one product per class run (all columns
    clustered only)."""

    directions: np.ndarray
    sq: np.ndarray
    dots: np.ndarray
    joint: dict[int, np.ndarray] | None


def _assign_block(
    start: int, z: np.ndarray, y: np.ndarray, cols: np.ndarray | None, centroids: Mapping[int, np.ndarray],
    raw: np.ndarray, sim: np.ndarray | None, sums: Mapping[int, np.ndarray] | None, products: _Products | None = None,
) -> int:
    """``_assign_pass`` on one block (rows ``start..``): writes ``raw`` (and ``sim``, and ``products``) at its
    rows, adds its members to ``sums`` unless None (the last pass: no centroid moves after it); returns the
    assignments changed (0 in the last pass, which does not count them)."""
    stop = start + len(z)
    lab = y[start:stop]
    # Rows sorted by class: each class is one contiguous run (slices, not fancy-indexed copies).
    order = np.argsort(lab, kind="stable")
    x = np.asarray(z)[order]
    full = None  # (b, D) float64 in class order, every column: the products' rows
    if products is not None:
        full = x = np.asarray(x, dtype=np.float64)
        full_sq = np.einsum("ij,ij->i", full, full)  # (b,)
        products.sq[start + order] = full_sq
    if cols is not None:
        x = x[:, cols]  # (b, D) -> (b, d)
    x = np.asarray(x, dtype=np.float64)  # (b, d) in class order
    norms = np.sqrt(full_sq if full is not None and cols is None else np.einsum("ij,ij->i", x, x))  # (b,)
    inv = np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0)  # 0 for a zero row
    lab_s = lab[order]
    runs = np.flatnonzero(np.r_[True, lab_s[1:] != lab_s[:-1], True])
    changed = 0
    for lo, hi in zip(runs[:-1].tolist(), runs[1:].tolist()):
        c = int(lab_s[lo])
        rows = start + order[lo:hi]
        # cos(x_i, centroid) = (x_i · centroid) / ‖x_i‖ (unit centroids): no (b, d) array of unit rows.
        if products is not None and products.joint is not None:
            both = x[lo:hi] @ products.joint[c]  # (b_c, k + e): the centroids' and the directions' products
            k = len(centroids[c])
            s = both[:, :k] * inv[lo:hi, None]  # (b_c, k)
            products.dots[rows] = both[:, k:]
        else:
            s = (x[lo:hi] @ centroids[c].T) * inv[lo:hi, None]  # (b_c, k)
            if products is not None:  # only some columns clustered: the directions' product of its own
                products.dots[rows] = np.asarray(full)[lo:hi] @ products.directions[c]  # (b_c, e)
        best = s.argmax(axis=1)
        if sums is not None:
            changed += int((raw[rows] != best).sum())
        raw[rows] = best
        if sim is not None:
            sim[rows] = s[np.arange(len(best)), best]
        if sums is None:
            continue
        # Sum each centroid's members as contiguous runs after a sort (np.add.at, an unbuffered per-row
        # scatter, was most of the slicing time).
        by = np.argsort(best, kind="stable")
        best_s = best[by]
        starts = np.flatnonzero(np.r_[True, best_s[1:] != best_s[:-1]])
        u = x[lo:hi][by] * inv[lo:hi][by, None]  # (b_c, d) the members' unit vectors, by centroid
        sums[c][best_s[starts]] += np.add.reduceat(u, starts, axis=0)  # (n_present, d)
    return changed


def _compute_slices(blocks: Blocks, y: np.ndarray, seed: int, cols: np.ndarray | None, embedding: str) -> SliceAssignment:
    return _compute_assignment(_compute_centroids(blocks, y, seed, cols, embedding), blocks, None, None).assignment


def _compute_centroids(blocks: Blocks, y: np.ndarray, seed: int, cols: np.ndarray | None, embedding: str) -> SliceCentroids:
    n = len(y)
    classes, class_n = np.unique(y, return_counts=True)
    ks = {int(c): _compute_slice_count(int(m)) for c, m in zip(classes, class_n)}
    # The width of the vectors sizes the sample: the chosen columns, else the first block's (no block: refused
    # below, where the blocks must cover every label).
    if cols is not None:
        width = len(cols)
    else:
        first = next(iter(blocks()), None)
        width = 1 if first is None else int(np.shape(first[1])[1])
    init_rows, shrunk = _training_rows(y, classes, ks, seed, width)
    # Pass 1: the k-means sample of every class with K > 1 (up to 256 rows per slice, bounded in total).
    gathered: list[np.ndarray] = []
    seen = 0
    for start, z in blocks():
        stop = start + len(z)
        seen = max(seen, stop)
        lo, hi = np.searchsorted(init_rows, [start, stop])
        if hi > lo:
            gathered.append(_unit(z[init_rows[lo:hi] - start], cols))
    if seen != n:
        raise ValueError(f"the vector blocks cover {seen} rows but there are {n} labels; they must match.")
    sample = np.concatenate(gathered) if gathered else None  # (n_init, d)
    sample_y = y[init_rows]
    centroids: dict[int, np.ndarray] = {}
    for c in classes.tolist():
        if ks[c] > 1:
            centroids[c] = _kmeans(np.ascontiguousarray(sample[sample_y == c]), ks[c], seed * 1_000_003 + c)
        else:  # any unit vector: one centroid takes every row
            centroids[c] = np.ones((1, width)) / math.sqrt(width)
    raw = np.full(n, -1, dtype=np.int64)
    # A full sample (256 rows per slice) gives the class's centroids up to sampling noise; a shrunk one is
    # refined by streamed spherical Lloyd iterations over all rows: assign, then move each centroid to the
    # normalised sum of its members; stop when no assignment changes (or after NITER passes).
    for _ in range(NITER if shrunk else 0):
        sums, changed = _assign_pass(blocks, y, cols, centroids, raw)
        for c, sm in sums.items():
            empty = ~(np.abs(sm).sum(axis=1) > 0)
            new = _normalise(sm)
            new[empty] = centroids[c][empty]  # an empty centroid stays where it was
            centroids[c] = new
        if changed == 0:
            break
    return SliceCentroids(labels=y, centroids=centroids, columns=cols, seed=seed, embedding=embedding)


def _compute_assignment(
    fit: SliceCentroids, blocks: Blocks, directions: np.ndarray | None, share: SharedPass | None,
    on_block: Callable[[int], None] | None = None,
) -> AssignedSlices:
    y, cols, centroids = fit.labels, fit.columns, fit.centroids
    n = len(y)
    classes = np.array(sorted(centroids), dtype=np.int64)
    ks = {c: len(v) for c, v in centroids.items()}
    raw = np.full(n, -1, dtype=np.int64)
    sim = np.zeros(n, dtype=np.float64)
    products = None
    if directions is not None:
        joint = None
        if cols is None:  # C-contiguous (D, K_c + e): one product per class run gives both
            joint = {c: np.concatenate([v.T, directions[c]], axis=1) for c, v in centroids.items()}  # a new array
        products = _Products(directions, np.full(n, np.nan), np.full((n, directions.shape[2]), np.nan), joint)
    # The last pass, block by block, with any thread that joins it (each block: disjoint rows; alone without one).
    lock = threading.Lock()
    done = [0]  # rows assigned by every thread so far

    def assign(start: int, z: np.ndarray) -> None:
        _assign_block(start, z, y, cols, centroids, raw, sim, None, products)
        with lock:
            done[0] += len(z)
            rows = done[0]
        if on_block is not None:
            on_block(rows)

    (share or SharedPass()).run(_labelled_blocks(blocks, n), assign)
    # Renumber inside each class by size, largest first (stable: ties keep the centroid order): one count
    # over (class, centroid) pairs and one table lookup, not a pass over the rows per class.
    k_max = max(ks.values(), default=1)
    pair = np.searchsorted(classes, y) * k_max + raw  # (n,) class position · k_max + centroid
    sizes = np.bincount(pair, minlength=len(classes) * k_max).reshape(len(classes), k_max)  # (C, k_max)
    new_id = np.zeros((len(classes), k_max), dtype=np.int64)  # (C, k_max) centroid -> slice number
    counts: dict[int, int] = {}
    for i, c in enumerate(classes.tolist()):
        size = sizes[i, : ks[c]]  # (k,)
        new_id[i, np.argsort(-size, kind="stable")] = np.arange(ks[c])
        counts[c] = int((size > 0).sum())
    within = new_id.ravel()[pair]  # (n,)
    logger.info("slices: %d classes, %d slices (embedding %s)", len(classes), sum(counts.values()), fit.embedding)
    assignment = SliceAssignment(within=within, similarity=sim, counts=counts, seed=fit.seed, embedding=fit.embedding)
    if products is None:
        return AssignedSlices(assignment, None, None)
    return AssignedSlices(assignment, products.sq, products.dots)


def slice_ids(labels: np.ndarray, within: np.ndarray) -> np.ndarray:
    """``"<label>/<k>"`` for every row (object array of str)."""
    lab = np.asarray(labels)
    w = np.asarray(within)
    if lab.shape != w.shape or lab.ndim != 1:
        raise ValueError(f"labels {lab.shape} and within {w.shape} must be 1-D of the same length.")

    def per_row() -> np.ndarray:
        return np.array([f"{a}/{b}" for a, b in zip(lab.tolist(), w.tolist())], dtype=object)

    if lab.dtype.kind not in "iu" or w.dtype.kind not in "iu" or len(w) == 0 or w.min() < 0:
        return per_row()
    # Format each (class, slice) name once and index it: a million rows hold only a few hundred names.
    classes, code = np.unique(lab, return_inverse=True)  # (C,), (N,)
    width = int(w.max()) + 1
    if len(classes) * width > len(lab):  # more names than rows (nearly every row its own class)
        return per_row()
    names = np.array([f"{c}/{k}" for c in classes.tolist() for k in range(width)], dtype=object)  # (C * width,)
    return names[code.reshape(-1) * width + w]  # (N,)


# ------------------------------------------------------------------------------------------ statistics
def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """``Σ_b n_b/n · |acc_b - conf_b|`` over ``bins`` equal-width bins of ``confidence`` in [0, 1]; NaN
    when there is no finite value."""
    bins = positive_int(bins, "bins")
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    if conf.shape != ok.shape:
        raise ValueError(f"confidence {conf.shape} and correct {ok.shape} must have the same shape.")
    return _compute_ece(conf, ok, bins)


def _compute_ece(conf: np.ndarray, ok: np.ndarray, bins: int) -> float:
    m = np.isfinite(conf) & np.isfinite(ok)
    if not m.any():
        return math.nan
    conf, ok = conf[m], ok[m]
    b = np.minimum((conf * bins).astype(np.int64), bins - 1)  # bin of each sample; 1.0 goes to the last
    n_b = np.bincount(b, minlength=bins)  # (bins,)
    acc = np.bincount(b, weights=ok, minlength=bins)
    cf = np.bincount(b, weights=conf, minlength=bins)
    nz = n_b > 0
    return float(np.sum(np.abs(acc[nz] - cf[nz])) / len(conf))



def slice_table(df: pd.DataFrame, similarity: np.ndarray | None = None, n_examples: int = N_EXAMPLES) -> pd.DataFrame:
    """One row per slice (columns ``SLICE_COLUMNS``) from a manifest frame with ``slice`` and ``label``
    (and, where present, ``correct``, ``loss``, ``pred_confidence``, ``is_label_issue``, ``hardness``).
    ``similarity``: ``(N,)`` cosine to the slice centroid, for ``representative_ids`` (without it the
    representatives are the lowest-hardness members). Rows: by label, then slice number."""
    for col in ("slice", "label", "sample_id"):
        if col not in df:
            raise ValueError(f"slice_table needs a {col!r} column; the frame has {list(df.columns)}.")
    n_examples = non_negative_int(n_examples, "n_examples")
    if similarity is not None:
        similarity = np.asarray(similarity, dtype=np.float64)
        if similarity.shape != (len(df),):
            raise ValueError(f"similarity has shape {similarity.shape}; it needs ({len(df)},).")
    return _compute_slice_table(df, similarity, n_examples)


def _compute_slice_table(df: pd.DataFrame, similarity: np.ndarray | None, n_examples: int) -> pd.DataFrame:
    labels = df["label"].to_numpy()
    ids = df["sample_id"].to_numpy()
    correct = float_column(df, "correct")
    loss = float_column(df, "loss")
    conf = float_column(df, "pred_confidence")
    issue = float_column(df, "is_label_issue")
    hard = float_column(df, "hardness")
    rep_key = similarity if similarity is not None else -np.nan_to_num(hard, nan=np.inf)
    class_size = pd.Series(labels).value_counts().to_dict()
    codes, uniq = pd.factorize(df["slice"].astype(str), sort=False)
    # Stable by slice, scan order inside: on codes that fit 16 bits numpy's stable sort is a radix sort.
    order = np.argsort(codes.astype(np.uint16) if len(uniq) <= 2**16 else codes, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(codes, minlength=len(uniq)))]
    rows = []
    for i, name in enumerate(uniq):
        m = order[bounds[i] : bounds[i + 1]]  # rows of this slice, in scan order
        lab = labels[m[0]]
        top_rep = m[_smallest(-rep_key[m], n_examples)]
        top_hard = m[_smallest(-np.nan_to_num(hard[m], nan=-np.inf), n_examples)]
        rows.append(
            {
                "slice": str(name),
                "label": lab.item() if hasattr(lab, "item") else lab,
                "size": int(len(m)),
                "share_of_class": len(m) / class_size[lab],
                "error_rate": _nanmean(1.0 - correct[m]),
                "mean_loss": _nanmean(loss[m]),
                "mean_confidence": _nanmean(conf[m]),
                "ece": _compute_ece(conf[m], correct[m], ECE_BINS),
                "label_issue_rate": _nanmean(issue[m]),
                "representative_ids": [v.item() if hasattr(v, "item") else v for v in ids[top_rep]],
                "hardest_ids": [v.item() if hasattr(v, "item") else v for v in ids[top_hard]],
            }
        )
    out = pd.DataFrame(rows, columns=list(SLICE_COLUMNS))
    num = out["slice"].str.rsplit("/", n=1).str[-1].astype(np.int64)
    out = out.assign(_k=num).sort_values(["label", "_k"], kind="stable").drop(columns="_k").reset_index(drop=True)
    return out


def _smallest(a: np.ndarray, n: int) -> np.ndarray:
    """Positions of the ``n`` smallest values of ``a`` (no NaN), smallest first, ties in position order: exactly
    ``np.argsort(a, kind="stable")[:n]``, without sorting all of ``a`` (a slice's members; only a few are kept)."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if len(a) <= n:
        return np.argsort(a, kind="stable")
    kth = np.partition(a, n - 1)[n - 1]  # the n-th smallest value
    candidates = np.flatnonzero(a <= kth)  # every value up to it, ties at it included, in position order
    return candidates[np.argsort(a[candidates], kind="stable")[:n]]


def _nanmean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else math.nan


# ------------------------------------------------------------------------------------------ the scan's step
def fit_scan_slices(
    blocks: Blocks,
    labels: np.ndarray,
    layout: Sequence[Mapping[str, Any]] | None,
    seed: int,
    embedding: SliceEmbedding | str = DEFAULT_SLICE_EMBEDDING,
) -> SliceAssignment:
    """The clustering of a scan's slicing step (``fit_slices`` on the columns of ``embedding``): it needs only
    the labels and the vectors, so a scan can run it beside its scoring passes and hand the result to
    ``annotate_manifest(assignment=...)``. The same as ``assign_slices(fit_slice_centroids(...), blocks)``."""
    return assign_slices(fit_slice_centroids(blocks, labels, layout, seed, embedding), blocks).assignment


def fit_slice_centroids(
    blocks: Blocks,
    labels: np.ndarray,
    layout: Sequence[Mapping[str, Any]] | None,
    seed: int,
    embedding: SliceEmbedding | str = DEFAULT_SLICE_EMBEDDING,
) -> SliceCentroids:
    """``fit_scan_slices`` up to its last pass: every class's centroids (the k-means sample, k-means, and the
    streamed refinement when the sample was shrunk). ``assign_slices`` then assigns every row."""
    embedding = parse_choice(SliceEmbedding, embedding, "slice embedding")
    cols = embedding_columns(layout, embedding)
    return _compute_centroids(*_slice_args(blocks, np.asarray(labels).astype(np.int64), seed, cols, embedding))


def assign_slices(
    fit: SliceCentroids,
    blocks: Blocks,
    directions: np.ndarray | None = None,
    *,
    share: SharedPass | None = None,
    on_block: Callable[[int], None] | None = None,
) -> AssignedSlices:
    """The last pass of ``fit_scan_slices``: each row of ``blocks()`` (the blocks ``fit`` was made from) goes to
    its class's nearest centroid, and the slices are numbered by size.

    ``directions``: ``(C, D, e)`` float64 per class (every label in ``[0, C)``, ``D`` the blocks' full width):
    the pass also returns each row's squared norm and its ``e`` dot products with its class's directions, from
    the same float64 copy of the block (a scan takes its divergence scores' products here,
    ``hardmine.score.divergence_directions``: one read of the vectors instead of two). ``share``: the pass runs
    as ``share.run``, so other threads can join it with ``share.help()`` (the result is the same whoever assigns
    which block); it is closed when the pass ends or fails. ``on_block(rows)``: called after each block by the
    thread that assigned it, with the rows assigned so far by every thread (increasing within each thread)."""
    try:
        if not isinstance(fit, SliceCentroids):
            raise ValueError(f"fit must be the SliceCentroids of fit_slice_centroids, got {type(fit).__name__}.")
        if directions is not None:
            directions = _checked_directions(directions, fit.labels, blocks)
        return _compute_assignment(fit, blocks, directions, share, on_block)
    finally:
        if share is not None:
            share.close()


def _checked_directions(directions: Any, y: np.ndarray, blocks: Blocks) -> np.ndarray:
    d = np.asarray(directions, dtype=np.float64)
    first = next(iter(blocks()), None)
    width = None if first is None else int(np.shape(first[1])[1])
    if d.ndim != 3 or (width is not None and d.shape[1] != width):
        raise ValueError(
            f"directions must be (classes, {width if width is not None else 'D'}, e) for these blocks, got shape "
            f"{d.shape}; make them with hardmine.score.divergence_directions."
        )
    if len(y) and (y.min() < 0 or y.max() >= d.shape[0]):
        raise ValueError(
            f"labels run from {y.min()} to {y.max()} but directions has {d.shape[0]} classes; pass one (D, e) "
            "matrix per class id."
        )
    return d


def annotate_manifest(
    df: pd.DataFrame,
    blocks: Blocks,
    layout: Sequence[Mapping[str, Any]] | None,
    seed: int,
    directory: str | os.PathLike[str] | None,
    embedding: SliceEmbedding | str = DEFAULT_SLICE_EMBEDDING,
    assignment: SliceAssignment | None = None,
    submit: Callable[[Callable[[], Any]], Any] | None = None,
    label_issues: bool = True,
    slice_column: np.ndarray | None = None,
) -> dict[str, Any]:
    """The scan's slicing step, on a scored manifest frame (``hardness`` and ``rank`` present), in place:
    adds ``label_issue`` / ``is_label_issue`` (``hardmine.label_issues``) and ``slice``, and writes
    ``directory/slices.parquet`` (``slice_table``). Classification only: for other labels the columns are
    null and no file is written (an old one is removed). ``assignment``: the result of ``fit_scan_slices``
    for these labels, layout, seed and embedding when already computed (else it is computed here).
    ``submit``: runs the job that computes and writes the slice table (default: at once); the job reads its
    own copy of the columns it needs, so the caller may add columns to ``df`` meanwhile (a scan runs it in a
    thread beside the manifest's weights, and writes the manifest after it) and must wait for it.
    ``label_issues=False``: the frame already has the label-issue columns (the caller ran
    ``add_label_issue_columns`` on it, e.g. a scan while its clustering finished). ``slice_column``: with
    ``assignment``, its ``ids`` of these labels when already made (a scan makes them in its worker meanwhile).
    Returns the manifest metadata entry ``slices``."""
    if label_issues:
        add_label_issue_columns(df)
    labels = df["label"].to_numpy() if "label" in df else np.zeros(0)
    path = None if directory is None else Path(directory) / SLICES_FILE
    meta: dict[str, Any] = {
        "label_issue_method": DEFAULT_LABEL_ISSUE_METHOD.value,
        "label_issue_rule": "pred != label and pred_confidence >= mean confidence of the predicted class",
    }
    if labels.dtype.kind not in "iu" or len(labels) == 0:
        df["slice"] = pd.array([None] * len(df), dtype="string")
        if path is not None:
            path.unlink(missing_ok=True)
        return {**meta, "embedding": None}
    embedding = parse_choice(SliceEmbedding, embedding, "slice embedding")
    if assignment is None:
        a = fit_scan_slices(blocks, labels, layout, seed, embedding)
    elif (len(assignment.within), assignment.seed, assignment.embedding) != (len(labels), seed, embedding.value):
        raise ValueError(
            f"the slice assignment covers {len(assignment.within)} rows with seed {assignment.seed} and embedding "
            f"{assignment.embedding!r}; this manifest needs {len(labels)} rows, seed {seed} and {embedding.value!r}. "
            "Pass the fit_scan_slices result for this scan, or none."
        )
    else:
        a = assignment
    if slice_column is not None and (assignment is None or len(slice_column) != len(labels)):
        raise ValueError(
            f"slice_column ({len(slice_column)} rows) must come with the assignment it names and have one name per "
            f"row ({len(labels)}); pass assignment.ids(labels), or none."
        )
    set_column(df, "slice", a.ids(labels) if slice_column is None else slice_column)
    meta.update(
        {
            "embedding": embedding.value,
            "seed": int(seed),
            "k_rule": f"clip(round(sqrt(n_class / {SAMPLES_PER_SLICE_UNIT})), 1, {MAX_SLICES})",
            "niter": NITER,
            "n_slices": int(sum(a.counts.values())),
        }
    )
    if path is not None:
        columns = df[[c for c in _TABLE_INPUTS if c in df]]  # a new frame: later columns of df are not its
        table_meta = dict(meta)

        def write_table() -> None:
            write_slice_table(path, slice_table(columns, a.similarity), table_meta)

        if submit is None:
            write_table()
        else:
            submit(write_table)
        meta["file"] = SLICES_FILE
    return meta


# The manifest columns slice_table reads.
_TABLE_INPUTS = ("slice", "label", "sample_id", "correct", "loss", "pred_confidence", "is_label_issue", "hardness")


def write_slice_table(path: str | os.PathLike[str], table: pd.DataFrame, metadata: Mapping[str, Any]) -> Path:
    """Write a ``slice_table`` frame to ``path`` (Parquet, atomically) with ``metadata`` as JSON under the
    key ``hardmine``."""
    missing = [c for c in SLICE_COLUMNS if c not in table]
    if missing:
        raise ValueError(f"the slice table is missing column(s) {missing}; it needs {list(SLICE_COLUMNS)}.")
    path = Path(path)
    t = pa.Table.from_pandas(table[list(SLICE_COLUMNS)], preserve_index=False)
    t = t.replace_schema_metadata({_METADATA_KEY: json.dumps(dict(metadata), sort_keys=True, default=str).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(t, tmp)
    return path


def read_slice_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read ``slices.parquet`` (a path to it, or the scan directory holding it); the metadata is attached as
    ``df.attrs["hardmine"]``."""
    p = Path(path)
    if p.is_dir():
        p = p / SLICES_FILE
    if not p.is_file():
        raise ValueError(
            f"{p} does not exist; slices are written by scans of classification data (rescore an older scan "
            "to add them)."
        )
    t = pq.read_table(p)
    missing = [c for c in SLICE_COLUMNS if c not in t.column_names]
    if missing:
        raise ValueError(f"{p} is missing column(s) {missing}; it is not a hardmine slice table.")
    raw = (t.schema.metadata or {}).get(_METADATA_KEY)
    df = t.to_pandas()
    for c in ("representative_ids", "hardest_ids"):
        df[c] = [list(v) for v in df[c]]
    df.attrs["hardmine"] = json.loads(raw) if raw else {}
    return df
