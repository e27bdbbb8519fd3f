"""One self-contained HTML report of a scan: what the model gets wrong, where, how sure it is, and examples.

``report(scan, out="report.html")`` writes a single file with no external resource (no scripts, fonts, styles
or images fetched; every plot is inline SVG built here), so it opens offline and can be mailed or attached to
a CI run. Sections (each an HTML ``<section>`` with the id in brackets):

- summary (``summary``): samples, accuracy, ECE, ``is_hard`` / ``is_label_issue`` / ``confident_error``
  counts, the engine plan (parameters per engine), projection and index, provenance (versions, fingerprints,
  checkpoint and data, times);
- per class (``classes``) and, when the manifest has slices, per slice (``slices``, the worst
  ``MAX_BARS``): failure rate (``1 - correct``) as sorted bars with the group's size, and a table with ECE,
  mean loss and label-issue rate;
- calibration (``calibration``): the reliability diagram (accuracy against mean ``pred_confidence`` in
  ``ECE_BINS`` equal-width bins, bar width = the bin, the diagonal = perfect calibration) and ECE per class;
- distributions (``distributions``): histograms of ``hardness`` and ``log10 loss`` (values above the 99th
  percentile are counted in the last bin);
- the worst groups (``worst``): the ``N_WORST`` slices (else classes) with the highest failure rate, with their
  representative samples (``slices.parquet``'s ``representative_ids``: closest to the slice centroid) and
  their hardest ones;
- confident errors (``confident-errors``) and label-issue candidates (``label-issues``), the ``N_EXAMPLES``
  hardest / most suspicious.

Every example shown comes with its label, prediction and confidence, its text where the scan read text
(the scan's ``--text-column`` of a Parquet or CSV file, read back for the shown ids only; or ``texts=``), and
its ``K_NEIGHBORS`` nearest gradient neighbours by ``|cos|`` with their labels. Regression scans get the
summary, the distributions and the hardest samples.

The work is one read of the manifest (and ``slices.parquet``) plus one neighbour query for the shown examples:
independent of the scan's gradient volume (``scripts/report_screenshot.py --time`` measures it).
"""

from __future__ import annotations

import html
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._io import atomic_write_bytes, check_page_destination, utc_now
from ._version import __version__
from .checks import as_bool, positive_int
from .enums import TaskKind
from .loaders.view import data_snippets
from .manifest import bool_column, class_names, float_column
from .scan import Scan
from .slices import ECE_BINS, SLICES_FILE, expected_calibration_error, read_slice_table

__all__ = ["GENERATOR", "SECTIONS", "MAX_BARS", "N_EXAMPLES", "N_WORST", "K_NEIGHBORS", "check_report_destination",
           "render_report", "report"]

logger = logging.getLogger(__name__)

