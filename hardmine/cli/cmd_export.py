"""``hardmine export SCAN_DIR --out FILE``: an oversampling manifest with a sampling strategy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ..defaults import DEFAULT_BOOST, DEFAULT_CAP, DEFAULT_SLICE_BOOST, DEFAULT_TEMPERATURE, DEFAULT_TOP
from ..enums import HardSet, Strategy
from ._common import emit_json, handle_errors, stderr

__all__ = ["export_command"]


@handle_errors
def export_command(
    scan_dir: Path = typer.Argument(..., help="A scan directory (or a manifest .parquet)."),
    out: Path = typer.Option(..., "--out", "-o", help="Parquet file to write (atomically)."),
    strategy: Strategy | None = typer.Option(
        None, "--strategy",
        help="Default: slices for classification scans (per-class for manifests without slices), proportional "
             "for regression.",
    ),
    top: float = typer.Option(DEFAULT_TOP, "--top", help="Fraction of samples marked hard (and boosted by top-k)."),
    boost: float = typer.Option(DEFAULT_BOOST, "--boost", help="top-k: weight of a hard sample relative to an easy one."),
    temperature: float = typer.Option(DEFAULT_TEMPERATURE, "--temperature", help="proportional/per-class exponent."),
    slice_boost: float = typer.Option(
        DEFAULT_SLICE_BOOST, "--slice-boost",
        help="slices: weight 1 + slice_boost x (slice error rate / class error rate) before class balancing.",
    ),
    cap: float = typer.Option(DEFAULT_CAP if DEFAULT_CAP is not None else 0.0, "--cap", help="Max weight as a multiple of the mean (0 = no cap)."),
    hard_set: HardSet = typer.Option(
        HardSet.TOP, "--hard-set",
        help="Which samples are is_hard: the --top fraction, hardness >= --threshold, or the estimated "
             "label-noise rate (share of confident errors) as the fraction.",
    ),
    threshold: float | None = typer.Option(None, "--threshold", help="Hardness cut for --hard-set threshold."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing --out file that is not a hardmine manifest."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
) -> None:
    """Write an oversampling manifest (sample_id, weight, is_hard and every score)."""
    from ..manifest import export_manifest

    df = export_manifest(scan_dir, strategy=strategy, top=top, boost=boost, temperature=temperature,
                         cap=None if cap == 0 else cap, out=out, overwrite=overwrite, hard_set=hard_set,
                         threshold=threshold, slice_boost=slice_boost)
    summary = _summary(df, out, cap=None if cap == 0 else cap)
    if as_json:
        emit_json(summary)
    else:
        stderr.print(f"wrote {out}: {summary['samples']} samples, {summary['hard']} marked hard; {summary['weights']}",
                     soft_wrap=True)


def _summary(df: Any, out: Path, cap: float | None) -> dict[str, Any]:
    """What was written, in the terms the user asked in: weights have mean 1, so ``--boost 4`` shows as the
    ratio of a hard to an easy weight, and a binding cap is named."""
    import numpy as np

    export = df.attrs["hardmine"]["export"]
    w = df["weight"].to_numpy(dtype=float)
    hard = df["is_hard"].to_numpy(dtype=bool)
    capped = cap is not None and bool(np.isclose(w.max(), cap))
    parts = [f"weights have mean 1, max {w.max():.3g}"]
    ratio = None
    # Likely label errors are marked hard but never boosted (hardmine.manifest): compare the boosted ones.
    issue = df["is_label_issue"].to_numpy(dtype=bool, na_value=False) if "is_label_issue" in df else np.zeros(len(w), bool)
    boosted = hard & ~issue
    if export["strategy"] == "top-k" and boosted.any() and (~hard).any():
        ratio = float(np.median(w[boosted]) / np.median(w[~hard]))
        parts.append(f"a hard sample weighs {ratio:.3g}x an easy one (--boost {export['boost']:g})")
    if (hard & issue).any():
        parts.append(f"{int((hard & issue).sum())} of the hard samples are likely label errors (is_label_issue) and "
                     "are not oversampled")
    if capped:
        parts.append(f"capped at --cap {cap:g}x the mean")
    return {"out": str(out), "samples": len(df), "hard": int(hard.sum()), "max_weight": float(w.max()),
            "hard_to_easy": ratio, "capped": capped, "strategy": export["strategy"],
            "weights": "; ".join(parts) + f" ({export['strategy']})"}
