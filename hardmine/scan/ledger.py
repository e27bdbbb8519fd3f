"""The shard ledger (``progress.json``): which shards are complete, and what the scan learned on the way.

The ledger is written after every shard (atomically, by ``ScanStore.write_ledger``), so a killed scan
resumes from its last complete shard. Its JSON form is the one earlier versions wrote: optional fields
that are still unknown are left out rather than written as ``null``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Any

from ..enums import TaskKind

__all__ = ["Ledger", "ShardRecord"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardRecord:
    """One complete shard: its batch and row ranges (half-open), the data digest and its two files."""

    index: int
    batches: tuple[int, int]  # [first batch, end batch)
    rows: tuple[int, int]  # [first row, end row)
    digest: str  # sha256 over the per-batch digests of its batches (the resume check)
    grads: str  # path of the (rows, out_dim) float32 .npy, relative to the scan directory
    stats: str  # path of the per-sample statistics .parquet, relative to the scan directory

    @property
    def n_rows(self) -> int:
        return self.rows[1] - self.rows[0]

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "batches": list(self.batches), "rows": list(self.rows), "digest": self.digest,
                "grads": self.grads, "stats": self.stats}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardRecord:
        b0, b1 = d["batches"]
        r0, r1 = d["rows"]
        return cls(int(d["index"]), (int(b0), int(b1)), (int(r0), int(r1)), d["digest"], d["grads"], d["stats"])


@dataclass
class Ledger:
    """What ``progress.json`` records. The ``record_*`` methods check a batch against what earlier batches
    established (``where`` names the batch in the error)."""

    shards: list[ShardRecord] = field(default_factory=list)
    complete: bool = False
    id_kind: str | None = None  # "int" | "str"
    task: str | None = None  # a TaskKind value
    num_classes: int | None = None
    extractor: dict[str, Any] | None = None  # GradientExtractor.metadata() of the plan in use
    n_samples: int | None = None  # set when complete
    n_batches: int | None = None
    dataset_fingerprint: str | None = None
    out_dim: int | None = None

    # ---------------------------------------------------------------------------------------- progress
    @property
    def done_batches(self) -> int:
        """Batches recorded in complete shards."""
        return self.shards[-1].batches[1] if self.shards else 0

    @property
    def done_rows(self) -> int:
        """Samples recorded in complete shards."""
        return self.shards[-1].rows[1] if self.shards else 0

    def record_id_kind(self, kind: str, where: str) -> None:
        if self.id_kind is None:
            self.id_kind = kind
        elif self.id_kind != kind:
            raise ValueError(f"{where}: sample ids switch between integers and strings; use one kind throughout.")

    def record_task(self, task: TaskKind, where: str) -> None:
        if self.task is not None and self.task != task.value:
            raise ValueError(f"{where}: targets look like {task.value} but earlier batches were {self.task}.")
        self.task = task.value

    def record_num_classes(self, c: int, where: str) -> None:
        if self.num_classes not in (None, c):
            raise ValueError(f"{where}: the model output has {c} classes, earlier batches had {self.num_classes}.")
        self.num_classes = c

    def finish(self, *, n_samples: int, n_batches: int, dataset_fingerprint: str, out_dim: int) -> None:
        """Mark the extraction complete."""
        self.complete = True
        self.n_samples, self.n_batches = n_samples, n_batches
        self.dataset_fingerprint, self.out_dim = dataset_fingerprint, out_dim

    def summary(self) -> dict[str, Any]:
        """The fields ``scan.json`` repeats (unknown ones as ``None``), shards included."""
        keys = ("n_samples", "n_batches", "task", "num_classes", "id_kind", "dataset_fingerprint", "out_dim", "extractor")
        return {k: getattr(self, k) for k in keys} | {"shards": [s.to_dict() for s in self.shards]}

    # -------------------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"shards": [s.to_dict() for s in self.shards], "complete": self.complete}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in out and value is not None:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Ledger:
        known = {f.name for f in fields(cls)} - {"shards"}
        extra = sorted(set(d) - known - {"shards"})
        if extra:
            logger.debug("ignoring unknown ledger fields %s", extra)
        return cls(shards=[ShardRecord.from_dict(s) for s in d.get("shards", [])],
                   **{k: v for k, v in d.items() if k in known})
