"""Per-sample hardness scores from projected gradients and model outputs. Higher = harder, everywhere.

This table is the one place where every column's meaning and direction is defined (``SCORE_TABLE`` holds
the same text and is embedded in every manifest). ``z`` is a sample's projected gradient, ``u = z/‖z‖`` its
unit direction (``0`` for a zero gradient), ``p`` the softmax of the model output, ``y`` the label.

=========================  ======================================================  =============  ===========
column                     meaning                                                 harder when    in hardness
=========================  ======================================================  =============  ===========
loss                       per-sample loss                                         higher         as is
confidence                 ``p[y]`` (kept as the contract column)                  LOWER          ``-confidence``
pred_confidence            ``max_j p[j]``                                          n/a            no
margin                     ``p[y] - max_{j≠y} p[j]`` (negative = misclassified)    LOWER          ``-margin``
pred                       ``argmax_j p[j]`` (regression: the scalar output)       n/a            no
correct                    ``pred == y``                                           false          ``-correct``
el2n                       ``‖p - onehot(y)‖₂`` (EL2N)                             higher         as is
grad_norm                  exact ``‖g‖₂`` of the unprojected gradient (GraNd)      higher         as is
class_divergence           ``1 - cos(u, Σ_{class} u)``: robust form, mean of       higher         as is
                           UNIT gradients of the sample's class (range [0, 2])
global_divergence          ``1 - cos(u, Σ_{all} u)``, same over the whole data      higher         as is
class_divergence_plain     ``1 - cos(z, Σ_{class} z)``: plain alternative           higher         as is
global_divergence_plain    ``1 - cos(z, Σ_{all} z)``                                higher         as is
class_distance             ``‖z - mean_{class}(z)‖₂``                              higher         as is
knn_outlier                ``1 - mean cos(u, u_j)`` over the k nearest neighbours   higher         as is
                           j ≠ self by signed cosine (isolated = harder)
neighbor_disagreement      fraction of the k nearest neighbours by ``|cos|`` whose  higher         as is
                           label differs from ``y`` (likely label error)
confident_error            ``not correct and pred_confidence >= threshold``        true           as is
near_miss                  ``correct and margin < near_miss_margin``               true           as is
perplexity                 causal LM: ``exp(mean NLL)`` over the target tokens      higher         as is
n_target_tokens            causal LM: number of target tokens (labels != -100)      n/a            no
token_entropy_mean         causal LM: mean entropy (nats) of the predictive         higher         as is
                           distribution at the target tokens
top1_miss_rate             causal LM: share of target tokens that are not the       higher         as is
                           model's top prediction
max_token_loss             causal LM: largest NLL among the target tokens           higher         as is
hardness                   weighted mean of rank-normalised signals (below)        higher         --
rank                       1 = hardest (ties broken by sample order)               lower          --
=========================  ======================================================  =============  ===========

Why the robust divergence: the plain mean gradient of a class is dominated by the few large gradients of
its hardest samples, so plain cosine to it can rank a rare sub-group *below random*; averaging unit vectors
gives every sample one vote. The measured minority-membership AUROCs of ``class_divergence_plain`` and
``class_divergence`` on Fashion-MNIST superclasses are in the quality benchmark's "minority-membership
AUROC" table (``scripts/results/eval_quality.md``, written by ``make eval``). Both forms are
computed; the weights decide which one counts. ``leave_one_out=True`` removes the sample's own vote from its
mean (``Σ u - u_i``); a class left empty then has divergence 1 (no direction to agree with) and distance NaN.

Why ``|cos|`` for neighbour labels: a mislabelled sample's gradient points *against* those of its true
class (it pulls the model towards the wrong label), so its signed-cosine neighbours are other samples with
the same wrong label and disagree rarely; by ``|cos|`` its neighbours include the true-class samples.
Flip-detection AUROC with signed cosine vs ``|cos|`` on the test suite's planted blobs:
``scripts/results/neighbor_signs.md`` (``scripts/measure_neighbor_signs.py``, run by ``make eval``).
``knn_outlier`` keeps the signed cosine (a flipped or rare sample has few aligned neighbours).

Hardness: each weighted signal ``s`` is oriented (``-s`` where the table says LOWER/false), rank-normalised
to ``(0, 1]`` (average rank / number of non-missing values, ties averaged), and
``hardness = Σ w_s r_s / Σ w_s`` over the signals present for that sample (NaN signals drop out, so
regression scans use the global signals only). ``rank`` sorts by hardness, descending, ties by sample order.

Causal LM (``TaskKind.CAUSAL_LM``, ``hardmine.lm``): ``loss`` is the mean (or, with ``token_reduction="sum"``,
summed) NLL of the target tokens; the classification columns (``label``, ``pred``, ``correct``, ``confidence``,
``pred_confidence``, ``margin``, ``el2n``, the ``class_*`` scores, ``neighbor_disagreement``, the flags, label
issues and slices) do not exist and are absent from the manifest. Default hardness: ``DEFAULT_WEIGHTS_LM``.

Regression (floating targets): ``confidence``, ``pred_confidence``, ``margin``, ``correct``, ``el2n``,
``class_*``, ``neighbor_disagreement``, ``confident_error`` and ``near_miss`` are missing (NaN / null);
``pred`` is the scalar output (NaN for multi-output models), ``label`` the scalar target.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from ._frames import set_column
from .checks import as_bool, finite_number, is_finite_number, non_negative_int, number_in, positive_int
from .defaults import DEFAULT_BOOST, DEFAULT_CAP, DEFAULT_TEMPERATURE, DEFAULT_TOP
from .enums import Strategy, TaskKind, parse_choice

_C = TypeVar("_C")

__all__ = [
    "SCORE_TABLE",
    "DEFAULT_STRATEGY",
    "DEFAULT_STRATEGY_REGRESSION",
    "default_strategy",
    "DEFAULT_TOP",
    "DEFAULT_BOOST",
    "DEFAULT_TEMPERATURE",
    "DEFAULT_CAP",
    "validate_export_params",
    "DEFAULT_WEIGHTS",
    "DEFAULT_WEIGHTS_LM",
    "weights_for_task",
    "ScoreInfo",
    "ScoreConfig",
    "config_from_dict",
    "PopulationStats",
    "KnnResult",
    "classification_stats",
    "label_set",
    "multilabel_stats",
    "regression_stats",
    "unit_rows",
    "divergence_scores",
    "divergence_directions",
    "divergence_from_dots",
    "knn_scores",
    "NEIGHBOR_SCORES",
    "DIVERGENCE_SCORES",
    "knn_columns",
    "flag_scores",
    "rank_normalize",
    "composite_hardness",
    "hardness_rank",
    "population_pass",
    "score_pass",
    "finalize_scores",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreInfo:
    meaning: str
    harder_when: str  # "higher", "lower", "true", "false" or "n/a"
    orientation: int  # +1: enters hardness as is, -1: negated, 0: cannot be weighted
    needs_classes: bool  # missing for regression

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SCORE_TABLE: dict[str, ScoreInfo] = {
    "loss": ScoreInfo("per-sample loss", "higher", 1, False),
    "confidence": ScoreInfo("p[label], softmax probability of the label", "lower", -1, True),
    "pred_confidence": ScoreInfo("max_j p[j], probability of the predicted class", "n/a", 0, True),
    "margin": ScoreInfo("p[label] - max_{j != label} p[j]; negative = misclassified", "lower", -1, True),
    "pred": ScoreInfo("argmax_j p[j] (regression: the scalar output)", "n/a", 0, False),
    "correct": ScoreInfo("pred == label", "false", -1, True),
    "el2n": ScoreInfo("||softmax - onehot(label)||_2 (EL2N)", "higher", 1, True),
    "grad_norm": ScoreInfo("exact L2 norm of the unprojected per-sample gradient (GraNd)", "higher", 1, False),
    "class_divergence": ScoreInfo(
        "1 - cos(u, sum of unit gradients of the sample's class) (robust form)", "higher", 1, True
    ),
    "global_divergence": ScoreInfo("1 - cos(u, sum of all unit gradients) (robust form)", "higher", 1, False),
    "class_divergence_plain": ScoreInfo("1 - cos(z, sum of the class's raw gradients) (plain form)", "higher", 1, True),
    "global_divergence_plain": ScoreInfo("1 - cos(z, sum of all raw gradients) (plain form)", "higher", 1, False),
    "class_distance": ScoreInfo("||z - mean of the class's raw projected gradients||_2", "higher", 1, True),
    "knn_outlier": ScoreInfo("1 - mean signed cosine to the k nearest neighbours (self excluded)", "higher", 1, False),
    "neighbor_disagreement": ScoreInfo(
        "fraction of the k nearest neighbours by |cos| whose label differs from the sample's", "higher", 1, True
    ),
    "confident_error": ScoreInfo("wrong with pred_confidence >= confident_error_threshold", "true", 1, True),
    "near_miss": ScoreInfo("correct with margin < near_miss_margin", "true", 1, True),
    "perplexity": ScoreInfo("causal LM: exp(mean NLL over the target tokens)", "higher", 1, False),
    "n_target_tokens": ScoreInfo("causal LM: number of target tokens (labels != -100)", "n/a", 0, False),
    "token_entropy_mean": ScoreInfo(
        "causal LM: mean entropy (nats) of the predictive distribution at the target tokens", "higher", 1, False
    ),
    "top1_miss_rate": ScoreInfo("causal LM: share of target tokens that are not the top prediction", "higher", 1, False),
    "max_token_loss": ScoreInfo("causal LM: largest NLL among the target tokens", "higher", 1, False),
    "hardness": ScoreInfo("weighted mean of rank-normalised signals", "higher", 0, False),
    "rank": ScoreInfo("1 = hardest; ties broken by sample order", "lower", 0, False),
}

# Default hardness weights, chosen by the quality benchmark (scripts/eval_quality.py, README "Quality
# benchmark"): among the weightings compared on the same scans, {margin, grad_norm} has the smallest
# worst-case AUROC shortfall to the best weighting over the four detection settings (label noise x2,
# hidden minority x2), and the best worst-sub-class accuracy of the retrained weightings under the default
# export. One output signal (margin: confidently-wrong and near-boundary samples) and one gradient signal
# (grad_norm: samples that would move the model most). Change them here only.
DEFAULT_WEIGHTS: dict[str, float] = {
    "margin": 1.0,
    "grad_norm": 1.0,
}

# Default hardness weights of a causal-LM scan (no classes, so no margin). The same shape as the classification
# default: one output signal and one gradient signal. perplexity, not loss: it is the per-token mean whatever
# the token reduction, so under token_reduction="sum" long samples are not ranked hard for their length alone
# (under the default mean it ranks exactly as loss). grad_norm: the samples that would move the model most
# (GraNd). Not chosen by a benchmark like DEFAULT_WEIGHTS (the quality benchmark has no language-model setting).
DEFAULT_WEIGHTS_LM: dict[str, float] = {
    "perplexity": 1.0,
    "grad_norm": 1.0,
}


def weights_for_task(weights: Mapping[str, float], task: TaskKind) -> dict[str, float]:
    """The hardness weights a scan of ``task`` uses: ``DEFAULT_WEIGHTS_LM`` for a causal LM left at the default
    weights (``DEFAULT_WEIGHTS`` names classification signals it lacks), else ``weights`` as given."""
    if task is TaskKind.CAUSAL_LM and dict(weights) == DEFAULT_WEIGHTS:
        return dict(DEFAULT_WEIGHTS_LM)
    return dict(weights)


# Defaults of the export that fills `is_hard` and `weight` (see hardmine.manifest.compute_weights).
# slices (whole failing slices up-weighted within each class, classes balanced, label issues not boosted) at
# slice_boost 0.5 (hardmine.defaults.DEFAULT_SLICE_BOOST) is the export the quality benchmark's strategy rule
# chose over both of its datasets (scripts/eval_summary.py: best mean of worst sub-class on both
# hidden-stratification variants and long-tail balanced accuracy, among exports costing at most 2 points of
# accuracy against ERM under label noise on both datasets; stronger slice boosts gain more worst sub-class
# accuracy but cost more). A manifest without slices falls back to per-class (hardmine.manifest). Regression
# has no classes: its default is proportional (hardness ** temperature).
DEFAULT_STRATEGY = Strategy.SLICES
DEFAULT_STRATEGY_REGRESSION = Strategy.PROPORTIONAL


def default_strategy(classification: bool) -> Strategy:
    """The export strategy used when none is given: ``DEFAULT_STRATEGY`` for classification (integer labels),
    ``DEFAULT_STRATEGY_REGRESSION`` otherwise."""
    return DEFAULT_STRATEGY if classification else DEFAULT_STRATEGY_REGRESSION


def validate_export_params(top: Any, boost: Any, temperature: Any, cap: Any) -> None:
    """Raise ValueError for export parameters outside their documented ranges."""
    if not is_finite_number(top) or not (0 < top <= 1):
        raise ValueError(f"top={top!r} must be a fraction in (0, 1] (e.g. 0.1 = the hardest 10%).")
    finite_number(boost, "boost", above=0, hint="weight of a hard sample vs an easy one")
    finite_number(temperature, "temperature", at_least=0, hint="0 = uniform")
    if cap is not None and (not is_finite_number(cap) or cap < 1):
        raise ValueError(
            f"cap={cap!r} must be None or a number >= 1: the largest weight allowed, as a multiple of the mean "
            "weight (which is 1)."
        )


# The scores that need every sample's nearest neighbours (``hardmine.index.knn_all``): computed only when
# ``ScoreConfig.computes_neighbor_scores``.
NEIGHBOR_SCORES = ("knn_outlier", "neighbor_disagreement")
# The scores of pass 2 made from the gradients and the population's sums (``divergence_scores``).
DIVERGENCE_SCORES = ("class_divergence", "global_divergence", "class_divergence_plain", "global_divergence_plain",
                     "class_distance")


def _weighted_columns() -> list[str]:
    return [n for n, info in SCORE_TABLE.items() if info.orientation != 0]


@dataclass(frozen=True)
class ScoreConfig:
    """Everything that turns stored gradients into scores and default sampling weights.

    Attributes:
        k: neighbours for ``knn_outlier`` and ``neighbor_disagreement`` (self excluded).
        neighbor_scores: compute ``knn_outlier`` and ``neighbor_disagreement`` (``NEIGHBOR_SCORES``). ``None``
            (default): only when the hardness ``weights`` use one of them, since every sample's neighbours
            cost several times the extraction itself at scale (``scripts/results/bench_scan.md``) and no
            default signal, flag or export uses them; off, the two columns are NaN. ``True``: always (then a
            ``Scan.rescore`` adds them to a finished scan); ``False`` with weights that use them is refused.
        weights: hardness weight per column of ``SCORE_TABLE`` (only columns with a direction).
        leave_one_out: remove the sample itself from its class / global mean in the divergences.
        confident_error_threshold: ``pred_confidence`` at or above which a wrong prediction is flagged.
        near_miss_margin: ``margin`` below which a correct prediction is flagged.
        top, strategy, boost, temperature, cap: the default export that fills ``is_hard`` and ``weight`` of
            ``manifest.parquet`` (see ``hardmine.manifest.compute_weights``). ``strategy=None`` (default):
            ``default_strategy`` of the scan's task (per-class for classification, proportional for regression).
    """

    k: int = 10
    weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    leave_one_out: bool = False
    confident_error_threshold: float = 0.8
    near_miss_margin: float = 0.1
    top: float = DEFAULT_TOP
    strategy: Strategy | str | None = None
    boost: float = DEFAULT_BOOST
    temperature: float = DEFAULT_TEMPERATURE
    cap: float | None = DEFAULT_CAP
    neighbor_scores: bool | None = None

    def __post_init__(self) -> None:
        positive_int(self.k, "ScoreConfig k", hint="neighbours per sample")
        if not isinstance(self.weights, Mapping) or not self.weights:
            raise ValueError(f"ScoreConfig weights={self.weights!r} must be a non-empty mapping column -> weight.")
        allowed = _weighted_columns()
        for name, w in self.weights.items():
            if name not in allowed:
                raise ValueError(f"hardness weight for {name!r}: not a weightable score; use some of {allowed}.")
            finite_number(w, f"hardness weight {name}", at_least=0)
        if not any(w > 0 for w in self.weights.values()):
            raise ValueError(f"ScoreConfig weights={dict(self.weights)!r} are all zero; give one signal a weight > 0.")
        object.__setattr__(self, "weights", {n: float(w) for n, w in self.weights.items()})
        for name, lo, hi in (("confident_error_threshold", 0.0, 1.0), ("near_miss_margin", 0.0, 2.0)):
            number_in(getattr(self, name), f"ScoreConfig {name}", lo, hi)
        as_bool(self.leave_one_out, "ScoreConfig leave_one_out")
        if self.strategy is not None:
            object.__setattr__(self, "strategy", parse_choice(Strategy, self.strategy, "strategy"))
        validate_export_params(self.top, self.boost, self.temperature, self.cap)
        if self.neighbor_scores is not None:
            if not isinstance(self.neighbor_scores, bool):
                raise ValueError(
                    f"ScoreConfig neighbor_scores={self.neighbor_scores!r} must be True, False or None (None: only "
                    "when the hardness weights use knn_outlier or neighbor_disagreement)."
                )
            weighted = sorted(c for c in NEIGHBOR_SCORES if self.weights.get(c, 0.0) > 0)
            if not self.neighbor_scores and weighted:
                raise ValueError(
                    f"ScoreConfig neighbor_scores=False, but the hardness weights use {weighted}; set "
                    "neighbor_scores=True (or None) or give those weights 0."
                )

    @property
    def computes_neighbor_scores(self) -> bool:
        """Whether scoring computes ``NEIGHBOR_SCORES``: ``neighbor_scores`` when set, else whether a hardness
        weight uses one of them."""
        if self.neighbor_scores is not None:
            return bool(self.neighbor_scores)
        return any(self.weights.get(c, 0.0) > 0 for c in NEIGHBOR_SCORES)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["weights"] = dict(sorted(self.weights.items()))
        d["strategy"] = None if self.strategy is None else Strategy(self.strategy).value
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ScoreConfig:
        return config_from_dict(cls, d)


def config_from_dict(cls: type[_C], d: Mapping[str, Any]) -> _C:
    """``cls(**d)`` for a config dataclass, refusing unknown fields with a message that lists the known ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(names)}.")
    return cls(**dict(d))


