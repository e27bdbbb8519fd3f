"""Stream a dataset on disk as ``(inputs, labels, sample_ids)`` batches.

Formats (``DataFormat``): Parquet (read by record batches) and CSV (pyarrow's streaming reader) with a label
column, an optional id column, and features as one list column, several numeric columns (glob), or a text
column tokenised by a Hugging Face tokenizer; ``.npz`` with ``X``, ``y`` and optional ``ids`` (uncompressed
members are memory-mapped); a Hugging Face ``datasets`` directory (``save_to_disk``); a ``pkg.module:factory``
returning a ``torch.utils.data.Dataset``; Fashion-MNIST-style IDX files.

Classification labels must be integers (integral floats are accepted and cast); NaN labels, non-integral
labels and NaN/inf features are refused with the offending sample id quoted.
"""

from __future__ import annotations

import fnmatch
import hashlib
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..datasets import find_idx_pair, read_idx
from ..enums import DataFormat  # defined in hardmine.enums; re-exported here for existing imports
from .model import import_object

__all__ = ["DataFormat", "BatchSource", "open_data", "detect_format", "label_names_of", "row_groups_for"]

Batch = tuple[Any, torch.Tensor, list[Any]]


@dataclass
class BatchSource:
    """An iterable of ``(inputs, labels, sample_ids)`` batches plus what is known about it.

    ``rows(start, stop)`` is the same source cut to the rows ``[start, stop)`` (a distributed scan's part):
    only those rows are converted, and read where the format allows (Parquet: the row groups that overlap;
    ``.npz``, IDX, HF datasets and factories: random access; CSV is parsed from the top but only the part's
    rows are converted). Default sample ids stay the rows' positions in the whole source."""

    format: DataFormat
    total: int | None  # number of samples that will be yielded, when known up front
    _make_iter: Callable[[], Iterator[Batch]]
    description: dict[str, Any] = field(default_factory=dict)
    _make_range: Callable[[int, int], Iterator[Batch]] | None = None

    def __iter__(self) -> Iterator[Batch]:
        return self._make_iter()

    def rows(self, start: int, stop: int) -> BatchSource:
        """The rows ``[start, stop)`` of this source as a source of their own (``0 <= start < stop <= total``)."""
        if self._make_range is None or self.total is None:
            raise ValueError(f"this {self.format.value} source cannot be read by row range.")
        if not (0 <= start < stop <= self.total):
            raise ValueError(f"row range [{start}, {stop}) is not inside the source's {self.total} rows.")
        make = self._make_range
        desc = {**self.description, "rows": [start, stop], "total_rows": self.total}
        return BatchSource(self.format, stop - start, lambda: make(start, stop), desc)

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError("this source does not know its length up front")
        return self.total


def detect_format(data: str) -> DataFormat:
    if ":" in data and not Path(data).exists():
        return DataFormat.FACTORY
    p = Path(data)
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists():
            return DataFormat.HF
        if any(p.glob("*-idx3-ubyte*")):
            return DataFormat.IDX
        raise ValueError(
            f"cannot tell the format of directory {data!r}: it is neither a Hugging Face datasets directory "
            "(dataset_info.json) nor a folder of IDX files; pass --format."
        )
    name = p.name.lower()
    for suffix, fmt in ((".parquet", DataFormat.PARQUET), (".pq", DataFormat.PARQUET), (".csv", DataFormat.CSV),
                        (".csv.gz", DataFormat.CSV), (".npz", DataFormat.NPZ),
                        (".jsonl", DataFormat.JSONL), (".json", DataFormat.JSONL)):
        if name.endswith(suffix):
            return fmt
    if "idx3-ubyte" in name:
        return DataFormat.IDX
    raise ValueError(f"cannot tell the format of {data!r} from its name; pass --format (one of "
                     f"{', '.join(f.value for f in DataFormat if f is not DataFormat.AUTO)}).")


