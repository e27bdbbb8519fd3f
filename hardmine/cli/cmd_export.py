"""``hardmine export SCAN_DIR --out FILE``: an oversampling manifest with a sampling strategy."""

from __future__ import annotations

from pathlib import Path

import typer

from ..enums import Strategy
from ..score import DEFAULT_BOOST, DEFAULT_CAP, DEFAULT_TEMPERATURE, DEFAULT_TOP
from ._common import emit_json, handle_errors, stderr

__all__ = ["export_command"]


@handle_errors
def export_command(
    scan_dir: Path = typer.Argument(..., help="A scan directory (or a manifest .parquet)."),
    out: Path = typer.Option(..., "--out", "-o", help="Parquet file to write (atomically)."),
    strategy: Strategy | None = typer.Option(
        None, "--strategy", help="Default: per-class for classification scans, proportional for regression."
    ),
    top: float = typer.Option(DEFAULT_TOP, "--top", help="Fraction of samples marked hard (and boosted by top-k)."),
    boost: float = typer.Option(DEFAULT_BOOST, "--boost", help="top-k: weight of a hard sample relative to an easy one."),
    temperature: float = typer.Option(DEFAULT_TEMPERATURE, "--temperature", help="proportional/per-class exponent."),
    cap: float = typer.Option(DEFAULT_CAP if DEFAULT_CAP is not None else 0.0, "--cap", help="Max weight as a multiple of the mean (0 = no cap)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Write an oversampling manifest (sample_id, weight, is_hard and every score)."""
    from ..manifest import export_manifest

    df = export_manifest(scan_dir, strategy=strategy, top=top, boost=boost, temperature=temperature,
                         cap=None if cap == 0 else cap, out=out)
    summary = {"out": str(out), "samples": len(df), "hard": int(df["is_hard"].sum()),
               "max_weight": float(df["weight"].max()), "strategy": df.attrs["hardmine"]["export"]["strategy"]}
    if as_json:
        emit_json(summary)
    else:
        stderr.print(f"wrote {out}: {summary['samples']} samples, {summary['hard']} marked hard, "
                     f"max weight {summary['max_weight']:.3g} ({summary['strategy']})")
