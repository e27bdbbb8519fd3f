"""The streaming driver: batches -> projected gradients on disk -> FAISS index -> scores -> manifest.

``scan(model, data, out=...)`` iterates ``data`` once, extracts and projects per-sample gradients per batch
(``GradientExtractor``), and streams them to shards in ``out/`` as it goes; then builds the index and scores
in passes over the shards. Memory is bounded by the shard (``shard_rows`` samples, default 8192) and the
batch, not by N: gradients are never concatenated unless ``keep_gradients_in_memory=True``. What *is* held
for all N samples are the per-sample scalars needed for a global ranking: measured peak growth ~370 bytes
per sample at 1M samples (``scripts/bench_scan.py``), whatever the projection width. An IVF index also
trains on a sample of ``40·nlist ≈ 160·sqrt(N)`` rows (hardmine.index).

Output directory::

    out/
      scan.json                 config, provenance, timings, index info (JSON, atomic)
      progress.json             ledger of complete shards, for resuming (JSON, atomic)
      shards/grads-00000.npy    projected gradients of one shard, float32 (rows, out_dim)
      shards/stats-00000.parquet  per-sample sample_id, label, loss, grad_norm and output statistics
      index.faiss               FAISS index of the unit gradients (+ index.ivfdata for IVF)
      manifest.parquet          the ranked manifest (hardmine.manifest)
      ranks/00001/...           a distributed scan's per-rank progress.json and shards/ (hardmine.scan.distributed)
      tokens.parquet            causal-LM scans: one row per token (hardmine.lm), streamed from the
                                per-shard parts shards/tokens-00000.parquet written with each shard

Gradients are stored as float32, not float16: per-sample gradients span many orders of magnitude (float16
underflows below 6e-8 and overflows above 65504, and its 11-bit mantissa would blur the cosines the scores
are made of), FAISS needs float32 anyway, and ``np.load(mmap_mode="r")`` hands float32 shards to the passes
with no conversion. Cost: ``4 · out_dim`` bytes per sample on disk.

Resuming: each shard's files are written atomically, then recorded in ``progress.json``. A rerun with the
same model, data order and settings skips the recorded batches (it still reads them to check, by hash,
that they are the same data) and continues from the first unrecorded one, so an interrupted scan (even
``kill -9``) ends with the same manifest as an uninterrupted one. A different configuration in a non-empty
``out`` is refused (``overwrite=True`` replaces it); the manifest is only written, atomically, at the end.

Modules: ``driver`` (``scan``, ``ScanProgress``), ``task`` (which task and loss a scan runs), ``extraction`` (the batch pass), ``store`` (the directory:
prepare, resume, atomic writes), ``ledger`` (``progress.json`` as a dataclass), ``shards`` (``ShardSet.blocks``
to read gradients back, ``ShardWriter`` to write them), ``population`` (pass 1 of the scores beside the
extraction), ``worker`` (their background threads), ``result`` (``Scan``, ``Neighbors``) and ``distributed``
(several processes under torchrun: which rows each rank scans, what the ranks exchange).

``hardmine.scan`` the attribute is the ``scan`` function (``hardmine/__init__`` imports it over the
package); ``import hardmine.scan`` and ``from hardmine.scan import ...`` reach this package.
"""

from __future__ import annotations

from .driver import DEFAULT_SHARD_ROWS, ProgressFn, ScanProgress, scan
from .ledger import Ledger, ShardRecord
from .result import Neighbors, Scan
from .shards import BLOCK_ROWS, ShardSet
from .store import MANIFEST_FILE, PROGRESS_FILE, SCAN_FILE, SCAN_FORMAT_VERSION, SHARDS_DIR, ScanStore

__all__ = [
    "scan",
    "Scan",
    "ScanProgress",
    "Neighbors",
    "SCAN_FILE",
    "MANIFEST_FILE",
    "DEFAULT_SHARD_ROWS",
    "BLOCK_ROWS",
    "PROGRESS_FILE",
    "SCAN_FORMAT_VERSION",
    "SHARDS_DIR",
    "Ledger",
    "ProgressFn",
    "ScanStore",
    "ShardRecord",
    "ShardSet",
]
