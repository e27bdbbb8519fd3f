"""``hardmine show SCAN_DIR``: the hardest samples as a table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from ._common import emit_json, handle_errors

__all__ = ["show_command", "print_table"]

# (column, short header): short headers keep the table readable in an 80-column terminal.
_COLUMNS = (("rank", "rank"), ("sample_id", "sample_id"), ("label", "label"), ("pred", "pred"), ("loss", "loss"),
            ("confidence", "p(label)"), ("margin", "margin"), ("hardness", "hardness"),
            ("neighbor_disagreement", "nbr≠label"), ("knn_outlier", "isolated"))


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.3g}"
    if v is None or (hasattr(v, "__class__") and v.__class__.__name__ == "NAType"):
        return "-"
    return str(v)


def _flags(rec: Any) -> str:
    out = []
    if bool(rec.get("confident_error", False) is True):
        out.append("conf-err")
    if bool(rec.get("near_miss", False) is True):
        out.append("near-miss")
    return ",".join(out)


def print_table(df: Any, top: int, title: str, console: Console | None = None) -> None:
    cols = [(c, h) for c, h in _COLUMNS if c in df.columns]
    rows = df.sort_values("rank").head(top)
    table = Table(title=title, pad_edge=False, padding=(0, 1))
    for c, h in cols:
        table.add_column(h, justify="left" if c == "sample_id" else "right", no_wrap=True)
    table.add_column("flags", no_wrap=True)
    for _, rec in rows.iterrows():
        table.add_row(*(_fmt(rec[c]) for c, _ in cols), _flags(rec))
    console = console or _console()
    console.print(table)


def _console() -> Console:
    console = Console()
    if not console.is_terminal:  # piped or under make: don't squeeze the table into 80 columns
        console = Console(width=max(console.width, 120))
    return console


@handle_errors
def show_command(
    scan_dir: Path = typer.Argument(..., help="A scan directory (or a manifest .parquet)."),
    top: int = typer.Option(20, "--top", min=1, help="How many of the hardest samples to show."),
    class_: int | None = typer.Option(None, "--class", help="Only samples with this label."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON on stdout."),
) -> None:
    """Print the hardest samples of a scan with their scores."""
    from ..manifest import read_manifest

    df = read_manifest(scan_dir)
    if class_ is not None:
        labels = sorted(df["label"].dropna().unique().tolist())
        if class_ not in labels:
            raise ValueError(f"--class {class_} is not a label in this scan; labels are {labels[:20]}.")
        df = df[df["label"] == class_]
    if as_json:
        emit_json(df.sort_values("rank").head(top).to_dict(orient="records"))
        return
    title = f"hardest {min(top, len(df))} of {len(df)} samples" + (f" with label {class_}" if class_ is not None else "")
    print_table(df, top, title)
