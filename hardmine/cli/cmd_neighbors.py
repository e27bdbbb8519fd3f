"""``hardmine neighbors SCAN_DIR --ids 17,42 [--from OTHER_SCAN]``: nearest training examples in gradient space."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ._common import emit_json, handle_errors, table_console

__all__ = ["neighbors_command"]


@handle_errors
def neighbors_command(
    scan_dir: Path = typer.Argument(..., help="A scan directory."),
    ids: str = typer.Option(..., "--ids", help="Comma-separated sample ids."),
    k: int = typer.Option(10, "-k", "--k", min=1, help="Neighbours per sample."),
    absolute: bool = typer.Option(
        True, "--absolute/--signed",
        help="Rank by |cosine| (default: the neighbours the manifest's neighbor_disagreement counts, anti-aligned "
             "gradients included with a negative similarity) or by signed cosine (aligned gradients only).",
    ),
    from_scan: Path | None = typer.Option(
        None, "--from",
        help="Another scan of the same model and projection (e.g. of test data): --ids are its samples, and their "
             "neighbours are searched in SCAN_DIR (which training examples look like this failure).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the neighbours as JSON on stdout."),
) -> None:
    """For each sample, its k nearest neighbours by gradient cosine, with their labels."""
    from ..scan import Scan

    scan = Scan.open(scan_dir)
    manifest = scan.manifest().set_index("sample_id", drop=False)
    other = Scan.open(from_scan) if from_scan is not None else None
    queried = other.manifest().set_index("sample_id", drop=False) if other is not None else manifest
    id_kind = queried["sample_id"].dtype.kind
    queries: list[object] = []
    for part in (p.strip() for p in ids.split(",")):
        if not part:
            continue
        if id_kind in "iu":
            try:
                queries.append(int(part))
            except ValueError:
                raise typer.BadParameter(f"--ids {part!r} is not an integer sample id.") from None
        else:
            queries.append(part)
    if not queries:
        raise typer.BadParameter("--ids is empty; pass e.g. --ids 17,42.")
    if other is not None:
        from ..attribution import neighbors_from

        res = neighbors_from(scan, other, queries, k=k, absolute=absolute)
    else:
        res = scan.neighbors(queries, k=k, absolute=absolute)
    out = []
    for qi, q in enumerate(queries):
        rows = []
        for sid, sim in zip(res.sample_ids[qi].tolist(), res.similarities[qi].tolist()):
            rec = manifest.loc[sid]
            rows.append({"sample_id": sid, "similarity": sim, "label": _py(rec.get("label")), "pred": _py(rec.get("pred"))})
        q_rec = queried.loc[q]  # .get: a causal-LM manifest has no label or pred
        entry = {"sample_id": q, "label": _py(q_rec.get("label")), "pred": _py(q_rec.get("pred")), "neighbors": rows}
        if other is not None:
            entry["from"] = str(from_scan)
        out.append(entry)
    if as_json:
        emit_json(out)
        return
    console = table_console()
    for entry in out:
        agree = sum(r["label"] == entry["label"] for r in entry["neighbors"])
        where = f" of {from_scan}" if other is not None else ""
        table = Table(title=f"sample {entry['sample_id']}{where} (label {entry['label']}, pred {entry['pred']}): "
                            f"{agree}/{len(entry['neighbors'])} neighbours share its label")
        for c in ("sample_id", "similarity", "label", "pred"):
            table.add_column(c, justify="right")
        for r in entry["neighbors"]:
            table.add_row(str(r["sample_id"]), f"{r['similarity']:.3f}", str(r["label"]), str(r["pred"]))
        console.print(table)


def _py(v: object) -> object:
    return v.item() if hasattr(v, "item") else v
