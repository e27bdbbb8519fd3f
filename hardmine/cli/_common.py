"""What every command shares: error handling (exit codes), console output, small option parsers."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

__all__ = [
    "EXIT_BAD_INPUT", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "cli_words", "handle_errors", "parse_ints", "parse_shape",
    "emit_json", "stderr", "table_console",
]

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130
# The library's messages name its Python keywords; on the command line the same choices are flags. One table,
# longest phrase first, so every command speaks the user's words.
_CLI_WORDS = (
    ("overwrite=True (--overwrite on the command line)", "--overwrite"),
    ("overwrite=True", "--overwrite"),
    ("rerun hardmine.scan", "rerun `hardmine scan`"),
    ("run hardmine.scan first", "run `hardmine scan` first"),
    ("out=", "--out "),
)
F = TypeVar("F", bound=Callable[..., Any])

stderr = Console(stderr=True, highlight=False)


def cli_words(message: str) -> str:
    """A library message in command-line words (``overwrite=True`` -> ``--overwrite``)."""
    for api, cli in _CLI_WORDS:
        message = message.replace(api, cli)
    return message


def _error(message: str) -> None:
    # escape(): the message is the user's text (paths, column names, "[a, b]" lists), never rich markup.
    stderr.print(f"[bold red]error:[/] {escape(cli_words(message))}", soft_wrap=True)


def handle_errors(fn: F) -> F:
    """Bad input (ValueError, missing/unwritable paths, typer.BadParameter) -> one paragraph on stderr and exit 2;
    out of memory -> exit 2 saying what to shrink; Ctrl-C -> exit 130; an internal error -> exit 1 with the
    exception (the traceback only with HARDMINE_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except typer.BadParameter:
            raise
        except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError,
                PermissionError) as exc:
            _error(str(exc))
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except KeyboardInterrupt:
            stderr.print("interrupted: completed shards are kept; rerun the same command to resume.")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:
            if os.environ.get("HARDMINE_DEBUG"):
                raise
            # torch.OutOfMemoryError (a RuntimeError) by name: importing torch here would slow every command.
            if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
                _error(
                    f"out of memory ({type(exc).__name__}: {exc}). Lower --batch-size, --dim or --shard-rows, or "
                    "select fewer layers with --layers."
                )
                raise typer.Exit(EXIT_BAD_INPUT) from None
            logging.getLogger("hardmine").debug("internal error", exc_info=True)
            stderr.print(
                f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))}\n"
                "This is a bug in hardmine or an unexpected model; rerun with HARDMINE_DEBUG=1 for the traceback.",
                soft_wrap=True,
            )
            raise typer.Exit(EXIT_INTERNAL) from None

    return wrapper  # type: ignore[return-value]


def parse_ints(text: str | None, what: str) -> list[int] | None:
    if text is None or text == "":
        return None
    try:
        return [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise typer.BadParameter(f"{what} {text!r} must be comma-separated integers, e.g. 1,28,28.") from None


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    vals = parse_ints(text, "--input-shape")
    if vals is None:
        return None
    if not vals or any(v < 1 for v in vals):
        raise typer.BadParameter(f"--input-shape {text!r} must be positive integers, e.g. 1,28,28.")
    return tuple(vals)


def emit_json(obj: Any) -> None:
    """``obj`` as standard JSON on stdout: NaN and infinities as ``null`` (``json.dumps`` would write ``NaN``,
    which JSON parsers refuse), NumPy numbers and arrays as the numbers they hold, anything else as its text."""
    sys.stdout.write(json.dumps(_plain(obj), indent=2, sort_keys=True, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def _plain(obj: Any) -> Any:
    """``obj`` with NumPy values made Python ones and non-finite floats ``None``, through dicts, lists and tuples."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if type(obj).__module__ == "numpy" and hasattr(obj, "tolist"):  # an array or a NumPy scalar (no import here)
        return _plain(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def table_console(min_width: int = 160) -> Console:
    """The console tables print to: a terminal's width, or at least ``min_width`` columns when piped or under
    make (so a table is not squeezed into 80)."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, min_width))
    return console
