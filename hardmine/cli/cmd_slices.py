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
    class_: int | None = typer.Option(None, "--class", help="Only slices of this label."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON on stdout."),
) -> None:
    """Print the slices with the highest error rate, with their size, share of the class and examples."""
    from ..slices import read_slice_table

    df = worst_slices(read_slice_table(scan_dir), top, class_)
    if as_json:
        emit_json(df.to_dict(orient="records"))
        return
    table = Table(title=f"worst {len(df)} slices by error rate", pad_edge=False, padding=(0, 1))
    for c in _COLUMNS:
        table.add_column(c, justify="left" if c == "slice" else "right", no_wrap=True)
    table.add_column("representative_ids", no_wrap=False)
    for _, rec in df.iterrows():
        reps = ", ".join(str(v) for v in list(rec["representative_ids"])[:3])
        table.add_row(*(_fmt(rec[c]) for c in _COLUMNS), reps)
    table_console().print(table)