# --------------------------------------------------------------------------------------------- checking
def _object_array(values: list[Any]) -> np.ndarray:
    """A 1-D object array of ``values`` (lists stay lists: ``np.asarray`` would make a 2-D array of them)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def label_names_of(column: Any) -> list[str] | None:
    """The class names of a text label column (a pyarrow array / chunked array), sorted: class ``i`` is the
    ``i``-th name. ``None`` when the labels are not text (numbers are class ids already)."""
    import pyarrow as pa

    typ = column.type
    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        return None
    values = column.cast(pa.large_string()) if not pa.types.is_dictionary(column.type) else column
    names = sorted({v for v in values.to_pylist() if v is not None})
    return names


def _labels_tensor(
    raw: np.ndarray,
    ids: Sequence[Any],
    classification: bool,
    num_classes: int | None,
    names: Sequence[str] | None = None,
    multilabel: bool = False,
) -> torch.Tensor:
    if multilabel:  # (B, C) rows of 0/1 (a list column, or a 2-D array)
        try:
            rows = np.stack([np.asarray(v, dtype=np.float64) for v in raw]) if raw.dtype == object else raw
            rows = np.asarray(rows, dtype=np.float64).reshape(len(raw), -1)  # (B, C)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"multi-label (--loss bce) labels must be equal-length 0/1 rows, one per sample; found e.g. "
                f"{raw[0]!r} (sample {ids[0]!r})."
            ) from exc
        bad = ~((rows == 0) | (rows == 1)).all(axis=1)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"multi-label row of sample {ids[i]!r} is {raw[i]!r}; every value must be 0 or 1.")
        return torch.from_numpy(np.ascontiguousarray(rows.astype(np.float32)))
    if names is not None:  # text labels: class i is names[i] (label_names_of)
        index = {n: i for i, n in enumerate(names)}
        missing = [i for i, v in enumerate(raw) if v not in index]
        if missing:
            i = missing[0]
            raise ValueError(f"label of sample {ids[i]!r} is {raw[i]!r}; drop or fix samples with missing labels.")
        raw = np.fromiter((index[v] for v in raw), dtype=np.int64, count=len(raw))
    if raw.dtype == object:
        try:
            raw = raw.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"labels must be numbers or text class names; found e.g. {raw[0]!r} (sample {ids[0]!r}), a mix of "
                "types. Make the label column one type (text labels are mapped to class ids, recorded in the scan)."
            ) from exc
    if np.issubdtype(raw.dtype, np.floating):
        bad = ~np.isfinite(raw)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"label of sample {ids[i]!r} is {raw[i].item()!r}; drop or fix samples with missing labels.")
        if classification:
            frac = raw != np.round(raw)
            if frac.any():
                i = int(np.argmax(frac))
                raise ValueError(
                    f"label of sample {ids[i]!r} is {raw[i].item()!r}, not an integer class id; for regression pass --loss mse."
                )
            raw = raw.astype(np.int64)
    elif not np.issubdtype(raw.dtype, np.integer) and raw.dtype != np.bool_:
        raise ValueError(f"labels have dtype {raw.dtype}; they must be integers (classes) or floats (regression).")
    if classification:
        raw = raw.astype(np.int64)
        if num_classes is not None:
            out = (raw < 0) | (raw >= num_classes)
            if out.any():
                i = int(np.argmax(out))
                raise ValueError(
                    f"label {int(raw[i])} of sample {ids[i]!r} is out of range for --num-classes {num_classes} "
                    f"(labels must be in [0, {num_classes - 1}])."
                )
        return torch.from_numpy(np.ascontiguousarray(raw))
    return torch.from_numpy(np.ascontiguousarray(raw.astype(np.float32)))


def _features_tensor(x: np.ndarray, ids: Sequence[Any], shape: tuple[int, ...] | None, what: str) -> torch.Tensor:
    x = np.asarray(x)
    if x.dtype == object:
        raise ValueError(f"{what} are not numeric (dtype object, e.g. {x.flat[0]!r} for sample {ids[0]!r}).")
    x = x.astype(np.float32, copy=False)
    flat = x.reshape(len(x), -1)  # (B, F)
    bad = ~np.isfinite(flat).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{what} of sample {ids[i]!r} contain NaN/inf; clean or drop those samples.")
    if shape is not None:
        if int(np.prod(shape)) != flat.shape[1]:
            raise ValueError(
                f"--input-shape {','.join(map(str, shape))} needs {int(np.prod(shape))} values per sample but {what} "
                f"have {flat.shape[1]}."
            )
        x = flat.reshape(len(x), *shape)  # (B, *input_shape)
    x = np.ascontiguousarray(x)
    if not x.flags.writeable:  # memory-mapped input: torch wants memory it may write to
        x = x.copy()
    return torch.from_numpy(x)


# ------------------------------------------------------------------------------------------- tabular
@dataclass
class _TableSpec:
    label_column: str
    id_column: str | None
    feature_column: str | None
    feature_columns: str | None
    text_column: str | None
    input_shape: tuple[int, ...] | None
    classification: bool
    num_classes: int | None
    tokenizer: Any
    max_length: int
    label_names: list[str] | None = None  # text labels: class i is label_names[i] (set by the source)
    # The model's class names, class 0 first (--class-names, a HF model's id2label): text labels map to these
    class_names: list[str] | None = None
    labels: bool = True  # False: unlabelled data; a placeholder target is yielded (the scan predicts it)
    multilabel: bool = False  # labels are (C,) 0/1 rows (--loss bce)

    def read_label_names(self, column: Any) -> None:
        """Map text labels to class ids (classification only): the whole column is read once, up front, so the
        ids do not depend on which batch a name first appears in, or on --limit."""
        if self.classification and self.labels and not self.multilabel:
            self.label_names = label_names_of(column)
            if self.label_names is not None and self.class_names is not None:
                # the model's classes, not the names this data happens to hold (a subset may lack one, which
                # would shift every later id)
                unknown = [n for n in self.label_names if n not in self.class_names]
                if unknown:
                    raise ValueError(
                        f"label(s) {unknown[:10]} of the data are not among the model's class names "
                        f"{self.class_names[:20]} (--class-names, else a Hugging Face head's id2label); pass "
                        "--class-names with every class of the model, class 0 first, named as the data names them."
                    )
                self.label_names = list(self.class_names)
            if self.label_names is not None and self.num_classes is not None and len(self.label_names) > self.num_classes:
                raise ValueError(
                    f"the label column has {len(self.label_names)} class names {self.label_names[:10]} but "
                    f"--num-classes is {self.num_classes}."
                )

    def columns(self, names: list[str]) -> tuple[list[str], list[str]]:
        """Check the requested columns exist; return (columns to read, feature columns)."""
        def need(col: str, flag: str) -> None:
            if col not in names:
                raise ValueError(f"{flag} {col!r} is not a column of the data; columns are {names[:30]}.")

        read: list[str] = []
        if self.labels:
            need(self.label_column, "--label-column")
            read.append(self.label_column)
        if self.id_column:
            need(self.id_column, "--id-column")
            read.append(self.id_column)
        feats: list[str] = []
        chosen = [o for o in (self.feature_column, self.feature_columns, self.text_column) if o]
        if len(chosen) != 1:
            raise ValueError(
                "say where the inputs are with exactly one of --feature-column COL (one list/array column), "
                "--feature-columns GLOB (several numeric columns) or --text-column COL (Hugging Face models)."
            )
        if self.feature_column:
            need(self.feature_column, "--feature-column")
            feats = [self.feature_column]
        elif self.text_column:
            need(self.text_column, "--text-column")
            if self.tokenizer is None:
                raise ValueError("--text-column needs a Hugging Face model directory as CHECKPOINT (its tokenizer).")
            feats = [self.text_column]
        else:
            assert self.feature_columns is not None  # chosen has exactly one entry
            skip = {self.label_column if self.labels else None, self.id_column}
            feats = [n for n in names if fnmatch.fnmatchcase(n, self.feature_columns) and n not in skip]
            if not feats:
                raise ValueError(f"--feature-columns {self.feature_columns!r} matches no column; columns are {names[:30]}.")
        return read + [f for f in feats if f not in read], feats

    def convert(self, table: Any, feats: list[str], offset: int) -> Batch:
        """One pyarrow RecordBatch/Table -> (inputs, labels, ids)."""
        n = table.num_rows
        ids = table.column(self.id_column).to_pylist() if self.id_column else list(range(offset, offset + n))
        if self.id_column and any(i is None for i in ids):
            raise ValueError(f"--id-column {self.id_column!r} has missing values (near row {offset}).")
        if not self.labels:
            labels = torch.zeros(n, dtype=torch.int64)  # placeholder: an unlabelled scan predicts the target
        else:
            col = table.column(self.label_column)
            as_objects = self.label_names is not None or self.multilabel
            raw = _object_array(col.to_pylist()) if as_objects else _to_numpy(col)
            labels = _labels_tensor(raw, ids, self.classification, self.num_classes, self.label_names, self.multilabel)
        if self.text_column:
            texts = table.column(self.text_column).to_pylist()
            if any(not isinstance(t, str) for t in texts):
                i = next(i for i, t in enumerate(texts) if not isinstance(t, str))
                raise ValueError(f"--text-column {self.text_column!r} of sample {ids[i]!r} is {texts[i]!r}, not text.")
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            return dict(enc), labels, ids
        if self.feature_column:
            col = table.column(self.feature_column)
            x = _list_column_to_numpy(col, ids, self.feature_column)  # (B, F)
        else:
            x = np.stack([_to_numpy(table.column(c)).astype(np.float64) for c in feats], axis=1)  # (B, F)
        return _features_tensor(x, ids, self.input_shape, "features"), labels, ids


def _to_numpy(col: Any) -> np.ndarray:
    arr = col.to_numpy(zero_copy_only=False)
    return np.asarray(arr)


def _list_column_to_numpy(col: Any, ids: Sequence[Any], name: str) -> np.ndarray:
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if not pa.types.is_list(col.type) and not pa.types.is_large_list(col.type) and not pa.types.is_fixed_size_list(col.type):
        raise ValueError(f"--feature-column {name!r} has type {col.type}; it must be a list/array column.")
    lengths = col.value_lengths().to_numpy(zero_copy_only=False)
    if (lengths != lengths[0]).any():
        i = int(np.argmax(lengths != lengths[0]))
        raise ValueError(f"--feature-column {name!r}: sample {ids[i]!r} has {lengths[i]} values, sample {ids[0]!r} has {lengths[0]}.")
    values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    return values.reshape(len(col), int(lengths[0]))  # (B, F)


def _parquet_source(path: Path, spec: _TableSpec, batch_size: int, limit: int | None) -> BatchSource:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable Parquet file: {exc}") from exc
    read, feats = spec.columns(pf.schema_arrow.names)
    if spec.labels:
        spec.read_label_names(pq.read_table(path, columns=[spec.label_column]).column(0))
    total = pf.metadata.num_rows if limit is None else min(limit, pf.metadata.num_rows)

    def it() -> Iterator[Batch]:
        yield from _capped(
            (spec.convert(rb, feats, off) for rb, off in _offsets(pf.iter_batches(batch_size=batch_size, columns=read))),
            limit,
        )

    def part(start: int, stop: int) -> Iterator[Batch]:
        groups, first = row_groups_for(pf.metadata, start, stop)  # only the row groups that hold the part
        tables = pf.iter_batches(batch_size=batch_size, row_groups=groups, columns=read)
        yield from (spec.convert(t, feats, off) for t, off in _window(tables, first, start, stop))

    return BatchSource(DataFormat.PARQUET, total, it, {"path": str(path), "columns": read}, part)


def row_groups_for(metadata: Any, start: int, stop: int) -> tuple[list[int], int]:
    """The row groups of a Parquet file (its ``FileMetaData``) that overlap rows ``[start, stop)``, and the
    first row of the first of them."""
    groups: list[int] = []
    first = pos = 0
    for g in range(metadata.num_row_groups):
        n = metadata.row_group(g).num_rows
        if pos < stop and pos + n > start:
            if not groups:
                first = pos
            groups.append(g)
        pos += n
    return groups, first


def _csv_source(path: Path, spec: _TableSpec, batch_size: int, limit: int | None) -> BatchSource:
    import pyarrow.csv as pacsv

    def reader() -> Any:
        try:
            return pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=1 << 22))
        except Exception as exc:
            raise ValueError(f"{path} is not a readable CSV file: {exc}") from exc

    read, feats = spec.columns(reader().schema.names)
    if spec.labels:
        try:
            only = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(include_columns=[spec.label_column]))
        except Exception as exc:
            raise ValueError(f"{path} is not a readable CSV file: {exc}") from exc
        spec.read_label_names(only.column(0))
    opener = __import__("gzip").open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        rows = max(0, sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 24), b"")) - 1)
    total = rows if limit is None else min(limit, rows)

    def it() -> Iterator[Batch]:
        batches = _rebatch((rb.select(read) for rb in reader()), batch_size, 0)
        yield from _capped((spec.convert(t, feats, off) for t, off in _offsets(batches)), limit)

    def part(start: int, stop: int) -> Iterator[Batch]:
        # A CSV stream cannot seek: earlier rows are parsed, but only the part's rows are converted.
        blocks = (rb.select(read) for rb in reader())
        for t, off in _window(_rebatch(blocks, batch_size, start), 0, start, stop):
            yield spec.convert(t, feats, off)

    return BatchSource(DataFormat.CSV, total, it, {"path": str(path), "columns": read}, part)


def _hf_source(path: Path, spec: _TableSpec, batch_size: int, limit: int | None, split: str) -> BatchSource:
    try:
        import datasets
    except ImportError as exc:
        raise ValueError(f"{path} is a Hugging Face datasets directory; reading it needs: pip install 'hardmine[hf]'.") from exc
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"split {split!r} is not in {path}; it has {sorted(ds)}. Pass --split.")
        ds = ds[split]
    read, feats = spec.columns(list(ds.column_names))
    feature = ds.features.get(spec.label_column) if spec.labels else None
    if not spec.labels:
        class_label_names = None
    elif getattr(feature, "names", None):  # a ClassLabel: integer ids that come with their names
        spec.label_names = None
        class_label_names: list[str] | None = list(feature.names)
    else:
        spec.read_label_names(ds.data.column(spec.label_column))
        class_label_names = None
    table = ds.with_format("arrow").select_columns(read)
    total = len(table) if limit is None else min(limit, len(table))

    def it() -> Iterator[Batch]:
        def batches() -> Iterator[Any]:
            for lo in range(0, total, batch_size):
                yield table[lo : min(total, lo + batch_size)]

        yield from _capped((spec.convert(t, feats, off) for t, off in _offsets(batches())), limit)

    def part(start: int, stop: int) -> Iterator[Batch]:
        for lo in range(start, stop, batch_size):
            yield spec.convert(table[lo : min(stop, lo + batch_size)], feats, lo)

    desc = {"path": str(path), "columns": read, "split": split}
    if class_label_names:
        desc["class_names"] = class_label_names
    return BatchSource(DataFormat.HF, total, it, desc, part)


def _window(tables: Iterator[Any], first: int, start: int, stop: int) -> Iterator[tuple[Any, int]]:
    """``(table, first row)`` for the rows ``[start, stop)`` of a stream of Arrow tables / record batches that
    begins at row ``first``; tables outside the window are skipped unconverted, the edge ones sliced."""
    pos = first
    for t in tables:
        n = t.num_rows
        lo, hi = max(start - pos, 0), min(stop - pos, n)
        if hi > lo:
            yield (t if lo == 0 and hi == n else t.slice(lo, hi - lo)), pos + lo
        pos += n
        if pos >= stop:
            return


def _rebatch(blocks: Iterator[Any], batch_size: int, start: int) -> Iterator[Any]:
    """Arrow record batches of any size as tables of ``batch_size`` rows counted from row ``start`` (the rows
    before ``start`` come as tables of their own, so a part's batches are full ones)."""
    import pyarrow as pa

    pending: list[Any] = []
    count, pos = 0, 0
    for rb in blocks:
        if start and pos + rb.num_rows <= start:  # wholly before the part: passed on as is (skipped by _window)
            pos += rb.num_rows
            yield rb
            continue
        if pos < start:
            head = start - pos
            yield rb.slice(0, head)
            rb, pos = rb.slice(head), start
        pending.append(rb)
        count += rb.num_rows
        pos += rb.num_rows
        while count >= batch_size:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, batch_size)
            rest = table.slice(batch_size)
            pending, count = rest.to_batches(), rest.num_rows
    if count:
        yield pa.Table.from_batches(pending)


