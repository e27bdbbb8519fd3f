"""``scan``: the streaming driver. Checks the arguments, prepares the directory, runs the extraction pass,
then builds the index and scores (through ``Scan``), recording each phase in ``scan.json``."""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .._io import model_fingerprint, utc_now
from .._version import __version__
from ..batches import call_model, model_output_tensor, split_unlabelled, to_device
from ..checks import as_bool, as_module, non_negative_int, positive_int
from ..engine import GradientExtractor
from ..enums import (
    Engine,
    IndexKind,
    ProjectionKind,
    Randomness,
    ScanPhase,
    TaskKind,
    TokenReduction,
    parse_choice,
)
from ..index import INDEX_FILES
from ..lm import TokenTable
from ..losses import class_logits, loss_name
from ..score import PopulationStats, ScoreConfig
from .distributed import Job, check_unique_ids, local_population, merge_ledgers, part_dir
from .extraction import ExtractionPass, write_token_table
from .result import Scan
from .store import SCAN_FORMAT_VERSION, ScanStore, jsonable
from .task import resolve_task

__all__ = ["DEFAULT_SHARD_ROWS", "ProgressFn", "ScanProgress", "scan"]

logger = logging.getLogger(__name__)

DEFAULT_SHARD_ROWS = 8192


@dataclass(frozen=True)
class ScanProgress:
    """One progress report: ``done`` of ``total`` samples in ``phase`` (``total`` None when unknown)."""

    phase: ScanPhase
    done: int
    total: int | None