# ------------------------------------------------------------------------------------- per-batch stats
def classification_stats(logits: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Output-derived statistics of a classifier: ``logits (B, C)``, integer ``labels (B,)``. A single logit
    (``(B,)`` or ``(B, 1)``: a binary BCE-with-logits model) is scored as the two-class model ``[0, z]``
    (``hardmine.losses.class_logits``): ``confidence`` = p(label), ``pred`` = 1 when ``z > 0``."""
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]  # (B,) -> (B, 1)
    if x.shape[1] == 1:
        x = np.concatenate([np.zeros_like(x), x], axis=1)  # (B, 2): [0, z]
    y = np.asarray(labels, dtype=np.int64)
    b, c = x.shape
    shifted = x - x.max(axis=1, keepdims=True)  # (B, C), stable softmax
    p = np.exp(shifted)
    p /= p.sum(axis=1, keepdims=True)  # (B, C)
    rows = np.arange(b)
    conf = p[rows, y]
    pred = x.argmax(axis=1)  # ties -> lowest class id, deterministic
    others = p.copy()
    others[rows, y] = -np.inf
    margin = conf - others.max(axis=1)
    onehot = np.zeros_like(p)
    onehot[rows, y] = 1.0
    return {
        "pred": pred.astype(np.int64),
        "correct": pred == y,
        "confidence": conf,
        "pred_confidence": p.max(axis=1),
        "margin": margin,
        "el2n": np.linalg.norm(p - onehot, axis=1),
    }


def label_set(rows: np.ndarray) -> list[str]:
    """``(B, C)`` 0/1 rows as the manifest writes a multi-label ``label``/``pred``: the ids of the 1s,
    comma-separated (``"1,4"``; ``""`` for none)."""
    return [",".join(str(int(i)) for i in np.flatnonzero(r)) for r in np.asarray(rows) > 0.5]


def multilabel_stats(logits: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    """Statistics of a multi-label model: ``logits (B, C)``, 0/1 ``targets (B, C)``; ``p = sigmoid(logits)``,
    ``p_t`` the probability given to each label's true value. ``label``/``pred``: the label sets as
    ``label_set`` strings (predicted: ``p >= 0.5``); ``correct``: every label right; ``confidence``: mean
    ``p_t``; ``pred_confidence``: mean ``max(p, 1 - p)``; ``margin``: the worst label's ``2 p_t - 1`` (negative
    iff some label is wrong); ``el2n``: ``||p - t||``."""
    x = np.asarray(logits, dtype=np.float64).reshape(len(logits), -1)  # (B, C)
    t = np.asarray(targets, dtype=np.float64).reshape(x.shape)  # (B, C)
    p = 1.0 / (1.0 + np.exp(-x))
    p_t = np.where(t > 0.5, p, 1.0 - p)  # (B, C)
    pred = p >= 0.5
    return {
        "label": label_set(t),
        "pred": label_set(pred),
        "correct": (pred == (t > 0.5)).all(axis=1),
        "confidence": p_t.mean(axis=1),
        "pred_confidence": np.maximum(p, 1.0 - p).mean(axis=1),
        "margin": (2.0 * p_t - 1.0).min(axis=1),
        "el2n": np.linalg.norm(p - t, axis=1),
    }


def regression_stats(output: np.ndarray) -> dict[str, np.ndarray]:
    """Statistics of a regression model: only ``pred`` (the scalar output) exists; the rest are missing."""
    out = np.asarray(output, dtype=np.float64)
    b = out.shape[0]
    flat = out.reshape(b, -1)  # (B, outputs)
    nan = np.full(b, np.nan)
    return {
        "pred": flat[:, 0].copy() if flat.shape[1] == 1 else nan.copy(),
        "correct": pd.array([None] * b, dtype="boolean"),
        "confidence": nan.copy(),
        "pred_confidence": nan.copy(),
        "margin": nan.copy(),
        "el2n": nan.copy(),
    }


# ------------------------------------------------------------------------------------ gradient scores
def unit_rows(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(u, norms)``: rows of ``z`` scaled to unit length in float64; zero rows stay zero."""
    z64 = np.asarray(z, dtype=np.float64)
    norms = np.linalg.norm(z64, axis=1)  # (B,)
    safe = np.where(norms > 0, norms, 1.0)
    return z64 / safe[:, None], norms  # (B, D), (B,)


