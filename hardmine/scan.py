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

Gradients are stored as float32, not float16: per-sample gradients span many orders of magnitude (float16
underflows below 6e-8 and overflows above 65504, and its 11-bit mantissa would blur the cosines the scores
are made of), FAISS needs float32 anyway, and ``np.load(mmap_mode="r")`` hands float32 shards to the passes
with no conversion. Cost: ``4 · out_dim`` bytes per sample on disk.

Resuming: each shard's files are written atomically, then recorded in ``progress.json``. A rerun with the
same model, data order and settings skips the recorded batches (it still reads them to check, by hash,
that they are the same data) and continues from the first unrecorded one, so an interrupted scan (even
``kill -9``) ends with the same manifest as an uninterrupted one. A different configuration in a non-empty
``out`` is refused (``overwrite=True`` replaces it); the manifest is only written, atomically, at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from ._io import (
    DatasetHasher,
    atomic_path,
    atomic_save_npy,
    atomic_write_json,
    model_fingerprint,
    remove_stale_temporaries,
)
from ._version import __version__
from .batches import check_labels, infer_task, input_leaves, sample_ids, split_batch_ids, to_device
from .checks import as_bool, is_int, non_negative_int, positive_int
from .engine import GradientExtractor
from .enums import (
    Engine,
    IndexKind,
    ProjectionKind,
    Randomness,
    ScanPhase,
    Strategy,
    TaskKind,
    parse_choice,
)
from .index import INDEX_FILE, IVFDATA_FILE, IndexInfo, build_index, knn_block, open_index, search
from .losses import resolve_loss
from .manifest import (
    FORMAT_VERSION,
    MANIFEST_FORMAT,
    compute_weights,
    read_manifest,
    resolve_strategy,
    write_manifest,
)
from .score import SCORE_TABLE, ScoreConfig, finalize_scores, population_pass, score_pass, unit_rows

__all__ = ["scan", "Scan", "ScanProgress", "Neighbors", "SCAN_FILE", "MANIFEST_FILE", "DEFAULT_SHARD_ROWS"]

logger = logging.getLogger(__name__)

SCAN_FILE = "scan.json"
PROGRESS_FILE = "progress.json"
SHARDS_DIR = "shards"
MANIFEST_FILE = "manifest.parquet"
DEFAULT_SHARD_ROWS = 8192
# Rows per block in the index and scoring passes: their float64 working set is ~6 arrays of
# (BLOCK_ROWS, out_dim), so blocks smaller than a shard keep the peak low for wide projections.
BLOCK_ROWS = 2048
SCAN_FORMAT_VERSION = 1
_OWNED = (SCAN_FILE, PROGRESS_FILE, SHARDS_DIR, INDEX_FILE, IVFDATA_FILE, "index.ivfdata.path", MANIFEST_FILE)


@dataclass(frozen=True)
class ScanProgress:
    """One progress report: ``done`` of ``total`` samples in ``phase`` (``total`` None when unknown)."""

    phase: ScanPhase
    done: int
    total: int | None


ProgressFn = Callable[[ScanProgress], None]


class Neighbors(NamedTuple):
    """Result of ``Scan.neighbors``: ``(q, k)`` arrays; missing neighbours have row -1 and similarity NaN."""

    sample_ids: np.ndarray
    similarities: np.ndarray
    rows: np.ndarray


