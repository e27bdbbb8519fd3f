"""Distributed scans on torchrun: who is which rank, which rows each rank extracts, and what the ranks share.

A scan runs distributed when ``torch.distributed`` is already initialised with more than one process (a
user's DDP job) or when torchrun's environment says so (``WORLD_SIZE`` > 1, ``RANK``, ``MASTER_ADDR``; the
process group is then created here — gloo on CPU, nccl on CUDA — and destroyed at the end). Every rank calls
``hardmine.scan`` with the same arguments and the *whole* data; the driver (``scan/driver.py``) then:

1. rank 0 prepares the directory and takes its lock (``store.DirectoryLock``) for the whole job; the outcome
   is broadcast, so a second job's ranks all get the same clear error;
2. each rank extracts the contiguous block of rows ``row_range(N, rank, world)`` (``shard_data``) into its
   own part of the directory, ``ranks/NNNNN/`` (a ``ScanStore`` of the single-process layout: its own
   ``progress.json`` and ``shards/``), so a rerun resumes every rank from its last complete shard;
3. the ranks exchange their ledgers (``merge_ledgers`` makes the scan's ``progress.json``, rows in the
   original order) and sum their population statistics (``Job.sum_population``: what the divergence scores
   need over the whole population, computed by each rank over its own rows);
4. rank 0 builds the index and the scores from every rank's shards, streamed block by block as in a
   single-process scan, and writes the manifest; the other ranks wait for it and return the same ``Scan``.

Coordination uses a gloo group of its own (CPU objects and float64 sums; a long timeout, since the other
ranks wait while rank 0 builds the index and scores). The scan directory must be on a file system every
rank sees (multi-node: a shared one; the lock is an ``flock`` on rank 0's host).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, SequentialSampler, Subset
from torch.utils.data.distributed import DistributedSampler

from .._io import remove_stale_temporaries
from ..batches import SAMPLE_ID_KEY, input_leaves, split_batch_ids, split_unlabelled
from ..enums import TaskKind
from ..loaders.data import BatchSource
from ..score import PopulationStats, population_pass
from .ledger import Ledger, ShardRecord
from .shards import ShardSet
from .store import RANKS_DIR, SHARDS_DIR, ScanStore

__all__ = [
    "COORDINATION_TIMEOUT",
    "DataPart",
    "Job",
    "check_unique_ids",
    "local_population",
    "merge_ledgers",
    "part_dir",
    "rank_and_world",
    "rank_device",
    "row_range",
    "shard_data",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How long a rank waits for the others at a collective: rank 0 alone builds the index and scores while the
# others wait, which takes minutes at millions of samples.
COORDINATION_TIMEOUT = timedelta(hours=24)


# ------------------------------------------------------------------------------------------ who am I
def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (torchrun sets it).") from None


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)``: from the initialised process group, else from torchrun's environment, else
    ``(0, 1)``. Starts nothing (the CLI uses it before the scan, e.g. to show progress on rank 0 only)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = _env_int("WORLD_SIZE")
    rank = _env_int("RANK")
    if world is None or world <= 1 or rank is None:
        return 0, 1
    return rank, world


def rank_device(device: torch.device) -> torch.device:
    """``cuda`` without an index means this process's GPU under torchrun (``LOCAL_RANK``); other devices are
    returned as they are."""
    local = _env_int("LOCAL_RANK")
    if device.type == "cuda" and device.index is None and local is not None and rank_and_world()[1] > 1:
        return torch.device("cuda", local)
    return device


def row_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous block ``[start, stop)`` of ``n`` rows: blocks in rank order, sizes differing by
    at most one (deterministic: the same ``n`` and ``world`` always give the same blocks)."""
    return n * rank // world, n * (rank + 1) // world


def part_dir(rank: int) -> str:
    """A rank's part of the scan directory, relative to it."""
    return f"{RANKS_DIR}/{rank:05d}"


