"""``hardmine drift REF_SCAN NEW_SCAN --out DRIFT_DIR``: is the new data still like the reference data?"""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.table import Table

from ._common import emit_json, handle_errors, stderr, table_console

__all__ = ["EXIT_DRIFT", "drift_command"]

EXIT_DRIFT = 3  # --fail-above: the drift score passed the threshold (a monitoring job's failure, not an error)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.3f}"
    return "-" if v is None else str(v)


@handle_errors
def drift_command(
    reference: Path = typer.Argument(..., help="The reference scan directory (usually of the training data)."),
    new: Path = typer.Argument(..., help="The scan of the new data (same checkpoint, --layers, --dim, --seed)."),
    out: Path = typer.Option(..., "--out", help="Directory for drift.parquet and summary.json (created if missing)."),
    k: int = typer.Option(10, "-k", "--k", min=1, help="Reference neighbours per new sample."),
    quantile: float = typer.Option(
        0.99, "--quantile",
        help="A new sample is unfamiliar when its distance to the reference is above this quantile of the "
             "reference samples' own neighbour distances (0.99: about 1% of reference-like data is flagged).",
    ),
    fail_above: float | None = typer.Option(
        None, "--fail-above",
        help="Exit 3 when the drift score (summary.json 'score', in [0, 1]) is above this value: for monitoring jobs.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty --out that holds no drift report."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Per new sample, how close its gradient is to the reference's, and an unfamiliar flag; per class and
    slice, the share and failure rates in both scans; a drift score."""
    from ..drift import drift

    if fail_above is not None and not math.isfinite(fail_above):
        raise typer.BadParameter(f"--fail-above {fail_above!r} must be a finite number, e.g. 0.05.")
    result = drift(reference, new, out=out, k=k, quantile=quantile, overwrite=overwrite)
    s = result.summary
    failed = fail_above is not None and s["score"] > fail_above
    if as_json:
        emit_json(s | {"fail_above": fail_above, "failed": failed})
    else:
        console = table_console()
        console.print(
            f"drift score {s['score']:.3f} (max of unfamiliar excess {s['unfamiliar_excess']:.3f} and class TV "
            f"{_fmt(s['class_tv'])}); {s['unfamiliar']} of {s['n_new']} new samples unfamiliar "
            f"(expected about {s['expected_unfamiliar_rate']:.1%}); slice TV {_fmt(s['slice_tv'])}",
            soft_wrap=True, highlight=False,
        )
        rows = s["per_slice"] or s["per_class"]
        if rows:
            key = "slice" if s["per_slice"] else "label"
            worst = sorted(rows, key=lambda r: -abs(r["share_new"] - r["share_reference"]))[:10]
            table = Table(title=f"largest share shifts by {key}")
            for c in (key, "share_reference", "share_new", "unfamiliar_rate_new", "failure_rate_reference",
                      "failure_rate_new"):
                table.add_column(c, justify="right")
            for r in worst:
                table.add_row(*(_fmt(r.get(c)) for c in (key, "share_reference", "share_new", "unfamiliar_rate_new",
                                                          "failure_rate_reference", "failure_rate_new")))
            console.print(table)
        console.print(f"wrote {out}/drift.parquet and {out}/summary.json", highlight=False)
    if failed:
        stderr.print(f"drift score {s['score']:.3f} is above --fail-above {fail_above}", highlight=False)
        raise typer.Exit(EXIT_DRIFT)
