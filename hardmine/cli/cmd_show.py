"""``hardmine show SCAN_DIR``: the hardest samples as a table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from ._common import emit_json, handle_errors

__all__ = ["show_command", "print_table"]

_COLUMNS = ("rank", "sample_id", "label", "pred", "loss", "confidence", "margin", "hardness",
            "neighbor_disagreement", "knn_outlier", "confident_error", "near_miss")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if v is None or (hasattr(v, "__class__") and v.__class__.__name__ == "NAType"):
        return "-"
    return str(v)


def print_table(df: Any, top: int, title: str, console: Console | None = None) -> None:
    cols = [c for c in _COLUMNS if c in df.columns]
    rows = df.sort_values("rank").head(top)
    table = Table(title=title)
    for c in cols:
        table.add_column(c, justify="right" if c not in ("sample_id",) else "left")
    for rec in rows[cols].itertuples(index=False):
        table.add_row(*(_fmt(v) for v in rec))
    (console or Console()).print(table)


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