def _offsets(tables: Iterator[Any]) -> Iterator[tuple[Any, int]]:
    off = 0
    for t in tables:
        yield t, off
        off += t.num_rows


def _capped(batches: Iterator[Batch], limit: int | None) -> Iterator[Batch]:
    seen = 0
    for inputs, labels, ids in batches:
        if limit is not None and seen + len(ids) > limit:
            keep = limit - seen
            if keep <= 0:
                return
            inputs = {k: v[:keep] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[:keep]
            labels, ids = labels[:keep], ids[:keep]
        seen += len(ids)
        yield inputs, labels, ids
        if limit is not None and seen >= limit:
            return


# ------------------------------------------------------------------------------------------ arrays
def _npz_member(path: Path, name: str) -> np.ndarray:
    """Memory-map an uncompressed .npz member; load compressed ones."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name + ".npy")
        if info.compress_type == zipfile.ZIP_STORED:
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(f)
                header_len = f.tell()
            # local file header: 30 bytes + name + extra, then the member's bytes
            with open(path, "rb") as raw:
                raw.seek(info.header_offset + 26)
                n, m = np.frombuffer(raw.read(4), dtype="<u2")
            start = info.header_offset + 30 + int(n) + int(m) + header_len
            if dtype.hasobject:
                raise ValueError(f"{path}:{name} holds Python objects; hardmine does not unpickle data.")
            return np.memmap(path, dtype=dtype, mode="r", offset=start, shape=shape, order="F" if fortran else "C")
    with np.load(path, allow_pickle=False) as z:
        return z[name]


def _npz_source(path: Path, batch_size: int, limit: int | None, shape: tuple[int, ...] | None,
                classification: bool, num_classes: int | None, labels: bool = True,
                multilabel: bool = False) -> BatchSource:
    try:
        with zipfile.ZipFile(path) as zf:
            names = {n.removesuffix(".npy") for n in zf.namelist()}
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{path} is not a readable .npz file: {exc}") from exc
    for need in ("X", "y") if labels else ("X",):
        if need not in names:
            raise ValueError(f"{path} has arrays {sorted(names)}; it needs 'X' (features) and 'y' (labels), and may have 'ids'.")
    x = _npz_member(path, "X")
    y = _npz_member(path, "y") if labels else np.zeros(len(x), dtype=np.int64)  # placeholder when unlabelled
    ids_arr = _npz_member(path, "ids") if "ids" in names else None
    if len(x) != len(y) or (ids_arr is not None and len(ids_arr) != len(y)):
        raise ValueError(f"{path}: X has {len(x)} rows, y {len(y)}" + (f", ids {len(ids_arr)}" if ids_arr is not None else "") + ".")
    total = len(y) if limit is None else min(limit, len(y))
    per_sample_shape = shape or tuple(x.shape[1:])

    def part(start: int, stop: int) -> Iterator[Batch]:
        for lo in range(start, stop, batch_size):
            hi = min(stop, lo + batch_size)
            ids = ids_arr[lo:hi].tolist() if ids_arr is not None else list(range(lo, hi))
            yield (_features_tensor(np.asarray(x[lo:hi]), ids, per_sample_shape, "X"),
                   _labels_tensor(np.asarray(y[lo:hi]), ids, classification, num_classes, multilabel=multilabel), ids)

    return BatchSource(DataFormat.NPZ, total, lambda: part(0, total), {"path": str(path)}, part)


def _idx_source(path: Path, split: str, batch_size: int, limit: int | None, shape: tuple[int, ...] | None,
                num_classes: int | None) -> BatchSource:
    if path.is_dir():
        img_path, lbl_path = find_idx_pair(path, split)
    else:
        img_path = path
        lbl_path = Path(str(path).replace("images-idx3", "labels-idx1"))
        if not lbl_path.exists():
            raise ValueError(f"no labels file next to {path} (looked for {lbl_path.name}).")
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if len(images) != len(labels):
        raise ValueError(f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels.")
    total = len(labels) if limit is None else min(limit, len(labels))
    # Pixels are scaled to [0, 1]; the default shape is (1, H, W), as image models expect.
    per_sample_shape = shape or (1, *images.shape[1:])

    def part(start: int, stop: int) -> Iterator[Batch]:
        for lo in range(start, stop, batch_size):
            hi = min(stop, lo + batch_size)
            ids = list(range(lo, hi))
            x = images[lo:hi].astype(np.float32) / 255.0  # (B, H, W)
            yield (_features_tensor(x, ids, per_sample_shape, "images"),
                   _labels_tensor(labels[lo:hi].astype(np.int64), ids, True, num_classes), ids)

    return BatchSource(DataFormat.IDX, total, lambda: part(0, total), {"path": str(img_path), "split": split}, part)


def _factory_source(spec: str, batch_size: int, limit: int | None, num_workers: int,
                    classification: bool, num_classes: int | None) -> BatchSource:
    from torch.utils.data import DataLoader, Dataset, Subset

    make = import_object(spec, "dataset factory")
    ds = make() if callable(make) and not isinstance(make, Dataset) else make
    if not isinstance(ds, Dataset):
        raise ValueError(f"dataset factory {spec!r} returned a {type(ds).__name__}, not a torch.utils.data.Dataset.")
    n = len(ds)  # type: ignore[arg-type]
    total = n if limit is None else min(limit, n)
    if total < n:
        ds = Subset(ds, range(total))

    def part(start: int, stop: int) -> Iterator[Batch]:
        off = start
        rows = ds if (start, stop) == (0, total) else Subset(ds, range(start, stop))  # only the part is loaded
        for item in DataLoader(rows, batch_size=batch_size, shuffle=False, num_workers=num_workers):
            if isinstance(item, dict):
                key = next((k for k in ("labels", "label", "y", "target") if k in item), None)
                if key is None:
                    raise ValueError(f"dataset items are dicts without a label key; keys are {sorted(item)}.")
                y = item[key]
                inputs: Any = {k: v for k, v in item.items() if k != key}
            elif isinstance(item, (list, tuple)) and len(item) >= 2:
                inputs, y = item[0], item[1]
            else:
                raise ValueError("dataset items must be (x, y) pairs or dicts with a 'labels' key.")
            b = len(y)
            ids = list(range(off, off + b))
            off += b
            labels = _labels_tensor(np.asarray(y), ids, classification, num_classes)
            if isinstance(inputs, torch.Tensor):
                inputs = _features_tensor(inputs.numpy(), ids, None, "inputs") if inputs.is_floating_point() else inputs
            yield inputs, labels, ids

    return BatchSource(DataFormat.FACTORY, total, lambda: part(0, total), {"factory": spec}, part)


# ------------------------------------------------------------------------------------------------ entry
def open_data(
    data: str,
    *,
    format: DataFormat | str = DataFormat.AUTO,
    label_column: str = "label",
    id_column: str | None = None,
    feature_column: str | None = None,
    feature_columns: str | None = None,
    text_column: str | None = None,
    input_shape: Sequence[int] | None = None,
    tokenizer: Any = None,
    max_length: int = 128,
    split: str = "train",
    batch_size: int = 256,
    limit: int | None = None,
    num_workers: int = 0,
    classification: bool = True,
    num_classes: int | None = None,
    labels: bool = True,
    multilabel: bool = False,
    class_names: Sequence[str] | None = None,
) -> BatchSource:
    """Open ``data`` as a stream of ``(inputs, labels, sample_ids)`` batches (never loaded whole when the
    format allows streaming). ``labels=False``: unlabelled data — no label column is read and a placeholder
    target is yielded (``hardmine.scan(..., labels=None)`` replaces it with the model's prediction).

    Text labels are class names: with ``class_names`` (the model's, class 0 first) each maps to its index there
    (a label not among them is refused); without, to its index among the data's own names, sorted (recorded as
    the source's ``class_names``)."""
    from ..enums import parse_choice

    fmt = parse_choice(DataFormat, format, "format")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size {batch_size!r} must be a positive integer.")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit {limit!r} must be a positive integer.")
    shape = tuple(int(s) for s in input_shape) if input_shape else None
    if shape is not None and any(s < 1 for s in shape):
        raise ValueError(f"input shape {shape} must have positive sizes.")
    if fmt is DataFormat.AUTO:
        fmt = detect_format(data)
    if fmt is DataFormat.JSONL:
        raise ValueError(
            f"data {data!r} is JSONL, which hardmine reads for causal-LM scans (--task causal-lm with --text-column, "
            "--prompt-column/--completion-column or --messages-column); convert it to Parquet or CSV for other tasks."
        )
    if fmt is DataFormat.FACTORY:
        return _factory_source(data, batch_size, limit, num_workers, classification, num_classes)
    path = Path(data)
    if not path.exists():
        raise ValueError(f"data {data!r} does not exist.")
    spec = _TableSpec(label_column, id_column, feature_column, feature_columns, text_column, shape,
                      classification, num_classes, tokenizer, max_length, labels=labels, multilabel=multilabel,
                      class_names=None if class_names is None else [str(n) for n in class_names])
    if fmt is DataFormat.PARQUET:
        src = _parquet_source(path, spec, batch_size, limit)
    elif fmt is DataFormat.CSV:
        src = _csv_source(path, spec, batch_size, limit)
    elif fmt is DataFormat.HF:
        src = _hf_source(path, spec, batch_size, limit, split)
    elif fmt is DataFormat.NPZ:
        src = _npz_source(path, batch_size, limit, shape, classification, num_classes, labels, multilabel)
    else:
        src = _idx_source(path, split, batch_size, limit, shape, num_classes)
    if src.total == 0:
        raise ValueError(f"data {data!r} has no samples; nothing to scan.")
    if spec.label_names is not None:  # text labels mapped to ids: the scan records the names
        src.description["class_names"] = list(spec.label_names)
        # how: by the class names given (the model's), or by the data's own names, sorted
        src.description["label_ids"] = "given names" if spec.class_names is not None else "sorted names"
    src.description["fingerprint_hint"] = _file_hint(path)
    return src


def _file_hint(path: Path) -> str:
    """Cheap identity of the data file(s): names, sizes and mtimes (the scan hashes the content it reads)."""
    h = hashlib.sha256()
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    for f in files:
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}|{st.st_size}|{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]