GENERATOR = "hardmine-report"  # <meta name="generator">: how a report written here is recognised
SECTIONS: tuple[str, ...] = (
    "summary", "classes", "slices", "calibration", "distributions", "worst", "confident-errors", "label-issues",
)
MAX_BARS = 20  # slices shown as bars (the worst by failure rate)
N_EXAMPLES = 8  # confident errors / label-issue candidates shown
N_WORST = 5  # worst groups shown with examples
N_GROUP_EXAMPLES = 3  # representative and hardest samples per worst group
K_NEIGHBORS = 5
TEXT_CHARS = 300  # a shown text is cut after this many characters

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;
color:#1d2330;background:#fff;padding:0 16px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:28px 0 8px;border-bottom:2px solid #e4e7ee;padding-bottom:4px}
h3{font-size:15px;margin:16px 0 6px}.muted{color:#667085}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}.card{background:#f4f6fa;border-radius:8px;padding:10px 14px;
min-width:120px}.card b{display:block;font-size:22px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}th,td{padding:3px 8px;border-bottom:1px solid #e4e7ee;
text-align:right;vertical-align:top}th{background:#f4f6fa}td.l,th.l{text-align:left}
.ex{border:1px solid #e4e7ee;border-radius:8px;padding:8px 10px;margin:8px 0}.ex .t{font-family:Georgia,serif;
margin:4px 0;white-space:pre-wrap}.nb{font-size:12px;color:#475467}.bad{color:#b42318}.ok{color:#067647}
.grid{display:flex;flex-wrap:wrap;gap:24px}svg{background:#fff}code{background:#f4f6fa;padding:0 3px;border-radius:3px}
"""


# ------------------------------------------------------------------------------------------------ files
def check_report_destination(path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Where a report may be written: not a directory; an existing file only if it is a report written here
    (its ``<meta name="generator">``) or with ``overwrite``."""
    return check_page_destination(path, overwrite=overwrite, generator=GENERATOR, what="report", example="report.html")


def report(
    source: Scan | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    texts: Mapping[Any, str] | None = None,
) -> Path:
    """Write the HTML report of a scan to ``out`` (atomically); see the module docstring.

    Args:
        source: a ``Scan`` or a scan directory.
        out: the ``.html`` file (an earlier report there is replaced; any other file only with ``overwrite``).
        overwrite: allow replacing a file that is not a hardmine report.
        texts: ``sample_id -> text`` for the shown examples (default: read from the scan's text column, if any).
    """
    as_bool(overwrite, "overwrite")
    out = check_report_destination(out, overwrite=overwrite)
    if texts is not None and not isinstance(texts, Mapping):
        raise ValueError(f"texts must be a mapping sample_id -> text, got {type(texts).__name__}.")
    scan = source if isinstance(source, Scan) else Scan.open(_path(source))
    page = render_report(scan, texts=texts)
    atomic_write_bytes(out, page.encode("utf-8"))
    logger.info("report: wrote %s", out)
    return out


def _path(source: Any) -> Path:
    if isinstance(source, (str, os.PathLike)):
        return Path(source)
    raise ValueError(f"pass a Scan or a scan directory, got {type(source).__name__} {source!r}.")


def render_report(scan: Scan, *, texts: Mapping[Any, str] | None = None, k: int = K_NEIGHBORS) -> str:
    """The report's HTML as a string (``report`` writes it)."""
    k = positive_int(k, "k")
    return _compute_report(scan, texts, k)


# ------------------------------------------------------------------------------------------------ svg
def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.{digits}f}"
    return _e(v)


def _bars_svg(names: Sequence[str], values: Sequence[float], sizes: Sequence[int], title: str, width: int = 520) -> str:
    """Horizontal bars in [0, 1], one per group, with the group's size after its name."""
    row, left, top = 18, 150, 26
    h = top + row * len(names) + 24
    plot = width - left - 60
    finite = [v for v in values if math.isfinite(v)]
    # The axis ends at the next round step above the largest value, so small rates are not flat lines.
    xmax = next((s for s in (0.05, 0.1, 0.2, 0.25, 0.5) if finite and max(finite) <= s), 1.0)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" role="img" aria-label="{_e(title)}">',
             f'<text x="0" y="16" font-size="13" font-weight="600">{_e(title)}</text>']
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        x = left + frac * plot
        parts.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{h - 20}" stroke="#e4e7ee"/>'
                     f'<text x="{x:.1f}" y="{h - 6}" font-size="10" text-anchor="middle" fill="#667085">'
                     f'{frac * xmax:g}</text>')
    for i, (name, v, n) in enumerate(zip(names, values, sizes)):
        y = top + i * row
        w = 0.0 if not math.isfinite(v) else max(0.0, min(1.0, v / xmax)) * plot
        parts.append(
            f'<text x="{left - 6}" y="{y + 12}" font-size="11" text-anchor="end">{_e(name)} (n={n})</text>'
            f'<rect x="{left}" y="{y + 2}" width="{w:.1f}" height="{row - 5}" fill="#d92d20" opacity="0.8"/>'
            f'<text x="{left + w + 4:.1f}" y="{y + 12}" font-size="10" fill="#344054">{_num(v)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _hist_svg(values: np.ndarray, title: str, bins: int = 30, width: int = 520, height: int = 220) -> str:
    v = values[np.isfinite(values)]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" aria-label="{_e(title)}">',
             f'<text x="0" y="16" font-size="13" font-weight="600">{_e(title)}</text>']
    if len(v) == 0:
        parts.append('<text x="10" y="60" font-size="12">no finite values</text></svg>')
        return "".join(parts)
    lo, hi = float(v.min()), float(np.quantile(v, 0.99))
    if hi <= lo:
        hi = lo + 1.0
    counts, edges = np.histogram(np.clip(v, lo, hi), bins=bins, range=(lo, hi))
    left, top, bottom = 40, 26, 28
    pw, ph = width - left - 10, height - top - bottom
    peak = max(int(counts.max()), 1)
    bw = pw / bins
    for i, c in enumerate(counts.tolist()):
        bh = ph * c / peak
        parts.append(f'<rect x="{left + i * bw:.1f}" y="{top + ph - bh:.1f}" width="{max(bw - 1, 1):.1f}" '
                     f'height="{bh:.1f}" fill="#1570ef" opacity="0.85"><title>{edges[i]:.3g}–{edges[i + 1]:.3g}: {c}</title></rect>')
    parts.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#344054"/>')
    for frac, anchor in ((0.0, "start"), (0.5, "middle"), (1.0, "end")):
        x = left + frac * pw
        parts.append(f'<text x="{x:.1f}" y="{height - 10}" font-size="10" text-anchor="{anchor}" fill="#667085">'
                     f'{lo + frac * (hi - lo):.3g}</text>')
    parts.append(f'<text x="{left - 4}" y="{top + 8}" font-size="10" text-anchor="end" fill="#667085">{peak}</text></svg>')
    return "".join(parts)