# Up to this many classes, pass 2's per-class dot products are one matrix product against all classes at once
# (C times the flops of the O(B·D) per-row route, but BLAS-fast and without gathering rows); above it, per row.
# Timed on 2 cores with blocks of 2048 x 272: the product is faster up to 64 classes, the per-row route from 128.
ONE_HOT_MAX_CLASSES = 64


@dataclass
class PopulationStats:
    """Pass-1 sums over the whole dataset (float64, accumulated shard by shard in row order)."""

    n: int
    unit_sum: np.ndarray  # (D,) Σ u
    plain_sum: np.ndarray  # (D,) Σ z
    class_count: np.ndarray | None = None  # (C,)
    class_unit_sum: np.ndarray | None = None  # (C, D)
    class_plain_sum: np.ndarray | None = None  # (C, D)
    # Two (rows, D) float64 work arrays reused from block to block (see update); not statistics.
    _work: list[np.ndarray] = field(default_factory=list, init=False, repr=False, compare=False)

    @classmethod
    def empty(cls, dim: int, num_classes: int | None) -> PopulationStats:
        if num_classes is None:
            return cls(0, np.zeros(dim), np.zeros(dim))
        return cls(
            0, np.zeros(dim), np.zeros(dim), np.zeros(num_classes, dtype=np.int64),
            np.zeros((num_classes, dim)), np.zeros((num_classes, dim)),
        )

    def update(self, z: np.ndarray, labels: np.ndarray | None) -> None:
        # No BLAS call in pass 1: a scan runs it in a worker thread beside the extraction
        # (hardmine.scan.population), where a multi-threaded BLAS product fought the extraction's own threads
        # for the cores (a 1M-sample scan extracted 2.7x slower on 2 cores). numpy's reductions and einsum run
        # in the calling thread only. The block's float64 copy and its rows sorted by class go into two work
        # arrays kept from block to block: allocated afresh, glibc handed their pages back to the OS after every
        # block and each block page-faulted them in again (twice the pass's time on 2 cores).
        b, d = np.shape(z)
        if b == 0:
            return  # an empty block adds nothing (and has no first label to sort by)
        if not self._work or self._work[0].shape[0] < b or self._work[0].shape[1] != d:
            self._work[:] = [np.empty((b, d)), np.empty((b, d))]
        z64 = self._work[0][:b]  # (B, D): the block in float64
        z64[...] = z
        inv = _inverse_norms(_row_sq_norms(z64))  # (B,) 1/‖z_i‖, 0 for a zero row
        self.n += len(z64)
        self.unit_sum += np.einsum("i,ij->j", inv, z64)  # Σ z_i/‖z_i‖ without a (B, D) array of unit rows
        self.plain_sum += z64.sum(axis=0)
        if self.class_count is None or labels is None:
            return
        assert self.class_unit_sum is not None and self.class_plain_sum is not None
        lab = np.asarray(labels, dtype=np.int64)
        self.class_count += np.bincount(lab, minlength=len(self.class_count))
        # Sort by label and sum contiguous runs: O(B·D) whatever the number of classes.
        order = np.argsort(lab, kind="stable")
        lab_s = lab[order]
        starts = np.flatnonzero(np.r_[True, lab_s[1:] != lab_s[:-1]])
        classes = lab_s[starts]
        zs = np.take(z64, order, axis=0, out=self._work[1][:b])  # (B, D) in class order
        self.class_plain_sum[classes] += np.add.reduceat(zs, starts, axis=0)  # (n_present, D)
        zs *= inv[order][:, None]
        self.class_unit_sum[classes] += np.add.reduceat(zs, starts, axis=0)


    def release_work(self) -> None:
        """Drop the work arrays ``update`` keeps between blocks (two ``(rows, D)`` float64 arrays); the next
        ``update`` makes them again."""
        self._work.clear()