ProgressFn = Callable[[ScanProgress], None]


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
    build_index: bool = False,
    resume: bool = True,
    overwrite: bool = False,
    keep_gradients_in_memory: bool = False,
    progress: ProgressFn | None = None,
    total: int | None = None,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    provenance: Mapping[str, Any] | None = None,
    config_extra: Mapping[str, Any] | None = None,
    labels: bool | None = True,
    task: TaskKind | str = TaskKind.AUTO,
    token_reduction: TokenReduction | str = TokenReduction.MEAN,
    tokenizer: Any = None,
    distributed: bool | None = None,
    cuda_graphs: bool = False,
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
        build_index: build the FAISS index during the scan. By default it is built on its first query
            (``Scan.neighbors``, drift, review, the report) and kept: no default score, flag, slice or export
            reads it, and at a million samples it costs several times the extraction. Scores that need
            neighbours (``ScoreConfig.neighbor_scores``) build it during the scan either way.
        resume: continue an interrupted scan of the same configuration in ``out`` (and reuse a complete
            one); ``False`` refuses a partial scan instead.
        overwrite: replace a scan with a different configuration in ``out``.
        keep_gradients_in_memory: also keep all projected gradients in RAM (``Scan.gradients()``).
        progress: called with a ``ScanProgress`` after every batch, index block and score block.
        total: number of samples, for progress (default: ``len(data.dataset)`` for a DataLoader).
        shard_rows: samples per gradient shard (the memory bound and the resume granularity).
        provenance: extra JSON-able facts about the inputs (checkpoint path, data source...), recorded in
            ``scan.json`` and under ``source`` in the manifest metadata; not part of the resume check.
        labels: ``True`` (default): the data's targets are the labels. ``None`` (or ``False``): unlabelled data —
            any target in the batches is ignored and each sample's target is the model's own prediction (the
            gradient a self-training step would take, as in BADGE), at the cost of one extra forward per
            batch; classification only. The manifest then has null ``label``, ``correct``,
            ``confident_error``, ``near_miss``, ``neighbor_disagreement`` and label-issue columns, no slices,
            per-class signals by *predicted* class, and the ``proportional`` default export.
        task: ``"auto"`` (default), ``"classification"``, ``"regression"``, ``"multilabel"`` or ``"causal-lm"``
            (``hardmine.scan.task``: auto recognises a causal LM by its class / HF config or by ``(B, T, V)``
            logits for ``(B, T)`` integer labels; otherwise the task follows the loss and targets).
            A causal-LM batch is a mapping with ``input_ids``, ``attention_mask`` and ``labels`` (same shape as
            ``input_ids``, ``-100`` = not a target; the shift happens inside the loss, as in Hugging Face
            models); the per-sample loss is the mean NLL over the sample's target tokens, and the scan also
            writes ``tokens.parquet`` (``hardmine.lm``). ``hardmine.loaders.open_text`` builds such batches.
        token_reduction: causal LM only: ``"mean"`` (default) or ``"sum"`` of the target tokens' NLL as the
            per-sample loss whose gradient is scanned.
        tokenizer: causal LM only: decodes the ``token`` column of ``tokens.parquet`` (default: the data's
            ``tokenizer`` attribute, as ``open_text`` sets it; without one the column is null).
        config_extra: extra JSON-able settings that define the scan (the CLI passes its data options: file,
            format, split, limit, columns, input shape); recorded in the config, so a rerun into the same
            ``out`` with different values is refused like any other configuration change.
        distributed: ``None`` (default): scan distributed when ``torch.distributed`` is initialised with more
            than one process or torchrun's environment says so — then every rank must call ``scan`` with the
            same arguments and the whole ``data`` (``hardmine.scan.distributed`` says how it is split);
            ``False``: a single-process scan even inside a distributed job (e.g. on rank 0 only);
            ``True``: require a distributed job.
        cuda_graphs: on a CUDA device, replay the factored pass as a CUDA graph (``GradientExtractor``): the
            same vectors with less host time per batch. Not part of the configuration: a rerun with or without
            it resumes the same scan. What it did is in ``scan.json``'s timings (``cuda_graphs``).
    """
    as_module(model)
    _check_data(data, labelled=labels is True)
    as_bool(resume, "resume")
    as_bool(overwrite, "overwrite")
    as_bool(keep_gradients_in_memory, "keep_gradients_in_memory")
    as_bool(build_index, "build_index")
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
    # The task decides the loss (a causal LM: the next-token loss); auto may look at the first batch.
    _, loss_fn, data = resolve_task(model, data, task, loss_fn, token_reduction, labelled=labels is True)
    extractor = GradientExtractor(
        model, layers=layers, dim=dim, seed=seed, engine=engine, loss_fn=loss_fn, projection=projection,
        chunk_size=chunk_size, randomness=randomness, cuda_graphs=cuda_graphs,
    )
    _check_width(model, extractor, shard_rows)
    unlabelled = labels is None or labels is False
    if not unlabelled and labels is not True:
        raise ValueError(f"labels={labels!r} must be True (the data has labels) or None (unlabelled data).")
    # causal LM: decodes the tokens of tokens.parquet (read before a distributed scan wraps its part of the data)
    tokens = TokenTable(tokenizer if tokenizer is not None else getattr(data, "tokenizer", None))
    data_report = getattr(data, "report", None)  # e.g. open_text's truncation count, kept in scan.json
    job = _join(distributed, model, keep_gradients_in_memory)  # None: a single-process scan
    if job is not None:  # this rank's part of the data, before predicting targets: skipped batches cost nothing
        data = job.shard_or_close(data, labelled=not unlabelled)
        total = data.total
    if unlabelled:
        data = _PredictedTargets(model, data)
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
    if unlabelled:  # only then: the configurations of labelled scans (and their resume checks) are unchanged
        config["targets"] = "predictions"
    for key, value in jsonable(dict(config_extra or {})).items():
        config[f"extra.{key}"] = value  # flat keys, so a refused rerun names exactly what changed
    source = jsonable(dict(provenance)) if provenance is not None else None
    if job is not None:  # only then: single-process configurations (and their resume checks) are unchanged
        config["world_size"] = job.world  # each rank's rows depend on it: another world size cannot resume
        return _scan_distributed(job, data, Path(out), config, source, progress, extractor, tokens, data_report,
                                 loss_fn=loss_fn,
                                 num_classes=num_classes, shard_rows=shard_rows, total=total, resume=resume,
                                 overwrite=overwrite, score_config=score_config, index_kind=index_kind,
                                 build_index=build_index)
    created = not Path(out).exists()  # a directory this run creates is removed again if it fails at once
    store = ScanStore.prepare(Path(out), config, resume=resume, overwrite=overwrite)
    driver = _Driver(store, config, source, progress, created=created, loss_label=loss_name(loss_fn, None))
    extraction = ExtractionPass(
        store, driver.ledger, extractor, loss_fn=loss_fn, num_classes=num_classes, shard_rows=shard_rows,
        keep=keep_gradients_in_memory, report=lambda done: driver.report(ScanPhase.EXTRACT, done, total),
        tokens=tokens,
    )
    driver.data_report = data_report
    try:
        result = driver.run(extraction, data, score_config, index_kind, build_index)
    finally:
        store.lock.release()
    if cuda_graphs:
        logger.info("cuda_graphs: %s", extractor.cuda_graph_state())  # also in scan.json's timings
    return result


def _scan_distributed(
    job: Job, data: Iterable[Any], out: Path, config: dict[str, Any], source: dict[str, Any] | None,
    progress: ProgressFn | None, extractor: GradientExtractor, tokens: TokenTable,
    data_report: Callable[[], Any] | None, *, loss_fn: Any,
    num_classes: int | None,
    shard_rows: int, total: int | None, resume: bool, overwrite: bool, score_config: ScoreConfig,
    index_kind: IndexKind, build_index: bool = False,
) -> Scan:
    """One rank of a distributed scan (the steps are in ``hardmine.scan.distributed``'s docstring): every
    collective goes through ``job``; rank 0 holds the directory and finishes the scan with ``_Driver``."""
    try:
        created = job.rank == 0 and not out.exists()
        store = job.prepare(out, config, resume=resume, overwrite=overwrite)
        driver = _Driver(store, config, source, progress, created=created, loss_label=loss_name(loss_fn, None)) if job.rank == 0 else None
        try:
            reuse = job.broadcast(driver.reusable(score_config, index_kind) if driver is not None else None)
            job.step(driver.start if driver is not None else lambda: None, "starting the scan")
            job.step(lambda: None if store.scan_file.is_file() else _not_shared(out, job.rank), "opening the scan directory")
            t0 = time.perf_counter()
            part = job.part_store(out)
            ledger = part.read_ledger()
            extraction = ExtractionPass(
                part, ledger, extractor, loss_fn=loss_fn, num_classes=num_classes, shard_rows=shard_rows, keep=False,
                report=lambda done: progress(ScanProgress(ScanPhase.EXTRACT, done, total)) if progress else None,
                tokens=tokens, finish_tokens=False,
            )
            try:
                job.step(lambda: extraction.run(data, population=not reuse), "extracting")
            except BaseException:
                _after_distributed_failure(job, store, ledger, created)
                raise
            t_extract = time.perf_counter() - t0
            # e.g. open_text's truncation count, of this rank's rows (its part shares the source's counters)
            reports = job.gather(jsonable(data_report()) if callable(data_report) else None)
            if driver is not None and reports and all(isinstance(r, dict) for r in reports):
                driver.data_report = lambda: _sum_reports(reports)
            ledgers = [type(ledger).from_dict(d) for d in job.gather(ledger.to_dict())]  # in rank order
            merged = merge_ledgers(ledgers)
            mine = job.step(
                lambda: extraction.population if extraction.population is not None
                else local_population(part, ledger, merged.task, merged.num_classes), "summing statistics",
            )
            pop = job.sum_population(mine)
            extracted = sum(job.gather(extraction.extracted_now))

            def finish() -> None:
                if driver is None:
                    return
                if reuse:
                    logger.info("%s: complete scan with the same configuration found; reusing it", out)
                    if build_index:
                        driver.ensure_index(index_kind)
                    return
                check_unique_ids(out, merged)
                if merged.task == TaskKind.CAUSAL_LM.value and not store.tokens_path.is_file():
                    # every rank's token parts, in rank then shard order: the rows of a single-process scan
                    parts = [ScanStore(out / part_dir(r)).token_part(i) for r, led in enumerate(ledgers)
                             for i in range(len(led.shards))]
                    write_token_table(store, merged, parts=parts)
                store.write_ledger(merged)
                driver.ledger = merged
                driver.finish(None, t0, t_extract, extracted, score_config, index_kind, population=pop,
                              build_index=build_index)

            job.step(finish, "building the index and scores on rank 0")
            return Scan.open(out)
        finally:
            if driver is not None:
                store.lock.release()
    finally:
        job.close()


def _sum_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The ranks' data reports as one: counts summed over the ranks, everything else as rank 0 saw it."""
    merged = dict(reports[0])
    for key in ("samples", "truncated", "target_tokens"):
        if all(isinstance(r.get(key), int) for r in reports):
            merged[key] = sum(int(r[key]) for r in reports)
    return merged


def _not_shared(out: Path, rank: int) -> None:
    raise ValueError(
        f"rank {rank} does not see the scan directory {str(out)!r} that rank 0 prepared: a multi-node scan needs --out "
        "on a file system every node shares."
    )


def _after_distributed_failure(job: Job, store: ScanStore, ledger: Any, created: bool) -> None:
    """A distributed run that failed before any rank completed a shard leaves nothing behind (as a single-process
    run does), so the corrected command is not refused as "a different configuration"."""
    try:
        shards = sum(job.gather(len(ledger.shards)))
    except BaseException:  # noqa: BLE001 - a rank is gone: keep everything for the rerun
        return
    if job.rank == 0 and shards == 0:
        store.clear()
        store.lock.release(remove=True)
        if created and store.path.is_dir() and not any(store.path.iterdir()):
            store.path.rmdir()


def _join(distributed: bool | None, model: nn.Module, keep: bool) -> Job | None:
    if distributed is not None:
        as_bool(distributed, "distributed")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    job = None if distributed is False else Job.join(device, required=distributed is True)
    if job is not None and keep:
        job.close()
        raise ValueError(
            "keep_gradients_in_memory=True in a distributed scan: no rank holds all gradients; read them with "
            "Scan.iter_gradients() after the scan."
        )
    return job


# Below this width a projection is cheap whatever the model (16 KiB per sample); above it, a projection wider
# than the gradient it compresses keeps no more information and only costs memory and disk.
WIDE_OUT_DIM = 4096


def _available_memory() -> int | None:
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not POSIX: no bound from memory
        return None


def _check_width(model: nn.Module, extractor: GradientExtractor, shard_rows: int) -> None:
    """Refuse, before anything is allocated or written, a projection wider than the selected gradient (when
    it is wide at all) or one whose shard buffer would not fit in memory."""
    out_dim = extractor.out_dim
    selected = set(extractor.param_names)
    n_params = sum(p.numel() for n, p in model.named_parameters() if n in selected)
    if out_dim > max(n_params, WIDE_OUT_DIM):
        raise ValueError(
            f"dim={extractor.layout.dim} gives {out_dim:,}-dim vectors for {n_params:,} selected parameters: a "
            "projection wider than the gradient it compresses keeps nothing more and costs memory and disk. "
            "Use a smaller dim (--dim)."
        )
    need = shard_rows * out_dim * 4  # one shard of float32 vectors, held before it is written
    free = _available_memory()
    if free is not None and need > free // 2:
        raise ValueError(
            f"one shard of {shard_rows:,} samples x {out_dim:,} dims needs {need / 2**30:.1f} GiB, more than half "
            f"of the {free / 2**30:.1f} GiB of memory available; lower dim (--dim) or shard_rows (--shard-rows), "
            "or select fewer layers (--layers)."
        )


class _PredictedTargets:
    """Unlabelled data as labelled batches: each batch's target is the model's prediction (argmax of its class
    logits), computed with one no-grad forward. Re-iterable like the data it wraps (resume reads it again)."""

    def __init__(self, model: nn.Module, data: Iterable[Any]) -> None:
        self.model, self.data = model, data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        for i, batch in enumerate(self.data):
            inputs, ids = split_unlabelled(batch, f"batch {i}")
            with torch.no_grad():
                out = model_output_tensor(call_model(self.model, to_device(inputs, device)))
            if not torch.is_floating_point(out) or out.ndim not in (1, 2):
                raise ValueError(
                    f"batch {i}: an unlabelled scan needs a classifier's (B, C) logits to predict targets from, "
                    f"got output shape {tuple(out.shape)}; scan regression models with labels."
                )
            target = class_logits(out).argmax(dim=1).to("cpu")  # (B,) predicted class ids
            yield (inputs, target) if ids is None else (inputs, target, ids)


def _check_data(data: Any, labelled: bool = True) -> None:
    if isinstance(data, (torch.Tensor, np.ndarray, str, bytes)) or not isinstance(data, Iterable):
        raise ValueError(
            f"data must be a DataLoader or an iterable of batches, got {type(data).__name__}; wrap tensors in a "
            "DataLoader(TensorDataset(x, y), batch_size=...) or a list of (x, y) batches."
        )
    # A list of tensors is a list of batches of unlabelled data, but a single (x, y) batch of labelled data.
    if labelled and isinstance(data, (tuple, list)) and data and all(isinstance(v, torch.Tensor) for v in data):
        raise ValueError(
            "data looks like a single batch (a tuple/list of tensors); pass an iterable of batches, e.g. [(x, y)]."
        )


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
    """One run of ``scan``: extraction with resume, then index, scores and manifest, each phase recorded in
    ``scan.json``."""

    def __init__(
        self,
        store: ScanStore,
        config: dict[str, Any],
        source: dict[str, Any] | None,
        progress: ProgressFn | None,
        *,
        created: bool = False,
        loss_label: str | None = None,
    ) -> None:
        self.store = store
        self.created = created
        self.loss_label = loss_label  # a callable's full name; built-in losses resolve from the task later
        self.config = config
        self.source = source
        self.progress = progress
        self.ledger = store.read_ledger()
        self.info: dict[str, Any] = store.read_info()
        self.data_report: Callable[[], Any] | None = None  # what the data says about itself once read
        self.graph_state: dict[str, Any] | None = None  # GradientExtractor.cuda_graph_state(), when asked for

    def _after_failure(self, exc: BaseException) -> None:
        """A run that failed before its first complete shard leaves nothing behind, so the corrected command
        is not refused as "a different configuration"; one that failed later keeps its shards to resume, and a
        bad-input error says so."""
        if not self.ledger.shards:
            self.store.clear()
            self.store.lock.release(remove=True)  # the directory as it was found (no lock file left)
            if self.created and self.store.path.is_dir() and not any(self.store.path.iterdir()):
                self.store.path.rmdir()
            return
        if isinstance(exc, ValueError) and "overwrite" not in str(exc):
            n = len(self.ledger.shards)
            exc.args = (
                f"{exc} The {n} complete shard(s) of this scan are kept in {str(self.store.path)!r}: rerun the same "
                "command to resume once the input is fixed, or pass overwrite=True to start again.",
            )

    def report(self, phase: ScanPhase, done: int, total: int | None) -> None:
        if self.progress is not None:
            self.progress(ScanProgress(phase, done, total))

    def _write_info(self, **updates: Any) -> None:
        self.info.update(updates)
        self.info["config"] = self.config
        self.info["provenance"] = _provenance()
        self.info["source"] = self.source
        if self.loss_label is not None:
            self.info["loss_name"] = self.loss_label
        self.store.write_info(self.info)

    def reusable(self, score_config: ScoreConfig, index_kind: IndexKind) -> bool:
        """Whether the directory holds a complete scan scored the same way (only the data is checked again)."""
        scoring = {"score_config": score_config.to_dict(), "index_requested": index_kind.value}
        return bool(
            self.ledger.complete and self.info.get("status") == "complete"
            and jsonable(self.info.get("scoring")) == jsonable(scoring) and self.store.manifest_path.is_file()
        )

    def ensure_index(self, index_kind: IndexKind) -> None:
        """A reused complete scan asked for its index now (``build_index``): build it if the scan left it for
        its first query (this driver holds the lock)."""
        if self.info.get("index") is None:
            result = Scan(self.store.path, self.info)
            result._writing = True
            result.build_index(index_kind)
            self.store.write_info(self.info)

    def start(self) -> None:
        if not self.info:
            self._write_info(status="extracting", started=utc_now())

    def run(
        self, extraction: ExtractionPass, data: Iterable[Any], score_config: ScoreConfig, index_kind: IndexKind,
        build_index: bool = False,
    ) -> Scan:
        t0 = time.perf_counter()
        path = self.store.path
        reuse = self.reusable(score_config, index_kind)
        self.start()
        try:
            # On a complete scan: only checks the data is the same (and sums pass 1 again unless it is reused).
            gradients = extraction.run(data, population=not reuse)
        except BaseException as exc:
            self._after_failure(exc)
            raise
        t_extract = time.perf_counter() - t0
        if extraction.extractor.cuda_graphs:  # what the option did, kept with the timings (not the configuration)
            self.graph_state = extraction.extractor.cuda_graph_state()
        if reuse:
            logger.info("%s: complete scan with the same configuration found; reusing it", path)
            if build_index:
                self.ensure_index(index_kind)
            return Scan.open(path, gradients=gradients)
        return self.finish(gradients, t0, t_extract, extraction.extracted_now, score_config, index_kind,
                           population=extraction.population, build_index=build_index)

    def finish(
        self, gradients: np.ndarray | None, t0: float, t_extract: float, extracted: int, score_config: ScoreConfig,
        index_kind: IndexKind, population: PopulationStats | None = None, build_index: bool = False,
    ) -> Scan:
        """After the extraction (``self.ledger`` complete): index, scores and manifest, each phase recorded.
        ``population``: the population statistics when already known (summed over the ranks of a distributed
        scan), else computed from the shards."""
        path = self.store.path
        scoring = {"score_config": score_config.to_dict(), "index_requested": index_kind.value}
        if callable(self.data_report):
            self.info["data"] = jsonable(self.data_report())
        self._write_info(status="extracted", **self.ledger.summary())
        n = int(self.ledger.n_samples or 0)
        result = Scan(path, self.info, gradients)  # shares self.info: the index it builds is recorded there
        result._writing = True  # this driver holds the directory's lock and writes scan.json
        self.store.remove_manifest()
        t1 = time.perf_counter()
        if build_index or score_config.computes_neighbor_scores:
            result.build_index(index_kind, on_block=lambda done: self.report(ScanPhase.INDEX, done, n))
        else:
            # No default score, flag, slice or export reads the index: it is built on its first query instead
            # (Scan.index), with the kind asked for here (scoring.index_requested). Files of an earlier build
            # describe other gradients.
            self.info["index"] = None
            for name in INDEX_FILES:
                (path / name).unlink(missing_ok=True)
        t_index = time.perf_counter() - t1
        self._write_info(status="scoring", **self.ledger.summary())
        t2 = time.perf_counter()
        result.write_scores(score_config, progress=lambda done: self.report(ScanPhase.SCORE, done, n), population=population)
        t_score = time.perf_counter() - t2
        timings = dict(self.info.get("timings", {}))
        timings.update(
            extract_s=round(t_extract, 3), index_s=round(t_index, 3), score_s=round(t_score, 3),
            total_s=round(time.perf_counter() - t0, 3),
            extract_samples_per_s=round(extracted / t_extract, 1) if extracted and t_extract > 0 else None,
        )
        if self.graph_state is not None:
            timings["cuda_graphs"] = self.graph_state
        self._write_info(status="complete", finished=utc_now(), scoring=scoring, timings=timings, **self.ledger.summary())
        return Scan.open(path, gradients=gradients)
