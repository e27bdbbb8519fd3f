"""Expert review: a queue of the samples worth a human look, and a manifest with the expert's corrections.

``review_queue(scan, budget=N)`` picks at most ``N`` samples of a classification scan, by reason
(``ReviewReason``), in priority order:

1. ``confident-error``: ``confident_error`` (wrong with ``pred_confidence`` at or above the scan's threshold);
2. ``label-issue``: ``is_label_issue`` where the manifest has it, else ``neighbor_disagreement >=
   NEIGHBOR_DISAGREEMENT_CUT`` (most ``|cos|`` gradient neighbours carry another label), most suspicious first
   (``label_issue``, else ``neighbor_disagreement``);
3. ``near-miss``: ``near_miss`` (right, but with a margin under the scan's ``near_miss_margin``).

A sample is queued once, for its first reason; inside a reason, hardest first (``rank``). The budget is
spread over *groups* — the manifest's ``slice`` (``"<label>/<k>"``, ``hardmine.slices``) when it has one,
else the label — so that it is not spent on one failure mode: reasons are taken in order and, inside a reason,
groups in turn (round robin; a group whose best candidate is harder goes first), and no group takes more than
``ceil(budget / G)`` places (``G`` = groups with any candidate) until every group has run out; only then is
what is left of the budget filled without that cap.

The queue is a CSV (``QUEUE_COLUMNS``), one row per sample keyed by ``sample_id``, in queue order, with the
context to judge a sample (label, prediction, confidences, slice, the labels and ids of its ``k`` nearest
gradient neighbours by ``|cos|`` and the share that agree with its label) and two columns to fill:
``corrected_label`` (the right class; the same label confirms it; empty = not reviewed) and ``note``. An
existing file is replaced only when it is a queue written here with nothing filled in (its header is
``QUEUE_COLUMNS``); anything else needs ``overwrite=True``.

``relabel(scan, queue, out=...)`` validates the filled queue — unknown or duplicated ``sample_id``, a
``corrected_label`` that is not an integer class in ``[0, num_classes)``: ``ValueError`` naming the line and
the value, nothing written — and returns (and writes) the scan's manifest with:

- ``label``: the corrected label of every reviewed sample; ``original_label``: the scan's label;
- ``reviewed``: the sample has a ``corrected_label`` in the queue; ``review_note``: its note (or null);
- for reviewed samples, ``correct = pred == label`` and ``confident_error = not correct and pred_confidence >=
  the scan's confident_error_threshold``; ``is_label_issue`` is false (an expert has decided), so an export
  of the file no longer treats them as suspected label errors (the ``slices`` strategy never boosts those);
- ``is_hard`` and ``weight`` recomputed with the manifest's export parameters;
- metadata ``review``: the queue's path and sha256, the scan, counts of reviewed and changed labels, time.

The other scores (loss, margin, hardness, ...) stay those the scan computed with the old labels: rescan with
the corrected labels to recompute them.
"""

from __future__ import annotations

import csv
import inspect
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._io import atomic_path, file_sha256, utc_now
from .checks import as_bool, positive_int
from .enums import ReviewReason, Strategy, parse_choice
from .loaders.view import data_snippets
from .manifest import (
    check_destination,
    class_names,
    compute_weights,
    float_column,
    read_manifest,
    write_manifest,
)
from .scan import Scan

__all__ = [
    "NEIGHBOR_DISAGREEMENT_CUT",
    "QUEUE_COLUMNS",
    "EDITABLE_COLUMNS",
    "DEFAULT_BUDGET",
    "review_queue",
    "check_queue_destination",
    "read_queue",
    "relabel",
]

logger = logging.getLogger(__name__)

NEIGHBOR_DISAGREEMENT_CUT = 0.5  # without is_label_issue: most neighbours carry another label
DEFAULT_BUDGET = 100
DEFAULT_K = 5
EDITABLE_COLUMNS: tuple[str, ...] = ("corrected_label", "note")
QUEUE_COLUMNS: tuple[str, ...] = (
    "queue_position", "sample_id", "reason", "slice", "label", "label_name", "pred", "pred_name", "pred_confidence",
    "confidence", "loss",
    "hardness", "rank", "neighbor_agreement", "neighbor_labels", "neighbor_ids", "data", *EDITABLE_COLUMNS,
)
_HEADER = ",".join(QUEUE_COLUMNS)


