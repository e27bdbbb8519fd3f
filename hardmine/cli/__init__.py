"""The ``hardmine`` command line: one small Typer app per command, each a thin wrapper over the API."""

from __future__ import annotations

import typer

from .._version import __version__
from . import (
    cmd_drift,
    cmd_export,
    cmd_layers,
    cmd_neighbors,
    cmd_relabel,
    cmd_report,
    cmd_review,
    cmd_scan,
    cmd_show,
    cmd_slices,
    cmd_tokens,
)

app = typer.Typer(
    name="hardmine",
    help="Find the examples a model struggles with from its per-sample gradients.",
    pretty_exceptions_show_locals=False,
    no_args_is_help=True,
    add_completion=False,
)


def _version_flag(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_flag, is_eager=True, help="Print the version."),
) -> None:
    """Find the examples a model struggles with from its per-sample gradients."""


@app.command("version")
def version() -> None:
    """Print the hardmine version."""
    typer.echo(__version__)


# One small module per command; each is a thin wrapper over the Python API.
app.command("scan")(cmd_scan.scan_command)
app.command("export")(cmd_export.export_command)
app.command("show")(cmd_show.show_command)
app.command("neighbors")(cmd_neighbors.neighbors_command)
app.command("layers")(cmd_layers.layers_command)
app.command("slices")(cmd_slices.slices_command)
app.command("drift")(cmd_drift.drift_command)
app.command("review")(cmd_review.review_command)
app.command("relabel")(cmd_relabel.relabel_command)
app.command("report")(cmd_report.report_command)
app.command("tokens")(cmd_tokens.tokens_command)


def main() -> None:
    app()
