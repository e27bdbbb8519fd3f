"""Atomic file writes and content fingerprints shared by the scan, index and manifest stages.

Every file hardmine writes goes through a temporary file in the destination directory (named
``.tmp-<name>-<pid>-<random>``) that is flushed, fsynced and then ``os.replace``-d onto the final name, so a
reader (or a resumed scan) sees either the old file or the complete new one, never half of one. Temporary
files left behind by a killed process are removed by ``remove_stale_temporaries``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "SCAN_FILE",
    "TMP_PREFIX",
    "DatasetHasher",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_save_npy",
    "check_page_destination",
    "file_sha256",
    "json_bytes",
    "model_fingerprint",
    "remove_stale_temporaries",
    "tensor_bytes",
    "utc_now",
]

TMP_PREFIX = ".tmp-"
# A scan directory's record (status, configuration; written by hardmine.scan.store): what tells one apart
SCAN_FILE = "scan.json"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and ``os.replace`` it onto ``path``.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    final = Path(path)
    tmp = final.with_name(f"{TMP_PREFIX}{final.name}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        # fsync so a crash after the rename cannot leave a renamed-but-empty file on disk.
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer, np.floating, np.bool_)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "value") and isinstance(o.value, str):  # str Enums
        return o.value
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def json_bytes(obj: Any, *, compact: bool = False) -> bytes:
    """What :func:`atomic_write_json` writes. ``compact``: one line without indentation, for files written often
    and read by programs (the scan's ledger, after every shard): json's C encoder handles only that form, the
    indented one is pure Python (about ten times slower)."""
    # sort_keys + fixed separators: the same object always gives the same bytes.
    if compact:
        text = json.dumps(obj, separators=(",", ":"), sort_keys=True, default=_json_default, allow_nan=True)
    else:
        text = json.dumps(obj, indent=1, sort_keys=True, default=_json_default, allow_nan=True)
    return (text + "\n").encode()


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def atomic_save_npy(path: str | os.PathLike[str], array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> int:
    """Delete ``.tmp-*`` files a killed writer left in ``directory``. Returns how many were removed."""
    n = 0
    for p in Path(directory).glob(f"{TMP_PREFIX}*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    return n


def utc_now() -> str:
    """The current UTC time as ISO 8601 to the second (``2026-01-31T12:00:00+00:00``), for records."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks (for checkpoint fingerprints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The raw bytes of a tensor (any dtype, including bfloat16) as a contiguous uint8 array, on the CPU."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)  # (numel,)
    return flat.view(torch.uint8).numpy()  # (numel * itemsize,)


def model_fingerprint(model: nn.Module | Mapping[str, Any]) -> str:
    """sha256 over the model's state dict in key order: each key, dtype, shape and the tensor's bytes.

    Two models with the same architecture and weights give the same fingerprint on any machine; one changed
    weight changes it. Non-tensor entries (``_extra_state``) contribute their ``repr``. A state dict
    (mapping) gives the fingerprint of a model holding it. This is hardmine's one model fingerprint: the
    value scans and online miners record as ``model_fingerprint`` and ``LoadedModel.fingerprint``.
    """
    state = model.state_dict() if isinstance(model, nn.Module) else model
    h = hashlib.sha256(b"hardmine-model/v1")
    for key, value in state.items():
        h.update(key.encode() + b"\0")
        if isinstance(value, torch.Tensor):
            h.update(f"{value.dtype}{tuple(value.shape)}".encode() + b"\0")
            h.update(tensor_bytes(value))
        else:
            h.update(repr(value).encode() + b"\0")
    return h.hexdigest()


class DatasetHasher:
    """Streaming sha256 fingerprint of a dataset: sample ids, labels and input bytes, batch by batch.

    Each stream (ids, labels, every input tensor) has its own running hash fed with the concatenated batch
    bytes, so the fingerprint does not depend on how the data was batched as long as per-sample shapes do
    not change between batches (padding that depends on the batch changes the bytes, and so the
    fingerprint). ``update`` also returns a digest of the batch alone, which a resumed scan compares with
    what it recorded, to detect data that changed or was reordered.
    """

    def __init__(self) -> None:
        self._ids = hashlib.sha256()
        self._labels = hashlib.sha256()
        self._inputs: dict[str, Any] = {}
        self._schema: dict[str, Any] | None = None

    @staticmethod
    def _id_bytes(ids: np.ndarray | Sequence[str]) -> bytes:
        if isinstance(ids, np.ndarray) and ids.dtype.kind in "iu":
            return ids.astype("<i8", copy=False).tobytes()
        # Length-prefixed UTF-8 so ["ab", "c"] and ["a", "bc"] differ.
        return b"".join(struct.pack("<I", len(b)) + b for b in (str(s).encode() for s in ids))

    def update(self, ids: np.ndarray | Sequence[str], labels: torch.Tensor, leaves: Sequence[tuple[str, torch.Tensor]]) -> str:
        if self._schema is None:
            self._schema = {
                "ids": "int" if isinstance(ids, np.ndarray) and ids.dtype.kind in "iu" else "str",
                "label_dtype": str(labels.dtype),
                "inputs": [[n, str(t.dtype), list(t.shape[1:])] for n, t in leaves],
            }
        batch = hashlib.sha256()
        parts: list[tuple[Callable[[Any], None], Any]] = []
        idb = self._id_bytes(ids)
        lab = tensor_bytes(labels)
        parts.append((self._ids.update, idb))
        parts.append((self._labels.update, lab))
        for name, t in leaves:
            h = self._inputs.setdefault(name, hashlib.sha256())
            parts.append((h.update, tensor_bytes(t)))
        for fn, data in parts:
            fn(data)
            batch.update(data)
        return batch.hexdigest()

    def hexdigest(self) -> str:
        h = hashlib.sha256(b"hardmine-dataset/v1")
        h.update(json.dumps(self._schema, sort_keys=True).encode())
        h.update(self._ids.digest())
        h.update(self._labels.digest())
        for name in sorted(self._inputs):
            h.update(name.encode() + b"\0" + self._inputs[name].digest())
        return h.hexdigest()


def check_page_destination(
    path: str | os.PathLike[str], *, overwrite: bool, generator: str, what: str, example: str
) -> Path:
    """Where an HTML page may be written: not a directory, in an existing directory; an existing file only if a
    page of the same kind wrote it (its ``<meta name="generator" content="{generator}...">``) or with
    ``overwrite``. ``what`` names the page in errors ("report"), ``example`` a file name to suggest."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"cannot write a {what} to {str(p)!r}: it is a directory; give a file such as "
                         f"{str(p / example)!r}.")
    if p.exists() and not overwrite:
        try:
            head = p.read_bytes()[:4096].decode("utf-8", "replace")
        except OSError:
            head = ""
        if f'<meta name="generator" content="{generator}' not in head:
            raise ValueError(f"{str(p)!r} exists and is not a hardmine {what}; refusing to replace it. Choose another "
                             "path, or pass overwrite=True to replace it.")
    if not p.parent.exists():
        raise ValueError(f"cannot write {p}: directory {p.parent} does not exist.")
    return p

