"""``hardmine tokens SCAN_DIR --id ID [--html FILE] [--json]``: one sample's text with its target tokens
highlighted by uncertainty tier (a causal-LM scan's ``tokens.parquet``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ._common import emit_json, handle_errors, table_console

__all__ = ["tokens_command", "TIER_STYLES"]

# Rich styles of the tiers in the terminal (the HTML page uses the same colours); non-targets are dim.
TIER_STYLES = {"none": "", "yellow": "black on #ffec99", "orange": "black on #ffc078", "red": "black on #ff8787"}
_NOT_TARGET = "dim"


def _fmt(v: Any, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


@handle_errors
def tokens_command(
    scan_dir: Path = typer.Argument(..., help="A causal-LM scan directory (one with tokens.parquet)."),
    sample_id: str = typer.Option(..., "--id", help="The sample's id (as in the manifest's sample_id)."),
    html: Path | None = typer.Option(
        None, "--html", help="Also write the same view as one self-contained HTML page (tooltips per token)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing --html file that is not a hardmine token page."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the tokens, their tiers and the thresholds as JSON."),
) -> None:
    """One sample's text with its target tokens coloured by loss: yellow / orange / red from the scan's q0.50 /
    q0.80 / q0.95 of target-token loss; tokens outside the targets dim."""
    from rich.text import Text

    from ..scan import Scan
    from ..tokens import (
        TIER_QUANTILES,
        assign_tiers,
        check_tokens_html_destination,
        parse_sample_id,
        token_summary,
        tokens_json,
        write_tokens_html,
    )

    if html is not None:
        check_tokens_html_destination(html, overwrite=overwrite)  # before any reading: fail fast
    scan = Scan.open(scan_dir)
    sid = parse_sample_id(scan, sample_id)
    df = scan.tokens(sid)
    thresholds = scan.token_tiers()
    written = None
    if html is not None:
        written = write_tokens_html(scan, sid, html, overwrite=overwrite,
                                    title=f"tokens of sample {sid} ({scan.path.name})")
    if as_json:
        out = tokens_json(df, thresholds, sid)
        if written is not None:
            out["html"] = str(written)
        emit_json(out)
        return
    console = table_console(100)
    summary = token_summary(df, thresholds)
    console.print(
        f"sample {sid}: {summary['n_tokens']} tokens, {summary['n_target_tokens']} targets, mean loss "
        f"{_fmt(summary['mean_loss'])}, perplexity {_fmt(summary['perplexity'], 2)}, top-1 miss rate "
        f"{_fmt(summary['top1_miss_rate'])}", markup=False, highlight=False,
    )
    text = Text()
    for token, target, tier in zip(df["token"].tolist(), df["is_target"].tolist(), assign_tiers(df, thresholds).tolist()):
        text.append(str(token), style=TIER_STYLES[tier] if target else _NOT_TARGET)
    console.print(text, highlight=False, soft_wrap=True)
    legend = Text("tiers: ")
    for tier, q in TIER_QUANTILES.items():
        legend.append(f" {tier.value} ", style=TIER_STYLES[tier.value])
        legend.append(f" loss >= {_fmt(thresholds.threshold(tier))} (q{q:.2f})  ")
    legend.append("not a target", style=_NOT_TARGET)
    console.print(legend, highlight=False)
    how = "exact" if thresholds.exact else f"from a uniform sample of {thresholds.n_sampled:,}"
    counts = ", ".join(f"{k} {v}" for k, v in summary["tiers"].items())
    console.print(f"thresholds over the scan's {thresholds.n_target:,} target tokens ({how}); this sample: {counts}",
                  markup=False, highlight=False)
    if written is not None:
        console.print(f"wrote {written} ({written.stat().st_size:,} bytes)", markup=False, highlight=False)