# ---------------------------------------------------------------------------------------------- the job
class Job:
    """The ranks of one distributed scan and their coordination group (``join`` to get one)."""

    def __init__(self, rank: int, world: int, group: Any, *, created: bool) -> None:
        self.rank, self.world, self.group = rank, world, group
        self._created = created  # the default process group was initialised here: destroy it in close()

    @classmethod
    def join(cls, device: torch.device, *, required: bool = False) -> Job | None:
        """The job this process is a rank of, or ``None`` for a single-process scan. Initialises the default
        process group from torchrun's environment when none exists (nccl for a CUDA model, else gloo)."""
        if not dist.is_available():
            if required:
                raise ValueError("distributed=True, but this PyTorch build has no torch.distributed.")
            return None
        created = False
        if not dist.is_initialized():
            rank, world = rank_and_world()
            if world <= 1:
                if required:
                    raise ValueError(
                        "distributed=True, but no process group is initialised and WORLD_SIZE is not set above 1; "
                        "launch with torchrun --nproc-per-node N, or call torch.distributed.init_process_group first."
                    )
                return None
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend=backend, timeout=COORDINATION_TIMEOUT)
            created = True
            logger.info("initialised a %s process group: rank %d of %d", backend, rank, world)
        world = dist.get_world_size()
        if world <= 1:
            if created:
                dist.destroy_process_group()
            return None
        # Our own gloo group: CPU objects and sums whatever the user's backend, with a long timeout.
        group = dist.new_group(backend="gloo", timeout=COORDINATION_TIMEOUT)
        return cls(dist.get_rank(), world, group, created=created)

    def close(self) -> None:
        """Destroy what ``join`` created (the coordination group; the default group only if it was ours)."""
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None
        if self._created and dist.is_initialized():
            dist.destroy_process_group()
            self._created = False

    # --------------------------------------------------------------------------------- collectives
    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return box[0]

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def step(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` on every rank, then agree on the outcome: if any rank failed, every rank raises (the
        failed one its own exception, the others a ``ValueError``/``RuntimeError`` naming the rank), so no
        rank is left waiting at the next collective."""
        failure: BaseException | None = None
        value: Any = None
        try:
            value = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
            failure = exc
        mine = None if failure is None else (str(failure) or type(failure).__name__, isinstance(failure, ValueError))
        try:
            outcomes = self.gather(mine)
        except BaseException:
            if failure is not None:
                raise failure from None
            raise
        if failure is not None:
            raise failure
        for r, outcome in enumerate(outcomes):
            if outcome is not None:
                message, bad_input = outcome
                kind = ValueError if bad_input else RuntimeError
                raise kind(f"rank {r} of {self.world} failed while {what}: {message}")
        return value

    def prepare(self, out: Path, config: dict[str, Any], *, resume: bool, overwrite: bool) -> ScanStore:
        """Rank 0 prepares ``out`` and takes its lock for the job (``ScanStore.prepare``); every rank gets the
        same error when it cannot (a second job into a held directory, a different configuration...)."""
        store: ScanStore | None = None
        failure: BaseException | None = None
        if self.rank == 0:
            try:
                store = ScanStore.prepare(out, config, resume=resume, overwrite=overwrite)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
                failure = exc
        outcome = self.broadcast(None if failure is None else (str(failure), isinstance(failure, ValueError)))
        if failure is not None:
            raise failure
        if outcome is not None:
            message, bad_input = outcome
            raise (ValueError if bad_input else RuntimeError)(message)
        return store if store is not None else ScanStore(out)

    def part_store(self, out: Path) -> ScanStore:
        """This rank's part of the directory (``ranks/NNNNN``), with what a killed run of it left removed."""
        part = ScanStore(out / part_dir(self.rank))
        (part.path / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(part.path)
        remove_stale_temporaries(part.path / SHARDS_DIR)
        return part

    def sum_population(self, pop: PopulationStats) -> PopulationStats:
        """The population statistics of all ranks (each computed over its own rows), summed in float64."""
        parts = [np.asarray([pop.n], dtype=np.float64), pop.unit_sum, pop.plain_sum]
        if pop.class_count is not None:
            assert pop.class_unit_sum is not None and pop.class_plain_sum is not None
            parts += [pop.class_count, pop.class_unit_sum, pop.class_plain_sum]
        flat = torch.from_numpy(np.concatenate([np.asarray(a, dtype=np.float64).reshape(-1) for a in parts]))  # (sum of sizes,)
        dist.all_reduce(flat, group=self.group)
        values = flat.numpy()
        out, pos = [], 0
        for a in parts:
            out.append(values[pos : pos + a.size].reshape(np.shape(a)))  # back to the array's own shape
            pos += a.size
        total = PopulationStats(int(round(out[0][0])), out[1], out[2])
        if pop.class_count is not None:
            total.class_count = np.rint(out[3]).astype(np.int64)
            total.class_unit_sum, total.class_plain_sum = out[4], out[5]
        return total

    # ------------------------------------------------------------------------------------------ data
    def shard_or_close(self, data: Iterable[Any], *, labelled: bool) -> DataPart:
        """This rank's part of ``data`` (``shard_data``); the job is closed when the data cannot be split."""
        try:
            return shard_data(data, self.rank, self.world, labelled=labelled)
        except BaseException:
            self.close()
            raise


# --------------------------------------------------------------------------------------------- data
def _batch_rows(batch: Any, labelled: bool, where: str) -> int:
    if labelled:
        return int(split_batch_ids(batch, where)[1].shape[0])
    inputs, _ = split_unlabelled(batch, where)
    return int(input_leaves(inputs)[0][1].shape[0])


def _has_ids(batch: Any) -> bool:
    if isinstance(batch, Mapping):
        return SAMPLE_ID_KEY in batch
    return isinstance(batch, (tuple, list)) and len(batch) == 3


def _with_ids(batch: Any, ids: torch.Tensor) -> Any:
    """``batch`` carrying ``ids`` (the rows' positions in the whole data) in the batch contract's own way."""
    if isinstance(batch, Mapping):
        return {**batch, SAMPLE_ID_KEY: ids}
    if isinstance(batch, torch.Tensor):  # unlabelled: bare inputs
        return batch, None, ids
    if len(batch) == 1:  # unlabelled: (x,)
        return batch[0], None, ids
    return batch[0], batch[1], ids


class DataPart:
    """A rank's part of the data: the batches of ``data`` (from batch ``batches[0]`` to ``batches[1]`` when
    given, else all), each carrying its rows' positions in the whole data as sample ids (unless it has ids of
    its own), counted from row ``offset``. ``total``: the part's rows when known."""

    def __init__(
        self, data: Iterable[Any], *, labelled: bool, offset: int = 0, batches: tuple[int, int] | None = None,
        total: int | None = None,
    ) -> None:
        self.data, self.labelled, self.offset, self.batches, self.total = data, labelled, offset, batches, total

    def __iter__(self) -> Iterator[Any]:
        row = self.offset
        b0, b1 = self.batches if self.batches is not None else (0, None)
        for i, batch in enumerate(self.data):
            if b1 is not None and i >= b1:
                return
            n = _batch_rows(batch, self.labelled, f"batch {i}")
            if i >= b0:
                yield batch if _has_ids(batch) else _with_ids(batch, torch.arange(row, row + n))
            row += n


def _loader_over(loader: DataLoader, dataset: Any) -> DataLoader:
    """A DataLoader like ``loader`` (batch size, collate, workers...) over ``dataset``, in order, keeping every
    batch (the part's rows were already cut to what ``drop_last`` keeps)."""
    kwargs: dict[str, Any] = {
        "batch_size": loader.batch_size, "shuffle": False, "collate_fn": loader.collate_fn,
        "num_workers": loader.num_workers, "pin_memory": loader.pin_memory, "drop_last": False,
        "timeout": loader.timeout, "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context, "generator": loader.generator,
        "persistent_workers": loader.persistent_workers,
    }
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    return DataLoader(dataset, **kwargs)


def shard_data(data: Iterable[Any], rank: int, world: int, *, labelled: bool) -> DataPart:
    """Rank ``rank``'s part of ``data``, by contiguous row ranges (``row_range``), so the parts in rank order
    are the data in its own order:

    - a ``hardmine.loaders.BatchSource`` (what the CLI reads files with): its rows ``[start, stop)``, read by
      row range (Parquet: only the overlapping row groups);
    - a ``DataLoader`` over a map-style dataset with a sequential sampler: a loader like it over
      ``Subset(dataset, range(start, stop))`` — only the part's rows are loaded;
    - any other iterable of batches with a ``len`` (a list of batches, a loader with a batch sampler...): the
      contiguous block of *batches* ``row_range(len(data), rank, world)``; each rank iterates the batches
      before its block (to count their rows) without extracting them.

    Refused: shuffled or already-sharded loaders (``RandomSampler``, ``DistributedSampler``: pass the whole
    data in order, every rank the same) and iterables without a ``len`` (generators, iterable datasets)."""
    if isinstance(data, BatchSource):
        if data.total is None:
            raise ValueError("a distributed scan needs to know how many rows the data has; this source does not.")
        _check_enough(data.total, world, "samples")
        start, stop = row_range(data.total, rank, world)
        return DataPart(data.rows(start, stop), labelled=labelled, offset=start, total=stop - start)
    if isinstance(data, DataLoader):
        sampler = data.sampler
        if isinstance(sampler, (RandomSampler, DistributedSampler)):
            raise ValueError(
                f"data is a DataLoader with a {type(sampler).__name__}; a distributed scan shards the data itself by "
                "row ranges, so give every rank the same, unsharded DataLoader with shuffle=False."
            )
        dataset = data.dataset
        if (
            not isinstance(dataset, IterableDataset) and isinstance(sampler, SequentialSampler)
            and data.batch_size is not None and hasattr(dataset, "__len__")
        ):
            n = len(dataset)  # type: ignore[arg-type]
            if data.drop_last:
                n = n // data.batch_size * data.batch_size  # the rows a single-process scan sees
            _check_enough(n, world, "samples")
            start, stop = row_range(n, rank, world)
            part = _loader_over(data, Subset(dataset, range(start, stop)))
            return DataPart(part, labelled=labelled, offset=start, total=stop - start)
    try:
        n_batches = len(data)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(
            f"a distributed scan splits the data between ranks by rows, but data ({type(data).__name__}) has no len(); "
            "pass a DataLoader over a map-style Dataset (shuffle=False) or a list of batches."
        ) from None
    _check_enough(n_batches, world, "batches")
    b0, b1 = row_range(n_batches, rank, world)
    logger.info("rank %d: batches %d-%d of %d (earlier batches are read to count their rows)", rank, b0, b1 - 1, n_batches)
    return DataPart(data, labelled=labelled, batches=(b0, b1))


def _check_enough(n: int, world: int, what: str) -> None:
    if n < world:
        raise ValueError(
            f"the data has {n} {what}, fewer than the {world} processes of the distributed scan; use fewer processes "
            "(--nproc-per-node) or a smaller batch size."
        )


# --------------------------------------------------------------------------------- merging the parts
def merge_ledgers(parts: list[Ledger]) -> Ledger:
    """The scan's ledger from the ranks' complete ledgers, in rank order: shards renumbered and their rows and
    batches counted in the whole data, paths under ``ranks/NNNNN/``. ValueError when the ranks disagree on
    what the data is (task, classes, kind of ids)."""
    for r, p in enumerate(parts):
        if not p.complete:
            raise RuntimeError(f"rank {r}'s part of the scan is not complete; rerun the same command to resume it.")
    first = parts[0]
    for key in ("task", "num_classes", "id_kind", "out_dim"):
        values = {getattr(p, key) for p in parts}
        if len(values) > 1:
            raise ValueError(
                f"the ranks' parts of the data disagree on {key} ({sorted(map(str, values))}); every rank must get the "
                "same data and model."
            )
    plans = [p.extractor for p in parts]
    if any(plan != plans[0] for plan in plans):
        logger.warning("the ranks chose different engine plans after probing their first batch; recording rank 0's")
    merged = Ledger(
        complete=False, id_kind=first.id_kind, task=first.task, num_classes=first.num_classes, extractor=first.extractor
    )
    rows = batches = 0
    for r, p in enumerate(parts):
        prefix = part_dir(r)
        for s in p.shards:
            merged.shards.append(ShardRecord(
                len(merged.shards), (batches + s.batches[0], batches + s.batches[1]), (rows + s.rows[0], rows + s.rows[1]),
                s.digest, f"{prefix}/{s.grads}", f"{prefix}/{s.stats}",
            ))
        rows += int(p.n_samples or 0)
        batches += int(p.n_batches or 0)
    # The single-process fingerprint is one running hash over all the data; the ranks' hashes cannot be
    # joined into it, so a distributed scan's fingerprint is the digest of the ranks' fingerprints in order.
    digest = hashlib.sha256(f"ranks:{len(parts)}:".encode() + ",".join(str(p.dataset_fingerprint) for p in parts).encode())
    merged.finish(n_samples=rows, n_batches=batches, dataset_fingerprint=digest.hexdigest(), out_dim=int(first.out_dim or 0))
    return merged


def local_population(part: ScanStore, ledger: Ledger, task: str | None, num_classes: int | None) -> PopulationStats:
    """This rank's population statistics (``score.population_pass`` over its own shards, streamed)."""
    shards = ShardSet(part.path, ledger.shards)
    classification = task == TaskKind.CLASSIFICATION.value
    labels = shards.stats_table(["label"]).column("label").to_numpy().astype(np.int64) if classification else None
    return population_pass(shards.blocks(), int(ledger.out_dim or 0), labels, num_classes if classification else None)


def check_unique_ids(out: Path, ledger: Ledger) -> None:
    """Sample ids unique across every rank's part (each rank checked its own)."""
    ids = pd.Index(ShardSet(out, ledger.shards).sample_ids())
    if ids.has_duplicates:
        dup = ids[ids.duplicated()][0]
        raise ValueError(
            f"sample_id {dup!r} appears more than once in the data; sample ids must be unique. Fix the id column and "
            "rerun with overwrite=True."
        )