# ------------------------------------------------------------------------------------------- the driver
def scan(
    model: nn.Module,
    data: Iterable[Any],
    *,
    out: str | os.PathLike[str],
    layers: str | Sequence[str] | None = None,
    dim: int = 256,
    seed: int = 0,
    engine: Engine | str = Engine.AUTO,
    loss_fn: Any = None,
    num_classes: int | None = None,
    projection: ProjectionKind | str = ProjectionKind.RADEMACHER,
    randomness: Randomness | str = Randomness.EVAL,
    chunk_size: int | None = None,
    score_config: ScoreConfig | None = None,
    index: IndexKind | str = IndexKind.AUTO,
    resume: bool = True,
    overwrite: bool = False,
    keep_gradients_in_memory: bool = False,
    progress: ProgressFn | None = None,
    total: int | None = None,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    provenance: Mapping[str, Any] | None = None,
    config_extra: Mapping[str, Any] | None = None,
) -> Scan:
    """Scan ``data`` with ``model`` and write gradients, index, scores and ``manifest.parquet`` to ``out``.

    Args:
        model: a trained ``nn.Module`` (left unchanged; batches are moved to its parameters' device).
        data: a ``DataLoader`` or any iterable of batches ``(x, y)``, ``(x, y, sample_ids)`` or mappings
            with ``labels`` (and optionally ``sample_id``). Ids are ints or strings, unique across the
            data; default: the running 0-based position. The order must be deterministic to resume.
        out: the scan directory (created if missing).
        layers, dim, seed, engine, loss_fn, projection, randomness, chunk_size: passed to
            ``GradientExtractor`` (``dim`` per selected parameter tensor; ``out_dim`` in total).
        num_classes: for classification, check the model outputs this many classes.
        score_config: scoring and default-export settings (``ScoreConfig()``).
        index: ``"auto"``, ``"flat"``, ``"ivf"`` or ``"hnsw"`` (``hardmine.index``).
        resume: continue an interrupted scan of the same configuration in ``out`` (and reuse a complete
            one); ``False`` refuses a partial scan instead.
        overwrite: replace a scan with a different configuration in ``out``.
        keep_gradients_in_memory: also keep all projected gradients in RAM (``Scan.gradients()``).
        progress: called with a ``ScanProgress`` after every batch, index block and score block.
        total: number of samples, for progress (default: ``len(data.dataset)`` for a DataLoader).
        shard_rows: samples per gradient shard (the memory bound and the resume granularity).
        provenance: extra JSON-able facts about the inputs (checkpoint path, data source...), recorded in
            ``scan.json`` and under ``source`` in the manifest metadata; not part of the resume check.
        config_extra: extra JSON-able settings that define the scan (the CLI passes its data options: file,
            format, split, limit, columns, input shape); recorded in the config, so a rerun into the same
            ``out`` with different values is refused like any other configuration change.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    _check_data(data)
    as_bool(resume, "resume")
    as_bool(overwrite, "overwrite")
    as_bool(keep_gradients_in_memory, "keep_gradients_in_memory")
    shard_rows = positive_int(shard_rows, "shard_rows")
    num_classes = positive_int(num_classes, "num_classes", allow_none=True)
    total = non_negative_int(total, "total", allow_none=True)
    if provenance is not None and not isinstance(provenance, Mapping):
        raise ValueError(f"provenance={provenance!r} must be a mapping of JSON-able values, or None.")
    if config_extra is not None and not isinstance(config_extra, Mapping):
        raise ValueError(f"config_extra={config_extra!r} must be a mapping of JSON-able values, or None.")
    if progress is not None and not callable(progress):
        raise ValueError(f"progress={progress!r} must be a callable taking a ScanProgress, or None.")
    score_config = ScoreConfig() if score_config is None else score_config
    if not isinstance(score_config, ScoreConfig):
        raise ValueError(f"score_config must be a hardmine.ScoreConfig, got {type(score_config).__name__}.")
    index_kind = parse_choice(IndexKind, index, "index")
    extractor = GradientExtractor(
        model, layers=layers, dim=dim, seed=seed, engine=engine, loss_fn=loss_fn, kind=projection,
        chunk_size=chunk_size, randomness=randomness,
    )
    if total is None and isinstance(data, DataLoader):
        try:
            total = len(data.dataset)  # type: ignore[arg-type]
        except TypeError:
            total = None
    config = {
        "format_version": SCAN_FORMAT_VERSION,
        "model_fingerprint": model_fingerprint(model),
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "layers_requested": layers if layers is None or isinstance(layers, str) else list(layers),
        "layers": list(extractor.param_names),
        "dim": extractor.layout.dim,
        "seed": extractor.layout.seed,
        "engine_requested": parse_choice(Engine, engine, "engine").value,
        "extractor": extractor.metadata(),
        "loss": loss_fn if loss_fn is None or isinstance(loss_fn, str) else getattr(loss_fn, "__qualname__", repr(loss_fn)),
        "randomness": parse_choice(Randomness, randomness, "randomness").value,
        "num_classes_requested": num_classes,
        "shard_rows": shard_rows,
    }
    for key, value in _jsonable(dict(config_extra or {})).items():
        config[f"extra.{key}"] = value  # flat keys, so a refused rerun names exactly what changed
    directory = _prepare_out(Path(out), config, resume=resume, overwrite=overwrite)
    driver = _Driver(directory, extractor, config, loss_fn, num_classes, shard_rows, keep_gradients_in_memory, progress, total)
    driver.source = _jsonable(dict(provenance)) if provenance is not None else None
    return driver.run(data, score_config, index_kind)


def _check_data(data: Any) -> None:
    if isinstance(data, (torch.Tensor, np.ndarray, str, bytes)) or not isinstance(data, Iterable):
        raise ValueError(
            f"data must be a DataLoader or an iterable of batches, got {type(data).__name__}; wrap tensors in a "
            "DataLoader(TensorDataset(x, y), batch_size=...) or a list of (x, y) batches."
        )
    if isinstance(data, (tuple, list)) and data and all(isinstance(v, torch.Tensor) for v in data):
        raise ValueError(
            "data looks like a single batch (a tuple/list of tensors); pass an iterable of batches, e.g. [(x, y)]."
        )


def _prepare_out(directory: Path, config: dict[str, Any], *, resume: bool, overwrite: bool) -> Path:
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"out={str(directory)!r} exists and is not a directory.")
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(directory)
    if (directory / SHARDS_DIR).is_dir():
        remove_stale_temporaries(directory / SHARDS_DIR)
    for p in directory.glob(".tmp-*"):  # directories a killed index build left
        shutil.rmtree(p, ignore_errors=True)
    entries = [p.name for p in directory.iterdir()]
    if not entries:
        return directory
    scan_file = directory / SCAN_FILE
    if not scan_file.is_file():
        raise ValueError(
            f"out={str(directory)!r} is not empty ({sorted(entries)[:5]}) and holds no hardmine scan; choose an "
            "empty or new directory."
        )
    if overwrite:
        for name in _OWNED:
            p = directory / name
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        return directory
    old = _read_json(scan_file).get("config", {})
    diff = sorted(k for k in set(old) | set(config) if _jsonable(old.get(k)) != _jsonable(config.get(k)))
    if diff:
        details = "; ".join(f"{k}: {_short(old.get(k))} -> {_short(config.get(k))}" for k in diff[:4])
        raise ValueError(
            f"out={str(directory)!r} holds a scan with a different configuration ({details}); pass "
            "overwrite=True (--overwrite on the command line) to replace it, or choose another directory."
        )
    if not resume:
        raise ValueError(
            f"out={str(directory)!r} already holds a scan with this configuration; pass resume=True to continue "
            "or reuse it, or overwrite=True to start again."
        )
    return directory


def _short(v: Any, limit: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not readable JSON ({exc}); the scan directory is damaged.") from None


def _provenance() -> dict[str, Any]:
    return {
        "hardmine_version": __version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "faiss_version": getattr(faiss, "__version__", "unknown"),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


class _Driver:
    """One run of ``scan``: extraction with resume, then index, scores and manifest."""

    def __init__(
        self,
        directory: Path,
        extractor: GradientExtractor,
        config: dict[str, Any],
        loss_fn: Any,
        num_classes: int | None,
        shard_rows: int,
        keep: bool,
        progress: ProgressFn | None,
        total: int | None,
    ) -> None:
        self.dir = directory
        self.extractor = extractor
        self.config = config
        self.loss_fn = loss_fn
        self.num_classes = num_classes
        self.shard_rows = shard_rows
        self.keep = keep
        self.progress = progress
        self.total = total
        self.device = next(iter(extractor.model.parameters())).device
        prog_path = directory / PROGRESS_FILE
        self.ledger: dict[str, Any] = _read_json(prog_path) if prog_path.is_file() else {"shards": [], "complete": False}
        self.scan_info: dict[str, Any] = _read_json(directory / SCAN_FILE) if (directory / SCAN_FILE).is_file() else {}
        self.source: dict[str, Any] | None = None

    def _report(self, phase: ScanPhase, done: int, total: int | None) -> None:
        if self.progress is not None:
            self.progress(ScanProgress(phase, done, total))

    def _write_scan_info(self, **updates: Any) -> None:
        self.scan_info.update(updates)
        self.scan_info["config"] = self.config
        self.scan_info["provenance"] = _provenance()
        self.scan_info["source"] = self.source
        atomic_write_json(self.dir / SCAN_FILE, self.scan_info)

    # ---------------------------------------------------------------------------------------- run
    def run(self, data: Iterable[Any], score_config: ScoreConfig, index_kind: IndexKind) -> Scan:
        t0 = time.perf_counter()
        scoring = {"score_config": score_config.to_dict(), "index_requested": index_kind.value}
        reuse = (
            bool(self.ledger.get("complete")) and self.scan_info.get("status") == "complete"
            and _jsonable(self.scan_info.get("scoring")) == _jsonable(scoring) and (self.dir / MANIFEST_FILE).is_file()
        )
        if not self.scan_info:
            self._write_scan_info(status="extracting", started=_now())
        gradients = self._extract(data)  # on a complete scan: only checks the data is the same
        t_extract = time.perf_counter() - t0
        if reuse:
            logger.info("%s: complete scan with the same configuration found; reusing it", self.dir)
            return Scan.open(self.dir, gradients=gradients)
        self._write_scan_info(status="extracted", **self._summary())
        n = int(self.ledger["n_samples"])
        dim = self.extractor.out_dim
        scan_obj = Scan(self.dir, self.scan_info, gradients)
        (self.dir / MANIFEST_FILE).unlink(missing_ok=True)  # a stale manifest must not outlive new scores
        t1 = time.perf_counter()
        info = build_index(
            scan_obj._blocks, n, dim, self.dir, kind=index_kind, seed=int(self.config["seed"]),
            on_block=lambda done: self._report(ScanPhase.INDEX, done, n),
        )
        t_index = time.perf_counter() - t1
        self._write_scan_info(status="scoring", index=info.to_dict(), **self._summary())
        scan_obj = Scan(self.dir, self.scan_info, gradients)
        t2 = time.perf_counter()
        scan_obj._score_and_write(score_config, progress=lambda done: self._report(ScanPhase.SCORE, done, n))
        t_score = time.perf_counter() - t2
        timings = dict(self.scan_info.get("timings", {}))
        timings.update(
            extract_s=round(t_extract, 3), index_s=round(t_index, 3), score_s=round(t_score, 3),
            total_s=round(time.perf_counter() - t0, 3),
            extract_samples_per_s=round(self._extracted_now / t_extract, 1) if self._extracted_now and t_extract > 0 else None,
        )
        self._write_scan_info(status="complete", finished=_now(), scoring=scoring, timings=timings, **self._summary())
        return Scan.open(self.dir, gradients=gradients)

    def _summary(self) -> dict[str, Any]:
        keys = ("n_samples", "n_batches", "task", "num_classes", "id_kind", "dataset_fingerprint", "out_dim", "extractor")
        return {k: self.ledger.get(k) for k in keys} | {"shards": self.ledger["shards"]}

    # ---------------------------------------------------------------------------------- extraction
    def _extract(self, data: Iterable[Any]) -> np.ndarray | None:
        done_shards: list[dict[str, Any]] = list(self.ledger.get("shards", []))
        done_batches = done_shards[-1]["batches"][1] if done_shards else 0
        done_rows = done_shards[-1]["rows"][1] if done_shards else 0
        if done_batches:
            logger.info("%s: resuming after %d complete batches (%d samples)", self.dir, done_batches, done_rows)
        hasher = DatasetHasher()
        user_ids = False
        kept: list[np.ndarray] = []
        if self.keep and done_shards:
            kept.extend(np.load(self.dir / s["grads"]) for s in done_shards)
        buf_z: list[np.ndarray] = []
        buf_stats: list[dict[str, Any]] = []
        buf_digests: list[str] = []
        shard_digests: list[str] = []
        rows = 0
        batch_i = -1
        shard_i = 0  # next recorded shard to check while skipping
        shard_start_batch = done_batches
        self._extracted_now = 0
        (self.dir / SHARDS_DIR).mkdir(exist_ok=True)
        shuffled = isinstance(data, DataLoader) and isinstance(getattr(data, "sampler", None), RandomSampler)
        for batch_i, batch in enumerate(data):
            where = f"batch {batch_i}"
            inputs, target, ids = split_batch_ids(batch, where)
            b = int(target.shape[0])
            if batch_i == 0 and shuffled:
                if ids is None:
                    raise ValueError(
                        "data is a DataLoader with shuffle=True and the batches carry no sample ids, so sample_id "
                        "(the position) would not identify samples; use shuffle=False or yield (x, y, ids)."
                    )
                logger.warning("data is shuffled: the dataset fingerprint and resuming need a fixed order")
            id_arr = np.arange(rows, rows + b, dtype=np.int64) if ids is None else sample_ids(ids, b, where)[0]
            user_ids = user_ids or ids is not None
            self._check_ids(id_arr, where)
            digest = hasher.update(id_arr, target, input_leaves(inputs))
            if batch_i < done_batches:  # recorded in a complete shard: only check it is the same data
                shard_digests.append(digest)
                rec = done_shards[shard_i]
                if batch_i + 1 == rec["batches"][1]:
                    if _digest_of(shard_digests) != rec["digest"] or rows + b != rec["rows"][1]:
                        raise ValueError(
                            f"the data differs from the interrupted scan in {self.dir} at batches "
                            f"{rec['batches'][0]}-{rec['batches'][1] - 1} (shard {shard_i}): different samples, "
                            "order or batch size. Rerun with the same data and batch size, or overwrite=True."
                        )
                    shard_digests = []
                    shard_i += 1
                rows += b
                self._report(ScanPhase.EXTRACT, rows, self.total)
                continue
            if self.ledger.get("complete"):
                raise ValueError(
                    f"the data has more batches than the complete scan in {self.dir} ({done_batches}); rerun with "
                    "the same data, or overwrite=True."
                )
            inputs, target_dev = to_device(inputs, self.device), to_device(target, self.device)
            pb = self.extractor((inputs, target_dev))
            # The plan in use (auto may move a module to vmap after probing the first batch).
            self.ledger["extractor"] = self.extractor.metadata()
            z = pb.z.detach().to("cpu", torch.float32).numpy()  # (B, out_dim)
            stats = self._batch_stats(id_arr, target, pb, where)
            buf_z.append(z)
            buf_stats.append(stats)
            buf_digests.append(digest)
            if self.keep:
                kept.append(z)
            rows += b
            self._extracted_now += b
            self._report(ScanPhase.EXTRACT, rows, self.total)
            if sum(len(a) for a in buf_z) >= self.shard_rows:
                self._flush(buf_z, buf_stats, buf_digests, shard_start_batch, batch_i + 1, rows)
                shard_start_batch = batch_i + 1
                buf_z, buf_stats, buf_digests = [], [], []
        n_batches = batch_i + 1
        if n_batches < done_batches:
            raise ValueError(
                f"data ended after {n_batches} batches, but the interrupted scan in {self.dir} had already "
                f"recorded {done_batches}; rerun with the same data, or overwrite=True."
            )
        if buf_z:
            self._flush(buf_z, buf_stats, buf_digests, shard_start_batch, n_batches, rows)
        if rows == 0:
            raise ValueError("data yielded no batches; nothing to scan.")
        if user_ids:
            self._check_unique_ids()
        fingerprint = hasher.hexdigest()
        if self.ledger.get("complete") and self.ledger.get("dataset_fingerprint") != fingerprint:
            raise ValueError(
                f"the data's fingerprint differs from the complete scan in {self.dir}; rerun with the same data, "
                "or overwrite=True."
            )
        self.ledger.update(
            complete=True, n_samples=rows, n_batches=n_batches, dataset_fingerprint=fingerprint,
            out_dim=self.extractor.out_dim,
        )
        atomic_write_json(self.dir / PROGRESS_FILE, self.ledger)
        return np.concatenate(kept) if self.keep else None

    def _check_ids(self, ids: np.ndarray, where: str) -> None:
        kind = "int" if ids.dtype.kind in "iu" else "str"
        if self.ledger.setdefault("id_kind", kind) != kind:
            raise ValueError(f"{where}: sample ids switch between integers and strings; use one kind throughout.")
        dup = pd.Index(ids).duplicated()
        if dup.any():
            raise ValueError(f"{where}: sample_id {ids[dup][0]!r} appears more than once; sample ids must be unique.")

    def _check_unique_ids(self) -> None:
        # Across batches, checked once at the end from the shards: a set of N Python objects would cost
        # ~70 bytes per sample during the whole extraction.
        tables = [pq.read_table(self.dir / s["stats"], columns=["sample_id"]) for s in self.ledger["shards"]]
        ids = pd.Index(pa.concat_tables(tables).column("sample_id").to_numpy(zero_copy_only=False))
        if ids.has_duplicates:
            dup = ids[ids.duplicated()][0]
            raise ValueError(
                f"sample_id {dup!r} appears more than once in the data; sample ids must be unique. Fix the id "
                "column and rerun with overwrite=True."
            )

    def _batch_stats(self, ids: np.ndarray, target: torch.Tensor, pb: Any, where: str) -> dict[str, Any]:
        from .score import classification_stats, regression_stats

        output = pb.output.detach().to("cpu")
        task = infer_task(resolve_loss(self.loss_fn, target)[1], target, output)
        prev = self.ledger.get("task")
        if prev is not None and prev != task.value:
            raise ValueError(f"{where}: targets look like {task.value} but earlier batches were {prev}.")
        self.ledger["task"] = task.value
        b = len(ids)
        tgt = target.detach().to("cpu")
        if task is TaskKind.CLASSIFICATION:
            c = int(output.shape[1])
            if self.num_classes is not None and c != self.num_classes:
                raise ValueError(f"{where}: the model outputs {c} classes but num_classes={self.num_classes}.")
            if self.ledger.get("num_classes") not in (None, c):
                raise ValueError(f"{where}: the model output has {c} classes, earlier batches had {self.ledger['num_classes']}.")
            check_labels(tgt, c, where)
            lab = tgt.numpy().astype(np.int64)
            self.ledger["num_classes"] = c
            stats = classification_stats(output.numpy(), lab)
            label: np.ndarray = lab
        else:
            flat = tgt.reshape(b, -1).to(torch.float64).numpy()  # (B, outputs)
            label = flat[:, 0].copy() if flat.shape[1] == 1 else np.full(b, np.nan)
            stats = regression_stats(output.numpy())
        return {
            "sample_id": ids,
            "label": label,
            "loss": pb.loss.detach().to("cpu", torch.float64).numpy(),
            "grad_norm": pb.grad_norm.detach().to("cpu", torch.float64).numpy(),
            **stats,
        }

    def _flush(
        self, zs: list[np.ndarray], stats: list[dict[str, Any]], digests: list[str], b0: int, b1: int, rows_end: int
    ) -> None:
        i = len(self.ledger["shards"])
        z = np.concatenate(zs)  # (shard rows, out_dim): one shard, the memory bound
        r0 = rows_end - len(z)
        grads = f"{SHARDS_DIR}/grads-{i:05d}.npy"
        stats_name = f"{SHARDS_DIR}/stats-{i:05d}.parquet"
        atomic_save_npy(self.dir / grads, z)
        table = _stats_table(stats)
        with atomic_path(self.dir / stats_name) as tmp:
            pq.write_table(table, tmp)
        self.ledger["shards"].append(
            {"index": i, "batches": [b0, b1], "rows": [r0, rows_end], "digest": _digest_of(digests),
             "grads": grads, "stats": stats_name}
        )
        atomic_write_json(self.dir / PROGRESS_FILE, self.ledger)
        logger.debug("wrote shard %d: rows %d-%d", i, r0, rows_end)


def _digest_of(digests: list[str]) -> str:
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def _stats_table(stats: list[dict[str, Any]]) -> pa.Table:
    cols: dict[str, pa.Array] = {}
    for name in stats[0]:
        if name == "correct":
            cols[name] = pa.array(pd.array(np.concatenate([np.asarray(s[name], dtype=object) for s in stats]), dtype="boolean"), type=pa.bool_())
        elif name == "sample_id" and stats[0][name].dtype == object:
            cols[name] = pa.array([str(v) for s in stats for v in s[name]], type=pa.string())
        else:
            cols[name] = pa.array(np.concatenate([np.asarray(s[name]) for s in stats]))
    return pa.table(cols)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------- Scan
class Scan:
    """A scan directory: gradients, index, scores and manifest. Reopen one with ``Scan.open(path)``."""

    def __init__(self, path: str | os.PathLike[str], info: dict[str, Any], gradients: np.ndarray | None = None) -> None:
        self.path = Path(path)
        self.info = info
        self._gradients = gradients
        self._index: Any = None
        self._id_rows: dict[Any, int] | None = None
        self._ids: np.ndarray | None = None

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, gradients: np.ndarray | None = None) -> Scan:
        """Reopen a complete scan directory."""
        p = Path(path)
        f = p / SCAN_FILE
        if not f.is_file():
            raise ValueError(f"{p} is not a hardmine scan directory (no {SCAN_FILE}); run hardmine.scan first.")
        info = _read_json(f)
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
    def dim(self) -> int:
        """Total projected dimension (``out_dim``) of the stored gradients."""
        return int(self.info["out_dim"])

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
    def index_info(self) -> IndexInfo:
        return IndexInfo.from_dict(self.info["index"])

    def __repr__(self) -> str:
        return f"Scan({str(self.path)!r}, n_samples={self.info.get('n_samples')}, dim={self.info.get('out_dim')})"

    def manifest(self) -> pd.DataFrame:
        """The ranked manifest (``read_manifest(scan.path / "manifest.parquet")``)."""
        return read_manifest(self.manifest_path)

    def stats(self) -> pd.DataFrame:
        """Per-sample statistics recorded during extraction, in scan order (one row per sample)."""
        table = pa.concat_tables([pq.read_table(self.path / s["stats"]) for s in self.info["shards"]])
        # Free each Arrow column as it is converted: the frame is not held twice at a million rows.
        df = table.to_pandas(self_destruct=True, split_blocks=True)
        del table
        df["correct"] = df["correct"].astype("boolean")
        return df

    def _blocks(self, max_rows: int = BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """``(first_row, z)`` in row order, at most ``max_rows`` rows each, sliced from the memory-mapped
        shards (or from the in-memory copy)."""
        for s in self.info["shards"]:
            r0, r1 = s["rows"]
            z = self._gradients[r0:r1] if self._gradients is not None else np.load(self.path / s["grads"], mmap_mode="r")
            for lo in range(0, r1 - r0, max_rows):
                yield r0 + lo, z[lo : lo + max_rows]

    def iter_gradients(self, max_rows: int = BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """Stream the projected gradients: ``(first_row, (rows, dim) float32)``, ``max_rows`` at a time."""
        return self._blocks(max_rows)

    def gradients(self) -> np.ndarray:
        """All projected gradients ``(N, dim)``: the in-memory copy if the scan kept one, else loaded from the
        shards now (``4 · N · dim`` bytes of RAM; prefer ``iter_gradients`` for large scans)."""
        if self._gradients is None:
            return np.concatenate([np.asarray(z) for _, z in self._blocks()])  # (N, dim)
        return self._gradients

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        for r0, z in self._blocks():
            m = (rows >= r0) & (rows < r0 + len(z))
            if m.any():
                out[m] = z[rows[m] - r0]
        return out

    def sample_ids(self) -> np.ndarray:
        if self._ids is None:
            tables = [pq.read_table(self.path / s["stats"], columns=["sample_id"]) for s in self.info["shards"]]
            self._ids = pa.concat_tables(tables).column("sample_id").to_numpy(zero_copy_only=False)
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
        """The FAISS index (loaded once; IVF lists stay memory-mapped)."""
        if self._index is None:
            self._index = open_index(self.path, self.index_info)
        return self._index

    # ------------------------------------------------------------------------------------ queries
    def neighbors(self, query: Any, k: int = 10, *, absolute: bool = False) -> Neighbors:
        """Nearest neighbours by cosine of projected gradients.

        ``query``: float vectors ``(dim,)`` / ``(q, dim)`` (array or tensor), or sample ids (an int or str, or a
        sequence / integer array of them). Querying by id excludes the sample itself. Returns ``(q, k)``
        sample ids, similarities (signed cosine) and rows.

        ``absolute=True`` ranks by ``|cos|`` instead: the neighbours ``neighbor_disagreement`` counts (a
        gradient pointing the opposite way is as informative about the label as an aligned one); the
        similarities stay signed, so anti-aligned neighbours show as negative.
        """
        positive_int(k, "k")
        as_bool(absolute, "absolute")
        vectors, self_rows = self._query_vectors(query)
        limit = self.n_samples - (1 if self_rows is not None else 0)
        if k > limit:
            raise ValueError(f"k={k} is larger than the {limit} other samples in the scan; use k <= {limit}.")
        u = np.ascontiguousarray(unit_rows(vectors)[0], dtype=np.float32)  # (q, dim)
        info = self.index_info
        if absolute:
            # No real row is -1, so a vector query excludes nothing; knn_block merges the searches of u and -u.
            own = self_rows if self_rows is not None else np.full(len(u), -1, dtype=np.int64)
            rows = knn_block(self.index(), info, u, own, k).abs_rows  # (q, k)
            found = np.maximum(rows, 0)
            z = unit_rows(self._gather(found.reshape(-1)))[0].reshape(*rows.shape, -1)  # (q, k, dim)
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
            rows = self.rows_of(arr.reshape(-1).tolist())
            return self._gather(rows), rows
        if arr.dtype.kind != "f":
            raise ValueError(f"query of dtype {arr.dtype} is not understood; pass float vectors or sample ids.")
        arr = arr.reshape(1, -1) if arr.ndim == 1 else arr
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(f"query vectors have shape {tuple(arr.shape)}; they need {self.dim} columns (the scan's dim).")
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
        if index is not None:
            kind = parse_choice(IndexKind, index, "index")
            self._index = None
            info = build_index(self._blocks, self.n_samples, self.dim, self.path, kind=kind, seed=int(self.config["seed"]))
            self.info["index"] = info.to_dict()
        df = self._score_and_write(score_config)
        self.info["scoring"] = {
            "score_config": score_config.to_dict(),
            "index_requested": index if index is not None else self.info.get("scoring", {}).get("index_requested"),
        }
        atomic_write_json(self.path / SCAN_FILE, self.info)
        return df

    def export(self, **kwargs: Any) -> pd.DataFrame:
        """``hardmine.export_manifest(self, **kwargs)``."""
        from .manifest import export_manifest

        return export_manifest(self, **kwargs)

    def _score_and_write(self, config: ScoreConfig, progress: Callable[[int], None] | None = None) -> pd.DataFrame:
        n = self.n_samples
        task = self.task
        if progress is not None:
            progress(0)  # loading the per-sample statistics and pass 1 come before the first scored block
        stats = self.stats()
        labels = stats["label"].to_numpy(dtype=np.int64) if task is TaskKind.CLASSIFICATION else None
        pop = population_pass(self._blocks(), self.dim, labels, self.num_classes)
        k = min(config.k, n - 1)
        if k < config.k:
            logger.warning("only %d samples: using k=%d neighbours instead of %d", n, k, config.k)
        info = self.index_info
        index = self.index()
        knn = (lambda u, rows: knn_block(index, info, u, rows, k)) if k >= 1 else None
        grad_scores = score_pass(self._blocks(), n, labels, pop, config, knn, on_block=progress)
        df, used = finalize_scores(stats, grad_scores, config, task)
        strategy = resolve_strategy(df, config.strategy)  # None -> the task's default
        weight, is_hard = compute_weights(df, strategy, config.top, config.boost, config.temperature, config.cap)
        df["is_hard"] = pd.array(is_hard, dtype="boolean")
        df["weight"] = weight
        meta = self._manifest_metadata(config, used, k, strategy)
        write_manifest(df, self.manifest_path, meta)
        df.attrs["hardmine"] = meta
        return df

    def _manifest_metadata(
        self, config: ScoreConfig, used: dict[str, float], k: int, strategy: Strategy
    ) -> dict[str, Any]:
        cfg = self.info["config"]
        index = {key: v for key, v in self.info["index"].items() if key != "build_s"}  # timings are not content
        return {
            "format": MANIFEST_FORMAT,
            "format_version": FORMAT_VERSION,
            "hardmine_version": __version__,
            "created": _now(),
            "task": self.task.value,
            "num_classes": self.num_classes,
            "n_samples": self.n_samples,
            "model_fingerprint": cfg["model_fingerprint"],
            "model_class": cfg["model_class"],
            "dataset_fingerprint": self.info["dataset_fingerprint"],
            "layers": cfg["layers"],
            "layers_requested": cfg["layers_requested"],
            "engine": self.info.get("extractor") or cfg["extractor"],
            "projection": {"dim": cfg["dim"], "out_dim": self.dim, "seed": cfg["seed"],
                           "kind": cfg["extractor"].get("projection")},
            "loss": cfg["loss"],
            "source": self.info.get("source"),
            "index": index,
            "score_config": config.to_dict(),
            "k_used": k,
            "hardness_weights_used": used,
            "scores": {name: s.to_dict() for name, s in SCORE_TABLE.items()},
            "export": {"strategy": strategy.value, "top": config.top, "boost": config.boost,
                       "temperature": config.temperature, "cap": config.cap},
        }