def _reliability_svg(conf: np.ndarray, ok: np.ndarray, bins: int = ECE_BINS, size: int = 300) -> str:
    m = np.isfinite(conf) & np.isfinite(ok)
    conf, ok = conf[m], ok[m]
    left, top, pad = 40, 26, 30
    p = size - left - 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{top + p + pad}" role="img" '
             'aria-label="reliability diagram">',
             '<text x="0" y="16" font-size="13" font-weight="600">reliability: accuracy vs confidence</text>',
             f'<rect x="{left}" y="{top}" width="{p}" height="{p}" fill="none" stroke="#344054"/>']
    if len(conf):
        b = np.minimum((conf * bins).astype(np.int64), bins - 1)  # bin of each sample, as the ECE bins them
        n_b = np.bincount(b, minlength=bins)  # (bins,)
        acc = np.bincount(b, weights=ok, minlength=bins)
        for i in range(bins):
            if n_b[i] == 0:
                continue
            a = acc[i] / n_b[i]
            x, w = left + p * i / bins, p / bins
            parts.append(f'<rect x="{x:.1f}" y="{top + p * (1 - a):.1f}" width="{w - 1:.1f}" height="{p * a:.1f}" '
                         f'fill="#1570ef" opacity="0.8"><title>confidence {i / bins:.1f}–{(i + 1) / bins:.1f}: '
                         f'accuracy {a:.3f}, n={int(n_b[i])}</title></rect>')
    # The diagonal (perfect calibration) over the bars.
    parts.append(f'<line x1="{left}" y1="{top + p}" x2="{left + p}" y2="{top}" stroke="#344054" stroke-dasharray="4 3"/>')
    for frac in (0.0, 0.5, 1.0):
        parts.append(f'<text x="{left + frac * p:.1f}" y="{top + p + 14}" font-size="10" text-anchor="middle" '
                     f'fill="#667085">{frac:g}</text><text x="{left - 4}" y="{top + p * (1 - frac) + 4:.1f}" '
                     f'font-size="10" text-anchor="end" fill="#667085">{frac:g}</text>')
    parts.append(f'<text x="{left + p / 2:.1f}" y="{top + p + 27}" font-size="10" text-anchor="middle">'
                 'pred_confidence</text></svg>')
    return "".join(parts)


# ------------------------------------------------------------------------------------------------ data


def _nanmean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else math.nan


def _group_stats(m: pd.DataFrame, key: str) -> pd.DataFrame:
    ok, conf, loss, issue = bool_column(m, "correct"), float_column(m, "pred_confidence"), float_column(m, "loss"), bool_column(m, "is_label_issue")
    rows = []
    for g, idx in m.groupby(key, sort=True).indices.items():
        rows.append({
            key: g.item() if hasattr(g, "item") else g, "size": len(idx), "failure_rate": _nanmean(1.0 - ok[idx]),
            "ece": expected_calibration_error(conf[idx], ok[idx]), "mean_loss": _nanmean(loss[idx]),
            "label_issue_rate": _nanmean(issue[idx]),
        })
    out = pd.DataFrame(rows)
    return out.sort_values(["failure_rate", "size"], ascending=[False, False], kind="stable").reset_index(drop=True)


