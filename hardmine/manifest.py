"""The ranked Parquet manifest: writing, reading (with validation) and oversampling weights.

One row per sample, in scan order, with the columns of ``MANIFEST_COLUMNS`` (``REQUIRED_COLUMNS`` are the
contract every reader may rely on). Score meanings and directions: ``hardmine.score`` (also embedded in
the file). The Parquet key-value metadata key ``hardmine`` holds JSON with ``format``/``format_version``,
``hardmine_version``, ``created`` (UTC, ISO 8601; the only field that differs between two identical
scans), ``task``, ``source`` (a dict: ``door`` = ``"scan"`` or ``"online"`` and the door's provenance),
``loss`` (the resolved loss name), ``sample_id_kind`` (scans: ``"positions"`` or ``"custom"``), model and
dataset fingerprints, layers, engine plan, projection dim and seed, index and scoring configuration and the
export that produced ``is_hard`` and ``weight``. Both doors build it with ``finish_manifest``.

Strategies (``Strategy``) turn hardness into sampling ``weight``; every strategy normalises the weights to
mean 1 (they sum to the number of samples, so ``weight = 3`` means "drawn three times as often as under
uniform sampling"), then applies the cap:

===================  ==========================================================================  =============
strategy             raw weight                                                                  ``is_hard``
===================  ==========================================================================  =============
``top-k``            ``boost`` for the ``top`` fraction by rank (``ceil(top·N)`` samples), 1       top fraction
                     otherwise (JTT-like upweighting of the hard set)                             by rank
``proportional``     ``hardness ** temperature`` (``temperature=0``: uniform)                      top fraction
                                                                                                  by rank
``per-class``        ``hardness ** temperature`` normalised within each class so that every       top fraction
                     class gets the same total mass (class-balanced, hard-first inside)          of each class
``slices``           ``1 + slice_boost · e_s / e_c`` for a sample of slice ``s`` (``slices``)     top fraction
                     in class ``c``: ``e_s`` = error rate of the slice's members not flagged     of each class
                     ``is_label_issue``, ``e_c`` = the same over the class (``e_c = 0``: 1);      (as per-class)
                     a sample flagged ``is_label_issue`` gets 1 (never boosted); then
                     normalised within each class so every class gets the same total mass.
                     Whole failing slices are up-weighted, correct members included.
                     ``top``, ``boost`` and ``temperature`` are not used.
===================  ==========================================================================  =============

Default (``strategy=None``): ``hardmine.score.DEFAULT_STRATEGY`` (``slices`` at ``slice_boost`` 0.5) for
classification manifests (integer labels), ``proportional`` otherwise (``hardmine.score.default_strategy``;
chosen by the quality benchmark's rule over both of its datasets, ``scripts/eval_summary.py``). A
classification manifest without a slice for every sample (written before slices existed, or by
``OnlineMiner``) gets ``per-class``.

Which samples are ``is_hard`` (``hard_set``, ``HardSet``): ``top`` (default) the fraction ``top`` by rank as in
the table; ``threshold`` every sample with ``hardness >= threshold`` (one cut for all classes, whatever the
strategy); ``noise-rate`` the fraction by rank equal to the estimated label-noise rate, the share of
``confident_error`` samples (at least one sample; within each class for ``per-class``). ``top-k`` boosts
exactly the ``is_hard`` samples.

Label issues are never oversampled: a sample with ``is_label_issue`` (``hardmine.label_issues``; manifests
that lack the column have none) gets the un-boosted weight 1 under ``top-k`` and ``slices``, and at most the
mean raw weight (of its class for ``per-class``, of all samples for ``proportional``), i.e. never more than
uniform sampling would give it. ``hardness`` ranks rare-but-valid and mislabelled samples alike; this keeps
the second kind out of the boost.

Cap: no weight may exceed ``cap`` times the mean weight. Weights above it are set to ``cap`` and the rest
are scaled up to keep the mean at 1, repeated until none exceeds it (``cap >= 1``; ``None`` = no cap).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ._frames import set_column
from ._io import SCAN_FILE, atomic_path
from ._version import __version__
from .checks import finite_number
from .defaults import DEFAULT_SLICE_BOOST
from .enums import HardSet, Strategy, parse_choice
from .score import (
    DEFAULT_BOOST,
    DEFAULT_CAP,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP,
    default_strategy,
    hardness_rank,
    validate_export_params,
)

__all__ = [
    "MANIFEST_FORMAT",
    "FORMAT_VERSION",
    "METADATA_KEY",
    "REQUIRED_COLUMNS",
    "REQUIRED_COLUMNS_LM",
    "MANIFEST_COLUMNS",
    "required_columns",
    "compute_weights",
    "finish_manifest",
    "resolve_strategy",
    "cap_weights",
    "bool_column",
    "check_destination",
    "class_names",
    "float_column",
    "write_manifest",
    "read_manifest",
    "read_manifest_metadata",
    "export_manifest",
]

MANIFEST_FORMAT = "hardmine-manifest"
# Major version of the file layout; a reader refuses anything newer and reads every older one.
# 2: ``source`` is always a dict naming its ``door`` ("scan" | "online"; v1: a provenance dict offline, the
# string "online" online) and ``loss`` is the resolved loss name for both (v1: None / "auto" when automatic).
FORMAT_VERSION = 2
METADATA_KEY = b"hardmine"

REQUIRED_COLUMNS: tuple[str, ...] = (
    "sample_id", "label", "pred", "correct", "loss", "confidence", "margin", "el2n", "grad_norm",
    "knn_outlier", "confident_error", "near_miss", "hardness", "rank", "is_hard", "weight",
)
# A causal-LM manifest has no labels or predictions: its contract (docs/guide.md, "Language models").
REQUIRED_COLUMNS_LM: tuple[str, ...] = (
    "sample_id", "loss", "perplexity", "n_target_tokens", "token_entropy_mean", "top1_miss_rate", "max_token_loss",
    "grad_norm", "knn_outlier", "hardness", "rank", "is_hard", "weight",
)
MANIFEST_COLUMNS: tuple[str, ...] = (
    "sample_id", "label", "pred", "correct", "loss", "perplexity", "n_target_tokens", "token_entropy_mean",
    "top1_miss_rate", "max_token_loss", "confidence", "pred_confidence", "margin", "el2n",
    "grad_norm", "class_divergence", "global_divergence", "class_divergence_plain", "global_divergence_plain",
    "class_distance", "knn_outlier", "neighbor_disagreement", "confident_error", "near_miss", "label_issue",
    "is_label_issue", "slice", "hardness", "rank", "is_hard", "weight",
)
_ROW_GROUP = 131_072  # rows per Parquet row group (and per conversion chunk when writing)
_BOOL_COLUMNS = ("correct", "confident_error", "near_miss", "is_label_issue", "is_hard")
_STR_COLUMNS = ("slice",)  # "<label>/<k>" (hardmine.slices); null for regression
_INT_COLUMNS = ("rank", "n_target_tokens")


def required_columns(task: Any) -> tuple[str, ...]:
    """The columns every manifest of ``task`` (a ``TaskKind`` or its value; ``None``: unknown) must have."""
    return REQUIRED_COLUMNS_LM if str(getattr(task, "value", task)) == "causal-lm" else REQUIRED_COLUMNS


# -------------------------------------------------------------------------------------------- weights
def cap_weights(weights: np.ndarray, cap: float | None) -> np.ndarray:
    """Normalise to mean 1, then water-fill: no weight above ``cap`` (a multiple of the mean), mean kept at 1."""
    w = np.asarray(weights, dtype=np.float64).copy()
    n = len(w)
    w *= n / w.sum()
    if cap is None:
        return w
    fixed = np.zeros(n, dtype=bool)
    for _ in range(n):  # each round fixes at least one more weight, so this ends
        over = ~fixed & (w > cap)
        if not over.any():
            break
        fixed |= over
        w[fixed] = cap
        free = ~fixed
        rest = w[free].sum()
        if not free.any() or rest <= 0:
            break
        w[free] *= (n - cap * fixed.sum()) / rest
    return w


def _top_count(n: int, top: float) -> int:
    return max(1, math.ceil(top * n - 1e-9))


def finish_manifest(
    df: pd.DataFrame,
    metadata: Mapping[str, Any],
    *,
    strategy: Strategy | str | None = None,
    top: float = DEFAULT_TOP,
    boost: float = DEFAULT_BOOST,
    temperature: float = DEFAULT_TEMPERATURE,
    cap: float | None = DEFAULT_CAP,
) -> pd.DataFrame:
    """The tail every manifest builder shares (the offline scan and the online miner): ``rank`` from
    ``hardness`` (unless the frame has it), ``is_hard`` and ``weight`` from the export strategy (``None``: the
    task's default), and the common metadata — format, versions, ``created``, ``n_samples``, ``export`` —
    around the door's own ``metadata``, which must say ``task``, ``source`` (a dict with ``door``) and
    ``loss`` (``hardmine.losses.loss_name``). In place; returns ``df`` with ``attrs["hardmine"]`` set."""
    for key in ("task", "source", "loss"):
        if key not in metadata:
            raise ValueError(f"manifest metadata needs {key!r}; got keys {sorted(metadata)}.")
    if not isinstance(metadata["source"], Mapping) or "door" not in metadata["source"]:
        raise ValueError(f"manifest metadata 'source' must be a dict with 'door', got {metadata['source']!r}.")
    validate_export_params(top, boost, temperature, cap)
    if "rank" not in df:
        df["rank"] = hardness_rank(df["hardness"].to_numpy(dtype=np.float64))
    df.attrs["hardmine"] = {k: metadata[k] for k in ("task", "targets") if k in metadata}  # resolve_strategy reads
    strategy = resolve_strategy(df, strategy)
    weight, is_hard = compute_weights(df, strategy, top, boost, temperature, cap)
    set_column(df, "is_hard", pd.array(is_hard, dtype="boolean"))
    set_column(df, "weight", weight)
    df.attrs["hardmine"] = {
        "format": MANIFEST_FORMAT,
        "format_version": FORMAT_VERSION,
        "hardmine_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n_samples": len(df),
        **metadata,
        "export": {"strategy": strategy.value, "top": top, "boost": boost, "temperature": temperature, "cap": cap},
    }
    return df


def resolve_strategy(df: pd.DataFrame, strategy: Strategy | str | None = None) -> Strategy:
    """``strategy`` parsed, or for ``None`` the default for this manifest's task: per-class for
    classification, proportional for regression. The task comes from the manifest's metadata; a frame
    without it counts as classification when its labels are integers with no missing values."""
    if strategy is not None:
        return parse_choice(Strategy, strategy, "strategy")
    meta = df.attrs.get("hardmine")
    task = meta.get("task") if isinstance(meta, Mapping) else None
    if isinstance(meta, Mapping) and meta.get("targets") == "predictions":
        return default_strategy(False)  # unlabelled: no labels to balance classes by
    if task in ("classification", "regression"):
        return _usable(df, default_strategy(task == "classification"))
    labels = df["label"] if "label" in df else None
    classification = (
        labels is not None and pd.api.types.is_integer_dtype(labels.dtype) and not bool(labels.isna().any())
    )
    return _usable(df, default_strategy(classification))


def _usable(df: pd.DataFrame, strategy: Strategy) -> Strategy:
    """The default ``slices`` needs a slice for every sample; a manifest without them (written before they
    existed, or by ``OnlineMiner``) gets ``per-class`` instead."""
    if strategy is Strategy.SLICES and ("slice" not in df or bool(df["slice"].isna().any())):
        return Strategy.PER_CLASS
    return strategy


def compute_weights(
    df: pd.DataFrame,
    strategy: Strategy | str | None = None,
    top: float = DEFAULT_TOP,
    boost: float = DEFAULT_BOOST,
    temperature: float = DEFAULT_TEMPERATURE,
    cap: float | None = DEFAULT_CAP,
    hard_set: HardSet | str = HardSet.TOP,
    threshold: float | None = None,
    slice_boost: float = DEFAULT_SLICE_BOOST,
) -> tuple[np.ndarray, np.ndarray]:
    """``(weight, is_hard)`` for a scored frame (needs ``hardness``, ``rank`` and, for per-class, ``label``).
    ``strategy=None``: ``resolve_strategy(df)``. ``hard_set``/``threshold``: see the module docstring.
    ``slice_boost``: the ``slices`` strategy's boost (see the strategy table)."""
    strategy = resolve_strategy(df, strategy)
    validate_export_params(top, boost, temperature, cap)
    finite_number(slice_boost, "slice_boost", at_least=0, hint="0 = class-balanced, no slice boost")
    hard_set = parse_choice(HardSet, hard_set, "hard_set")
    if hard_set is HardSet.THRESHOLD and (threshold is None or not np.isfinite(threshold)):
        raise ValueError(f"hard_set='threshold' needs a finite threshold on hardness, got threshold={threshold!r}.")
    if hard_set is not HardSet.THRESHOLD and threshold is not None:
        raise ValueError(f"threshold={threshold!r} is only used with hard_set='threshold'.")
    if hard_set is HardSet.NOISE_RATE:
        if "confident_error" not in df or not df["confident_error"].notna().any():  # regression, unlabelled: null
            raise ValueError(
                "hard_set='noise-rate' needs the 'confident_error' column of a labelled classification manifest; "
                "this manifest has none (regression or unlabelled data): use hard_set='top' or 'threshold'."
            )
        top = max(float(np.mean(df["confident_error"].fillna(False).to_numpy(dtype=bool))), 1.0 / max(len(df), 1))
    per_class = strategy in (Strategy.PER_CLASS, Strategy.SLICES)
    needs = ("hardness", "rank") + (("label",) if per_class else ()) + (("slice", "correct") if strategy is Strategy.SLICES else ())
    for col in needs:
        if col not in df:
            raise ValueError(f"cannot compute {strategy.value} weights: the manifest has no {col!r} column.")
    n = len(df)
    if n == 0:
        raise ValueError("the manifest is empty; there is nothing to weight.")
    rank = df["rank"].to_numpy(dtype=np.int64)
    h = df["hardness"].to_numpy(dtype=np.float64)
    finite = np.isfinite(h)
    # A sample without any signal gets the lowest hardness seen, so it is still drawn.
    h = np.where(finite, h, np.nanmin(h) if finite.any() else 1.0)
    is_hard = h >= threshold if hard_set is HardSet.THRESHOLD else rank <= _top_count(n, top)
    issue = _label_issues(df)
    if strategy is Strategy.TOP_K:
        raw = np.where(is_hard & ~issue, float(boost), 1.0)
    elif strategy is Strategy.PROPORTIONAL:
        raw = np.power(np.maximum(h, 1e-12), float(temperature))
        raw = _at_most_mean(raw, issue, np.zeros(len(raw), dtype=np.int64))
    else:
        labels = df["label"].to_numpy()
        if labels.dtype.kind not in "iu":
            raise ValueError(
                f"strategy {strategy.value!r} needs integer class labels, but the label column is {labels.dtype}; "
                "use 'top-k' or 'proportional' for regression scans."
            )
        classes, inverse, counts = _unique_labels(labels)
        if strategy is Strategy.SLICES:
            raw = _slice_weights(df, labels, float(slice_boost))  # each class sums to 1
        else:
            raw = np.power(np.maximum(h, 1e-12), float(temperature))
            raw = _at_most_mean(raw, issue, inverse)  # label issues: at most uniform within their class
            class_mass = np.bincount(inverse, weights=raw, minlength=len(classes))  # (C,)
            raw = raw / class_mass[inverse]  # each class sums to 1
        # is_hard inside each class: the top fraction by global rank among the class's samples.
        order = _by_class_then_rank(inverse, rank)
        pos = np.empty(n, dtype=np.int64)
        starts = np.r_[0, np.cumsum(counts)[:-1]]
        pos[order] = np.arange(n) - np.repeat(starts, counts)  # 0-based position within class
        if hard_set is not HardSet.THRESHOLD:
            is_hard = pos < np.array([_top_count(int(c), top) for c in counts])[inverse]
    return cap_weights(raw, cap), is_hard


def _unique_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.unique(labels, return_inverse=True, return_counts=True)`` for integer labels, by counting when they
    are small non-negative class ids (a million labels: one ``bincount`` instead of a sort)."""
    if len(labels) and labels.min() >= 0 and labels.max() <= 2 * len(labels):
        count = np.bincount(labels.astype(np.intp, copy=False))  # (max + 1,); uint64 needs numpy 2.2.4 as is
        classes = np.flatnonzero(count)  # (C,) sorted
        position = np.zeros(len(count), dtype=np.intp)
        position[classes] = np.arange(len(classes))
        return classes.astype(labels.dtype), position[labels], count[classes]
    return np.unique(labels, return_inverse=True, return_counts=True)


def _by_class_then_rank(inverse: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Row order by class, then rank, ties by row: ``np.lexsort((rank, inverse))``, but as one sort of the
    integer key ``class · span + rank`` (lexsort's stable merge sorts took a tenth of a second at a million
    rows). Ranks are unique in a scored manifest, so numpy's faster unstable sort gives the same order; with
    ties, or a key that could overflow, it falls back to lexsort."""
    lo, hi = int(rank.min()), int(rank.max())
    span = hi - lo + 1
    if span * (int(inverse.max()) + 1) >= 2**62:
        return np.lexsort((rank, inverse))
    key = inverse.astype(np.int64) * span + (rank - lo)  # (N,)
    order = np.argsort(key)
    sk = key[order]
    if (sk[1:] == sk[:-1]).any():  # a tie: the unstable sort may have swapped its rows
        return np.lexsort((rank, inverse))
    return order


def _at_most_mean(raw: np.ndarray, flagged: np.ndarray, group: np.ndarray) -> np.ndarray:
    """``raw`` with every flagged value lowered to at most the mean of its group *after* the lowering (the
    fixed point of ``m = mean(where(flagged, min(raw, m), raw))``, reached from above in a few rounds)."""
    if not flagged.any():
        return raw
    size = np.bincount(group).astype(np.float64)  # (G,)
    out = raw
    for _ in range(100):
        mean = np.bincount(group, weights=out, minlength=len(size)) / np.maximum(size, 1)  # (G,)
        new = np.where(flagged, np.minimum(raw, mean[group]), raw)
        if np.allclose(new, out, rtol=1e-12, atol=0.0):
            return new
        out = new
    return out


def _label_issues(df: pd.DataFrame) -> np.ndarray:
    """``(N,)`` bool: ``is_label_issue`` where the manifest has it (older manifests: none)."""
    if "is_label_issue" not in df:
        return np.zeros(len(df), dtype=bool)
    return pd.array(df["is_label_issue"], dtype="boolean").fillna(False).to_numpy(dtype=bool)


def _slice_weights(df: pd.DataFrame, labels: np.ndarray, boost: float) -> np.ndarray:
    """Raw ``slices`` weights (before the cap), each class summing to 1; see the strategy table above."""
    sl = df["slice"]
    if sl.isna().any():
        raise ValueError("strategy 'slices' needs a slice for every sample; rescore the scan to add them.")
    issue = _label_issues(df)
    wrong = ~pd.array(df["correct"], dtype="boolean").fillna(True).to_numpy(dtype=bool)
    valid = ~issue
    codes, _ = pd.factorize(sl.astype(str), sort=True)
    n_codes = int(codes.max()) + 1
    s_err = np.bincount(codes, weights=(wrong & valid).astype(np.float64), minlength=n_codes)  # (S,)
    s_n = np.bincount(codes, weights=valid.astype(np.float64), minlength=n_codes)
    classes, inverse, _ = _unique_labels(labels)
    c_err = np.bincount(inverse, weights=(wrong & valid).astype(np.float64), minlength=len(classes))  # (C,)
    c_n = np.bincount(inverse, weights=valid.astype(np.float64), minlength=len(classes))
    e_s = np.divide(s_err, s_n, out=np.zeros_like(s_err), where=s_n > 0)[codes]  # (N,)
    e_c = np.divide(c_err, c_n, out=np.zeros_like(c_err), where=c_n > 0)[inverse]  # (N,)
    rel = np.divide(e_s, e_c, out=np.zeros_like(e_s), where=e_c > 0)
    raw = np.where(issue, 1.0, 1.0 + boost * rel)
    class_mass = np.bincount(inverse, weights=raw, minlength=len(classes))  # (C,)
    return raw / class_mass[inverse]  # each class sums to 1


# ----------------------------------------------------------------------------------------- write/read
def _arrow_table(df: pd.DataFrame) -> pa.Table:
    cols = [c for c in MANIFEST_COLUMNS if c in df] + [c for c in df.columns if c not in MANIFEST_COLUMNS]
    arrays, fields = [], []
    for c in cols:
        s = df[c]
        if c in _BOOL_COLUMNS:
            arr = pa.array(pd.array(s, dtype="boolean"), type=pa.bool_())
        elif c in _INT_COLUMNS:
            arr = pa.array(pd.array(s, dtype="Int64"), type=pa.int64())  # nullable: e.g. an online LM's token counts
        elif c in _STR_COLUMNS and isinstance(s.dtype, pd.StringDtype):  # str or missing: no per-row loop
            arr = pa.array(s.array, type=pa.string(), from_pandas=True)
        elif c in _STR_COLUMNS:
            arr = pa.array([None if v is None or v is pd.NA or v != v else str(v) for v in s.tolist()], type=pa.string())
        elif c == "sample_id":
            arr = _sample_id_array(s)
        else:
            arr = pa.array(s)
        arrays.append(arr)
        fields.append(pa.field(c, arr.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _sample_id_array(s: pd.Series) -> pa.Array:
    """Integer sample ids as Arrow int64 (unsigned ones only when they fit: 2**63 and above would wrap to
    negative ids), anything else as strings."""
    if s.dtype.kind == "u" and len(s) and int(s.max()) > np.iinfo(np.int64).max:
        raise ValueError(
            f"sample_id {int(s.max())} does not fit a signed 64-bit integer (the manifest's integer id type); "
            "pass such ids as strings."
        )
    if s.dtype.kind in "iu":
        return pa.array(s.to_numpy(dtype=np.int64), type=pa.int64())
    return pa.array(s.astype(str).tolist(), type=pa.string())


def float_column(df: pd.DataFrame, name: str) -> np.ndarray:
    """Column ``name`` as float64 with NaN for missing values (nullable ints/floats/booleans included); all
    NaN when the manifest has no such column (older or partial manifests)."""
    if name not in df:
        return np.full(len(df), np.nan)
    return pd.array(df[name], dtype="Float64").to_numpy(dtype=np.float64, na_value=np.nan)


def bool_column(df: pd.DataFrame, name: str) -> np.ndarray:
    """A boolean column as float64 1/0 with NaN for missing values (all NaN when absent)."""
    if name not in df:
        return np.full(len(df), np.nan)
    return pd.array(df[name], dtype="boolean").to_numpy(dtype=np.float64, na_value=np.nan)


def class_names(df_or_meta: Any) -> list[str] | None:
    """The class names a manifest records (class 0 first), from its metadata: a scan's ``class_names`` (text
    labels, ``--class-names``, a HF model's ``id2label`` or a dataset's ClassLabel); ``None`` when unknown."""
    meta = df_or_meta.attrs.get("hardmine") if isinstance(df_or_meta, pd.DataFrame) else df_or_meta
    names = meta.get("class_names") if isinstance(meta, Mapping) else None
    return [str(n) for n in names] if isinstance(names, list) and names else None


def _is_manifest_file(path: Path) -> bool:
    try:
        return METADATA_KEY in (pq.read_schema(path).metadata or {})
    except (pa.ArrowInvalid, OSError):
        return False


def check_destination(path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Where a manifest may be written: not a directory, and not an existing file that is not a hardmine
    manifest unless ``overwrite`` (a user's CSV or model is never replaced by accident)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"cannot write a manifest to {str(path)!r}: it is a directory; give a file path such as "
            f"{str(path / 'manifest.parquet')!r}."
        )
    if path.exists() and not overwrite and not _is_manifest_file(path):
        raise ValueError(
            f"{str(path)!r} exists and is not a hardmine manifest; refusing to replace it. Choose another path, "
            "or pass overwrite=True to replace it."
        )
    if path.parent and not path.parent.exists():
        raise ValueError(f"cannot write {path}: directory {path.parent} does not exist.")
    return path


def write_manifest(
    df: pd.DataFrame, path: str | os.PathLike[str], metadata: Mapping[str, Any], *, overwrite: bool = False,
    before_replace: Callable[[], object] | None = None,
) -> Path:
    """Write ``df`` to ``path`` atomically with ``metadata`` as JSON under the Parquet key ``hardmine``.

    An existing hardmine manifest at ``path`` is replaced; any other existing file only with
    ``overwrite=True``; a directory never. ``before_replace``: called once the new file is written, before it
    replaces ``path``; if it raises, the old manifest stays (a scan waits there for its slice table, which is
    computed meanwhile and must land first)."""
    path = check_destination(path, overwrite=overwrite)
    required = required_columns(metadata.get("task"))
    missing = [c for c in required if c not in df]
    if missing:
        raise ValueError(f"manifest is missing required column(s) {missing}; it needs {list(required)}.")
    meta = dict(metadata)
    meta.setdefault("format", MANIFEST_FORMAT)
    meta.setdefault("format_version", FORMAT_VERSION)
    meta.setdefault("hardmine_version", __version__)
    meta.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    key = {METADATA_KEY: json.dumps(meta, sort_keys=True, default=str).encode()}
    # pandas deep-copies a frame's attrs into every column and row slice taken from it (below: one per column
    # and row group; 0.1 s for a scan's metadata at a million rows); the file's metadata comes from `metadata`.
    df = df.copy(deep=False)
    df.attrs = {}
    with atomic_path(path) as tmp:
        if len(df) <= _ROW_GROUP:
            table = _arrow_table(df).replace_schema_metadata(key)
            pq.write_table(table, tmp, use_dictionary=_dictionary_columns(table.schema))
        else:
            # Convert and write a row group at a time, so the Arrow copy of a million-row frame is never
            # held whole next to the frame itself.
            schema = _arrow_table(df.iloc[:_ROW_GROUP]).schema.with_metadata(key)
            with pq.ParquetWriter(tmp, schema, use_dictionary=_dictionary_columns(schema)) as writer:
                for lo in range(0, len(df), _ROW_GROUP):
                    writer.write_table(_arrow_table(df.iloc[lo : lo + _ROW_GROUP]).cast(schema))
        if before_replace is not None:
            before_replace()
    return path


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    """The text columns (slice names, string ids): the only ones where Parquet's dictionary encoding pays.
    On the float, integer and boolean columns it costs more than half the write time and saves no space."""
    return [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]


def _resolve_manifest_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.parquet"
        if not p.is_file():
            if (p.parent / SCAN_FILE).is_file():  # a scan that has not finished: it has no manifest yet
                raise ValueError(
                    f"the scan in {p.parent} is not complete (no manifest yet); rerun the same `hardmine scan` "
                    "command (or hardmine.scan with the same arguments) to resume it."
                )
    if not p.is_file():
        raise ValueError(f"{p} does not exist; pass a manifest .parquet file or a scan directory.")
    return p


def read_manifest_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated ``hardmine`` metadata of a manifest file (or of ``SCAN_DIR/manifest.parquet``)."""
    p = _resolve_manifest_path(path)
    try:
        schema = pq.read_schema(p)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{p} is not a readable Parquet file ({exc}); pass a hardmine manifest.") from None
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        # A manifest re-saved by pandas/polars loses the key but keeps the columns: read it, say what is lost.
        missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
        if missing and all(c in schema.names for c in REQUIRED_COLUMNS_LM):
            missing = []  # a causal-LM manifest
        if missing:
            raise ValueError(
                f"{p} is a Parquet file but not a hardmine manifest (no 'hardmine' key in its metadata, and no "
                f"column(s) {missing}); write one with hardmine.scan or hardmine.export_manifest."
            )
        return _bare_metadata(str(p), schema.names)
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: the 'hardmine' metadata is not valid JSON ({exc}).") from None
    if not isinstance(meta, dict) or meta.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{p}: the 'hardmine' metadata does not describe a {MANIFEST_FORMAT!r} file.")
    version = meta.get("format_version")
    try:
        major = int(str(version).split(".")[0])
    except ValueError:
        raise ValueError(f"{p}: format_version {version!r} is not a version number.") from None
    if major > FORMAT_VERSION:
        raise ValueError(
            f"{p} was written by hardmine {meta.get('hardmine_version')} with manifest format {version}; this "
            f"hardmine ({__version__}) reads format {FORMAT_VERSION} or older. Upgrade hardmine to read it."
        )
    missing = [c for c in required_columns(meta.get("task")) if c not in schema.names]
    if missing:
        raise ValueError(f"{p} is missing required column(s) {missing}; it is not a complete hardmine manifest.")
    return meta


def _bare_metadata(where: str, columns: Any) -> dict[str, Any]:
    """Metadata for a manifest whose ``hardmine`` key was lost (e.g. re-saved with ``DataFrame.to_parquet``):
    the columns are all there, the provenance is not. The task is read from the columns where they say it (a
    causal LM's), so what is checked and written later is that task's manifest."""
    names = set(columns)
    lm = all(c in names for c in REQUIRED_COLUMNS_LM) and not all(c in names for c in REQUIRED_COLUMNS)
    warnings.warn(
        f"{where} has every manifest column but no hardmine metadata (re-saved by pandas/polars?): read as a "
        "manifest, without provenance (model/dataset fingerprints, scan configuration).",
        UserWarning,
        stacklevel=3,
    )
    meta: dict[str, Any] = {"format": MANIFEST_FORMAT, "format_version": FORMAT_VERSION, "provenance": None}
    if lm:
        meta["task"] = "causal-lm"
    return meta


def read_manifest(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read and validate a manifest. The metadata dict is attached as ``df.attrs["hardmine"]``."""
    meta = read_manifest_metadata(path)
    p = _resolve_manifest_path(path)
    df = pq.read_table(p).to_pandas()
    for c in _BOOL_COLUMNS:
        if c in df:  # is_label_issue is absent from manifests written before it existed
            df[c] = df[c].astype("boolean")
    _validate_rows(df, p)
    df.attrs["hardmine"] = meta
    return df


def _validate_rows(df: pd.DataFrame, where: Any) -> None:
    if len(df) == 0:
        raise ValueError(f"{where}: the manifest has no rows.")
    if df["sample_id"].isna().any() or df["sample_id"].duplicated().any():
        dup = df["sample_id"][df["sample_id"].duplicated()].head(3).tolist()
        raise ValueError(f"{where}: sample_id must be unique and present; duplicated/missing e.g. {dup}.")
    for c in ("loss", "hardness", "weight", "rank"):
        if not pd.api.types.is_numeric_dtype(df[c]):
            raise ValueError(f"{where}: column {c!r} has dtype {df[c].dtype}, expected a number.")
    w = df["weight"].to_numpy(dtype=np.float64)
    if not np.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"{where}: weights must be finite and >= 0.")
    rank = df["rank"].to_numpy()
    if not np.array_equal(np.sort(rank), np.arange(1, len(df) + 1)):
        raise ValueError(f"{where}: rank must be a permutation of 1..{len(df)}.")


def _ranked_here(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with ``rank`` 1..n over its own rows: a filtered manifest (some rows of a scan's) keeps the scan's
    ranks, which its export would read as positions among rows it no longer has (too few marked hard, and a file
    ``read_manifest`` refuses). Numbered again in the order of the scan's ranks (its ties kept as the scan broke
    them; a whole manifest's ranks are their own numbering); ranks that are no selection of a scan's (repeated,
    not whole numbers, below 1, missing) are left for validation to refuse."""
    rank = pd.to_numeric(df["rank"], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)  # (n,)
    selection = bool(np.isfinite(rank).all() and (rank >= 1).all() and (rank == np.round(rank)).all()
                     and len(np.unique(rank)) == len(rank))
    if selection:
        renumbered = np.empty(len(rank), dtype=np.int64)
        renumbered[np.argsort(rank)] = np.arange(1, len(rank) + 1)  # (n,) unique ranks: any sort agrees
        df["rank"] = renumbered
    return df


def _manifest_of(source: Any) -> pd.DataFrame:
    if hasattr(source, "manifest") and hasattr(source, "manifest_path"):  # a Scan
        return source.manifest()
    if isinstance(source, pd.DataFrame):
        meta = source.attrs.get("hardmine")
        task = meta.get("task") if isinstance(meta, Mapping) else None
        if "hardmine" not in source.attrs and all(c in source for c in REQUIRED_COLUMNS_LM):
            task = task or ("causal-lm" if not all(c in source for c in REQUIRED_COLUMNS) else None)
        missing = [c for c in required_columns(task) if c not in source]
        if "hardmine" not in source.attrs:
            if missing:
                raise ValueError(
                    f"the DataFrame carries no hardmine metadata (df.attrs['hardmine']) and is missing manifest "
                    f"column(s) {missing}; pass a Scan, a scan directory, a manifest path, or a manifest frame."
                )
            df = _ranked_here(source.copy())
            _validate_rows(df, "the DataFrame")
            df.attrs["hardmine"] = _bare_metadata("the DataFrame", df.columns)
            return df
        if missing:
            raise ValueError(f"the DataFrame is missing manifest column(s) {missing}.")
        df = _ranked_here(source.copy())
        _validate_rows(df, "the DataFrame")  # edited since its scan (rows dropped, values changed): checked here
        return df
    if isinstance(source, (str, os.PathLike)):
        return read_manifest(source)
    raise ValueError(
        f"export_manifest got a {type(source).__name__}; pass a Scan, a scan directory, a manifest path or a "
        "DataFrame from read_manifest."
    )


def export_manifest(
    source: Any,
    *,
    strategy: Strategy | str | None = None,
    top: float = DEFAULT_TOP,
    boost: float = DEFAULT_BOOST,
    temperature: float = DEFAULT_TEMPERATURE,
    cap: float | None = DEFAULT_CAP,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    hard_set: HardSet | str = HardSet.TOP,
    threshold: float | None = None,
    slice_boost: float = DEFAULT_SLICE_BOOST,
) -> pd.DataFrame:
    """Recompute ``is_hard`` and ``weight`` of a manifest with a sampling strategy and optionally write it.

    Args:
        source: a ``Scan``, a scan directory, a manifest path, or a frame from ``read_manifest``.
        strategy: ``"top-k"``, ``"proportional"``, ``"per-class"`` or ``"slices"`` (see the module docstring);
            ``None`` (default): ``DEFAULT_STRATEGY`` for classification manifests, proportional for regression.
        top: fraction of samples marked ``is_hard`` (and boosted by ``top-k``).
        boost: ``top-k`` weight of a hard sample relative to an easy one.
        temperature: exponent on hardness for ``proportional`` and ``per-class``.
        cap: largest weight as a multiple of the mean weight (1), or ``None``.
        out: if given, the manifest is written there atomically (Parquet, with metadata). An existing
            hardmine manifest there is replaced; any other file only with ``overwrite=True``.
        overwrite: allow replacing an existing file at ``out`` that is not a hardmine manifest.
        hard_set: which samples are ``is_hard``: ``"top"`` (the ``top`` fraction), ``"threshold"``
            (``hardness >= threshold``) or ``"noise-rate"`` (the estimated label-noise rate as the fraction).
        threshold: the hardness cut for ``hard_set="threshold"``.
        slice_boost: ``slices``: weight ``1 + slice_boost · e_s / e_c`` before the class balancing.

    Returns the new manifest frame (``attrs["hardmine"]`` updated with the ``export`` parameters).
    """
    if strategy is not None:
        strategy = parse_choice(Strategy, strategy, "strategy")
    validate_export_params(top, boost, temperature, cap)
    if out is not None:  # before any work: a bad destination is refused at once
        check_destination(out, overwrite=overwrite)
    df = _manifest_of(source)
    strategy = resolve_strategy(df, strategy)
    meta = dict(df.attrs.get("hardmine", {}))
    hard_set = parse_choice(HardSet, hard_set, "hard_set")
    weight, is_hard = compute_weights(df, strategy, top, boost, temperature, cap, hard_set, threshold, slice_boost)
    df["is_hard"] = pd.array(is_hard, dtype="boolean")
    df["weight"] = weight
    meta["export"] = {"strategy": strategy.value, "top": top, "boost": boost, "temperature": temperature, "cap": cap}
    if strategy is Strategy.SLICES:
        meta["export"]["slice_boost"] = slice_boost
    if hard_set is not HardSet.TOP:  # recorded only when used, so default exports keep their metadata
        meta["export"].update(hard_set=hard_set.value, threshold=threshold)
    meta["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    df.attrs["hardmine"] = meta
    if out is not None:
        write_manifest(df, out, meta, overwrite=overwrite)
    return df
