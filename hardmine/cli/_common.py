"""What every command shares: error handling (exit codes), console output, small option parsers."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

__all__ = ["EXIT_BAD_INPUT", "EXIT_INTERNAL", "handle_errors", "parse_ints", "parse_shape", "emit_json", "stderr"]

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1
F = TypeVar("F", bound=Callable[..., Any])

stderr = Console(stderr=True, highlight=False)


def handle_errors(fn: F) -> F:
    """Bad input (ValueError, FileNotFoundError, typer.BadParameter) -> one paragraph on stderr and exit 2; an
    internal error -> exit 1 with the exception (the traceback only with HARDMINE_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except typer.BadParameter:
            raise
        except (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError) as exc:
            stderr.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except KeyboardInterrupt:
            stderr.print("interrupted: completed shards are kept; rerun the same command to resume.")
            raise typer.Exit(130) from None
        except Exception as exc:
            if os.environ.get("HARDMINE_DEBUG"):
                raise
            logging.getLogger("hardmine").debug("internal error", exc_info=True)
            stderr.print(
                f"[bold red]internal error:[/] {type(exc).__name__}: {exc}\n"
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
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()