def _row_sq_norms(z64: np.ndarray) -> np.ndarray:
    """``‖z_i‖²`` per row ``(B,)``, without a ``(B, D)`` temporary."""
    return np.einsum("ij,ij->i", z64, z64)


def _inverse_norms(sq: np.ndarray) -> np.ndarray:
    """``1/‖z_i‖`` from ``‖z_i‖²`` ``(B,)``; 0 for a zero row (its unit direction is 0)."""
    norms = np.sqrt(sq)
    return np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0)


def _cos(dot: np.ndarray, a_sq: np.ndarray, b_sq: np.ndarray | float) -> np.ndarray:
    """``dot / sqrt(a_sq · b_sq)``, 0 where either vector is zero."""
    denom = np.sqrt(a_sq * b_sq)
    return np.where(denom > 0, dot / np.where(denom > 0, denom, 1.0), 0.0)


def _cos_to_rest(x: np.ndarray, x_sq: np.ndarray, s: np.ndarray) -> np.ndarray:
    """cos(x_i, s_i - x_i) row by row, 0 where either vector is zero: ``x (B, D)``, ``x_sq (B,)`` = ‖x_i‖²,
    ``s (B, D)`` or ``(D,)`` a sum that includes ``x_i``."""
    rest = s - x  # (B, D): explicitly (see _loo_divergence_scores)
    return _cos(np.einsum("ij,ij->i", x, rest), x_sq, np.einsum("ij,ij->i", rest, rest))