def _texts_from_source(scan: Scan, ids: Sequence[Any]) -> dict[Any, str]:
    """The texts of ``ids`` from the scan's data file, when it read a ``--text-column`` of Parquet or CSV."""
    if not (scan.info.get("source") or {}).get("text_column"):
        return {}
    return data_snippets(scan.info.get("source"), ids, width=0)


# ------------------------------------------------------------------------------------------------ html
def _table(df: pd.DataFrame, left: Sequence[str] = ()) -> str:
    head = "".join(f'<th class="{"l" if c in left else ""}">{_e(c)}</th>' for c in df.columns)
    body = []
    for rec in df.itertuples(index=False):
        cells = "".join(f'<td class="{"l" if c in left else ""}">{_num(v)}</td>' for c, v in zip(df.columns, rec))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _class(v: Any, names: Sequence[str] | None) -> str:
    """A class id as its recorded name (``hardmine.manifest.class_names``) when known, else the number: HTML."""
    return _e(_class_text(v, names))


def _class_text(v: Any, names: Sequence[str] | None) -> str:
    """:func:`_class` as plain text (for what escapes it itself, e.g. :func:`_bars_svg`)."""
    if names is not None and isinstance(v, (int, np.integer)) and 0 <= int(v) < len(names):
        return str(names[int(v)])
    if v is None or isinstance(v, (float, np.floating)):
        return _num(v)  # digits or a dash: nothing to escape
    return str(v)


def _example(sid: Any, m: pd.DataFrame, nbrs: dict[Any, list[tuple[Any, float]]], texts: Mapping[Any, str]) -> str:
    rec = m.loc[sid]
    label, pred = rec.get("label"), rec.get("pred")
    names = class_names(m)
    cls = "bad" if str(rec.get("correct")) == "False" else "ok"
    bits = [f'<b>sample {_e(sid)}</b>', f'label <b>{_class(label, names)}</b>',
            f'pred <b class="{cls}">{_class(pred, names)}</b>']
    for c in ("pred_confidence", "loss", "hardness"):
        if c in rec:
            bits.append(f"{c} {_num(rec[c])}")
    if "slice" in rec and isinstance(rec["slice"], str):
        bits.append(f"slice {_e(rec['slice'])}")
    out = [f'<div class="ex" data-sample-id="{_e(sid)}"><div>{" · ".join(bits)}</div>']
    if sid in texts:
        t = texts[sid]
        out.append(f'<div class="t">{_e(t[:TEXT_CHARS] + ("…" if len(t) > TEXT_CHARS else ""))}</div>')
    near = nbrs.get(sid, [])
    if near and "label" not in m:  # a causal-LM scan: no labels to compare
        items = ", ".join(f"{_e(n)} (cos {_num(s, 2)})" for n, s in near)
        out.append(f'<div class="nb">nearest gradient neighbours: {items}</div>')
    elif near:
        items = ", ".join(
            f'{_e(n)} (label {_class(m.loc[n, "label"], names) if n in m.index else "?"}, cos {_num(s, 2)})'
            for n, s in near
        )
        agree = sum(1 for n, _ in near if n in m.index and m.loc[n, "label"] == label)
        out.append(f'<div class="nb">nearest gradient neighbours ({agree}/{len(near)} share its label): {items}</div>')
    out.append("</div>")
    return "".join(out)


