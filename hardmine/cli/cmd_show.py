"""``hardmine show SCAN_DIR``: the hardest samples as a table."""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from ._common import emit_json, handle_errors, table_console

__all__ = ["show_command", "print_table"]

# The headers are the manifest's own column names, so what the table shows can be looked up in the file.
_COLUMNS = ("rank", "sample_id", "label", "pred", "loss", "perplexity", "n_target_tokens", "confidence", "margin", "hardness",
            "neighbor_disagreement", "knn_outlier")
_FLAGS = ("confident_error", "near_miss")  # boolean columns, listed by name in the last column when true


def _fmt(v: Any, decimals: int = 3) -> str:
    if v is None or (hasattr(v, "__class__") and v.__class__.__name__ == "NAType"):
        return "-"
    if isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral):  # floats, NumPy's too
        if math.isnan(v):
            return "-"
        return f"{float(v):.{decimals}f}" if abs(v) < 1000 else f"{float(v):.4g}"
    return str(v)


def _hardness_decimals(n: int) -> int:
    """Hardness is a mean of rank fractions, so neighbouring samples differ by about 1/n: show enough
    decimals that the top rows do not all print as 1."""
    return max(3, math.ceil(math.log10(max(n, 1))) + 1)


def _flags(rec: Any) -> str:
    # NumPy booleans are not ``bool`` but compare equal to True; pandas' NA is neither.
    return ",".join(c for c in _FLAGS if type(rec.get(c, False)).__name__ in ("bool", "bool_") and rec.get(c) == True)  # noqa: E712


def _named(v: Any, names: list[str] | None) -> str:
    """A class id shown by its name when the scan recorded names."""
    if names is not None and isinstance(v, numbers.Integral) and 0 <= int(v) < len(names):
        return names[int(v)]
    return _fmt(v)


def print_table(
    df: Any, top: int, title: str, console: Console | None = None, data: dict[Any, str] | None = None
) -> None:
    """The hardest ``top`` rows; ``data``: ``sample_id -> snippet`` shown in a last ``data`` column."""
    from ..manifest import class_names
    from ..score import NEIGHBOR_SCORES

    names = class_names(df)
    # The neighbour scores are NaN unless the scan computed them (ScoreConfig.neighbor_scores): no empty columns.
    cols = [c for c in _COLUMNS if c in df.columns and not (c in NEIGHBOR_SCORES and df[c].isna().all())]
    rows = df.sort_values("rank").head(top)
    hd = _hardness_decimals(len(df))
    table = Table(title=title, pad_edge=False, padding=(0, 1))
    for c in cols:
        table.add_column(c, justify="left" if c == "sample_id" else "right", no_wrap=True)
    table.add_column("flags", no_wrap=True)
    if data is not None:
        table.add_column("data", overflow="fold", min_width=24)
    for _, rec in rows.iterrows():
        cells = [_named(rec[c], names) if c in ("label", "pred") else _fmt(rec[c], hd if c == "hardness" else 3)
                 for c in cols]
        extra = [data.get(rec["sample_id"], "")] if data is not None else []
        table.add_row(*cells, _flags(rec), *extra)
    console = console or table_console(200 if data is not None else 160)  # room for the data column
    console.print(table)


def parse_class(value: str | None, df_or_meta: Any) -> int | None:
    """``--class`` as a class id or, when the scan recorded class names (in a manifest frame's or a metadata
    dict's ``class_names``), a name."""
    from ..manifest import class_names

    if value is None:
        return None
    names = class_names(df_or_meta) or []
    if value in names:
        return names.index(value)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--class {value!r} is neither a class id nor a class name of this scan {names[:20]}.") from None


@handle_errors
def show_command(
    scan_dir: Path = typer.Argument(..., help="A scan directory (or a manifest .parquet)."),
    top: int = typer.Option(20, "--top", min=1, help="How many of the hardest samples to show."),
    class_: str | None = typer.Option(None, "--class", help="Only samples with this label (a class id or name)."),
    with_data: bool = typer.Option(
        False, "--with-data",
        help="Also show each sample's data: its text for text data, else its data file and row (read back from "
             "the file the scan read).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON on stdout."),
) -> None:
    """Print the hardest samples of a scan with their scores."""
    from ..manifest import read_manifest

    df = read_manifest(scan_dir)
    class_ = parse_class(class_, df)
    if class_ is not None:
        labels = sorted(df["label"].dropna().unique().tolist())
        if class_ not in labels:
            raise ValueError(f"--class {class_} is not a label in this scan; labels are {labels[:20]}.")
        df = df[df["label"] == class_]
    data = None
    if with_data:
        from ..loaders.view import data_snippets

        data = data_snippets(df.attrs["hardmine"].get("source"), df.sort_values("rank").head(top)["sample_id"].tolist())
    if as_json:
        from ..manifest import class_names

        rows = df.sort_values("rank").head(top).to_dict(orient="records")
        if data is not None:
            for r in rows:
                r["data"] = data.get(r["sample_id"])
        names = class_names(df)
        if names is not None:
            for r in rows:
                for c in ("label", "pred"):
                    if isinstance(r.get(c), numbers.Integral) and 0 <= r[c] < len(names):
                        r[f"{c}_name"] = names[r[c]]
        emit_json(rows)
        return
    title = f"hardest {min(top, len(df))} of {len(df)} samples" + (f" with label {class_}" if class_ is not None else "")
    print_table(df, top, title, data=data)