def divergence_scores(
    z: np.ndarray, labels: np.ndarray | None, pop: PopulationStats, leave_one_out: bool = False
) -> dict[str, np.ndarray]:
    """Divergence of each row of ``z`` from the population's mean directions (robust and plain forms)."""
    if leave_one_out:
        return _loo_divergence_scores(z, labels, pop)
    # Every score is a function of a few dot products per row: ‖z_i‖², z_i·Σu, z_i·Σz and the same with the
    # sums of the sample's class; u_i·s = (z_i·s)/‖z_i‖. So the block is read by one product, never copied
    # into unit rows or gathered per-row class sums (several (B, D) float64 temporaries each).
    z64 = np.asarray(z, dtype=np.float64)  # (B, D)
    sq = _row_sq_norms(z64)  # (B,)
    dots = z64 @ np.stack([pop.unit_sum, pop.plain_sum], axis=1)  # (B, 2)
    if labels is None or pop.class_count is None:
        return _compute_divergence_from_dots(sq, dots, None, pop)
    assert pop.class_unit_sum is not None and pop.class_plain_sum is not None
    lab = np.asarray(labels, dtype=np.int64)
    n_classes = len(pop.class_count)
    if n_classes <= ONE_HOT_MAX_CLASSES:  # every class at once: (B, 2C), then each row's own class
        both = z64 @ np.concatenate([pop.class_unit_sum, pop.class_plain_sum]).T  # (B, 2C)
        rows = np.arange(len(z64))
        du, dz = both[rows, lab], both[rows, n_classes + lab]  # (B,), (B,)
    else:  # many classes: each row against its own class's sums
        du = np.einsum("ij,ij->i", z64, pop.class_unit_sum[lab])
        dz = np.einsum("ij,ij->i", z64, pop.class_plain_sum[lab])
    return _compute_divergence_from_dots(sq, np.column_stack([dots, du, dz]), lab, pop)  # dots: (B, 4)


