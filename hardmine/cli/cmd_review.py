"""``hardmine review SCAN_DIR --out queue.csv``: the samples an expert should look at first, as a CSV to fill."""

from __future__ import annotations

from pathlib import Path

import typer

from ._common import emit_json, handle_errors, table_console

__all__ = ["review_command"]


@handle_errors
def review_command(
    scan_dir: Path = typer.Argument(..., help="A scan directory of classification data."),
    out: Path = typer.Option(..., "--out", help="The queue to write (CSV, one row per sample)."),
    budget: int = typer.Option(100, "--budget", min=1, help="At most this many samples (what the expert can review)."),
    k: int = typer.Option(5, "-k", "--k", min=1, help="Gradient neighbours shown per sample (their labels and ids)."),
    overwrite: bool = typer.Option(
        False, "--overwrite",
        help="Replace an existing file that is not an unfilled queue written by hardmine review.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a summary as JSON on stdout."),
) -> None:
    """Confident errors, then label-issue candidates, then near misses, spread over slices (or classes); fill
    in corrected_label (and note), then apply it with `hardmine relabel`."""
    from ..review import review_queue

    q = review_queue(scan_dir, budget=budget, k=k, out=out, overwrite=overwrite)
    by_reason = {str(r): int(n) for r, n in q["reason"].value_counts(sort=False).items()}
    group = "slice" if q["slice"].ne("").any() else "label"
    summary = {"out": str(out), "samples": len(q), "by_reason": by_reason, "groups": int(q[group].nunique()),
               "grouped_by": group}
    if as_json:
        emit_json(summary)
        return
    reasons = ", ".join(f"{n} {r}" for r, n in by_reason.items()) or "no candidates"
    table_console().print(
        f"wrote {len(q)} samples to {out} ({reasons}; {summary['groups']} {group}s). Fill in corrected_label (the "
        f"right class; the same label confirms it; empty = not reviewed) and note, then run: hardmine relabel "
        f"{scan_dir} {out} --out corrected.parquet",
        soft_wrap=True, highlight=False, markup=False,
    )
