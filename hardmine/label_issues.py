"""Label issues, kept apart from hardness: which samples are likely mislabelled (review or down-weight them),
as opposed to rare but valid samples (oversample them).

Two manifest columns, computed from the scored manifest's own columns (classification only; NaN / null
for regression):

``label_issue`` (higher = more likely mislabelled). Formula chosen by ``LabelIssueMethod``; the default
(``DEFAULT_LABEL_ISSUE_METHOD``, ``loss``) is the one the quality benchmark picks by its written rule
(``scripts/eval_summary.py``: smallest worst-case AUROC shortfall against ``max(cleanlab, loss)`` over both
noise types of both datasets):

=========================  ===================================================================================
method                     ``label_issue``
=========================  ===================================================================================
``loss``                   ``-log p[y]``
``margin``                 ``max_{j≠y} p[j] - p[y]`` (the negated ``margin`` column)
``log-margin``             ``log max_{j≠y} p[j] - log p[y]`` (= ``loss + log max_{j≠y} p[j]``): the margin
                           in log-probabilities; like ``loss`` it keeps ordering confidently wrong samples
                           (where the probability margin saturates at 1), like ``margin`` it accounts
                           for the competing class of samples that are merely unsure
``normalized-confidence``  ``-log(p[y] / t_y)``, ``t_y`` = mean ``p[y]`` over the samples labelled ``y``
                           (confident learning's per-class threshold): a sample is suspicious by how far
                           it falls below what its class usually gets, so hard classes are not all flagged
``loss+neighbors``         mean of the rank-normalised ``loss`` and ``neighbor_disagreement`` (fraction of
                           the k nearest gradient neighbours by ``|cos|`` with another label)
=========================  ===================================================================================

``is_label_issue`` (bool): the confident-learning rule (the off-diagonal of cleanlab's confident joint):
the model predicts a class ``j ≠ y`` with ``p[j] >= t_j``, the mean ``p[j]`` of the samples labelled ``j``;
i.e. it is at least as sure the sample is a ``j`` as it typically is about real ``j`` samples. No
threshold is tuned: ``t`` comes from the data.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pandas as pd

from ._frames import set_column
from .enums import LabelIssueMethod, parse_choice
from .score import rank_normalize

__all__ = [
    "DEFAULT_LABEL_ISSUE_METHOD",
    "LABEL_ISSUE_COLUMNS",
    "class_thresholds",
    "label_issue_score",
    "flag_label_issues",
    "add_label_issue_columns",
]

logger = logging.getLogger(__name__)

# Chosen by scripts/eval_summary.py's rule over both datasets of the quality benchmark (docs/benchmarks.md):
# the smallest worst-case AUROC shortfall against max(cleanlab, loss) over symmetric and pair noise on
# Fashion-MNIST and Satellite. The plain loss had the smallest; log-margin was better on pair noise and a
# little worse on symmetric noise (scripts/results/eval_summary.md has the table).
DEFAULT_LABEL_ISSUE_METHOD = LabelIssueMethod.LOSS
LABEL_ISSUE_COLUMNS: tuple[str, ...] = ("label_issue", "is_label_issue")


def _floats(df: pd.DataFrame, name: str) -> np.ndarray:
    if name not in df:
        raise ValueError(f"label issues need the manifest column {name!r}; the frame has {list(df.columns)}.")
    return pd.array(df[name], dtype="Float64").to_numpy(dtype=np.float64, na_value=np.nan)


def _labels(df: pd.DataFrame) -> np.ndarray:
    if "label" not in df:
        raise ValueError("label issues need the manifest column 'label'.")
    y = df["label"].to_numpy()
    if y.dtype.kind not in "iu":
        raise ValueError(f"label issues need integer class labels; the label column is {y.dtype}.")
    return y.astype(np.int64)


def class_thresholds(confidence: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """Per class ``j``: ``t_j`` = mean ``p[j]`` (the ``confidence`` column) over the samples labelled ``j``."""
    conf = np.asarray(confidence, dtype=np.float64)
    y = np.asarray(labels)
    if conf.shape != y.shape or conf.ndim != 1:
        raise ValueError(f"confidence {conf.shape} and labels {y.shape} must be 1-D of the same length.")
    if y.dtype.kind not in "iu":
        raise ValueError(f"labels must be integer class ids, got dtype {y.dtype}.")
    return _compute_thresholds(conf, y.astype(np.int64))


def _compute_thresholds(conf: np.ndarray, y: np.ndarray) -> dict[int, float]:
    out: dict[int, float] = {}
    for c in np.unique(y).tolist():
        v = conf[(y == c) & np.isfinite(conf)]
        out[int(c)] = float(v.mean()) if len(v) else float("nan")
    return out


def label_issue_score(df: pd.DataFrame, method: LabelIssueMethod | str | None = None) -> np.ndarray:
    """``(N,)`` ``label_issue`` of a scored classification manifest frame (higher = more likely
    mislabelled) by ``method`` (``None``: ``DEFAULT_LABEL_ISSUE_METHOD``); see the module table."""
    method = DEFAULT_LABEL_ISSUE_METHOD if method is None else parse_choice(LabelIssueMethod, method, "label issue method")
    return _compute_score(df, method)


def _compute_score(df: pd.DataFrame, method: LabelIssueMethod) -> np.ndarray:
    if method is LabelIssueMethod.LOSS:
        return _floats(df, "loss")
    if method is LabelIssueMethod.MARGIN:
        return -_floats(df, "margin")
    if method is LabelIssueMethod.LOG_MARGIN:
        conf = _floats(df, "confidence")
        other = conf - _floats(df, "margin")  # max_{j != y} p[j]
        return np.log(np.maximum(other, 1e-300)) - np.log(np.maximum(conf, 1e-300))
    if method is LabelIssueMethod.NORMALIZED_CONFIDENCE:
        conf = _floats(df, "confidence")
        y = _labels(df)
        t = _compute_thresholds(conf, y)
        ty = _per_row(t, y, np.nan)  # (N,); every label has a threshold
        with np.errstate(divide="ignore", invalid="ignore"):
            return -np.log(np.maximum(conf, 1e-300) / np.maximum(ty, 1e-300))
    loss = rank_normalize(_floats(df, "loss"))
    nd = rank_normalize(_floats(df, "neighbor_disagreement"))
    return np.nanmean(np.stack([loss, nd]), axis=0)  # (2, N) -> (N,)


def flag_label_issues(df: pd.DataFrame, thresholds: Mapping[int, float] | None = None) -> np.ndarray:
    """``(N,)`` bool ``is_label_issue``: ``pred != label`` and ``pred_confidence >= t_pred`` (the
    confident-learning rule; ``t`` from ``class_thresholds`` of the frame unless given)."""
    y = _labels(df)
    conf = _floats(df, "confidence")
    t = _compute_thresholds(conf, y) if thresholds is None else {int(k): float(v) for k, v in thresholds.items()}
    return _compute_flags(y, df["pred"].to_numpy(), _floats(df, "pred_confidence"), t)


def _compute_flags(y: np.ndarray, pred: np.ndarray, pred_conf: np.ndarray, t: Mapping[int, float]) -> np.ndarray:
    pred = np.asarray(pred).astype(np.int64)
    tp = _per_row(t, pred, np.inf)  # (N,) t of the prediction
    tp = np.where(np.isfinite(tp), tp, np.inf)
    return (pred != y) & np.isfinite(pred_conf) & (pred_conf >= tp)


def _per_row(t: Mapping[int, float], codes: np.ndarray, missing: float) -> np.ndarray:
    """``t[code]`` for every row (``missing`` for a code ``t`` lacks), by a sorted lookup rather than a Python
    loop over a million rows."""
    if not t:
        return np.full(len(codes), missing)
    keys = np.array(sorted(t), dtype=np.int64)  # (K,)
    values = np.array([t[int(k)] for k in keys], dtype=np.float64)
    at = np.minimum(np.searchsorted(keys, codes), len(keys) - 1)  # (N,)
    return np.where(keys[at] == codes, values[at], missing)


def add_label_issue_columns(df: pd.DataFrame, method: LabelIssueMethod | str | None = None) -> pd.DataFrame:
    """Add ``label_issue`` and ``is_label_issue`` to a scored manifest frame in place (classification: the
    formulas above; a frame whose labels are not integer class ids gets NaN / null) and return it."""
    y = df["label"].to_numpy() if "label" in df else None
    if y is None or y.dtype.kind not in "iu" or "confidence" not in df:
        df["label_issue"] = np.full(len(df), np.nan)
        df["is_label_issue"] = pd.array([None] * len(df), dtype="boolean")
        return df
    set_column(df, "label_issue", label_issue_score(df, method))
    set_column(df, "is_label_issue", pd.array(flag_label_issues(df), dtype="boolean"))
    return df