def divergence_directions(pop: PopulationStats) -> np.ndarray:
    """``(C, D, 4)`` float64: for a row ``z`` of class ``c``, ``z @ out[c]`` are the dot products its divergence
    scores are made of, ``(z·Σu, z·Σz, z·Σ_c u, z·Σ_c z)`` (``divergence_from_dots``). So a pass that reads the
    rows anyway (a scan's slices, class by class) gets them from its own product. Needs per-class sums."""
    if pop.class_count is None or pop.class_unit_sum is None or pop.class_plain_sum is None:
        raise ValueError("these population statistics have no per-class sums (no labels); use divergence_scores.")
    c, d = pop.class_unit_sum.shape
    glob = np.broadcast_to(np.stack([pop.unit_sum, pop.plain_sum], axis=1), (c, d, 2))  # (C, D, 2)
    own = np.stack([pop.class_unit_sum, pop.class_plain_sum], axis=2)  # (C, D, 2)
    return np.concatenate([glob, own], axis=2)  # (C, D, 4)


def divergence_from_dots(
    sq: np.ndarray, dots: np.ndarray, labels: np.ndarray | None, pop: PopulationStats
) -> dict[str, np.ndarray]:
    """``divergence_scores`` (without leave-one-out) from each row's squared norm ``sq`` ``(B,)`` and its dot
    products ``dots`` ``(B, 4)`` with the columns of its class in ``divergence_directions(pop)`` (or ``(B, 2)``,
    the first two, for rows without labels): the same numbers, up to the rounding of the products."""
    sq = np.asarray(sq, dtype=np.float64)
    dots = np.asarray(dots, dtype=np.float64)
    classes = labels is not None and pop.class_count is not None
    if sq.ndim != 1 or dots.ndim != 2 or len(dots) != len(sq) or dots.shape[1] != (4 if classes else 2):
        raise ValueError(
            f"sq must be (B,) and dots (B, {4 if classes else 2}) for these rows, got shapes {sq.shape} and "
            f"{dots.shape}; take dots with divergence_directions(pop)."
        )
    lab = None if labels is None else np.asarray(labels, dtype=np.int64)
    if lab is not None and lab.shape != sq.shape:
        raise ValueError(f"labels has shape {lab.shape} for {len(sq)} rows; pass one label per row of sq.")
    return _compute_divergence_from_dots(sq, dots, lab, pop)


def _compute_divergence_from_dots(
    sq: np.ndarray, dots: np.ndarray, lab: np.ndarray | None, pop: PopulationStats
) -> dict[str, np.ndarray]:
    inv = _inverse_norms(sq)
    u_sq = (sq > 0).astype(np.float64)  # ‖u‖² is 1, or 0 for a zero gradient
    out = {
        "global_divergence": 1.0 - _cos(dots[:, 0] * inv, u_sq, pop.unit_sum @ pop.unit_sum),
        "global_divergence_plain": 1.0 - _cos(dots[:, 1], sq, pop.plain_sum @ pop.plain_sum),
    }
    if lab is None or pop.class_count is None:
        return _without_classes(out, len(sq))
    assert pop.class_unit_sum is not None and pop.class_plain_sum is not None
    du, dz = dots[:, 2], dots[:, 3]  # (B,) z·Σ_c u, z·Σ_c z with the row's own class
    su_sq = np.einsum("ij,ij->i", pop.class_unit_sum, pop.class_unit_sum)[lab]  # (B,) ‖Σ_class u‖²
    sz_sq = np.einsum("ij,ij->i", pop.class_plain_sum, pop.class_plain_sum)[lab]
    out["class_divergence"] = 1.0 - _cos(du * inv, u_sq, su_sq)
    out["class_divergence_plain"] = 1.0 - _cos(dz, sq, sz_sq)
    count = pop.class_count[lab].astype(np.float64)  # (B,) ≥ 1: the sample is in its class
    # ‖z - Σz/n‖² = ‖z‖² - 2 z·Σz/n + ‖Σz‖²/n²; rounding can take a near-zero distance below 0
    out["class_distance"] = np.sqrt(np.maximum(sq - 2.0 * dz / count + sz_sq / count**2, 0.0))
    return out


def _without_classes(out: dict[str, np.ndarray], b: int) -> dict[str, np.ndarray]:
    """``out`` with the class scores NaN (three arrays): rows without labels, or sums without classes."""
    nan = np.full(b, np.nan)
    out.update(class_divergence=nan, class_divergence_plain=nan.copy(), class_distance=nan.copy())
    return out


def _loo_divergence_scores(z: np.ndarray, labels: np.ndarray | None, pop: PopulationStats) -> dict[str, np.ndarray]:
    """``divergence_scores`` with each sample's own vote removed from its sums (``leave_one_out``). The sums less
    the sample are formed explicitly: from dot products, ‖s‖² - 2<x, s> + ‖x‖² cancels catastrophically when s
    is mostly x itself (a class of one), where s - x is exactly 0 here."""
    z64 = np.asarray(z, dtype=np.float64)  # (B, D)
    z_sq = _row_sq_norms(z64)
    # The unit rows exactly as PopulationStats.update summed them (z·(1/‖z‖), not z/‖z‖): for a class of one,
    # its sum less the row is then exactly 0, not a rounding residue with a random direction.
    u = z64 * _inverse_norms(z_sq)[:, None]  # (B, D)
    u_sq = (z_sq > 0).astype(np.float64)
    out = {
        "global_divergence": 1.0 - _cos_to_rest(u, u_sq, pop.unit_sum),
        "global_divergence_plain": 1.0 - _cos_to_rest(z64, z_sq, pop.plain_sum),
    }
    if labels is None or pop.class_count is None:
        return _without_classes(out, len(z64))
    assert pop.class_unit_sum is not None and pop.class_plain_sum is not None
    lab = np.asarray(labels, dtype=np.int64)
    su = pop.class_unit_sum[lab]  # (B, D)
    sz = pop.class_plain_sum[lab]  # (B, D)
    out["class_divergence"] = 1.0 - _cos_to_rest(u, u_sq, su)
    out["class_divergence_plain"] = 1.0 - _cos_to_rest(z64, z_sq, sz)
    others = pop.class_count[lab].astype(np.float64) - 1.0  # (B,)
    mean = (sz - z64) / np.where(others > 0, others, 1.0)[:, None]  # (B, D)
    dist = np.linalg.norm(z64 - mean, axis=1)
    dist[others <= 0] = np.nan
    out["class_distance"] = dist
    return out


