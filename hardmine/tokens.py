"""Token-level hardness of a causal-LM scan: ``SCAN_DIR/tokens.parquet`` read back one sample at a time, the
scan's uncertainty tiers, and the views ``hardmine tokens`` prints or writes.

A causal-LM scan writes one row per token of every sample (``TOKEN_COLUMNS``), one or more row groups per extraction
shard, rows in scan order then position:

=============  =========  ==========================================================================================
column         type       meaning
=============  =========  ==========================================================================================
``sample_id``  manifest   the sample (the manifest's ``sample_id`` dtype: integer positions or the data's own ids)
``position``   int32      0-based index in the tokenized sequence (padding excluded)
``token_id``   int64      the tokenizer's id
``token``      string     the decoding of that single id (may start with a space or be a newline)
``is_target``  bool       the token is in the loss (``False`` for prompt tokens and non-assistant turns)
``loss``       float32    NLL of this token given its prefix, nats (null at position 0: nothing predicts it)
``entropy``    float32    entropy of the model's next-token distribution at this position, nats (null at 0)
``top1``       bool       the model's top prediction is this token (null at 0)
=============  =========  ==========================================================================================

**Reading one sample** (``read_sample_tokens``, ``Scan.tokens``) never loads the table: the row groups whose
``sample_id`` statistics (min/max) exclude the id are skipped unread; a remaining group's ``sample_id`` column
is read (``READ_ROWS`` rows at a time) to see whether it holds the id, and only the groups that do are read in
full, again ``READ_ROWS`` rows at a time. With integer ids in scan order the statistics leave exactly the
sample's own group.

**Tiers** (``TokenTier``): a target token is yellow, orange or red when its loss is at least the scan's
q0.50, q0.80 or q0.95 of target-token loss (``TIER_QUANTILES``; the highest tier it reaches): half of the
scan's target tokens are highlighted, one in five orange or red, one in twenty red. The quantiles are over
the target tokens that have a finite loss, in the whole scan, so the colours of two samples compare. Tokens
outside the targets, and targets below the yellow threshold, have tier ``none``.

**Accuracy of the thresholds.** ``tier_thresholds`` streams the ``is_target`` and ``loss`` columns
(``READ_ROWS`` rows at a time) and keeps a uniform random sample, without replacement, of ``SAMPLE_SIZE``
target-token losses (the ``SAMPLE_SIZE`` smallest of a seeded uniform key per token, so the same file always
gives the same thresholds). A scan with at most ``SAMPLE_SIZE`` target tokens keeps them all and its thresholds
are the exact quantiles (NumPy's linear interpolation). Above that, a threshold is the exact quantile of the
sample; its rank among all target tokens is off by about ``sqrt(q (1 - q) / SAMPLE_SIZE)`` (one standard
deviation): at the default ``2**20``, 0.0005 for q0.50 and 0.0002 for q0.95, i.e. the red threshold lies
between the scan's q0.9493 and q0.9507 with 99.7% probability. Memory: ``SAMPLE_SIZE`` keys and losses (about
three times ``16 · SAMPLE_SIZE`` bytes while merging) plus one read batch; nothing is written to the scan
directory. A scan spares every reader the pass: it feeds a ``TierAccumulator`` the same columns shard by shard
while writing ``tokens.parquet`` (``hardmine.scan``), and stores ``thresholds().to_dict()`` as JSON under the footer
key ``TIERS_METADATA_KEY`` (``pq.ParquetWriter.add_key_value_metadata`` before closing); ``tier_thresholds``
then reads them from the footer (when they are for the same ``TIER_QUANTILES``).
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ._io import atomic_write_bytes, check_page_destination
from ._version import __version__
from .checks import as_bool, is_int, positive_int
from .enums import TokenTier
from .lm import TOKEN_COLUMNS  # the schema's columns, defined once where the rows are made

__all__ = [
    "GENERATOR", "READ_ROWS", "SAMPLE_SIZE", "TIERS_METADATA_KEY", "TIER_QUANTILES", "TOKENS_FILE", "TOKEN_COLUMNS",
    "TierAccumulator", "TierThresholds",
    "assign_tiers", "check_tokens_html_destination", "parse_sample_id", "read_sample_tokens", "render_tokens_html",
    "tier_thresholds", "token_summary", "tokens_json", "tokens_path", "write_tokens_html",
]

logger = logging.getLogger(__name__)

TOKENS_FILE = "tokens.parquet"
_SCAN_FILE = "scan.json"  # hardmine.scan.store.SCAN_FILE, named here because this module sits below hardmine.scan
# The tiers from the lowest to the highest and the quantile of target-token loss where each starts.
TIER_QUANTILES: dict[TokenTier, float] = {TokenTier.YELLOW: 0.50, TokenTier.ORANGE: 0.80, TokenTier.RED: 0.95}
SAMPLE_SIZE = 1 << 20  # target-token losses kept for the quantiles (all of them in a scan with fewer)
READ_ROWS = 1 << 16  # rows per Arrow batch read from tokens.parquet (bounds memory inside a row group)
# Footer key (Parquet key-value metadata) where a writer may store ``TierThresholds.to_dict()`` as JSON.
TIERS_METADATA_KEY = "hardmine_token_tiers"
GENERATOR = "hardmine-tokens"  # <meta name="generator"> of a page written here (replaced without overwrite)
_SAMPLE_SEED = 20260  # the uniform keys of the threshold sample: fixed, so a file always gives the same thresholds


@dataclass(frozen=True)
class TierThresholds:
    """The loss at which each tier starts (nats; NaN when the scan has no target token with a loss), and how
    they were computed: over ``n_sampled`` of the scan's ``n_target`` target-token losses (all of them when
    ``exact``)."""

    yellow: float
    orange: float
    red: float
    n_target: int
    n_sampled: int

    @property
    def exact(self) -> bool:
        return self.n_sampled == self.n_target

    def threshold(self, tier: TokenTier | str) -> float:
        tier = TokenTier(tier)
        if tier is TokenTier.NONE:
            raise ValueError("tier 'none' has no threshold; it is every target token below the yellow one.")
        return float(getattr(self, tier.value))

    def to_dict(self) -> dict[str, Any]:
        return {
            **{t.value: _finite_or_none(self.threshold(t)) for t in TIER_QUANTILES},
            "quantiles": {t.value: q for t, q in TIER_QUANTILES.items()},
            "n_target_tokens": self.n_target,
            "n_sampled": self.n_sampled,
            "exact": self.exact,
        }


# ------------------------------------------------------------------------------------------------ the file
def _scan_dir(source: Any) -> Path:
    """A ``Scan`` (anything with a ``path`` and ``info``: this module sits below ``hardmine.scan``) or a directory."""
    if hasattr(source, "path") and hasattr(source, "info"):
        return Path(source.path)
    if isinstance(source, (str, os.PathLike)):
        return Path(source)
    raise ValueError(f"pass a Scan or a scan directory, got {type(source).__name__} {source!r}.")


def tokens_path(source: Any) -> Path:
    """``SCAN_DIR/tokens.parquet``; a ValueError saying why when there is none (not a causal-LM scan)."""
    d = _scan_dir(source)
    path = d / TOKENS_FILE
    if path.is_file():
        return path
    info = d / _SCAN_FILE
    if not info.is_file():
        raise ValueError(f"{d} is not a hardmine scan directory (no {_SCAN_FILE}); run hardmine.scan first.")
    try:
        task = json.loads(info.read_text(encoding="utf-8")).get("task")
    except (OSError, ValueError, AttributeError):
        task = None
    raise ValueError(
        f"the scan in {d} has no {TOKENS_FILE}: per-token rows are written only by causal-LM scans (task "
        f"'causal-lm'), and this scan's task is {task!r}. Scan a causal language model to see token-level hardness."
    )


def _open(path: Path) -> pq.ParquetFile:
    pf = pq.ParquetFile(path)
    missing = [c for c in TOKEN_COLUMNS if c not in pf.schema_arrow.names]
    if missing:
        raise ValueError(f"{path} is missing column(s) {missing}; a tokens file has {list(TOKEN_COLUMNS)}.")
    return pf


def _id_is_int(pf: pq.ParquetFile) -> bool:
    t = pf.schema_arrow.field("sample_id").type
    if pa.types.is_integer(t):
        return True
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return False
    raise ValueError(f"{TOKENS_FILE} has sample_id of type {t}; a tokens file has integer or string sample ids.")


def parse_sample_id(source: Any, text: str) -> int | str:
    """A sample id typed on the command line, as the scan's id type (an integer for integer ids)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"sample id {text!r} is empty; pass one of the scan's sample ids, e.g. --id 17.")
    text = text.strip()
    if not _id_is_int(_open(tokens_path(source))):
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"sample id {text!r} is not an integer; this scan's sample ids are integers.") from None


