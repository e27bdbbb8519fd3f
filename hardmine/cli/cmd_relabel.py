"""``hardmine relabel SCAN_DIR queue.csv --out corrected.parquet``: apply an expert's corrections."""

from __future__ import annotations

from pathlib import Path

import typer

from ._common import emit_json, handle_errors, table_console

__all__ = ["relabel_command"]


@handle_errors
def relabel_command(
    scan_dir: Path = typer.Argument(..., help="The scan directory the queue was made from."),
    queue: Path = typer.Argument(..., help="The filled queue (CSV from hardmine review)."),
    out: Path = typer.Option(..., "--out", help="The corrected manifest to write (Parquet)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file that is not a hardmine manifest."),
    as_json: bool = typer.Option(False, "--json", help="Print a summary as JSON on stdout."),
) -> None:
    """Check the filled queue (ids, labels, duplicates) and write the manifest with corrected labels, a
    reviewed column and the review's provenance in its metadata."""
    from ..review import relabel

    df = relabel(scan_dir, queue, out=out, overwrite=overwrite)
    info = df.attrs["hardmine"]["review"]
    summary = {"out": str(out), "samples": len(df), "reviewed": info["reviewed"], "changed": info["changed"]}
    if as_json:
        emit_json(summary)
        return
    table_console().print(
        f"wrote {out}: {info['reviewed']} reviewed samples, {info['changed']} labels changed.",
        highlight=False, markup=False,
    )