@dataclass
class KnnResult:
    """Neighbours of a block of samples (rows index the scan; -1 = no neighbour found)."""

    sims: np.ndarray  # (B, k) signed cosine to the k nearest by signed cosine, NaN where missing
    rows: np.ndarray  # (B, k) their rows
    abs_rows: np.ndarray  # (B, k) rows of the k nearest by |cos|


def knn_scores(knn: KnnResult, labels_all: np.ndarray | None, labels: np.ndarray | None) -> dict[str, np.ndarray]:
    """``knn_outlier`` and ``neighbor_disagreement`` for a block, from its neighbours."""
    sims = np.where(knn.rows >= 0, knn.sims, np.nan)
    valid = np.isfinite(sims)
    cnt = valid.sum(axis=1)
    mean = np.where(cnt > 0, np.where(valid, sims, 0.0).sum(axis=1) / np.maximum(cnt, 1), np.nan)
    out = {"knn_outlier": 1.0 - mean}
    b = len(sims)
    if labels_all is None or labels is None:
        out["neighbor_disagreement"] = np.full(b, np.nan)
        return out
    ok = knn.abs_rows >= 0
    nbr = labels_all[np.where(ok, knn.abs_rows, 0)]  # (B, k)
    differ = (nbr != np.asarray(labels)[:, None]) & ok
    n_ok = ok.sum(axis=1)
    out["neighbor_disagreement"] = np.where(n_ok > 0, differ.sum(axis=1) / np.maximum(n_ok, 1), np.nan)
    return out


def knn_columns(
    groups: Iterable[tuple[np.ndarray, KnnResult]], n: int, labels: np.ndarray | None
) -> dict[str, np.ndarray]:
    """``knn_outlier`` and ``neighbor_disagreement`` for all ``n`` samples from neighbour groups
    ``(rows (b,), KnnResult)`` in any order (``hardmine.index.knn_all``); rows no group covers stay NaN."""
    n = non_negative_int(n, "n", hint="number of samples")
    return _compute_knn_columns(groups, n, None if labels is None else np.asarray(labels))


def _compute_knn_columns(
    groups: Iterable[tuple[np.ndarray, KnnResult]], n: int, labels: np.ndarray | None
) -> dict[str, np.ndarray]:
    out = {"knn_outlier": np.full(n, np.nan), "neighbor_disagreement": np.full(n, np.nan)}
    for rows, res in groups:
        lab = None if labels is None else labels[rows]
        for name, v in knn_scores(res, labels, lab).items():
            out[name][rows] = v
    return out


def flag_scores(correct: Any, pred_confidence: np.ndarray, margin: np.ndarray, config: ScoreConfig) -> dict[str, Any]:
    """``confident_error`` and ``near_miss`` as nullable boolean arrays (missing where ``correct`` is)."""
    corr = pd.array(correct, dtype="boolean")  # (B,), <NA> for regression rows
    known = ~np.asarray(corr.isna())
    c = np.asarray(corr.fillna(False), dtype=bool)
    with np.errstate(invalid="ignore"):
        ce = ~c & (np.asarray(pred_confidence, dtype=np.float64) >= config.confident_error_threshold)
        nm = c & (np.asarray(margin, dtype=np.float64) < config.near_miss_margin)
    return {
        "confident_error": pd.arrays.BooleanArray(ce, ~known),
        "near_miss": pd.arrays.BooleanArray(nm, ~known),
    }


# -------------------------------------------------------------------------------------------- hardness
def _as_float(x: Any) -> np.ndarray:
    """Numbers, booleans or nullable booleans (``pd.NA``/``None`` -> NaN) as a float64 array."""
    if isinstance(x, (pd.Series, pd.api.extensions.ExtensionArray)) or np.asarray(x).dtype == object:
        return pd.array(x, dtype="Float64").to_numpy(dtype=np.float64, na_value=np.nan)
    return np.asarray(x, dtype=np.float64)


def rank_normalize(x: Any, orientation: int = 1) -> np.ndarray:
    """Average rank of ``orientation * x`` divided by the number of non-missing values: ``(0, 1]``; NaN stays.
    An infinite value is present (ranked first or last), so it is counted too."""
    v = _as_float(x) * float(orientation)
    n_valid = int((~np.isnan(v)).sum())
    if n_valid == 0:
        return np.full(len(v), np.nan)
    return _average_ranks(v) / n_valid


def _average_ranks(v: np.ndarray) -> np.ndarray:
    """1-based ranks of ``v`` (float64), ties sharing their average rank and NaN staying NaN: the same numbers
    as ``pd.Series(v).rank(method="average")``. One unstable argsort (numpy's SIMD sort: several times faster
    than pandas' stable one at a million rows); the order among equal values does not change their average."""
    n = len(v)
    order = np.argsort(v)  # NaN sort last
    m = n - int(np.isnan(v).sum())  # the ranked values: order[:m]
    out = np.full(n, np.nan)
    if m == 0:
        return out
    sv = v[order[:m]]  # (m,) sorted
    new = np.empty(m, dtype=bool)
    new[0] = True
    np.not_equal(sv[1:], sv[:-1], out=new[1:])  # a run of equal values starts here (-0.0 == 0.0, as in pandas)
    del sv
    if new.all():  # no ties (continuous scores): the ranks are the positions; no run arrays
        out[order[:m]] = np.arange(1, m + 1, dtype=np.float64)
        return out
    starts = np.flatnonzero(new)  # (G,) first position of each run
    ends = np.append(starts[1:], m)  # (G,) one past its last
    # positions starts..ends-1 hold ranks starts+1..ends: their average is exact in float64 (a half-integer)
    out[order[:m]] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return out


