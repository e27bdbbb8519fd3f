"""The data behind sample ids, read back from a scan's own data file: what ``show``/``review``/``slices``
print with ``--with-data`` and the HTML report shows beside each example.

Text data (a ``--text-column`` of Parquet or CSV): the text itself. Any other input (images, feature
vectors): where the sample is — the data file and its row (``train-images-idx3-ubyte.gz[1387]``), which is
what a person opens. Nothing is read when the scan recorded no data file (a Python ``scan`` of a
``DataLoader``), or the file has moved: the ids are still shown.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["data_snippets"]

logger = logging.getLogger(__name__)


def data_snippets(source: Mapping[str, Any] | None, ids: Sequence[Any], width: int = 80) -> dict[Any, str]:
    """``{sample_id: text or "file[row]"}`` for ``ids``, from a scan's ``source`` (its recorded data options).
    Texts are cut to ``width`` characters (``…``); ``width=0`` keeps them whole."""
    src = dict(source or {})
    data, fmt = src.get("data"), src.get("data_format")
    if not data or not ids:
        return {}
    wanted = set(ids)
    text_col, id_col = src.get("text_column"), src.get("id_column")
    if text_col and fmt in ("parquet", "csv") and Path(data).is_file():
        columns = [text_col] + ([id_col] if id_col else [])
        try:
            table = _read_columns(Path(data), fmt, columns)
        except Exception as exc:  # a moved or changed data file: callers still show ids
            logger.warning("could not read texts from %s (%s)", data, exc)
            return {}
        texts = table.column(text_col).to_pylist()
        keys = table.column(id_col).to_pylist() if id_col else list(range(len(texts)))
        return {k: _cut(str(t), width) for k, t in zip(keys, texts) if k in wanted and t is not None}
    name = Path(data).name
    if id_col and fmt in ("parquet", "csv") and Path(data).is_file():  # custom ids: find each one's row
        try:
            keys = _read_columns(Path(data), fmt, [id_col]).column(id_col).to_pylist()
        except Exception as exc:
            logger.warning("could not read ids from %s (%s)", data, exc)
            return {}
        return {k: f"{name}[{row}]" for row, k in enumerate(keys) if k in wanted}
    return {k: f"{name}[{k}]" for k in ids if isinstance(k, int)}  # default ids are the rows


def _read_columns(path: Path, fmt: str, columns: list[str]) -> Any:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path, columns=columns)
    import pyarrow.csv as pcsv

    return pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(include_columns=columns))


def _cut(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if width <= 0 or len(text) <= width else text[: width - 1] + "…"
