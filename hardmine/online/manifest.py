"""The online manifest: the offline manifest's columns and the training dynamics, one row per sample id.

**Manifest.** :meth:`OnlineMiner.manifest` returns one row per sample id (sorted by id) with the columns of
the offline manifest (``hardmine.manifest.REQUIRED_COLUMNS``; ``knn_outlier`` and
``neighbor_disagreement`` need a neighbour index over all gradients and are NaN online) and the dynamics
above. ``hardness`` is the weighted mean of rank-normalised signals, exactly as offline
(``hardmine.score``), over ``DEFAULT_ONLINE_WEIGHTS`` (classification) or
``DEFAULT_ONLINE_WEIGHTS_REGRESSION``; ``rank`` (1 = hardest), ``is_hard`` and ``weight`` come from
``hardmine.manifest.compute_weights``, so ``hardmine.ManifestSampler`` and ``export_manifest`` work on it
unchanged. Higher = harder everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from ..checks import is_finite_number
from ..enums import LossKind, Strategy, TaskKind, parse_choice
from ..manifest import finish_manifest
from ..score import (
    SCORE_TABLE,
    ScoreConfig,
    ScoreInfo,
    composite_hardness,
    flag_scores,
    validate_export_params,
)
from .dynamics import COL, SampleDynamics

__all__ = [
    "DEFAULT_ONLINE_WEIGHTS",
    "DEFAULT_ONLINE_WEIGHTS_REGRESSION",
    "ONLINE_SCORE_TABLE",
    "add_lm_columns",
    "build_manifest",
    "check_hardness_weights",
    "manifest_frame",
    "online_hardness",
]

# Online columns on top of the offline ones (same ScoreInfo fields; higher = harder after orientation).
ONLINE_SCORE_TABLE: dict[str, ScoreInfo] = {
    **SCORE_TABLE,
    "class_divergence": ScoreInfo(
        "1 - cos(u, EMA of the class's mean unit gradient) at the sample's last observation",
        "higher",
        1,
        True,
    ),
    "global_divergence": ScoreInfo(
        "1 - cos(u, EMA of the mean unit gradient of all samples) at the last observation", "higher", 1, False
    ),
    "knn_outlier": ScoreInfo("not computed online (needs a neighbour index): NaN", "higher", 1, False),
    "neighbor_disagreement": ScoreInfo(
        "not computed online (needs a neighbour index): NaN", "higher", 1, True
    ),
    "times_seen": ScoreInfo("number of observations of the sample", "n/a", 0, False),
    "confidence_mean": ScoreInfo(
        "mean of p[label] over observations (Dataset Cartography)", "lower", -1, True
    ),
    "variability": ScoreInfo("std of p[label] over observations (Dataset Cartography)", "n/a", 0, True),
    "forgetting_events": ScoreInfo(
        "correct -> incorrect transitions between consecutive observations (Toneva); never-learned samples "
        "rank above all in hardness",
        "higher",
        1,
        True,
    ),
    "never_learned": ScoreInfo("never classified correctly when observed", "true", 1, True),
    "aum": ScoreInfo(
        "mean over observations of logit[label] - max other logit (AUM, Pleiss)", "lower", -1, True
    ),
    "agreement": ScoreInfo("last-seen agreement a_b that set the training weight", "lower", -1, False),
    "last_weight": ScoreInfo("training weight of the last observation", "n/a", 0, False),
    "last_step": ScoreInfo("miner step of the last observation", "n/a", 0, False),
}

# Default online hardness. AUM and forgetting summarise the whole run (robust to one noisy forward), the
# class divergence is the GradTail signal, the last loss is the current state. Regression has no class,
# margin or correctness signals, so it uses the loss and the global divergence.
DEFAULT_ONLINE_WEIGHTS: dict[str, float] = {
    "aum": 1.0,
    "loss": 0.5,
    "class_divergence": 1.0,
    "forgetting_events": 0.5,
}
DEFAULT_ONLINE_WEIGHTS_REGRESSION: dict[str, float] = {"loss": 1.0, "global_divergence": 1.0}


def build_manifest(
    dyn: SampleDynamics,
    task: TaskKind | None,
    describe: Mapping[str, Any],
    *,
    weights: Mapping[str, float] | None,
    strategy: Strategy | str,
    top: float,
    boost: float,
    temperature: float,
    cap: float | None,
) -> pd.DataFrame:
    """The manifest of ``OnlineMiner.manifest`` (arguments documented there). ``describe``: the miner's part of
    the metadata (model, layers, projection, ...), stored in ``df.attrs["hardmine"]`` with the rest."""
    strategy = parse_choice(Strategy, strategy, "strategy")
    validate_export_params(top, boost, temperature, cap)
    if dyn.n == 0:
        raise ValueError(
            "no sample has been observed with ids yet; pass ids to observe() to build a manifest."
        )
    is_class = task is TaskKind.CLASSIFICATION
    weights = dict(
        weights
        if weights is not None
        else (DEFAULT_ONLINE_WEIGHTS if is_class else DEFAULT_ONLINE_WEIGHTS_REGRESSION)
    )
    check_hardness_weights(weights)
    df = manifest_frame(dyn, is_class)
    if task is TaskKind.CAUSAL_LM:
        add_lm_columns(df, mean_loss=describe.get("loss") == LossKind.CAUSAL_LM.value)
    hardness, used = online_hardness(df, weights, task)
    df["hardness"] = hardness
    meta = {
        **describe,
        "source": {"door": "online", "steps": describe.get("steps")},
        "hardness_weights_used": used,
        "scores": {name: s.to_dict() for name, s in ONLINE_SCORE_TABLE.items()},
    }
    return finish_manifest(df, meta, strategy=strategy, top=top, boost=boost, temperature=temperature, cap=cap)


def add_lm_columns(df: pd.DataFrame, *, mean_loss: bool) -> None:
    """The causal-LM columns of the offline manifest (``hardmine.manifest.REQUIRED_COLUMNS_LM``), in place:
    ``perplexity`` is ``exp(loss)`` when the loss is the mean next-token NLL (NaN for a summed loss); the token
    statistics (``n_target_tokens``, ``token_entropy_mean``, ``top1_miss_rate``, ``max_token_loss``) need a pass
    over every token's distribution, which the offline scan makes and a training step does not: NaN online, like
    ``knn_outlier``."""
    loss = df["loss"].to_numpy(dtype=np.float64)  # (N,)
    with np.errstate(over="ignore"):
        df["perplexity"] = np.exp(loss) if mean_loss else np.full(len(df), np.nan)
    for name in ("n_target_tokens", "token_entropy_mean", "top1_miss_rate", "max_token_loss"):
        df[name] = np.full(len(df), np.nan)


def manifest_frame(dyn: SampleDynamics, is_class: bool) -> pd.DataFrame:
    """One row per sample id (sorted by id): the offline manifest's score columns and the dynamics, before
    ``hardness``, ``rank``, ``is_hard`` and ``weight``."""
    order = np.argsort(dyn.id_array(), kind="stable")
    n = len(order)
    last = dyn.last[: dyn.n][order]  # (N, L)
    run = {k: v[: dyn.n][order] for k, v in dyn.run.items()}

    def col(name: str) -> np.ndarray:
        return last[:, COL[name]].copy()

    nan = np.full(n, np.nan)
    seen = run["times_seen"].astype(np.float64)
    if is_class:
        correct = pd.array(run["prev_correct"] == 1, dtype="boolean")
        label: Any = col("label").astype(np.int64)
        pred: Any = col("pred").astype(np.int64)
        never = pd.array(~run["ever_correct"], dtype="boolean")
    else:
        correct = pd.array([None] * n, dtype="boolean")
        label, pred = col("label"), col("pred")
        never = pd.array([None] * n, dtype="boolean")
    flags = flag_scores(correct, col("pred_confidence"), col("margin"), ScoreConfig())  # offline thresholds
    cols: dict[str, Any] = {
        "sample_id": dyn.id_array()[order],
        "label": label,
        "pred": pred,
        "correct": correct,
        "loss": col("loss"),
        "confidence": col("confidence"),
        "pred_confidence": col("pred_confidence"),
        "margin": col("margin"),
        "el2n": col("el2n"),
        "grad_norm": col("grad_norm"),
        "class_divergence": 1.0 - col("class_agreement"),
        "global_divergence": 1.0 - col("global_agreement"),
        "knn_outlier": nan.copy(),
        "neighbor_disagreement": nan.copy(),
        "confident_error": flags["confident_error"],
        "near_miss": flags["near_miss"],
        "times_seen": run["times_seen"],
        "confidence_mean": run["conf_mean"] if is_class else nan.copy(),
        "variability": np.sqrt(run["conf_m2"] / seen) if is_class else nan.copy(),
        "forgetting_events": run["forgetting"] if is_class else nan.copy(),
        "never_learned": never,
        "aum": run["aum_sum"] / seen if is_class else nan.copy(),
        "agreement": col("agreement"),
        "last_weight": col("last_weight"),
        "last_step": col("last_step").astype(np.int64),
    }
    return pd.DataFrame(cols)


def check_hardness_weights(weights: Mapping[str, float]) -> None:
    allowed = [n for n, info in ONLINE_SCORE_TABLE.items() if info.orientation != 0]
    if not weights:
        raise ValueError(f"hardness weights are empty; give some of {allowed} a weight > 0.")
    for name, w in weights.items():
        if name not in allowed:
            raise ValueError(
                f"hardness weight for {name!r}: not a weightable online score; use some of {allowed}."
            )
        if not is_finite_number(w) or w < 0:
            raise ValueError(f"hardness weight {name}={w!r} must be a finite number >= 0.")
    if not any(w > 0 for w in weights.values()):
        raise ValueError(f"hardness weights {dict(weights)!r} are all zero; give one signal a weight > 0.")


def online_hardness(
    df: pd.DataFrame, weights: Mapping[str, float], task: TaskKind | None
) -> tuple[np.ndarray, dict[str, float]]:
    """``hardmine.score.composite_hardness`` with the orientations of ``ONLINE_SCORE_TABLE``; a
    ``ValueError`` when none of the weighted signals exists for a ``task`` miner."""
    columns: dict[str, Any] = {name: df[name] for name in weights if name in df}
    if "forgetting_events" in columns:
        # Toneva et al.: a never-learned sample counts as forgotten more often than any learned one.
        f = df["forgetting_events"].to_numpy(dtype=np.float64)
        never = df["never_learned"].to_numpy(dtype=bool, na_value=False)
        top = np.nanmax(f) + 1.0 if np.isfinite(f).any() else 1.0
        columns["forgetting_events"] = np.where(never, top, f)
    hardness, used = composite_hardness(columns, weights, ONLINE_SCORE_TABLE)
    if not used:
        raise ValueError(
            f"none of the weighted signals {sorted(weights)} exists for a {task.value if task else ''} miner; "
            "weight signals that do (regression: loss, grad_norm, global_divergence, agreement)."
        )
    return hardness, used
