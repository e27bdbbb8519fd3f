"""``Scan``: a complete scan directory opened for reading, querying and rescoring.

The driver (``hardmine.scan.driver``) returns one at the end of ``scan``; ``Scan.open(path)`` reopens a
directory later. Index building and scoring live here (``build_index``, ``write_scores``), so a scan and a
later ``rescore`` take the same path through them.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from threadpoolctl import threadpool_limits

from .._frames import set_column
from .._shared_pass import SharedPass
from ..checks import as_bool, is_int, positive_int
from ..enums import IndexKind, TaskKind, parse_choice
from ..index import IndexInfo, build_index, knn_all, knn_block, open_index, search
from ..label_issues import add_label_issue_columns
from ..losses import loss_name
from ..manifest import export_manifest, finish_manifest, read_manifest, write_manifest
from ..score import (
    DIVERGENCE_SCORES,
    NEIGHBOR_SCORES,
    SCORE_TABLE,
    PopulationStats,
    ScoreConfig,
    divergence_directions,
    divergence_from_dots,
    finalize_scores,
    knn_columns,
    population_pass,
    score_pass,
    unit_rows,
    weights_for_task,
)
from ..slices import AssignedSlices, SliceAssignment, annotate_manifest, assign_slices, fit_slice_centroids
from ..tokens import TierThresholds, read_sample_tokens, tier_thresholds
from .ledger import ShardRecord
from .shards import BLOCK_ROWS, Block, ShardSet
from .store import MANIFEST_FILE, SCAN_FILE, SCAN_FORMAT_VERSION, ScanStore, read_json

__all__ = ["Neighbors", "Scan"]

logger = logging.getLogger(__name__)


class Neighbors(NamedTuple):
    """Result of ``Scan.neighbors``: ``(q, k)`` arrays; missing neighbours have row -1 and similarity NaN."""

    sample_ids: np.ndarray
    similarities: np.ndarray
    rows: np.ndarray


class Scan:
    """A scan directory: gradients, index, scores and manifest. Reopen one with ``Scan.open(path)``."""

    def __init__(self, path: str | os.PathLike[str], info: dict[str, Any], gradients: np.ndarray | None = None) -> None:
        self.path = Path(path)
        self.info = info
        self._gradients = gradients  # the in-memory copy of all rows (keep_gradients_in_memory), or None
        self._index: Any = None
        # True while the owner of the directory (the scan driver or ``rescore``) holds its lock: an index built
        # on first use is then built under that lock, and ``scan.json`` is the owner's to write.
        self._writing = False
        self._id_rows: dict[Any, int] | None = None
        self._ids: np.ndarray | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, gradients: np.ndarray | None = None) -> Scan:
        """Reopen a complete scan directory."""
        p = Path(path)
        f = p / SCAN_FILE
        if not f.is_file():
            raise ValueError(f"{p} is not a hardmine scan directory (no {SCAN_FILE}); run hardmine.scan first.")
        info = read_json(f)
        if info.get("status") != "complete":
            raise ValueError(
                f"the scan in {p} is not complete (status {info.get('status')!r}); rerun hardmine.scan with the same "
                "arguments to resume it."
            )
        if int(info.get("config", {}).get("format_version", 0)) > SCAN_FORMAT_VERSION:
            raise ValueError(f"{p} was written by a newer hardmine ({info.get('provenance', {}).get('hardmine_version')}); upgrade.")
        return cls(p, info, gradients)

    # ------------------------------------------------------------------------------------ basics
    @property
    def n_samples(self) -> int:
        return int(self.info["n_samples"])

    @property
    def out_dim(self) -> int:
        """Total projected dimension of the stored gradients (the width of a gradient row)."""
        return int(self.info["out_dim"])

    @property
    def dim(self) -> int:
        """Deprecated name of ``out_dim`` (``dim`` is the per-parameter width elsewhere in hardmine)."""
        warnings.warn(
            "Scan.dim is deprecated; use Scan.out_dim (the total projected dimension).", DeprecationWarning,
            stacklevel=2,
        )
        return self.out_dim

    @property
    def task(self) -> TaskKind:
        return TaskKind(self.info["task"])

    @property
    def num_classes(self) -> int | None:
        return self.info.get("num_classes")

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.info["config"])

    @property
    def engine_metadata(self) -> dict[str, Any]:
        """The extractor's metadata as used (engine plan after probing the first batch, layout, dims)."""
        return dict(self.info.get("extractor") or self.info["config"]["extractor"])

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_FILE

    @property
    def index_built(self) -> bool:
        """Whether the FAISS index exists yet. A scan builds it only when asked (``scan(build_index=True)``,
        ``hardmine scan --build-index``) or when its scores need neighbours; otherwise the first query builds it
        (``neighbors``, drift, review, the report), with the kind the scan asked for, and keeps it."""
        return self.info.get("index") is not None

    @property
    def index_info(self) -> IndexInfo:
        """How the index was built (building it first if it is not yet: see ``index_built``)."""
        self._ensure_index()
        return IndexInfo.from_dict(self.info["index"])

    @property
    def shards(self) -> ShardSet:
        """The gradient shards (or the in-memory copy) as a ``ShardSet``."""
        records = [ShardRecord.from_dict(s) for s in self.info["shards"]]
        return ShardSet(self.path, records, self._gradients)

    def __repr__(self) -> str:
        return f"Scan({str(self.path)!r}, n_samples={self.info.get('n_samples')}, out_dim={self.info.get('out_dim')})"

    def manifest(self) -> pd.DataFrame:
        """The ranked manifest (``read_manifest(scan.path / "manifest.parquet")``)."""
        return read_manifest(self.manifest_path)

    def stats(self) -> pd.DataFrame:
        """Per-sample statistics recorded during extraction, in scan order (one row per sample)."""
        table = self.shards.stats_table()
        # Free each Arrow column as it is converted: the frame is not held twice at a million rows.
        df = table.to_pandas(self_destruct=True, split_blocks=True)
        del table
        if "correct" in df:  # a causal-LM scan has no predictions to be correct
            df["correct"] = df["correct"].astype("boolean")
        return df

    def iter_gradients(self, max_rows: int = BLOCK_ROWS) -> Iterator[Block]:
        """Stream the projected gradients: ``(first_row, (rows, out_dim) float32)``, ``max_rows`` at a time."""
        return self.shards.blocks(max_rows)

    def gradients(self) -> np.ndarray:
        """All projected gradients ``(N, out_dim)``: the in-memory copy if the scan kept one, else loaded from the
        shards now (``4 · N · out_dim`` bytes of RAM; prefer ``iter_gradients`` for large scans)."""
        if self._gradients is None:
            return np.concatenate([np.asarray(z) for _, z in self.iter_gradients()])  # (N, out_dim)
        return self._gradients

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        return self.shards.gather(rows, self.out_dim)  # (len(rows), out_dim)

    def sample_ids(self) -> np.ndarray:
        if self._ids is None:
            self._ids = self.shards.sample_ids()
        return self._ids

    def rows_of(self, sample_ids: Iterable[Any]) -> np.ndarray:
        """Row positions of the given sample ids (ValueError naming the first unknown id)."""
        if self._id_rows is None:
            self._id_rows = {v: i for i, v in enumerate(self.sample_ids().tolist())}
        out = []
        for v in sample_ids:
            key = v.item() if isinstance(v, np.generic) else v
            if key not in self._id_rows:
                raise ValueError(f"sample_id {v!r} is not in the scan {self.path} ({self.n_samples} samples).")
            out.append(self._id_rows[key])
        return np.asarray(out, dtype=np.int64)

    def index(self) -> Any:
        """The FAISS index (built on first use if the scan did not build it; loaded once; IVF lists stay
        memory-mapped)."""
        if self._index is None:
            self._index = open_index(self.path, self.index_info)
        return self._index

    def _ensure_index(self) -> None:
        """Build the index now if the scan left it for its first query, and record it in ``scan.json``.

        Under the directory's lock, waiting for a holder (two first queries at once build it once); the
        kind is the one the scan asked for (``index_requested``), the seed the scan's."""
        if self.index_built:
            return
        kind = parse_choice(IndexKind, (self.info.get("scoring") or {}).get("index_requested") or "auto", "index")
        if self._writing:  # the driver or rescore holds the lock and writes scan.json itself
            self.build_index(kind)
            return
        store = ScanStore(self.path)
        try:
            store.lock.acquire(wait=True)
        except OSError as exc:
            raise ValueError(
                f"the scan in {self.path} has no index yet (it is built on the first neighbour query) and the "
                f"directory cannot be written ({exc}); build it where the directory is writable: "
                "Scan.open(path).rescore(index='auto') or `hardmine scan ... --build-index`."
            ) from None
        try:
            on_disk = read_json(self.path / SCAN_FILE)
            if on_disk.get("index") is not None:  # another process built it while this one waited
                self.info["index"] = on_disk["index"]
                return
            logger.info("%s: building the %s index on its first query", self.path, kind.value)
            self.build_index(kind)
            on_disk["index"] = self.info["index"]
            store.write_info(on_disk)
        finally:
            store.lock.release()

    # ------------------------------------------------------------------------------------ queries
    def neighbors(self, query: Any, k: int = 10, *, absolute: bool = False) -> Neighbors:
        """Nearest neighbours by cosine of projected gradients.

        ``query``: float vectors ``(out_dim,)`` / ``(q, out_dim)`` (array or tensor), or sample ids (an int or str, or a
        sequence / integer array of them). Querying by id excludes the sample itself. Returns ``(q, k)``
        sample ids, similarities (signed cosine) and rows.

        ``absolute=True`` ranks by ``|cos|`` instead: the neighbours ``neighbor_disagreement`` counts (a
        gradient pointing the opposite way is as informative about the label as an aligned one); the
        similarities stay signed, so anti-aligned neighbours show as negative.
        """
        k = positive_int(k, "k")
        as_bool(absolute, "absolute")
        vectors, self_rows = self._query_vectors(query)
        limit = self.n_samples - (1 if self_rows is not None else 0)
        if k > limit:
            if limit < 1:
                raise ValueError(f"the scan has {self.n_samples} sample(s): no other sample to be a neighbour of one.")
            raise ValueError(f"k={k} is larger than the {limit} other samples in the scan; use k <= {limit}.")
        u = np.ascontiguousarray(unit_rows(vectors)[0], dtype=np.float32)  # (q, out_dim)
        info = self.index_info
        if absolute:
            # No real row is -1, so a vector query excludes nothing; knn_block merges the searches of u and -u.
            own = self_rows if self_rows is not None else np.full(len(u), -1, dtype=np.int64)
            rows = knn_block(self.index(), info, u, own, k).abs_rows  # (q, k)
            found = np.maximum(rows, 0)
            z = unit_rows(self._gather(found.reshape(-1)))[0].reshape(*rows.shape, -1)  # (q*k, out_dim) -> (q, k, out_dim)
            sims = np.where(rows >= 0, np.einsum("qkd,qd->qk", z.astype(np.float64), u.astype(np.float64)), np.nan)
        elif self_rows is None:
            sims, rows = search(self.index(), info, u, k)
        else:
            res = knn_block(self.index(), info, u, self_rows, k)
            sims, rows = res.sims, res.rows
        ids = self.sample_ids()
        fill: Any = -1 if ids.dtype.kind in "iu" else ""
        sample_ids = np.where(rows >= 0, ids[np.maximum(rows, 0)], fill)
        return Neighbors(sample_ids=sample_ids, similarities=sims, rows=rows)

    def _query_vectors(self, query: Any) -> tuple[np.ndarray, np.ndarray | None]:
        if isinstance(query, torch.Tensor):
            query = query.detach().cpu().numpy()
        if isinstance(query, str) or is_int(query):
            query = [query]
        arr = query if isinstance(query, np.ndarray) else None
        if arr is None:
            seq = list(query) if isinstance(query, Iterable) else None
            if not seq:
                raise ValueError(f"query {query!r} is empty or not understood; pass vectors or sample ids.")
            if all(isinstance(v, str) or is_int(v) for v in seq):
                rows = self.rows_of(seq)
                return self._gather(rows), rows
            arr = np.asarray(seq)
        if arr.dtype.kind in "iuUO":
            rows = self.rows_of(arr.reshape(-1).tolist())  # ids in any shape -> flat (q,)
            return self._gather(rows), rows
        if arr.dtype.kind != "f":
            raise ValueError(f"query of dtype {arr.dtype} is not understood; pass float vectors or sample ids.")
        arr = arr.reshape(1, -1) if arr.ndim == 1 else arr  # (out_dim,) -> (1, out_dim)
        if arr.ndim != 2 or arr.shape[1] != self.out_dim:
            raise ValueError(
                f"query vectors have shape {tuple(arr.shape)}; they need {self.out_dim} columns (the scan's out_dim)."
            )
        if not np.isfinite(arr).all():
            raise ValueError("query vectors contain NaN/inf.")
        return arr.astype(np.float32), None

    # ------------------------------------------------------------------------------------ scoring
    def rescore(self, score_config: ScoreConfig | None = None, *, index: IndexKind | str | None = None) -> pd.DataFrame:
        """Recompute scores (and the index, if ``index`` is given) from the stored gradients; rewrites
        ``manifest.parquet`` and ``scan.json``. No gradient is extracted again."""
        score_config = ScoreConfig() if score_config is None else score_config
        if not isinstance(score_config, ScoreConfig):
            raise ValueError(f"score_config must be a hardmine.ScoreConfig, got {type(score_config).__name__}.")
        kind = None if index is None else parse_choice(IndexKind, index, "index")
        store = ScanStore(self.path)
        store.lock.acquire()  # one writer per scan directory: not while a scan or another rescore runs
        self._writing = True
        try:
            if kind is not None:
                self.build_index(kind)
            df = self.write_scores(score_config)
            self.info["scoring"] = {
                "score_config": score_config.to_dict(),
                "index_requested": kind.value if kind is not None
                else self.info.get("scoring", {}).get("index_requested"),
            }
            store.write_info(self.info)
        finally:
            self._writing = False
            store.lock.release()
        return df

    def report(self, path: str | os.PathLike[str], **kwargs: Any) -> Path:
        """Write the HTML report of this scan to ``path`` (``hardmine.report.report``; same keywords)."""
        from ..report import report  # the report module imports this one

        return report(self, path, **kwargs)

    def tokens(self, sample_id: Any) -> pd.DataFrame:
        """One sample's per-token rows of a causal-LM scan (``tokens.parquet``: position, token, is_target, loss,
        entropy, top1), read without loading the table (``hardmine.tokens.read_sample_tokens``). ValueError when
        the scan is not a causal-LM scan or the id is not in it."""
        return read_sample_tokens(self, sample_id)

    def token_tiers(self) -> TierThresholds:
        """The yellow / orange / red loss thresholds of this scan's target tokens (``hardmine.tokens``)."""
        return tier_thresholds(self)

    def export(self, **kwargs: Any) -> pd.DataFrame:
        """``hardmine.export_manifest(self, **kwargs)``."""
        return export_manifest(self, **kwargs)

    def build_index(self, kind: IndexKind, on_block: Callable[[int], None] | None = None) -> IndexInfo:
        """Build the FAISS index over the stored gradients (replacing any), record it in ``self.info`` and
        return its description. ``scan.json`` is the caller's to write."""
        self._index = None
        info = build_index(
            self.shards.blocks, self.n_samples, self.out_dim, self.path, kind=kind, seed=int(self.config["seed"]),
            on_block=on_block,
        )
        self.info["index"] = info.to_dict()
        return info

    def write_scores(
        self, config: ScoreConfig, progress: Callable[[int], None] | None = None,
        population: PopulationStats | None = None,
    ) -> pd.DataFrame:
        """Score every sample from the stored gradients, statistics and index, and write ``manifest.parquet``
        (atomically); returns the manifest frame. ``progress(done)`` is called per scored block.
        ``population``: the pass-1 statistics when already known (a distributed scan sums the ranks'),
        else computed here from the shards."""
        n = self.n_samples
        task = self.task
        if progress is not None:
            progress(0)  # loading the per-sample statistics and pass 1 come before the first scored block
        # The labels alone first (one column): the slices' clustering needs nothing else, so it starts while the
        # rest of the statistics are read.
        labels = self._class_labels() if task is TaskKind.CLASSIFICATION else None
        unlabelled = self.config.get("targets") == "predictions"  # no true labels: no slices or label issues
        seed = int(self.config["seed"])
        layout = self.engine_metadata.get("layout")
        k = min(config.k, n - 1)
        with_neighbours = config.computes_neighbor_scores
        if with_neighbours and k < config.k:
            logger.warning("only %d samples: using k=%d neighbours instead of %d", n, k, config.k)
        # Every sample's neighbours in one pass over the index (shared by both neighbour scores, one
        # similarity matrix for the signed and the |cos| ranking), before the streamed per-block scores.
        # Only when asked for or weighted (ScoreConfig.neighbor_scores): otherwise the columns stay NaN.
        if with_neighbours and k >= 1:
            neighbours = knn_columns(knn_all(self.index(), self.index_info, k), n, labels)
        else:
            neighbours = {name: np.full(n, np.nan) for name in NEIGHBOR_SCORES}
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hardmine-slices") as pool:
            stop = threading.Event()
            try:
                df, used, slices = self._scores_beside_slices(
                    pool, stop, labels, config, progress, population, neighbours, layout, seed,
                    slicing=labels is not None and not unlabelled and n > 0,
                )
                if unlabelled:
                    _drop_label_columns(df)  # before slicing: no true labels, no slices or label issues
                # The slice table (slices.parquet) is computed and written in the worker thread, beside the
                # manifest's weights; the manifest is written after it.
                tables: list[Future[Any]] = []
                if task is TaskKind.CAUSAL_LM:
                    for c in CLASS_ONLY:  # no classes: the columns do not exist (del: no copy of the frame)
                        if c in df:
                            del df[c]
                    slices_meta = None
                else:
                    slices_meta = annotate_manifest(
                        df, self.iter_gradients, layout, seed, self.path,
                        assignment=None if slices is None else slices.assignment,
                        slice_column=None if slices is None else slices.names,
                        submit=lambda job: tables.append(pool.submit(job)), label_issues=slices is None,
                    )
                ids = df["sample_id"].to_numpy()
                meta = self._manifest_metadata(config, used, k if with_neighbours else None, ids) | {
                    "slices": slices_meta, "neighbor_scores": with_neighbours,
                }
                finish_manifest(df, meta, strategy=config.strategy, top=config.top, boost=config.boost,
                                temperature=config.temperature, cap=config.cap)

                def slice_table_written() -> None:  # it lands first: a failed one leaves the old manifest
                    for table in tables:
                        table.result()

                write_manifest(df, self.manifest_path, df.attrs["hardmine"], before_replace=slice_table_written)
            except BaseException:
                stop.set()  # a clustering still running stops at its next block instead of finishing (Ctrl-C)
                raise
        return df

    def _class_labels(self) -> np.ndarray:
        """The ``label`` column of the statistics as int64 (a classification scan's class ids)."""
        return self.shards.stats_table(["label"]).to_pandas()["label"].to_numpy(dtype=np.int64)

    def _scores_beside_slices(
        self, pool: ThreadPoolExecutor, stop: threading.Event, labels: np.ndarray | None, config: ScoreConfig,
        progress: Callable[[int], None] | None, population: PopulationStats | None,
        neighbours: dict[str, np.ndarray], layout: Any, seed: int, *, slicing: bool,
    ) -> tuple[pd.DataFrame, dict[str, float], _ScanSlices | None]:
        """The per-sample statistics, pass 1 (unless ``population`` is given) and pass 2 of the scores and the
        ranked frame, with the slices' clustering (when ``slicing``) in ``pool`` meanwhile: ``(frame, hardness
        weights used, the slices or None)``.

        The clustering needs only the labels and the vectors; both sides are mostly numpy and FAISS calls,
        which release the GIL. The BLAS is held to one thread meanwhile: two threads each driving a two-thread
        BLAS ran slower together than one after the other. No result depends on it (the same arrays in the
        same order either way). The clustering's last pass (a ``SharedPass``: each block assigned by whichever
        thread takes it, the same way) reads every vector once more, so pass 2 is taken from it: its products
        with the population's sums come out of the same product as the centroids' (``divergence_directions``),
        and this thread joins that pass once the centroids are there. Not with ``leave_one_out`` (its scores
        need more than dot products): pass 2 then runs here on its own while the worker assigns the rows, and
        this thread joins that pass when its scores are done."""
        n = self.n_samples

        def blocks() -> Iterator[Block]:  # the clustering's passes over the rows; ``stop`` ends them
            for block in self.iter_gradients():
                if stop.is_set():
                    raise RuntimeError("scoring failed; the slices' clustering was stopped")
                yield block

        with threadpool_limits(limits=1, user_api="blas"):
            share = SharedPass(stop)
            fitting = pool.submit(fit_slice_centroids, blocks, labels, layout, seed) if slicing else None
            me = threading.get_ident()

            def my_blocks(rows: int) -> None:  # progress from this thread only (a bar need not be thread-safe)
                if progress is not None and threading.get_ident() == me:
                    progress(rows)

            def fused(pop: PopulationStats) -> np.ndarray | None:  # pass 2's directions, when taken from the slices
                return None if config.leave_one_out or pop.class_count is None else divergence_directions(pop)

            # With the population known, the worker goes on from the centroids to the last pass at once.
            directions = None if fitting is None or population is None else fused(population)
            last = None if directions is None else pool.submit(
                self._last_slice_pass, fitting, blocks, share, directions, my_blocks
            )
            stats = self.stats()
            pop = population if population is not None else population_pass(
                self.iter_gradients(), self.out_dim, labels, self.num_classes
            )
            if pop.n != n:
                raise RuntimeError(f"population statistics over {pop.n} samples for a scan of {n}; a bug in hardmine.")

            def ranked_after_pass_two() -> tuple[pd.DataFrame, dict[str, float]]:  # pass 2 on its own, then the ranks
                grad_scores = score_pass(self.iter_gradients(), n, labels, pop, config, None, on_block=progress)
                grad_scores.update(neighbours)
                return finalize_scores(stats, grad_scores, config, self.task)

            if fitting is None:
                df, used = ranked_after_pass_two()
                return df, used, None
            if last is None:
                directions = fused(pop)
                # Progress from the last pass only when it is pass 2 (else score_pass reports it, up to n).
                last = pool.submit(self._last_slice_pass, fitting, blocks, share, directions,
                                   None if directions is None else my_blocks)
            # Then the slice column's names, in the worker while this thread ranks.
            names = pool.submit(lambda: last.result().assignment.ids(labels))
            # The label-issue columns need only the statistics (and the neighbour scores): made while the
            # centroids are fitted (annotate_manifest is then told they are there).
            for name, v in neighbours.items():
                set_column(stats, name, v)
            add_label_issue_columns(stats)
            if directions is None:  # pass 2 on its own, beside the last pass
                df, used = ranked_after_pass_two()
                share.help()
                return df, used, _ScanSlices(last.result().assignment, names.result())
            # Pass 2 is the last pass's products. A hardness that weights none of its scores (the default) is
            # ranked first, while the centroids are fitted; the divergences are added after that pass.
            early = not set(weights_for_task(config.weights, self.task)) & set(DIVERGENCE_SCORES)
            if early:  # (the neighbour columns are in the statistics already)
                df, used = finalize_scores(stats, {}, config, self.task)
            share.help()
            products = last.result()
            assert products.sq is not None and products.dots is not None
            grad_scores = divergence_from_dots(products.sq, products.dots, labels, pop)
            if progress is not None:
                progress(n)
            if early:
                for name, v in grad_scores.items():
                    set_column(df, name, v)
            else:
                df, used = finalize_scores(stats, grad_scores, config, self.task)
            return df, used, _ScanSlices(products.assignment, names.result())

    @staticmethod
    def _last_slice_pass(
        fitting: Future[Any], blocks: Callable[[], Iterator[Block]], share: SharedPass, directions: np.ndarray | None,
        on_block: Callable[[int], None] | None,
    ) -> AssignedSlices:
        """The slices' last pass on the centroids of ``fitting`` (done: the same worker ran it), owned by the
        calling thread; ``share`` is closed whatever happens, so a thread waiting to help is never left waiting."""
        try:
            return assign_slices(fitting.result(), blocks, directions, share=share, on_block=on_block)
        finally:
            share.close()

    def _manifest_metadata(
        self, config: ScoreConfig, used: dict[str, float], k: int | None, ids: np.ndarray
    ) -> dict[str, Any]:
        """The scan's part of the manifest metadata (``finish_manifest`` adds the common part); ``ids``: the
        sample ids in scan order."""
        cfg = self.info["config"]
        # The index is content only when the neighbour scores came from it (when and whether it was built
        # otherwise is history, not content); its build time never is.
        index = None if k is None else {key: v for key, v in self.info["index"].items() if key != "build_s"}
        return {
            "task": self.task.value,
            "num_classes": self.num_classes,
            # Whether sample ids are the data's 0-based positions (ManifestSampler's dataset indices) or the
            # data's own ids (then the sampler needs dataset_ids).
            "sample_id_kind": "positions" if ids.dtype.kind in "iu" and np.array_equal(ids, np.arange(len(ids)))
            else "custom",
            "model_fingerprint": cfg["model_fingerprint"],
            "model_class": cfg["model_class"],
            "dataset_fingerprint": self.info["dataset_fingerprint"],
            "layers": cfg["layers"],
            "layers_requested": cfg["layers_requested"],
            "engine": self.info.get("extractor") or cfg["extractor"],
            "projection": {"dim": cfg["dim"], "out_dim": self.out_dim, "seed": cfg["seed"],
                           "kind": cfg["extractor"].get("projection")},
            "loss": self.info.get("loss_name") or loss_name(cfg["loss"], self.task.value),
            "targets": self.config.get("targets", "labels"),  # "predictions": an unlabelled scan
            "source": {"door": "scan", **(self.info.get("source") or {})},
            "class_names": (self.info.get("source") or {}).get("class_names"),
            "index": index,
            "score_config": config.to_dict(),
            "k_used": k,
            "hardness_weights_used": used,
            "scores": {name: s.to_dict() for name, s in SCORE_TABLE.items()},
        }


# The gradient scores that need classes: a causal-LM manifest leaves them out (the global ones stay).
CLASS_ONLY = ("class_divergence", "class_divergence_plain", "class_distance", "neighbor_disagreement")

# The columns that need true labels: null in an unlabelled scan (the targets were the model's predictions).
UNLABELLED_NULL = ("label", "correct", "confident_error", "near_miss", "neighbor_disagreement")


class _ScanSlices(NamedTuple):
    """A scan's slices: the assignment and its ``slice`` column (``SliceAssignment.ids`` of the labels)."""

    assignment: SliceAssignment
    names: np.ndarray


def _drop_label_columns(df: pd.DataFrame) -> None:
    n = len(df)
    df["label"] = pd.array([None] * n, dtype="Int64")
    for c in ("correct", "confident_error", "near_miss"):
        df[c] = pd.array([None] * n, dtype="boolean")
    df["neighbor_disagreement"] = np.full(n, np.nan)