def read_sample_tokens(source: Any, sample_id: Any) -> pd.DataFrame:
    """One sample's rows of ``tokens.parquet`` in position order (see the module docstring for the columns and
    how little is read). ``loss``/``entropy`` are float32 with NaN at position 0; ``top1`` is a nullable
    boolean. ValueError when the scan has no tokens file or the id is not in it."""
    path = tokens_path(source)
    pf = _open(path)
    if _id_is_int(pf):
        if not is_int(sample_id):
            raise ValueError(f"sample_id {sample_id!r} is not an integer; this scan's sample ids are integers.")
        sample_id = int(sample_id)
    elif not isinstance(sample_id, str):
        raise ValueError(f"sample_id {sample_id!r} is not a string; this scan's sample ids are strings.")
    return _compute_sample_rows(pf, path, sample_id)


def _may_hold(pf: pq.ParquetFile, group: int, col: int, sample_id: int | str) -> bool:
    """False only when the row group's min/max statistics exclude the id (no statistics: it may hold it)."""
    stats = pf.metadata.row_group(group).column(col).statistics
    if stats is None or not stats.has_min_max:
        return True
    lo, hi = stats.min, stats.max
    if isinstance(lo, bytes):  # string statistics come back as bytes from some writers
        lo, hi = lo.decode("utf-8", "replace"), hi.decode("utf-8", "replace")
    try:
        return bool(lo <= sample_id <= hi)
    except TypeError:
        return True


