"""The extraction pass of a scan: batches -> projected gradients and per-sample statistics -> shards.

Batches already recorded in complete shards (a resumed scan) are read again only to check, by digest, that
they are the same data; extraction continues from the first unrecorded batch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, RandomSampler

from .._io import DatasetHasher
from ..batches import (
    check_labels,
    infer_task,
    input_leaves,
    is_causal_lm,
    sample_ids,
    split_batch_ids,
    to_device,
)
from ..engine import GradientExtractor, ProjectedBatch
from ..enums import LossKind, TaskKind
from ..lm import TokenStats, TokenTable, lm_sample_stats, token_schema, token_stats
from ..losses import class_count, resolve_loss
from ..score import PopulationStats, classification_stats, multilabel_stats, regression_stats
from ..tokens import TIERS_METADATA_KEY, TierAccumulator
from .ledger import Ledger, ShardRecord
from .population import PopulationSums
from .shards import ShardSet, ShardWriter, digest_of
from .store import ScanStore

__all__ = ["ClassCountError", "ExtractionPass", "write_token_table"]

logger = logging.getLogger(__name__)


class ClassCountError(ValueError):
    """The model's class count differs from the one asked for (``num_classes``); a caller that knows where
    that number came from (the CLI: text label names) can say more."""

    def __init__(self, message: str, model_classes: int, expected: int) -> None:
        super().__init__(message)
        self.model_classes = model_classes
        self.expected = expected


class ExtractionPass:
    """One pass over ``data`` for a prepared store and its ledger (updated in place and written per shard).

    ``report(rows_done)`` is called after every batch; ``extracted_now`` counts the samples this pass
    extracted (not the ones a resumed scan only checked); ``population``, after a ``run`` that summed them,
    the population statistics of every shard (``hardmine.scan.population``).
    """

    def __init__(
        self,
        store: ScanStore,
        ledger: Ledger,
        extractor: GradientExtractor,
        *,
        loss_fn: Any,
        num_classes: int | None,
        shard_rows: int,
        keep: bool,
        report: Callable[[int], None],
        tokens: TokenTable | None = None,
        finish_tokens: bool = True,
    ) -> None:
        self.store = store
        self.ledger = ledger
        self.extractor = extractor
        self.loss_fn = loss_fn
        self.num_classes = num_classes
        self.shard_rows = shard_rows
        self.keep = keep
        self.report = report
        self.tokens = tokens if tokens is not None else TokenTable()  # causal-LM scans: tokens.parquet rows
        # False for a rank of a distributed scan: rank 0 streams every rank's token parts into one table.
        self.finish_tokens = finish_tokens
        self.device = next(iter(extractor.model.parameters())).device
        self.extracted_now = 0
        self.population: PopulationStats | None = None
        self._sums: PopulationSums | None = None

    def run(self, data: Iterable[Any], *, population: bool = True) -> np.ndarray | None:
        """Extract (or check) every batch and mark the ledger complete; returns all gradients ``(N, out_dim)``
        when ``keep``, else ``None``. ``population``: also sum the population statistics of every shard in a
        worker thread (``self.population``; a resumed scan's earlier shards are read back for it)."""
        self.population = None
        try:
            kept = self._run(data, population)
            if self._sums is not None:
                pop = self._sums.result()
                if pop.n != self.ledger.n_samples:
                    raise RuntimeError(
                        f"population statistics over {pop.n} samples for {self.ledger.n_samples}; a bug in hardmine."
                    )
                self.population = pop
            return kept
        finally:
            if self._sums is not None:
                self._sums.close()
                self._sums = None

    def _summed(self, loader: Callable[[], tuple[np.ndarray, np.ndarray | None]]) -> None:
        """Queue one recorded shard for the population sums (the worker starts with the first shard, when the
        task and the number of classes are known)."""
        if self._sums is None:
            classes = self.ledger.num_classes if self.ledger.task == TaskKind.CLASSIFICATION.value else None
            self._sums = PopulationSums(int(self.ledger.out_dim or self.extractor.out_dim), classes)
        self._sums.add(loader)

    def _labels_of(self, stats: pa.Table) -> np.ndarray | None:
        """A shard's labels as the scores read them (``Scan.write_scores``): classification only."""
        if self.ledger.task != TaskKind.CLASSIFICATION.value:
            return None
        return stats.column("label").to_numpy().astype(np.int64)

    def _on_disk(self, rec: ShardRecord) -> tuple[np.ndarray, np.ndarray | None]:
        z = np.load(self.store.path / rec.grads, mmap_mode="r")  # (rows, out_dim), read by the worker
        if self.ledger.task != TaskKind.CLASSIFICATION.value:
            return z, None
        return z, self._labels_of(pq.read_table(self.store.path / rec.stats, columns=["label"]))

    def _run(self, data: Iterable[Any], population: bool) -> np.ndarray | None:
        done_shards = list(self.ledger.shards)
        done_batches, done_rows = self.ledger.done_batches, self.ledger.done_rows
        where_dir = self.store.path
        if done_batches:
            logger.info("%s: resuming after %d complete batches (%d samples)", where_dir, done_batches, done_rows)
        hasher = DatasetHasher()
        user_ids = False
        kept: list[np.ndarray] = [np.load(where_dir / s.grads) for s in done_shards] if self.keep else []
        on_flush = None
        if population:
            # A recorded shard (a resumed or complete scan) is queued when its batches have been checked, a new
            # one when it is cut (the writer writes it meanwhile): always in row order.
            def on_flush(z: np.ndarray, stats: pa.Table) -> None:
                labels = self._labels_of(stats)
                self._summed(lambda: (z, labels))

        # Shards are written by the writer's thread while the next batches are extracted; leaving the block
        # waits for the writes under way whatever happens, so an interrupted scan keeps every shard handed to
        # the writer before the interruption (up to a failed write, after which nothing is written).
        with ShardWriter(self.store, self.ledger, on_flush=on_flush) as writer:
            shard_digests: list[str] = []
            rows = 0
            batch_i = -1
            shard_i = 0  # next recorded shard to check while skipping
            shard_start_batch = done_batches
            self.extracted_now = 0
            self.store.make_shards_dir()
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
                    if batch_i + 1 == rec.batches[1]:
                        if digest_of(shard_digests) != rec.digest or rows + b != rec.rows[1]:
                            state = "complete" if self.ledger.complete else "interrupted"
                            raise ValueError(
                                f"the data differs from the {state} scan in {where_dir} at batches "
                                f"{rec.batches[0]}-{rec.batches[1] - 1} (shard {shard_i}): different samples, "
                                "order or batch size. Rerun with the same data and batch size, or overwrite=True."
                            )
                        shard_digests = []
                        shard_i += 1
                        if population:
                            self._summed(lambda rec=rec: self._on_disk(rec))
                    rows += b
                    self.report(rows)
                    continue
                if self.ledger.complete:
                    raise ValueError(
                        f"the data has more batches than the complete scan in {where_dir} ({done_batches}); rerun with "
                        "the same data, or overwrite=True."
                    )
                inputs, target_dev = to_device(inputs, self.device), to_device(target, self.device)
                # One wait per batch: its results come to the host together (pinned, from a GPU); the device has
                # then finished it, so its deferred value checks are read at no cost before anything is written.
                pb = self.extractor((inputs, target_dev))
                ts = None
                kind = resolve_loss(self.loss_fn, target_dev)[1]  # once per batch: the LM branch and the task below
                if is_causal_lm(kind):
                    # The token statistics where the logits are, before the copy to the host: (B, T) arrays come
                    # back, never the (B, T, V) logits. Labels outside the vocabulary are clamped there (no gather
                    # can fault the device) and refused by the flush after the copy, before anything is written.
                    ts = self._token_stats(pb.output, inputs, target_dev, where)
                    pb = dataclasses.replace(pb, output=pb.output.new_empty((b, 0)))  # (B, 0): nothing left to copy
                pb = pb.to_host()
                self.extractor.flush_checks()
                # The plan in use (auto may move a module to vmap after probing the first batch).
                self.ledger.extractor = self.extractor.metadata()
                z = pb.z.to(torch.float32).numpy()  # (B, out_dim)
                stats, token_rows = self._batch_stats(id_arr, target, pb, where, kind, ts)
                writer.add(z, stats, digest, token_rows)
                if self.keep:
                    kept.append(z)
                rows += b
                self.extracted_now += b
                self.report(rows)
                if writer.rows >= self.shard_rows:
                    writer.flush(shard_start_batch, batch_i + 1, rows)
                    shard_start_batch = batch_i + 1
            n_batches = batch_i + 1
            if n_batches < done_batches:
                state = "complete" if self.ledger.complete else "interrupted"
                raise ValueError(
                    f"data ended after {n_batches} batches, but the {state} scan in {where_dir} had already "
                    f"recorded {done_batches}; rerun with the same data and batch size, or overwrite=True."
                )
            writer.flush(shard_start_batch, n_batches, rows)
            writer.wait()
        if rows == 0:
            raise ValueError("data yielded no batches; nothing to scan.")
        if user_ids:
            self._check_unique_ids()
        fingerprint = hasher.hexdigest()
        if self.ledger.complete and self.ledger.dataset_fingerprint != fingerprint:
            raise ValueError(
                f"the data's fingerprint differs from the complete scan in {where_dir}; rerun with the same data, "
                "or overwrite=True."
            )
        self.ledger.finish(
            n_samples=rows, n_batches=n_batches, dataset_fingerprint=fingerprint, out_dim=self.extractor.out_dim
        )
        self.store.write_ledger(self.ledger)
        if self.finish_tokens and self.ledger.task == TaskKind.CAUSAL_LM.value and not self.store.tokens_path.is_file():
            write_token_table(self.store, self.ledger)
        return np.concatenate(kept) if self.keep else None

    # ------------------------------------------------------------------------------------------- checks
    def _check_ids(self, ids: np.ndarray, where: str) -> None:
        self.ledger.record_id_kind("int" if ids.dtype.kind in "iu" else "str", where)
        dup = pd.Index(ids).duplicated()
        if dup.any():
            raise ValueError(f"{where}: sample_id {ids[dup][0]!r} appears more than once; sample ids must be unique.")

    def _check_unique_ids(self) -> None:
        # Across batches, checked once at the end from the shards: a set of N Python objects would cost
        # ~70 bytes per sample during the whole extraction.
        ids = pd.Index(ShardSet(self.store.path, self.ledger.shards).sample_ids())
        if ids.has_duplicates:
            dup = ids[ids.duplicated()][0]
            raise ValueError(
                f"sample_id {dup!r} appears more than once in the data; sample ids must be unique. Fix the id "
                "column and rerun with overwrite=True."
            )

    @staticmethod
    def _token_stats(logits: torch.Tensor, inputs: Any, target: torch.Tensor, where: str) -> TokenStats:
        if not isinstance(inputs, Mapping):
            raise ValueError(
                f"{where}: a causal-LM batch needs its inputs as a mapping with 'input_ids' (and "
                f"'attention_mask'), got {type(inputs).__name__}."
            )
        return token_stats(logits, inputs, target)  # on the logits' device; (B, T) arrays back

    def _batch_stats(
        self, ids: np.ndarray, target: torch.Tensor, pb: ProjectedBatch, where: str, kind: LossKind | None,
        ts: TokenStats | None,
    ) -> tuple[dict[str, Any], pa.Table | None]:
        """The per-sample columns of the stats shard for one batch (checking the task and classes against
        earlier batches), and for a causal LM (``ts``: its token statistics) the batch's rows of the token table."""
        task = TaskKind.CAUSAL_LM if ts is not None else infer_task(kind, target, pb.output)
        self.ledger.record_task(task, where)
        common = {
            "sample_id": ids,
            "loss": pb.loss.detach().to("cpu", torch.float64).numpy(),
            "grad_norm": pb.grad_norm.detach().to("cpu", torch.float64).numpy(),
        }
        if ts is not None:
            return {**common, **lm_sample_stats(ts)}, self.tokens.rows(ids, ts)
        output = pb.output.detach().to("cpu")
        b = len(ids)
        tgt = target.detach().to("cpu")
        if task is TaskKind.CLASSIFICATION:
            c = class_count(output)  # a single logit is the binary model [0, z]
            if self.num_classes is not None and c != self.num_classes:
                raise ClassCountError(
                    f"{where}: the model outputs {c} classes but num_classes={self.num_classes}.", c, self.num_classes
                )
            self.ledger.record_num_classes(c, where)
            check_labels(tgt, c, where)
            lab = tgt.numpy().astype(np.int64)
            stats = classification_stats(output.numpy(), lab)
            label: Any = lab
        elif task is TaskKind.MULTILABEL:
            stats = multilabel_stats(output.numpy(), tgt.numpy())
            label = stats.pop("label")  # the label sets, "1,4"
        else:
            flat = tgt.reshape(b, -1).to(torch.float64).numpy()  # (B, outputs)
            label = flat[:, 0].copy() if flat.shape[1] == 1 else np.full(b, np.nan)
            stats = regression_stats(output.numpy())
        return {"sample_id": ids, "label": label, "loss": common["loss"], "grad_norm": common["grad_norm"], **stats}, None


def write_token_table(store: ScanStore, ledger: Ledger, parts: Sequence[Path] | None = None) -> None:
    """``tokens.parquet`` of a complete causal-LM scan from its token parts (``parts``: default, the store's own
    shard parts), with the uncertainty-tier thresholds computed in the same pass and stored in its footer, so
    that no reader needs a pass over the table (``hardmine.tokens``)."""
    tiers = TierAccumulator()
    store.write_tokens(
        len(ledger.shards), token_schema(ledger.id_kind or "int"),
        on_part=lambda t: tiers.update(t["is_target"], t["loss"]),
        footer=lambda: {TIERS_METADATA_KEY: json.dumps(tiers.thresholds().to_dict())},
        parts=parts,
    )
