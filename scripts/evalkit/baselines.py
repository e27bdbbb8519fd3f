"""The baselines people use instead of a gradient miner: loss ranking, JTT, class balancing, cleanlab.

Detection baselines return per-sample scores, higher = more suspicious. Resampling baselines return
per-sample sampling weights for ``train.weighted_indices``.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import torch

from .train import TrainConfig, predict_proba, train_mlp, weighted_indices

__all__ = [
    "cleanlab_available",
    "out_of_sample_proba",
    "cleanlab_scores",
    "class_balanced_weights",
    "jtt_weights",
    "topk_weights",
    "group_balanced_weights",
]


def cleanlab_available() -> bool:
    return (
        importlib.util.find_spec("cleanlab") is not None and importlib.util.find_spec("sklearn") is not None
    )


def _stratified_folds(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold id of every sample: each class is shuffled and dealt round-robin into ``k`` folds."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=np.int64)
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        fold[members] = np.arange(len(members)) % k
    return fold


def out_of_sample_proba(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, cfg: TrainConfig, seed: int, k: int = 5
) -> np.ndarray:
    """``(N, C)`` predicted probabilities where every sample is scored by a model that never saw it
    (K-fold cross-validation with the benchmark's training recipe), as cleanlab's docs recommend."""
    y_np = y.numpy()
    fold = _stratified_folds(y_np, k, seed)
    proba = np.zeros((len(y_np), n_classes), dtype=np.float64)
    for f in range(k):
        tr = np.flatnonzero(fold != f)
        te = np.flatnonzero(fold == f)
        idx = torch.from_numpy(tr)[
            weighted_indices(np.ones(len(tr)), cfg.steps(len(tr)) * cfg.batch, seed * 100 + f)
        ]
        model = train_mlp(x, y, n_classes, idx, cfg, seed * 100 + f)
        proba[te] = predict_proba(model, x[torch.from_numpy(te)]).double().numpy()
    return proba


def cleanlab_scores(y: np.ndarray, pred_probs: np.ndarray) -> dict[str, Any]:
    """cleanlab's label-quality score (turned into ``1 - quality``: higher = more likely mislabelled) and the
    boolean ``find_label_issues`` mask, both from out-of-sample ``pred_probs``."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    quality = get_label_quality_scores(y, pred_probs)  # default method: self_confidence
    issues = find_label_issues(y, pred_probs)  # default filter_by: prune_by_noise_rate
    return {"score": 1.0 - np.asarray(quality, dtype=np.float64), "issues": np.asarray(issues, dtype=bool)}


def class_balanced_weights(y: np.ndarray) -> np.ndarray:
    """Weight 1/n_c for a sample of class c: every class is drawn equally often."""
    counts = np.bincount(y)
    return 1.0 / counts[y]


def jtt_weights(pred: np.ndarray, y: np.ndarray, up: float) -> np.ndarray:
    """JTT (Liu et al. 2021): the first model's training errors are upsampled by ``up``."""
    return np.where(pred != y, float(up), 1.0)


def topk_weights(score: np.ndarray, top: float, boost: float) -> np.ndarray:
    """Weight ``boost`` for the ``top`` fraction with the highest score, 1 for the rest."""
    k = max(1, int(round(top * len(score))))
    w = np.ones(len(score), dtype=np.float64)
    w[np.argsort(-score, kind="stable")[:k]] = float(boost)
    return w


def group_balanced_weights(y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Every class gets the same mass, and inside it every group (e.g. an inferred cluster) the same share:
    weight ``1 / (n_classes_in_data * groups_in_class * n_group)``, up to a constant."""
    codes, inv = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    n_group = np.bincount(inv)  # (G,)
    per_class = {int(c): len(np.unique(inv[y == c])) for c in np.unique(y)}
    k = np.array([per_class[int(c)] for c in y], dtype=np.float64)
    return 1.0 / (k * n_group[inv])