def _compute_report(scan: Scan, texts: Mapping[Any, str] | None, k: int) -> str:
    m = scan.manifest()
    classification = scan.task is TaskKind.CLASSIFICATION and m["label"].to_numpy().dtype.kind in "iu"
    has_slices = classification and "slice" in m and bool(m["slice"].notna().any())
    slice_table = read_slice_table(scan.path) if has_slices and (scan.path / SLICES_FILE).is_file() else None
    ok, conf = bool_column(m, "correct"), float_column(m, "pred_confidence")
    by_rank = m.sort_values("rank", kind="stable")

    # Which examples are shown (one neighbour query for all of them).
    ce_ids = by_rank.loc[by_rank["confident_error"].fillna(False).astype(bool), "sample_id"].head(N_EXAMPLES).tolist() \
        if classification else []
    issue_ids: list[Any] = []
    if classification and "is_label_issue" in m:
        flagged = m[m["is_label_issue"].fillna(False).astype(bool)]
        if "label_issue" in flagged:
            flagged = flagged.sort_values(["label_issue", "rank"], ascending=[False, True], kind="stable")
        issue_ids = flagged["sample_id"].head(N_EXAMPLES).tolist()
    worst_key = "slice" if has_slices else ("label" if classification else None)
    worst = _group_stats(m, worst_key).head(N_WORST) if worst_key else None
    worst_examples: dict[Any, tuple[list[Any], list[Any]]] = {}
    if worst is not None:
        st = slice_table.set_index("slice") if slice_table is not None else None
        for g in worst[worst_key].tolist():
            members = by_rank[by_rank[worst_key] == g]
            reps = list(st.loc[g, "representative_ids"])[:N_GROUP_EXAMPLES] if st is not None and g in st.index else []
            hardest = members.loc[~members["sample_id"].isin(reps), "sample_id"].head(N_GROUP_EXAMPLES).tolist()
            worst_examples[g] = (reps, hardest)
    hardest_ids = by_rank["sample_id"].head(N_EXAMPLES).tolist() if not classification else []
    shown = list(dict.fromkeys(ce_ids + issue_ids + hardest_ids
                               + [s for r, h in worst_examples.values() for s in (*r, *h)]))
    nbrs: dict[Any, list[tuple[Any, float]]] = {}
    kk = min(k, scan.n_samples - 1)
    if shown and kk >= 1:
        res = scan.neighbors(shown, k=kk, absolute=True)
        for i, sid in enumerate(shown):
            nbrs[sid] = [(n, s) for n, s, r in zip(res.sample_ids[i].tolist(), res.similarities[i].tolist(),
                                                   res.rows[i].tolist()) if r >= 0]
    all_texts = dict(texts) if texts is not None else _texts_from_source(scan, shown)
    if "text" in m and texts is None:
        wanted = set(shown)
        all_texts.update({s: str(t) for s, t in zip(m["sample_id"], m["text"]) if s in wanted and t is not None})
    mi = m.set_index("sample_id", drop=False)

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta name="generator" content="{GENERATOR} {_e(__version__)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>hardmine report: {_e(scan.path.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>hardmine report: {_e(scan.path.name)}</h1>",
        f'<div class="muted">{_e(scan.path)} · generated {_e(utc_now())} by hardmine {_e(__version__)}</div>',
    ]
    parts.append(_summary_section(scan, m, ok, conf, classification))
    if classification:
        cls = _group_stats(m, "label")
        parts.append('<section id="classes"><h2>Per class</h2>')
        parts.append('<div class="grid"><div>' + _bars_svg(
            [_class_text(v, class_names(m)) if class_names(m) else f"class {v}" for v in cls["label"]],
            cls["failure_rate"].tolist(), cls["size"].tolist(),
            "failure rate (1 − accuracy) per class, worst first") + "</div>")
        parts.append("<div>" + _table(cls, left=("label",)) + "</div></div></section>")
        if has_slices:
            sl = _group_stats(m, "slice")
            shown_sl = sl.head(MAX_BARS)
            parts.append(f'<section id="slices"><h2>Per slice</h2><p class="muted">{len(sl)} slices (per-class '
                         f'clusters of gradient directions, <code>hardmine slices</code>); the worst {len(shown_sl)} '
                         'by failure rate.</p>')
            parts.append('<div class="grid"><div>' + _bars_svg(
                shown_sl["slice"].tolist(), shown_sl["failure_rate"].tolist(), shown_sl["size"].tolist(),
                "failure rate per slice, worst first") + "</div>")
            parts.append("<div>" + _table(shown_sl, left=("slice",)) + "</div></div></section>")
        ece_rows = cls[["label", "size", "ece"]].sort_values("label", kind="stable")
        parts.append('<section id="calibration"><h2>Calibration</h2><div class="grid">'
                     f'<div>{_reliability_svg(conf, ok)}</div><div><h3>ECE per class</h3>'
                     f'{_table(ece_rows, left=("label",))}</div></div></section>')
    parts.append('<section id="distributions"><h2>Distributions</h2><div class="grid">'
                 f'<div>{_hist_svg(float_column(m, "hardness"), "hardness (higher = harder)")}</div>'
                 f'<div>{_hist_svg(np.log10(np.maximum(float_column(m, "loss"), 1e-8)), "log10 per-sample loss")}</div>'
                 "</div></section>")
    if worst is not None:
        parts.append(f'<section id="worst"><h2>Worst {"slices" if has_slices else "classes"}</h2>')
        for rec in worst.to_dict("records"):
            g = rec[worst_key]
            parts.append(f"<h3>{'slice' if has_slices else 'class'} {_e(g)}: failure rate {_num(rec['failure_rate'])}, "
                         f"n={rec['size']}</h3>")
            reps, hardest = worst_examples[g]
            if reps:
                parts.append('<div class="muted">representative (closest to the slice centroid)</div>')
                parts += [_example(s, mi, nbrs, all_texts) for s in reps if s in mi.index]
            parts.append('<div class="muted">hardest</div>')
            parts += [_example(s, mi, nbrs, all_texts) for s in hardest]
        parts.append("</section>")
    if classification:
        parts.append('<section id="confident-errors"><h2>Confident errors</h2><p class="muted">wrong with '
                     '<code>pred_confidence</code> at or above the scan\'s threshold, hardest first: label errors '
                     'or real failures.</p>')
        parts += [_example(s, mi, nbrs, all_texts) for s in ce_ids] or ["<p>none</p>"]
        parts.append("</section>")
        parts.append('<section id="label-issues"><h2>Label-issue candidates</h2><p class="muted"><code>'
                     'is_label_issue</code>, most suspicious first; review them with <code>hardmine review</code>.</p>')
        parts += [_example(s, mi, nbrs, all_texts) for s in issue_ids] or ["<p>none</p>"]
        parts.append("</section>")
    else:
        parts.append('<section id="hardest"><h2>Hardest samples</h2>')
        parts += [_example(s, mi, nbrs, all_texts) for s in hardest_ids]
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _summary_section(scan: Scan, m: pd.DataFrame, ok: np.ndarray, conf: np.ndarray, classification: bool) -> str:
    cards: list[tuple[str, str]] = [("samples", f"{len(m):,}")]
    if classification:
        cards += [("accuracy", _num(_nanmean(ok))), ("ECE", _num(expected_calibration_error(conf, ok)))]
    cards.append(("is_hard", f"{int(np.nansum(bool_column(m, 'is_hard'))):,}"))
    if classification:
        cards += [("label issues", f"{int(np.nansum(bool_column(m, 'is_label_issue'))):,}"),
                  ("confident errors", f"{int(np.nansum(bool_column(m, 'confident_error'))):,}")]
    html_cards = "".join(f'<div class="card"><span class="muted">{_e(a)}</span><b>{b}</b></div>' for a, b in cards)
    eng = scan.engine_metadata
    plan = eng.get("plan") or {}
    counts: dict[str, int] = {}
    for v in plan.values():
        counts[str(v)] = counts.get(str(v), 0) + 1
    plan_text = ", ".join(f"{n} parameter(s) {e}" for e, n in sorted(counts.items())) or "–"
    cfg = scan.config
    meta = m.attrs.get("hardmine", {})
    prov = scan.info.get("provenance") or {}
    src = scan.info.get("source") or {}
    rows = [
        ("task", scan.task.value), ("classes", scan.num_classes),
        ("engine", f"{eng.get('engine', cfg.get('engine_requested'))}: {plan_text}"),
        ("layers", ", ".join(map(str, cfg.get("layers") or [])) or "–"),
        ("projection", f"dim {cfg.get('dim')} per parameter, {scan.out_dim} in all, {eng.get('projection')}, "
                       f"seed {cfg.get('seed')}"),
        ("index", scan.index_info.kind if scan.index_built else "not built yet (the first neighbour query builds it)"),
        ("strategy", (meta.get("export") or {}).get("strategy")),
        ("model", f"{cfg.get('model_class')} · fingerprint {str(cfg.get('model_fingerprint'))[:16]}…"),
        ("dataset fingerprint", f"{str(scan.info.get('dataset_fingerprint'))[:16]}…"),
        ("checkpoint", src.get("checkpoint", "–")), ("data", src.get("data", "–")),
        ("scanned", f"{scan.info.get('started', '–')} → {scan.info.get('finished', '–')}"),
        ("versions", ", ".join(f"{a} {b}" for a, b in sorted(prov.items()) if isinstance(b, (str, int, float))) or "–"),
    ]
    table = "".join(f'<tr><th class="l">{_e(a)}</th><td class="l">{_e(b if b is not None else "–")}</td></tr>'
                    for a, b in rows)
    return f'<section id="summary"><h2>Summary</h2><div class="cards">{html_cards}</div><table>{table}</table></section>'
