"""``hardmine layers CHECKPOINT [--model pkg.mod:factory]``: the modules ``--layers`` can select, their
parameter counts and the engine each would use."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ._common import emit_json, handle_errors, table_console

__all__ = ["layers_command", "layer_rows"]


def layer_rows(model: Any) -> list[dict[str, Any]]:
    """One row per module that holds trainable parameters directly: name (what ``--layers`` matches), type,
    parameter names and count, and the engine ``auto`` would plan for it with the reason when it is vmap."""
    from ..factored import plan_factored
    from ..params import select_parameters

    names = select_parameters(model, None)
    units, rejected = plan_factored(model, names)
    # A tied parameter (an LM head sharing the input embedding) is planned under its first name; the module
    # that holds it by another name is covered by the same unit (held_params).
    factored = {p for u in units.values() for p in (*u.params, *u.held_params)}
    first_name = {id(p): n for n, p in model.named_parameters()}
    rows = []
    for mname, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        full = [f"{mname}.{n}" if mname else n for n, _ in own]
        reasons = sorted({rejected[f] for f in full if f in rejected})
        reasons += [f"{f} is tied to {first_name[id(p)]} (counted there)" for f, (_, p) in zip(full, own)
                    if first_name.get(id(p), f) != f]
        engine = "factored" if all(f in factored for f in full) else ("vmap" if not any(f in factored for f in full)
                                                                     else "mixed")
        rows.append({
            "layer": mname or "<root>", "type": type(module).__name__, "params": [n for n, _ in own],
            "n_params": int(sum(p.numel() for f, (_, p) in zip(full, own) if first_name.get(id(p), f) == f)),
            "engine": engine, "reason": "; ".join(reasons) or None,
        })
    return rows


@handle_errors
def layers_command(
    checkpoint: Path = typer.Argument(..., help="State dict, torch.export archive (.pt2) or Hugging Face model dir."),
    model: str | None = typer.Option(None, "--model", help="pkg.module:factory building the architecture of a state dict."),
    state_key: str | None = typer.Option(None, "--state-key", help="Entry of a wrapped checkpoint holding the state dict."),
    unsafe_pickle: bool = typer.Option(False, "--unsafe-pickle", help="Allow unpickling a whole saved model (runs code from the file)."),
    allow_new_head: bool = typer.Option(
        False, "--allow-new-head", help="Accept a Hugging Face model whose classification head is not trained."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the rows as JSON on stdout."),
) -> None:
    """List the layers a scan can select (--layers), with parameter counts and the planned engine.

    The plan is the static one; a scan checks it on its first batch and may move a layer to vmap (it says so).
    """
    from ..loaders import load_model

    if os.getcwd() not in sys.path:  # --model resolves like `python -m`
        sys.path.insert(0, os.getcwd())
    loaded = load_model(checkpoint, model, state_key=state_key, unsafe_pickle=unsafe_pickle,
                        allow_new_head=allow_new_head)
    rows = layer_rows(loaded.model)
    if as_json:
        emit_json(rows)
        return
    table = Table(title=f"{len(rows)} layers with trainable parameters "
                        f"({sum(r['n_params'] for r in rows):,} parameters)", pad_edge=False, padding=(0, 1))
    for c in ("layer", "type", "params", "n_params", "engine", "reason"):
        table.add_column(c, justify="right" if c == "n_params" else "left", no_wrap=c != "reason",
                         overflow="fold")
    for r in rows:
        table.add_row(r["layer"], r["type"], ",".join(r["params"]), f"{r['n_params']:,}", r["engine"], r["reason"] or "")
    table_console().print(table)