def _group_holds(pf: pq.ParquetFile, group: int, sample_id: int | str) -> bool:
    for batch in pf.iter_batches(batch_size=READ_ROWS, row_groups=[group], columns=["sample_id"]):
        if pc.any(pc.equal(batch.column(0), sample_id)).as_py():
            return True
    return False


def _compute_sample_rows(pf: pq.ParquetFile, path: Path, sample_id: int | str) -> pd.DataFrame:
    col = pf.schema_arrow.get_field_index("sample_id")
    pieces: list[pa.Table] = []
    for g in range(pf.metadata.num_row_groups):
        if not _may_hold(pf, g, col, sample_id) or not _group_holds(pf, g, sample_id):
            if pieces:  # a sample's rows are contiguous (scan order): past them, nothing more to find
                break
            continue
        for batch in pf.iter_batches(batch_size=READ_ROWS, row_groups=[g], columns=list(TOKEN_COLUMNS)):
            rows = batch.filter(pc.equal(batch.column(0), sample_id))
            if rows.num_rows:
                pieces.append(pa.Table.from_batches([rows]))
    if not pieces:
        raise ValueError(f"sample_id {sample_id!r} is not in {path}; pass one of the scan's sample ids "
                         "(see `hardmine show`).")
    table = pa.concat_tables(pieces)
    df = table.to_pandas()
    df["top1"] = df["top1"].astype("boolean")  # null at position 0
    df["is_target"] = df["is_target"].astype("boolean").fillna(False).astype(bool)
    for c in ("loss", "entropy"):
        df[c] = df[c].astype(np.float32)
    return df.sort_values("position", kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------------------------ tiers
class TierAccumulator:
    """The streaming computation of ``tier_thresholds``: feed it ``(is_target, loss)`` batch by batch (Arrow or
    NumPy arrays, nulls allowed) and ask ``thresholds()`` at the end. Keeps a uniform sample without replacement
    of ``sample_size`` target-token losses (the smallest of a seeded uniform key per token), so memory is
    ``O(sample_size + batch)`` however many tokens pass; the same tokens in the same order give the same result.
    A scan's writer can feed it shard by shard and store the result in the file (``TIERS_METADATA_KEY``), so that
    no reader needs the pass."""

    def __init__(self, sample_size: int = SAMPLE_SIZE) -> None:
        self.sample_size = positive_int(sample_size, "sample_size")
        self._rng = np.random.default_rng(_SAMPLE_SEED)
        self._kept_k, self._kept_l = np.empty(0), np.empty(0, dtype=np.float32)
        self._cand_k: list[np.ndarray] = []
        self._cand_l: list[np.ndarray] = []
        self._n_cand = 0
        self._tau = math.inf  # the largest kept key once sample_size are kept: a larger key never enters
        self.n_target = 0

    def update(self, is_target: Any, loss: Any) -> None:
        """Add one batch of tokens; only targets with a finite loss count."""
        target = pa.array(is_target) if not isinstance(is_target, (pa.Array, pa.ChunkedArray)) else is_target
        losses = pa.array(loss) if not isinstance(loss, (pa.Array, pa.ChunkedArray)) else loss
        if len(target) != len(losses):
            raise ValueError(f"is_target has {len(target)} values and loss {len(losses)}; pass one per token.")
        mask = pc.and_(pc.fill_null(target, False), pc.fill_null(pc.is_finite(losses), False))
        vals = pc.filter(losses, mask).to_numpy(zero_copy_only=False).astype(np.float32)  # (n,)
        if not len(vals):
            return
        self.n_target += len(vals)
        keys = self._rng.random(len(vals))  # (n,)
        if self._tau < math.inf:
            sel = keys < self._tau
            keys, vals = keys[sel], vals[sel]
        self._cand_k.append(keys)
        self._cand_l.append(vals)
        self._n_cand += len(keys)
        # Merge once the candidates outnumber the sample: amortised O(1) per token, memory O(m + batch).
        if self._n_cand >= self.sample_size:
            self._merge()

    def _merge(self) -> None:
        keys = np.concatenate([self._kept_k, *self._cand_k])
        vals = np.concatenate([self._kept_l, *self._cand_l])
        m = self.sample_size
        if len(keys) > m:
            idx = np.argpartition(keys, m - 1)[:m]  # (m,)
            keys, vals = keys[idx], vals[idx]
        self._kept_k, self._kept_l = keys, vals
        self._cand_k, self._cand_l, self._n_cand = [], [], 0
        if len(keys) == m:
            self._tau = float(keys.max())

    def thresholds(self) -> TierThresholds:
        self._merge()
        if not len(self._kept_l):
            logger.warning("tokens: no target token has a finite loss; no token is highlighted")
            return TierThresholds(math.nan, math.nan, math.nan, 0, 0)
        q = np.quantile(self._kept_l.astype(np.float64), list(TIER_QUANTILES.values()))  # (3,)
        return TierThresholds(float(q[0]), float(q[1]), float(q[2]), self.n_target, len(self._kept_l))


def tier_thresholds(source: Any, *, sample_size: int | None = None) -> TierThresholds:
    """The scan's tier thresholds (quantiles of target-token loss, ``TIER_QUANTILES``): the ones stored in
    ``tokens.parquet`` under ``TIERS_METADATA_KEY`` when its writer stored them and ``sample_size`` is not given;
    else streamed in bounded memory, exact up to ``sample_size`` (default ``SAMPLE_SIZE``) target tokens and from
    a seeded uniform sample of that many above (the module docstring gives the accuracy)."""
    size = SAMPLE_SIZE if sample_size is None else positive_int(sample_size, "sample_size")
    path = tokens_path(source)
    pf = _open(path)
    stored = _stored_thresholds(pf, path) if sample_size is None else None
    return stored if stored is not None else _compute_thresholds(pf, size)


def _stored_thresholds(pf: pq.ParquetFile, path: Path) -> TierThresholds | None:
    """The thresholds the writer stored in the file's footer, if any and for the same quantiles."""
    raw = (pf.metadata.metadata or {}).get(TIERS_METADATA_KEY.encode())
    if raw is None:
        return None
    try:
        d = json.loads(raw)
        if {k: float(v) for k, v in d["quantiles"].items()} != {t.value: q for t, q in TIER_QUANTILES.items()}:
            logger.info("tokens: %s stores thresholds for other quantiles; recomputing", path)
            return None
        return TierThresholds(*(math.nan if d[t.value] is None else float(d[t.value]) for t in TIER_QUANTILES),
                              int(d["n_target_tokens"]), int(d["n_sampled"]))
    except (ValueError, KeyError, TypeError, AttributeError):
        logger.warning("tokens: unreadable %s metadata in %s; recomputing the thresholds", TIERS_METADATA_KEY, path)
        return None


def _compute_thresholds(pf: pq.ParquetFile, m: int) -> TierThresholds:
    acc = TierAccumulator(m)
    for batch in pf.iter_batches(batch_size=READ_ROWS, columns=["is_target", "loss"]):
        acc.update(batch.column(0), batch.column(1))
    return acc.thresholds()


def assign_tiers(df: pd.DataFrame, thresholds: TierThresholds) -> pd.Series:
    """Each row's tier (``TokenTier`` values as strings): the highest whose threshold the target token's loss
    reaches; ``none`` for non-target rows, rows without a finite loss and targets below yellow."""
    if not isinstance(thresholds, TierThresholds):
        raise ValueError(f"thresholds must be a TierThresholds (tier_thresholds(scan)), got {type(thresholds).__name__}.")
    missing = [c for c in ("is_target", "loss") if c not in df]
    if missing:
        raise ValueError(f"the frame has no column(s) {missing}; pass the rows Scan.tokens returns.")
    loss = df["loss"].to_numpy(dtype=np.float64, na_value=np.nan)  # (n,)
    target = df["is_target"].to_numpy(dtype=bool, na_value=False)  # (n,)
    tiers = np.full(len(df), TokenTier.NONE.value, dtype=object)
    ok = target & np.isfinite(loss)
    for tier in TIER_QUANTILES:  # lowest first: a higher tier overwrites
        tiers[ok & (loss >= thresholds.threshold(tier))] = tier.value
    return pd.Series(tiers, index=df.index, name="tier", dtype=object)


def _finite_or_none(v: Any) -> float | None:
    if v is None or pd.isna(v):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def token_summary(df: pd.DataFrame, thresholds: TierThresholds | None = None) -> dict[str, Any]:
    """One sample's token statistics: ``n_tokens``, ``n_target_tokens``, ``mean_loss`` (mean NLL over the target
    tokens with a loss, nats: the manifest's ``loss`` under the default mean reduction), ``perplexity``
    (``exp(mean_loss)``), ``max_token_loss``, ``token_entropy_mean`` and ``top1_miss_rate`` over the same
    tokens; with ``thresholds``, the number of target tokens per tier. ``None`` where no target has a loss."""
    target = df["is_target"].to_numpy(dtype=bool, na_value=False)
    loss = df["loss"].to_numpy(dtype=np.float64, na_value=np.nan)
    scored = target & np.isfinite(loss)
    n = int(scored.sum())
    mean = float(loss[scored].mean()) if n else None
    entropy = df["entropy"].to_numpy(dtype=np.float64, na_value=np.nan)[scored]
    top1 = df["top1"][scored].dropna().to_numpy(dtype=bool)
    out: dict[str, Any] = {
        "n_tokens": len(df),
        "n_target_tokens": int(target.sum()),
        "mean_loss": mean,
        # exp overflows a float past ~709 nats; no real model's mean token loss gets there.
        "perplexity": math.exp(mean) if mean is not None and mean < 700 else None,
        "max_token_loss": float(loss[scored].max()) if n else None,
        "token_entropy_mean": _finite_or_none(np.nanmean(entropy)) if np.isfinite(entropy).any() else None,
        "top1_miss_rate": float(1.0 - top1.mean()) if len(top1) else None,
    }
    if thresholds is not None:
        tiers = assign_tiers(df, thresholds)
        out["tiers"] = {t.value: int((tiers[target] == t.value).sum()) for t in TokenTier}
    return out


def tokens_json(df: pd.DataFrame, thresholds: TierThresholds, sample_id: Any) -> dict[str, Any]:
    """The machine-readable view: the sample's id, summary, thresholds and one record per token with its tier
    (missing values as ``None``)."""
    tiers = assign_tiers(df, thresholds)
    rows = []
    for rec, tier in zip(df.itertuples(index=False), tiers.tolist()):
        rows.append({
            "position": int(rec.position), "token_id": int(rec.token_id), "token": None if rec.token is None or rec.token != rec.token else str(rec.token),
            "is_target": bool(rec.is_target), "loss": _finite_or_none(rec.loss),
            "entropy": _finite_or_none(rec.entropy), "top1": None if pd.isna(rec.top1) else bool(rec.top1),
            "tier": tier,
        })
    sid = sample_id.item() if isinstance(sample_id, np.generic) else sample_id
    return {"sample_id": sid, "summary": token_summary(df, thresholds), "thresholds": thresholds.to_dict(),
            "tokens": rows}


# ------------------------------------------------------------------------------------------------ HTML
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1000px;
color:#1d2330;background:#fff;padding:0 16px}h1{font-size:22px;margin:0 0 4px}.muted{color:#667085}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}.card{background:#f4f6fa;border-radius:8px;padding:8px 12px;
min-width:110px}.card b{display:block;font-size:19px}.legend{margin:10px 0 14px}.legend .tok{padding:1px 5px;margin-right:4px}
.text{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:14px;line-height:1.8;white-space:pre-wrap;
word-wrap:break-word;border:1px solid #e4e7ee;border-radius:8px;padding:12px 14px}
.tok{border-radius:3px}.tok:hover{outline:1px solid #344054}.nt{color:#98a2b3}
.t-yellow{background:#ffec99}.t-orange{background:#ffc078}.t-red{background:#ff8787}
"""


def check_tokens_html_destination(path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Where a token page may be written: not a directory; an existing file only if it is a page written here
    (its ``<meta name="generator">``) or with ``overwrite``."""
    as_bool(overwrite, "overwrite")
    return check_page_destination(path, overwrite=overwrite, generator=GENERATOR, what="token page", example="tokens.html")


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _num(v: Any, digits: int = 3) -> str:
    v = _finite_or_none(v)
    return "–" if v is None else f"{v:.{digits}f}"


def render_tokens_html(df: pd.DataFrame, thresholds: TierThresholds, *, sample_id: Any, title: str = "") -> str:
    """The self-contained page of one sample (inline CSS, no script, nothing fetched): summary, legend with the
    thresholds, and the text with one ``<span class="tok t-TIER">`` per target token (``nt`` for a token outside
    the targets) whose tooltip gives its position, id, loss, entropy and top-1."""
    tiers = assign_tiers(df, thresholds)
    summary = token_summary(df, thresholds)
    spans = []
    for rec, tier in zip(df.itertuples(index=False), tiers.tolist()):
        cls = f"t-{tier}" if rec.is_target else "nt"
        top1 = "–" if pd.isna(rec.top1) else ("yes" if rec.top1 else "no")
        tip = (f"position {rec.position} · id {rec.token_id} · loss {_num(rec.loss)} · entropy {_num(rec.entropy)} · "
               f"top1 {top1}" + (f" · {tier}" if rec.is_target else " · not a target"))
        spans.append(f'<span class="tok {cls}" title="{_e(tip)}">{_e(rec.token)}</span>')
    cards = [("tokens", summary["n_tokens"]), ("target tokens", summary["n_target_tokens"]),
             ("mean loss", _num(summary["mean_loss"])), ("perplexity", _num(summary["perplexity"], 2)),
             ("max token loss", _num(summary["max_token_loss"])), ("top-1 miss rate", _num(summary["top1_miss_rate"]))]
    how = ("exact" if thresholds.exact else f"from a uniform sample of {thresholds.n_sampled:,}")
    legend = " ".join(
        f'<span class="tok t-{t.value}">{t.value}</span> loss ≥ {_num(thresholds.threshold(t))} (q{q:.2f})'
        for t, q in TIER_QUANTILES.items()
    )
    title = title or f"tokens of sample {sample_id}"
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta name="generator" content="{GENERATOR} {_e(__version__)}">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n"
        f"<h1>{_e(title)}</h1>\n"
        '<div class="cards">' + "".join(f'<div class="card"><b>{_e(v)}</b>{_e(k)}</div>' for k, v in cards) + "</div>\n"
        f'<p class="legend">{legend}<br><span class="muted">Tiers: quantiles of target-token loss over the whole '
        f"scan ({thresholds.n_target:,} target tokens, {how}). Grey tokens are not targets (not in the loss). "
        "Hover a token for its loss (nats), entropy and whether it was the model's top prediction.</span></p>\n"
        f'<div class="text">{"".join(spans)}</div>\n</body></html>\n'
    )


def write_tokens_html(
    source: Any, sample_id: Any, out: str | os.PathLike[str], *, overwrite: bool = False, title: str = ""
) -> Path:
    """Write one sample's token page (``render_tokens_html``) to ``out`` atomically. An earlier page written
    here is replaced; any other file only with ``overwrite``."""
    out = check_tokens_html_destination(out, overwrite=overwrite)
    df = read_sample_tokens(source, sample_id)
    page = render_tokens_html(df, tier_thresholds(source), sample_id=sample_id, title=title)
    atomic_write_bytes(out, page.encode("utf-8"))
    logger.info("tokens: wrote %s", out)
    return out
