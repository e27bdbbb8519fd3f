"""``hardmine slices SCAN_DIR``: the worst slices (failure modes as groups) of a scan as a table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ._common import emit_json, handle_errors, table_console

__all__ = ["slices_command", "worst_slices"]

# The headers are slices.parquet's own column names.
_COLUMNS = ("slice", "label", "size", "share_of_class", "error_rate", "mean_loss", "mean_confidence", "ece",
            "label_issue_rate")


def worst_slices(df: Any, top: int, class_: int | None = None) -> Any:
    """The ``top`` slices with the highest error rate (ties: the larger slice first), optionally of one
    class."""
    if class_ is not None:
        labels = sorted(df["label"].dropna().unique().tolist())
        if class_ not in labels:
            raise ValueError(f"--class {class_} is not a label in this scan; labels are {labels[:20]}.")
        df = df[df["label"] == class_]
    return df.sort_values(["error_rate", "size"], ascending=[False, False], kind="stable").head(top)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.3f}"
    return str(v)


@handle_errors
def slices_command(
    scan_dir: Path = typer.Argument(..., help="A scan directory (it holds slices.parquet)."),
    top: int = typer.Option(10, "--top", min=1, help="How many of the worst slices to show."),
    class_: str | None = typer.Option(None, "--class", help="Only slices of this label (a class id or name)."),
    with_data: bool = typer.Option(
        False, "--with-data", help="Also show the representatives' data (text, or data file and row)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON on stdout."),
) -> None:
    """Print the slices with the highest error rate, with their size, share of the class and examples."""
    from ..manifest import class_names, read_manifest_metadata
    from ..slices import read_slice_table
    from .cmd_show import parse_class

    meta = read_manifest_metadata(scan_dir)
    names = class_names(meta)
    shown = parse_class(class_, meta)
    df = worst_slices(read_slice_table(scan_dir), top, shown)
    data: dict[Any, str] = {}
    if with_data:
        from ..loaders.view import data_snippets

        reps = [v for ids in df["representative_ids"] for v in list(ids)[:3]]
        data = data_snippets(meta.get("source"), reps, width=40)
    if as_json:
        rows = df.to_dict(orient="records")
        for r in rows:
            if names is not None and 0 <= int(r["label"]) < len(names):
                r["label_name"] = names[int(r["label"])]
            if with_data:
                r["representative_data"] = [data.get(v) for v in list(r["representative_ids"])[:3]]
        emit_json(rows)
        return
    table = Table(title=f"worst {len(df)} slices by error rate", pad_edge=False, padding=(0, 1))
    for c in _COLUMNS:
        table.add_column(c, justify="left" if c == "slice" else "right", no_wrap=True)
    table.add_column("representative_ids", no_wrap=False)
    if with_data:
        table.add_column("data", overflow="fold", min_width=24)
    for _, rec in df.iterrows():
        ids = list(rec["representative_ids"])[:3]
        cells = [names[int(rec[c])] if c == "label" and names and 0 <= int(rec[c]) < len(names) else _fmt(rec[c])
                 for c in _COLUMNS]
        extra = [" | ".join(data.get(v, "") for v in ids)] if with_data else []
        table.add_row(*cells, ", ".join(str(v) for v in ids), *extra)
    table_console(200 if with_data else 160).print(table)
