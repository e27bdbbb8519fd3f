"""``hardmine report SCAN_DIR --out report.html``: one self-contained HTML report of a scan."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from ._common import emit_json, handle_errors, table_console

__all__ = ["report_command"]


@handle_errors
def report_command(
    scan_dir: Path = typer.Argument(..., help="A scan directory."),
    out: Path = typer.Option(..., "--out", help="The HTML file to write (one file, no network needed to open it)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file that is not a hardmine report."),
    as_json: bool = typer.Option(False, "--json", help="Print the output path and timing as JSON on stdout."),
) -> None:
    """Summary, per-class and per-slice failure rates, calibration, distributions, the worst slices, confident
    errors and label-issue candidates with their gradient neighbours."""
    from ..report import report

    t0 = time.perf_counter()
    path = report(scan_dir, out, overwrite=overwrite)
    seconds = time.perf_counter() - t0
    if as_json:
        emit_json({"out": str(path), "seconds": seconds, "bytes": path.stat().st_size})
        return
    table_console().print(f"wrote {path} ({path.stat().st_size:,} bytes)", highlight=False, markup=False)
