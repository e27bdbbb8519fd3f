"""Gradient shards: reading them back in row blocks (``ShardSet``) and filling them batch by batch
(``ShardWriter``).

A shard is ``shards/grads-NNNNN.npy`` (float32 ``(rows, out_dim)``, memory-mapped when read) plus
``shards/stats-NNNNN.parquet`` (one row of per-sample statistics per gradient row), recorded in the ledger
once both files are complete; a causal-LM scan writes the shard's token rows (``shards/tokens-NNNNN.parquet``,
``hardmine.lm``) first, so every recorded shard has them.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .ledger import Ledger, ShardRecord
from .store import ScanStore
from .worker import OrderedWorker

__all__ = ["BLOCK_ROWS", "Block", "ShardSet", "ShardWriter", "digest_of", "stats_table"]

logger = logging.getLogger(__name__)

# Rows per block in the index and scoring passes: their float64 working set is ~6 arrays of
# (BLOCK_ROWS, out_dim), so blocks smaller than a shard keep the peak low for wide projections.
BLOCK_ROWS = 2048

Block = tuple[int, np.ndarray]  # (first row, (rows, out_dim) float32)


class ShardSet:
    """The complete shards of a scan directory, read back in row order. ``gradients``: an in-memory copy of
    all rows ``(N, out_dim)`` to read from instead of the files."""

    def __init__(self, directory: Path, shards: Sequence[ShardRecord], gradients: np.ndarray | None = None) -> None:
        self.directory = directory
        self.shards = list(shards)
        self.gradients = gradients

    def blocks(self, max_rows: int = BLOCK_ROWS) -> Iterator[Block]:
        """``(first_row, z)`` in row order, at most ``max_rows`` rows each, sliced from the memory-mapped
        shards (or from the in-memory copy)."""
        for s in self.shards:
            r0, r1 = s.rows
            z = self.gradients[r0:r1] if self.gradients is not None else np.load(self.directory / s.grads, mmap_mode="r")
            for lo in range(0, r1 - r0, max_rows):
                yield r0 + lo, z[lo : lo + max_rows]

    def gather(self, rows: np.ndarray, out_dim: int) -> np.ndarray:
        """The gradient rows ``rows`` (any order) as ``(len(rows), out_dim)`` float32, in one pass."""
        out = np.empty((len(rows), out_dim), dtype=np.float32)
        for r0, z in self.blocks():
            m = (rows >= r0) & (rows < r0 + len(z))
            if m.any():
                out[m] = z[rows[m] - r0]
        return out

    def stats_table(self, columns: list[str] | None = None) -> pa.Table:
        """The per-sample statistics of every shard, in row order (only ``columns`` if given)."""
        # One dataset over the shards' files: Arrow reads them in parallel, and a table read of a dataset made
        # from a list of files keeps the files' order (Arrow's dataset docs), i.e. rows in scan order. Reading
        # them one by one took about twice as long at a million rows.
        files = [str(self.directory / s.stats) for s in self.shards]
        dataset = ds.dataset(files, format="parquet")
        if any(not f.physical_schema.equals(dataset.schema) for f in dataset.get_fragments()):
            # The dataset would cast every file to the first one's schema; shards that disagree are an error
            # (as concatenating them raises), not something to convert quietly.
            return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])
        return dataset.to_table(columns=columns)

    def sample_ids(self) -> np.ndarray:
        """All sample ids in row order: int64, or object holding ``str``."""
        return self.stats_table(["sample_id"]).column("sample_id").to_numpy(zero_copy_only=False)


class ShardWriter:
    """Buffers extracted batches and writes each shard (files, then the ledger entry) in a writer thread.

    ``flush`` cuts the buffered batches into the next shard and hands its writing to one worker thread, so the
    extraction goes on while the files are written and synced (numpy's file writes, Parquet and ``fsync``
    release the GIL). Shards are written in order; each one's ledger snapshot, taken at ``flush``, records it
    and every earlier shard, and is written only after its files, so ``progress.json`` never names a shard
    whose files are not complete. After a failed write nothing more is written (a later snapshot would name
    the failed shard); the failure surfaces at the next ``flush`` or at ``wait``. At most ``MAX_PENDING``
    shards wait for the writer (``flush`` blocks beyond that), which bounds the memory.

    The in-memory ``ledger.shards`` lists a shard from its ``flush`` on. Use it as a context manager (or call
    ``close`` in a ``finally``): ``wait`` waits until all are written, or raises; leaving the block (``close``)
    waits for the writes under way without raising, stops the thread and drops from ``ledger.shards`` what was
    not written.
    """

    MAX_PENDING = 2

    def __init__(
        self,
        store: ScanStore,
        ledger: Ledger,
        on_flush: Callable[[np.ndarray, pa.Table], None] | None = None,
    ) -> None:
        self.store = store
        self.ledger = ledger
        self.on_flush = on_flush  # called with each shard's gradients and statistics, in order
        self._z: list[np.ndarray] = []
        self._stats: list[dict[str, Any]] = []
        self._digests: list[str] = []
        self._tokens: list[pa.Table] = []  # causal-LM scans: the token rows of the buffered batches
        self._worker = OrderedWorker("hardmine-shards", self.MAX_PENDING, failure="a gradient shard was not written")
        self._written = len(ledger.shards)  # shards whose files and ledger entry are on disk
        self._failed = threading.Event()  # set by the first failed write: later ones are skipped

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def rows(self) -> int:
        """Rows buffered for the next shard."""
        return sum(len(z) for z in self._z)

    def add(self, z: np.ndarray, stats: dict[str, Any], digest: str, tokens: pa.Table | None = None) -> None:
        """One batch: its gradients ``(B, out_dim)``, per-sample statistics, data digest and (causal-LM
        scans) its rows of the token table."""
        if tokens is not None:
            self._tokens.append(tokens)
        self._z.append(z)
        self._stats.append(stats)
        self._digests.append(digest)

    def flush(self, first_batch: int, end_batch: int, rows_end: int) -> None:
        """Cut the buffered batches ``[first_batch, end_batch)`` (ending at row ``rows_end``) into the next
        shard and queue its writing; nothing happens when the buffer is empty."""
        if not self._z:
            return
        i = len(self.ledger.shards)
        z = np.concatenate(self._z)  # (shard rows, out_dim): one shard, the memory bound
        r0 = rows_end - len(z)
        tokens = pa.concat_tables(self._tokens) if self._tokens else None
        table = stats_table(self._stats)
        grads, stats = self.store.shard_files(i)
        self.ledger.shards.append(
            ShardRecord(i, (first_batch, end_batch), (r0, rows_end), digest_of(self._digests), grads, stats)
        )
        # progress.json once this shard's files are written, encoded now: the ledger changes as batches come
        snapshot = self.store.ledger_bytes(self.ledger)
        self._z, self._stats, self._digests, self._tokens = [], [], [], []
        self._worker.submit(self._write, i, z, table, tokens, snapshot)  # a failed write surfaces at a later one
        if self.on_flush is not None:
            self.on_flush(z, table)

    def _write(self, i: int, z: np.ndarray, table: pa.Table, tokens: pa.Table | None, snapshot: bytes) -> None:
        if self._failed.is_set():
            raise RuntimeError(f"shard {i} not written: an earlier shard's write failed")
        try:
            if tokens is not None:  # before the ledger records the shard (see ScanStore.write_token_part)
                self.store.write_token_part(i, tokens)
            self.store.write_shard(i, z, table)
            self.store.write_ledger(snapshot)
        except BaseException:
            self._failed.set()
            raise
        self._written = i + 1
        logger.debug("wrote shard %d: rows %d-%d", i, *self.ledger.shards[i].rows)

    def wait(self) -> None:
        """Wait until every flushed shard is written; raises the first failed write."""
        self._worker.wait()

    def close(self) -> None:
        """Wait for the writes under way (their shards are complete data: a resumed scan keeps them), without
        raising, stop the thread, and drop from ``ledger.shards`` the shards that were not written. Call it
        whether or not ``wait`` was."""
        try:
            self._worker.close(finish=True)
        finally:  # also after a second Ctrl-C while waiting
            del self.ledger.shards[self._written :]


def digest_of(digests: list[str]) -> str:
    """The digest of a run of batches: sha256 over their digests, in order."""
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def stats_table(stats: list[dict[str, Any]]) -> pa.Table:
    """Per-batch statistics (column -> per-sample array) as one Arrow table; ``correct`` becomes a nullable
    bool, string ids a string column."""
    cols: dict[str, pa.Array] = {}
    for name in stats[0]:
        if name == "correct":
            values = pd.array(np.concatenate([np.asarray(s[name], dtype=object) for s in stats]), dtype="boolean")
            cols[name] = pa.array(values, type=pa.bool_())
        elif name == "sample_id" and stats[0][name].dtype == object:
            cols[name] = pa.array([str(v) for s in stats for v in s[name]], type=pa.string())
        else:
            cols[name] = pa.array(np.concatenate([np.asarray(s[name]) for s in stats]))
    return pa.table(cols)