# ------------------------------------------------------------------------------------------------ sources
def _scan_and_manifest(source: Any) -> tuple[Scan | None, pd.DataFrame]:
    if isinstance(source, Scan):
        return source, source.manifest()
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_dir():
            s = Scan.open(p)
            return s, s.manifest()
        return None, read_manifest(p)
    raise ValueError(f"pass a Scan or a scan directory, got {type(source).__name__} {source!r}.")


def _classification(m: pd.DataFrame, where: str) -> None:
    if "label" not in m:  # a causal-LM scan
        raise ValueError(f"{where}: review needs a classification scan (integer labels); this scan has no labels.")
    if m["label"].to_numpy().dtype.kind not in "iu":
        raise ValueError(
            f"{where}: review needs a classification scan (integer labels); its labels are {m['label'].dtype}."
        )


def _bools(m: pd.DataFrame, name: str) -> np.ndarray:
    if name not in m:
        return np.zeros(len(m), dtype=bool)
    return pd.array(m[name], dtype="boolean").fillna(False).to_numpy(dtype=bool)



# ------------------------------------------------------------------------------------------------- queue
def check_queue_destination(path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Where a review queue may be written: not a directory; an existing file only if it is a queue written
    here with no ``corrected_label`` or ``note`` filled in, or with ``overwrite`` (an expert's work and a
    user's own files are never replaced by accident)."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"cannot write a review queue to {str(p)!r}: it is a directory; give a file such as "
                         f"{str(p / 'queue.csv')!r}.")
    if p.exists() and not overwrite:
        try:
            with open(p, newline="", encoding="utf-8") as f:
                header = f.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError):
            header = ""
        if header != _HEADER:
            raise ValueError(
                f"{str(p)!r} exists and is not a review queue written by hardmine; refusing to replace it. Choose "
                "another path, or pass overwrite=True to replace it."
            )
        filled = read_queue(p)
        n = int(sum(filled[c].str.strip().ne("").sum() for c in EDITABLE_COLUMNS))
        if n:
            raise ValueError(
                f"{str(p)!r} is a review queue with {n} filled-in corrected_label/note cell(s); refusing to replace "
                "an expert's work. Apply it with relabel first, choose another path, or pass overwrite=True."
            )
    if not p.parent.exists():
        raise ValueError(f"cannot write {p}: directory {p.parent} does not exist.")
    return p