def composite_hardness(
    columns: Mapping[str, Any], weights: Mapping[str, float], table: Mapping[str, ScoreInfo] | None = None
) -> tuple[np.ndarray, dict[str, float]]:
    """``Σ w_s r_s / Σ w_s`` per sample over the signals present for it. Returns it and the weights used
    (signals that are missing for every sample, e.g. class scores in regression, are dropped).
    ``table`` gives each signal's orientation (default ``SCORE_TABLE``; the online miner passes its own)."""
    table = SCORE_TABLE if table is None else table
    n = len(next(iter(columns.values())))
    num = np.zeros(n)
    den = np.zeros(n)
    used: dict[str, float] = {}
    for name, w in sorted(weights.items()):
        if w == 0:
            continue
        if name not in columns:
            raise ValueError(f"hardness weight for {name!r}, but there is no such score column.")
        r = rank_normalize(columns[name], table[name].orientation)
        ok = np.isfinite(r)
        if not ok.any():
            logger.info("hardness: %s is missing for every sample; its weight is dropped", name)
            continue
        num[ok] += w * r[ok]
        den[ok] += w
        used[name] = float(w)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan), used


def hardness_rank(hardness: np.ndarray) -> np.ndarray:
    """Ranks ``1..N``: 1 = highest hardness; ties (and NaN, ranked last) by sample order."""
    h = np.asarray(hardness, dtype=np.float64)
    n = len(h)
    key = np.where(np.isfinite(h), -h, np.inf)
    order = np.argsort(key)  # unstable (numpy's SIMD sort, several times faster than a stable one): ties below
    sk = key[order]  # (N,) sorted
    tie = sk[1:] == sk[:-1]  # (N-1,)
    if tie.any():
        # Within each run of equal keys, sample order: sort the unique integer keys (run, sample) instead.
        run = np.concatenate(([0], np.cumsum(~tie)))  # (N,) run number of each sorted position
        order = np.sort(run * n + order) % n  # run * n + sample < N**2 fits int64 for any N below 3e9
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(1, n + 1)
    return rank


# ---------------------------------------------------------------------------------- streaming passes
Block = tuple[int, np.ndarray]  # (first row, (b, D) projected gradients)
KnnFn = Callable[[np.ndarray, np.ndarray], KnnResult]  # (unit vectors (b, D) float32, rows (b,)) -> neighbours


def population_pass(
    blocks: Iterable[Block], dim: int, labels: np.ndarray | None, num_classes: int | None
) -> PopulationStats:
    """Pass 1: global and per-class sums of unit and raw gradients, streamed block by block."""
    pop = PopulationStats.empty(dim, num_classes if labels is not None else None)
    for start, z in blocks:
        pop.update(z, None if labels is None else labels[start : start + len(z)])
    pop.release_work()
    return pop


def score_pass(
    blocks: Iterable[Block],
    n: int,
    labels: np.ndarray | None,
    pop: PopulationStats,
    config: ScoreConfig,
    knn: KnnFn | None,
    on_block: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Pass 2: per-sample gradient scores (divergences and kNN), streamed block by block.

    Returns one length-``n`` float64 array per score; only these scalars are held, never the gradients.
    """
    out = {name: np.full(n, np.nan) for name in (*DIVERGENCE_SCORES, *NEIGHBOR_SCORES)}
    for start, z in blocks:
        stop = start + len(z)
        lab = None if labels is None else labels[start:stop]
        for name, v in divergence_scores(z, lab, pop, config.leave_one_out).items():
            out[name][start:stop] = v
        if knn is not None:
            u, _ = unit_rows(z)
            res = knn(np.ascontiguousarray(u, dtype=np.float32), np.arange(start, stop, dtype=np.int64))
            for name, v in knn_scores(res, labels, lab).items():
                out[name][start:stop] = v
            del u, res  # do not carry a block's arrays into the next block's peak
        if on_block is not None:
            on_block(stop)
    return out


def finalize_scores(
    stats: pd.DataFrame, grad_scores: Mapping[str, np.ndarray], config: ScoreConfig, task: TaskKind
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Join per-sample statistics and gradient scores, add flags, ``hardness`` and ``rank``.

    ``stats`` is extended in place (no copy: at a million samples every copy of the frame costs ~200 MB), and
    the arrays of ``grad_scores`` become its columns as they are (not copied: do not change them afterwards).
    Returns the frame (one row per sample, in scan order) and the hardness weights actually used.
    """
    df = stats
    for name, v in grad_scores.items():
        set_column(df, name, v)
    if task is not TaskKind.CAUSAL_LM:  # a causal LM has no prediction to be confidently wrong or nearly right
        flags = flag_scores(df["correct"].array, df["pred_confidence"].to_numpy(), df["margin"].to_numpy(), config)
        for name, v in flags.items():
            set_column(df, name, v)
    weights = weights_for_task(config.weights, task)
    cols = {name: df[name].array for name in weights if name in df}
    for name in weights:
        if name not in df:
            raise ValueError(f"hardness weight for {name!r}, but the scan has no such column.")
    hardness, used = composite_hardness(cols, weights)
    if not used:
        raise ValueError(
            f"none of the weighted signals {sorted(weights)} exists for a {task.value} scan; weight "
            "signals that do (for regression: loss, grad_norm, global_divergence, knn_outlier)."
        )
    set_column(df, "hardness", hardness)
    set_column(df, "rank", hardness_rank(hardness))
    return df, used
