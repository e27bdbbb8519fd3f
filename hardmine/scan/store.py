"""The scan directory on disk: preparing it (new, resume, overwrite), and every write into it (atomic).

``ScanStore`` is the only writer of the directory's files; the layout is described in ``hardmine.scan``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .._io import (
    SCAN_FILE,
    TMP_PREFIX,
    atomic_path,
    atomic_save_npy,
    atomic_write_bytes,
    atomic_write_json,
    json_bytes,
    remove_stale_temporaries,
    utc_now,
)
from ..index import INDEX_FILES
from ..slices import SLICES_FILE
from ..tokens import TOKENS_FILE  # causal-LM scans: one row per token (schema: hardmine.lm.token_schema)
from .ledger import Ledger

__all__ = [
    "LOCK_FILE",
    "MANIFEST_FILE",
    "PROGRESS_FILE",
    "RANKS_DIR",
    "SCAN_FILE",
    "SCAN_FORMAT_VERSION",
    "SHARDS_DIR",
    "TOKENS_FILE",
    "ScanStore",
    "jsonable",
    "read_json",
]

logger = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
SHARDS_DIR = "shards"
MANIFEST_FILE = "manifest.parquet"
RANKS_DIR = "ranks"  # a distributed scan's per-rank parts, ranks/NNNNN/ (hardmine.scan.distributed)
LOCK_FILE = ".lock"  # held (flock) by the one job writing the directory; its text says who
SCAN_FORMAT_VERSION = 1
# what overwrite=True removes: every file a scan writes there (the slice table too: a new scan that writes
# none, a causal LM's, must not leave the old one beside it)
OWNED = (SCAN_FILE, PROGRESS_FILE, SHARDS_DIR, RANKS_DIR, *INDEX_FILES, MANIFEST_FILE, TOKENS_FILE, SLICES_FILE)


def jsonable(v: Any) -> Any:
    """``v`` as it reads back from JSON (non-JSON values as their ``str``), for comparisons with stored values."""
    return json.loads(json.dumps(v, default=str))


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file of the scan directory; ValueError naming the file when it is missing or damaged."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not readable JSON ({exc}); the scan directory is damaged.") from None


def _short(v: Any, limit: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class DirectoryLock:
    """One writer per scan directory: an exclusive ``flock`` on ``DIR/.lock``, held while a scan runs.

    The kernel drops the lock when its process dies, however it dies (``kill -9`` included), so a stale lock
    file never blocks a rerun; the file's text (pid, host, start time, command) only names the holder in the
    error a second job gets. Not for network file systems whose ``flock`` is not shared between hosts."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, *, wait: bool = False) -> None:
        """Take the lock, or raise ``ValueError`` naming its holder; ``wait``: block until the holder lets go
        instead (for short jobs such as building a scan's index on its first query)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.path.read_text(errors="replace").strip() or "another process"
            os.close(fd)
            raise ValueError(
                f"out={str(self.path.parent)!r} is being written by another scan ({holder}); wait for it to finish, "
                "stop it, or choose another directory (overwrite=True never replaces a directory a running scan "
                "holds)."
            ) from None
        if os.fstat(fd).st_ino != os.stat(self.path).st_ino:  # the file was replaced while we waited: not ours
            os.close(fd)
            raise ValueError(f"out={str(self.path.parent)!r}: its lock file changed under us; rerun the command.")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {utc_now()}: {' '.join(sys.argv)[:300]}".encode())
        self._fd = fd

    def release(self, *, remove: bool = False) -> None:
        """Let go of the lock (``remove``: and delete the file first, while still holding it — a directory
        left as it was found)."""
        if self._fd is not None:
            if remove:
                self.path.unlink(missing_ok=True)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class ScanStore:
    """A prepared scan directory (``ScanStore.prepare``) and its atomic writes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = DirectoryLock(path)

    # ------------------------------------------------------------------------------------------ prepare
    @classmethod
    def prepare(cls, directory: Path, config: dict[str, Any], *, resume: bool, overwrite: bool) -> ScanStore:
        """Create ``directory`` or accept it for this ``config``: empty, a scan of the same configuration
        (to resume or reuse, with ``resume``) or any scan (removed first, with ``overwrite``). Leftover
        temporaries of a killed run are removed."""
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"out={str(directory)!r} exists and is not a directory.")
        if directory.is_dir() and not (directory / SCAN_FILE).is_file():
            foreign = sorted(p.name for p in directory.iterdir() if p.name != LOCK_FILE and not p.name.startswith(TMP_PREFIX))
            if foreign:  # refused before the lock file is created: nothing is added to a directory we do not own
                raise ValueError(
                    f"out={str(directory)!r} is not empty ({foreign[:5]}) and holds no hardmine scan; choose an "
                    "empty or new directory."
                )
        directory.mkdir(parents=True, exist_ok=True)
        store = cls(directory)
        store.lock.acquire()  # before anything is read, removed or written
        try:
            store._prepare(config, resume=resume, overwrite=overwrite)
        except BaseException:
            store.lock.release()
            raise
        return store

    def _prepare(self, config: dict[str, Any], *, resume: bool, overwrite: bool) -> None:
        directory = self.path
        remove_stale_temporaries(directory)
        if (directory / SHARDS_DIR).is_dir():
            remove_stale_temporaries(directory / SHARDS_DIR)
        for p in directory.glob(".tmp-*"):  # directories a killed index build left
            shutil.rmtree(p, ignore_errors=True)
        store = self
        entries = [p.name for p in directory.iterdir() if p.name != LOCK_FILE]
        if not entries:
            return
        if not store.scan_file.is_file():
            raise ValueError(
                f"out={str(directory)!r} is not empty ({sorted(entries)[:5]}) and holds no hardmine scan; choose an "
                "empty or new directory."
            )
        if overwrite:
            store.clear()
            return
        old = read_json(store.scan_file).get("config", {})
        diff = sorted(k for k in set(old) | set(config) if jsonable(old.get(k)) != jsonable(config.get(k)))
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

    def clear(self) -> None:
        """Remove every file a scan writes (and nothing else)."""
        for name in OWNED:
            p = self.path / name
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------- files
    @property
    def scan_file(self) -> Path:
        return self.path / SCAN_FILE

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_FILE

    def read_info(self) -> dict[str, Any]:
        """``scan.json``, or ``{}`` before the first write."""
        return read_json(self.scan_file) if self.scan_file.is_file() else {}

    def write_info(self, info: dict[str, Any]) -> None:
        atomic_write_json(self.scan_file, info)

    def read_ledger(self) -> Ledger:
        """``progress.json``, or an empty ledger before the first shard."""
        p = self.path / PROGRESS_FILE
        return Ledger.from_dict(read_json(p)) if p.is_file() else Ledger()

    @staticmethod
    def ledger_bytes(ledger: Ledger) -> bytes:
        """What ``progress.json`` holds for ``ledger`` (taken as a snapshot by ``ShardWriter``)."""
        return json_bytes(ledger.to_dict(), compact=True)

    def write_ledger(self, ledger: Ledger | bytes) -> None:
        """``progress.json`` from a ledger, or from its ``ledger_bytes`` taken earlier."""
        atomic_write_bytes(self.path / PROGRESS_FILE, ledger if isinstance(ledger, bytes) else self.ledger_bytes(ledger))

    @staticmethod
    def shard_files(i: int) -> tuple[str, str]:
        """Shard ``i``'s gradient and statistics paths, relative to the directory (what the ledger records)."""
        return f"{SHARDS_DIR}/grads-{i:05d}.npy", f"{SHARDS_DIR}/stats-{i:05d}.parquet"

    def make_shards_dir(self) -> None:
        (self.path / SHARDS_DIR).mkdir(exist_ok=True)

    def write_shard(self, i: int, z: np.ndarray, stats: pa.Table) -> tuple[str, str]:
        """Write shard ``i``'s gradients ``(rows, out_dim)`` and statistics, each atomically; returns their
        paths relative to the directory (what the ledger records)."""
        self.make_shards_dir()
        grads, stats_name = self.shard_files(i)
        atomic_save_npy(self.path / grads, z)
        with atomic_path(self.path / stats_name) as tmp:
            # No dictionary encoding: on per-sample floats and ids (all distinct) it cost two thirds of the write
            # and made the file larger (a classification shard of 8k rows: 3.4 ms -> 1.3 ms, 530 kB -> 461 kB).
            pq.write_table(stats, tmp, use_dictionary=False)
        return grads, stats_name

    def token_part(self, i: int) -> Path:
        """Shard ``i``'s rows of the token table (causal-LM scans), written with the shard."""
        return self.path / SHARDS_DIR / f"tokens-{i:05d}.parquet"

    def write_token_part(self, i: int, table: pa.Table) -> None:
        """Write shard ``i``'s token rows atomically, before the shard is recorded: a recorded shard always
        has its part, so a resumed scan never lacks one."""
        self.make_shards_dir()
        with atomic_path(self.token_part(i)) as tmp:
            pq.write_table(table, tmp)

    @property
    def tokens_path(self) -> Path:
        return self.path / TOKENS_FILE

    def write_tokens(
        self,
        n_shards: int,
        schema: pa.Schema,
        on_part: Callable[[pa.Table], None] | None = None,
        footer: Callable[[], Mapping[str, str]] | None = None,
        parts: Sequence[Path] | None = None,
    ) -> None:
        """Stream the token parts into ``tokens.parquet`` (atomically), one row group per part row group, so only
        one of them is in memory at a time; the parts are removed afterwards. ``parts``: the part files in scan
        order (default: this directory's ``n_shards`` shard parts; a distributed scan passes every rank's).
        ``on_part`` sees each table as it is written (e.g. to accumulate statistics over all tokens in one pass)
        and ``footer()``, called before the file is closed, returns key-value metadata to store in its footer."""
        parts = [self.token_part(i) for i in range(n_shards)] if parts is None else list(parts)
        missing = [p.name for p in parts if not p.is_file()]
        if missing:
            raise ValueError(
                f"{self.path}: the token rows of shard(s) {missing[:3]} are missing, so tokens.parquet cannot be "
                "written; rerun the scan with overwrite=True."
            )
        with atomic_path(self.tokens_path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
            for p in parts:
                pf = pq.ParquetFile(p)
                for g in range(pf.num_row_groups):
                    table = pf.read_row_group(g).cast(schema)
                    writer.write_table(table, row_group_size=max(1, table.num_rows))
                    if on_part is not None:
                        on_part(table)
                    del table
            if footer is not None:
                writer.add_key_value_metadata(dict(footer()))
        for p in parts:
            p.unlink(missing_ok=True)

    def remove_manifest(self) -> None:
        """Drop the manifest before new scores are computed: a stale one must not outlive them."""
        self.manifest_path.unlink(missing_ok=True)