def review_queue(
    source: Scan | str | os.PathLike[str],
    *,
    budget: int = DEFAULT_BUDGET,
    k: int = DEFAULT_K,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> pd.DataFrame:
    """The samples an expert should look at first (see the module docstring), as a frame with
    ``QUEUE_COLUMNS``; written to ``out`` (CSV, atomically) when given.

    Args:
        source: a ``Scan`` or a scan directory (its index gives the neighbours).
        budget: at most this many samples.
        k: gradient neighbours shown per sample (their labels and ids).
        out: the CSV to write.
        overwrite: replace an existing file that is not an unfilled queue written here.
    """
    budget = positive_int(budget, "budget", hint="how many samples the expert can review")
    k = positive_int(k, "k", hint="neighbours shown per sample")
    as_bool(overwrite, "overwrite")
    if out is not None:
        check_queue_destination(out, overwrite=overwrite)
    scan, m = _scan_and_manifest(source)
    if scan is None:
        raise ValueError(f"review needs a scan directory (for the gradient neighbours), got the file {source!r}.")
    _classification(m, str(scan.path))
    k = min(k, scan.n_samples - 1)
    queue = _compute_queue(scan, m, budget, k)
    if out is not None:
        with atomic_path(out) as tmp:
            queue.to_csv(tmp, index=False, quoting=csv.QUOTE_MINIMAL)
        logger.info("review: wrote %d samples to %s", len(queue), out)
    return queue


def _reasons(m: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """``(reason index per sample, -1 = not a candidate; a priority key inside the reason, lower = first)``."""
    n = len(m)
    rank = m["rank"].to_numpy(dtype=np.float64)
    has_issue = "is_label_issue" in m and bool(m["is_label_issue"].notna().any())
    issue = _bools(m, "is_label_issue") if has_issue else float_column(m, "neighbor_disagreement") >= NEIGHBOR_DISAGREEMENT_CUT
    suspicion = float_column(m, "label_issue") if has_issue and "label_issue" in m else float_column(m, "neighbor_disagreement")
    flags = [_bools(m, "confident_error"), issue, _bools(m, "near_miss")]
    reason = np.full(n, -1, dtype=np.int64)
    for i, f in enumerate(flags):
        reason[(reason < 0) & f] = i
    # label-issue candidates: most suspicious first (ties: hardest); the others: hardest first.
    first = np.where(reason == 1, -np.nan_to_num(suspicion, nan=-np.inf), 0.0)
    order = np.lexsort((rank, first, reason))
    key = np.empty(n, dtype=np.int64)
    key[order] = np.arange(n)
    return reason, key


def _select(reason: np.ndarray, key: np.ndarray, group: np.ndarray, budget: int) -> list[int]:
    """Rows in queue order: reason by reason, groups in turn, at most ceil(budget / G) per group first."""
    cand = np.flatnonzero(reason >= 0)
    if len(cand) == 0:
        return []
    groups = pd.unique(group[cand])
    cap = math.ceil(budget / len(groups))
    taken: dict[Any, int] = {g: 0 for g in groups}
    chosen: list[int] = []
    picked = np.zeros(len(reason), dtype=bool)
    for capped in (True, False):
        for r in range(len(ReviewReason)):
            rows = cand[reason[cand] == r]
            rows = rows[np.argsort(key[rows], kind="stable")]
            lists: dict[Any, list[int]] = {}
            for row in rows.tolist():
                if not picked[row]:
                    lists.setdefault(group[row], []).append(row)
            order = list(lists)  # groups by their best candidate (rows are sorted)
            pos = dict.fromkeys(order, 0)
            while len(chosen) < budget:
                progressed = False
                for g in order:
                    if len(chosen) >= budget:
                        break
                    if pos[g] >= len(lists[g]) or (capped and taken[g] >= cap):
                        continue
                    row = lists[g][pos[g]]
                    pos[g] += 1
                    chosen.append(row)
                    picked[row] = True
                    taken[g] += 1
                    progressed = True
                if not progressed:
                    break
        if len(chosen) >= budget:
            break
    return chosen


def _compute_queue(scan: Scan, m: pd.DataFrame, budget: int, k: int) -> pd.DataFrame:
    reason, key = _reasons(m)
    has_slice = "slice" in m and bool(m["slice"].notna().any())
    labels = m["label"].to_numpy()
    group = m["slice"].astype(str).to_numpy(dtype=object) if has_slice else labels.astype(object)
    rows = np.asarray(_select(reason, key, group, budget), dtype=np.int64)
    names = [r.value for r in ReviewReason]
    q = m.iloc[rows].reset_index(drop=True)
    out = pd.DataFrame({"queue_position": np.arange(1, len(rows) + 1), "sample_id": q["sample_id"].to_numpy()})
    out["reason"] = [names[i] for i in reason[rows]]
    out["slice"] = q["slice"].astype("string").fillna("") if has_slice else ""
    for c in ("label", "pred", "pred_confidence", "confidence", "loss", "hardness", "rank"):
        out[c] = q[c].to_numpy() if c in q else np.nan
    classes = class_names(m)  # the scan's class names, when it recorded them: what a reviewer reads
    for c in ("label", "pred"):
        out[f"{c}_name"] = [
            classes[int(v)] if classes and isinstance(v, (int, np.integer)) and 0 <= v < len(classes) else ""
            for v in q[c].tolist()
        ]
    if len(rows) and k >= 1:
        by_id = dict(zip(m["sample_id"].tolist(), labels.tolist()))
        nb = scan.neighbors(q["sample_id"].tolist(), k=k, absolute=True)
        nb_labels = [[by_id[i] for i in ids if i in by_id] for ids in nb.sample_ids.tolist()]
        out["neighbor_agreement"] = [
            float(np.mean([v == lab for v in nl])) if nl else np.nan for nl, lab in zip(nb_labels, q["label"].tolist())
        ]
        out["neighbor_labels"] = [" ".join(str(v) for v in nl) for nl in nb_labels]
        out["neighbor_ids"] = [" ".join(str(v) for v in ids) for ids in nb.sample_ids.tolist()]
    else:
        out["neighbor_agreement"], out["neighbor_labels"], out["neighbor_ids"] = np.nan, "", ""
    # The data the expert judges: the text, or the data file and row (hardmine.loaders.view).
    snippets = data_snippets((scan.info.get("source") or {}), q["sample_id"].tolist(), width=200)
    out["data"] = [snippets.get(v, "") for v in q["sample_id"].tolist()]
    for c in EDITABLE_COLUMNS:
        out[c] = ""
    return out[list(QUEUE_COLUMNS)]


# ------------------------------------------------------------------------------------------------ relabel
def read_queue(path: str | os.PathLike[str]) -> pd.DataFrame:
    """A review queue (or any CSV with ``sample_id`` and ``corrected_label``) as strings, blanks as ``""``."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p} does not exist; write a queue with hardmine review first.")
    try:
        q = pd.read_csv(p, dtype=str, keep_default_na=False, encoding="utf-8")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p} is not a readable CSV ({exc}).") from None
    for c in ("sample_id", "corrected_label"):
        if c not in q:
            raise ValueError(f"{p} has no {c!r} column (columns: {list(q.columns)}); pass a queue from hardmine review.")
    if "note" not in q:
        q["note"] = ""
    return q


def _parse_label(text: str) -> int | None:
    try:
        v = float(text)
    except ValueError:
        return None
    return int(v) if math.isfinite(v) and v == int(v) else None


def relabel(
    source: Scan | str | os.PathLike[str],
    queue: str | os.PathLike[str] | pd.DataFrame,
    *,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> pd.DataFrame:
    """The scan's manifest with an expert's corrections applied (see the module docstring); written to
    ``out`` (Parquet, atomically, a hardmine manifest) when given. Every check runs before anything is
    written.

    Args:
        source: a ``Scan``, a scan directory or a manifest file.
        queue: the filled queue (a CSV path, or a frame with ``sample_id`` and ``corrected_label``).
        out: the corrected manifest to write (an existing hardmine manifest there is replaced; any other file
            only with ``overwrite=True``).
        overwrite: allow replacing a file at ``out`` that is not a hardmine manifest.
    """
    as_bool(overwrite, "overwrite")
    if out is not None:
        check_destination(out, overwrite=overwrite)
    if isinstance(queue, pd.DataFrame):
        q, where = queue.astype(str).replace({"nan": "", "<NA>": "", "None": ""}), "the queue"
        for c in ("sample_id", "corrected_label"):
            if c not in q:
                raise ValueError(f"the queue has no {c!r} column (columns: {list(q.columns)}).")
        if "note" not in q:
            q["note"] = ""
    else:
        q, where = read_queue(queue), str(queue)
    scan, m = _scan_and_manifest(source)
    _classification(m, str(scan.path) if scan is not None else str(source))
    meta = dict(m.attrs.get("hardmine", {}))
    df, info = _compute_relabel(m, q, meta, where)
    info.update(
        {
            "queue": where,
            "queue_sha256": file_sha256(queue) if not isinstance(queue, pd.DataFrame) else None,
            "scan": str(scan.path) if scan is not None else str(source),
            "created": utc_now(),
        }
    )
    meta["review"] = info
    meta["created"] = info["created"]
    df.attrs["hardmine"] = meta
    if out is not None:
        write_manifest(df, out, meta, overwrite=overwrite)
        logger.info("relabel: %d reviewed, %d labels changed; wrote %s", info["reviewed"], info["changed"], out)
    return df


def _num_classes(m: pd.DataFrame, meta: dict[str, Any]) -> int:
    n = meta.get("num_classes")
    if isinstance(n, int) and n > 0:
        return n
    return int(m["label"].max()) + 1


def _compute_relabel(m: pd.DataFrame, q: pd.DataFrame, meta: dict[str, Any], where: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    int_ids = m["sample_id"].to_numpy().dtype.kind in "iu"
    n_classes = _num_classes(m, meta)
    row_of = {v: i for i, v in enumerate(m["sample_id"].tolist())}
    seen: dict[Any, int] = {}
    errors: list[str] = []
    new_label: dict[int, int] = {}
    notes: dict[int, str] = {}
    for i, (sid_text, lab_text, note) in enumerate(zip(q["sample_id"], q["corrected_label"], q["note"])):
        line = i + 2  # 1-based, after the header
        sid_text = str(sid_text).strip()
        sid: Any = sid_text
        if int_ids:
            parsed = _parse_label(sid_text)
            if parsed is None:
                errors.append(f"line {line}: sample_id {sid_text!r} is not an integer id")
                continue
            sid = parsed
        if sid in seen:
            errors.append(f"line {line}: sample_id {sid_text!r} is listed twice (also line {seen[sid]})")
            continue
        seen[sid] = line
        if sid not in row_of:
            errors.append(f"line {line}: sample_id {sid_text!r} is not in the scan")
            continue
        lab_text = str(lab_text).strip()
        if lab_text == "":
            continue  # not reviewed
        lab = _parse_label(lab_text)
        if lab is None or not 0 <= lab < n_classes:
            errors.append(
                f"line {line}: corrected_label {lab_text!r} is not a class in [0, {n_classes - 1}]"
            )
            continue
        new_label[row_of[sid]] = lab
        if str(note).strip():
            notes[row_of[sid]] = str(note)
    if errors:
        shown = "; ".join(errors[:10]) + (f"; and {len(errors) - 10} more" if len(errors) > 10 else "")
        raise ValueError(f"{where}: {len(errors)} problem(s), nothing written: {shown}.")
    df = m.copy()
    rows = np.fromiter(new_label.keys(), dtype=np.int64, count=len(new_label))
    labs = np.fromiter(new_label.values(), dtype=np.int64, count=len(new_label))
    original = df["label"].to_numpy().copy()
    label = original.copy()
    label[rows] = labs
    reviewed = np.zeros(len(df), dtype=bool)
    reviewed[rows] = True
    df["original_label"] = original
    df["label"] = label
    df["reviewed"] = pd.array(reviewed, dtype="boolean")
    note_col = np.full(len(df), None, dtype=object)
    for r, text in notes.items():
        note_col[r] = text
    df["review_note"] = pd.array(note_col, dtype="string")
    if len(rows):
        pred = df["pred"].to_numpy()
        correct = pd.array(df["correct"], dtype="boolean").copy()
        correct[rows] = pred[rows].astype(np.int64) == labs
        df["correct"] = correct
        t = float((meta.get("score_config") or {}).get("confident_error_threshold", 0.8))
        conf = float_column(df, "pred_confidence")
        ce = pd.array(df["confident_error"], dtype="boolean").copy()
        ce[rows] = ~correct[rows].to_numpy(dtype=bool) & (conf[rows] >= t)
        df["confident_error"] = ce
        if "is_label_issue" in df:
            issue = pd.array(df["is_label_issue"], dtype="boolean").copy()
            issue[rows] = False
            df["is_label_issue"] = issue
    exp = meta.get("export") or {}
    strategy = parse_choice(Strategy, exp["strategy"], "strategy") if exp.get("strategy") else None
    # every parameter of the export that compute_weights takes (slice_boost included), as the manifest records it
    params = [k for k in inspect.signature(compute_weights).parameters if k not in ("df", "strategy")]
    kwargs = {key: exp[key] for key in params if key in exp}
    weight, is_hard = compute_weights(df, strategy, **kwargs)
    df["is_hard"] = pd.array(is_hard, dtype="boolean")
    df["weight"] = weight
    info = {
        "reviewed": int(reviewed.sum()),
        "changed": int((label != original).sum()),
        "rule": "label <- corrected_label where given; reviewed samples: correct and confident_error recomputed, "
                "is_label_issue false; is_hard and weight recomputed with the manifest's export parameters; other "
                "scores are the scan's",
    }
    return df, info
