"""Metrics of the quality benchmark (numpy only, so the ``--quick`` smoke run needs no extra packages)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["auroc", "precision_at_k", "subgroup_accuracy", "mean_std", "paired_interval"]


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks of ``s`` with ties given their average rank (as in the Mann-Whitney U statistic)."""
    order = np.argsort(s, kind="stable")
    sorted_s = s[order]
    # Boundaries of runs of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends + 1) / 2.0  # mean of the 1-based positions start+1..end
    ranks = np.empty(len(s), dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` (higher = more likely positive); ties count one half.

    NaN when either class is empty; scores must be finite.
    """
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    if s.shape != pos.shape or s.ndim != 1:
        raise ValueError(f"scores {s.shape} and labels {pos.shape} must be 1-D of the same length.")
    if not np.isfinite(s).all():
        raise ValueError("auroc: scores contain NaN/inf.")
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    r = _average_ranks(s)
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def precision_at_k(scores: np.ndarray, positive: np.ndarray, k: int | None = None) -> float:
    """Share of positives among the ``k`` highest scores; ``k`` defaults to the number of positives
    (precision at the true rate, which then equals recall at that rate). Ties are broken by row order."""
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    k = int(pos.sum()) if k is None else int(k)
    if k <= 0:
        return math.nan
    top = np.argsort(-s, kind="stable")[:k]
    return float(pos[top].mean())


def subgroup_accuracy(
    pred: np.ndarray, y: np.ndarray, group: np.ndarray, group_weights: Mapping[int, float]
) -> dict[str, Any]:
    """Per-sub-group accuracy, the worst one, and the accuracy under the training mix of sub-groups
    (``sum_g w_g acc_g / sum_g w_g``): on a balanced test set that is the in-distribution accuracy."""
    correct = np.asarray(pred) == np.asarray(y)
    per = {int(g): float(correct[group == g].mean()) for g in np.unique(group)}
    wsum = sum(group_weights[g] for g in per)
    return {
        "per_group": per,
        "worst": min(per.values()),
        "weighted": float(sum(group_weights[g] * a for g, a in per.items()) / wsum),
        "mean": float(np.mean(list(per.values()))),
    }


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value) of finite values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


# Two-sided 95% quantiles of Student's t by degrees of freedom (n - 1 for n seeds).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def paired_interval(diffs: Sequence[float]) -> dict[str, float]:
    """``mean_std`` of per-seed paired differences plus ``ci95``: the half-width of the 95% t-interval of
    their mean (NaN for fewer than 2 values)."""
    ms = mean_std(diffs)
    n = ms["n"]
    ms["ci95"] = _T975.get(n - 1, 1.96) * ms["std"] / math.sqrt(n) if n >= 2 else math.nan
    return ms
