"""Training-loop API: per-sample gradient weighting and hard-example mining inside your own loop.

>>> miner = hardmine.OnlineMiner(model, layers="classifier", num_classes=10, dim=256, seed=0)
>>> for x, y, ids in loader:
...     stats = miner.observe(x, y, ids)              # the step's only forward
...     loss = (stats.loss * stats.weights).mean()    # == stats.weighted_loss()
...     loss.backward(); opt.step(); opt.zero_grad()
>>> miner.write_manifest("online_manifest.parquet")   # or miner.manifest() -> DataFrame
>>> miner.close()

**One forward per step.** ``observe`` runs the model once with forward hooks on the selected modules (removed
before it returns) that keep a reference to each call's input ``x`` and output. ``stats.loss`` is the
per-sample loss *still attached to the graph*, so the user's backward is the only full backward. Frameworks
that run the forward themselves use ``with miner.capture(): out = model(x)`` then
``miner.observe_output(out, y, ids)`` (the Lightning and Hugging Face integrations do exactly that).

**Projected per-sample gradients** use the same seeded layout as the offline engines
(:class:`hardmine.factored.ProjectionLayout`: ``P_out ⊗ P_in`` per weight matrix keyed ``"{param}:out"`` /
``"{param}:in"``, dense seeded blocks for biases), so online vectors are comparable with an offline scan of
the same model, layers, ``dim`` and ``seed``. Two paths, chosen per step automatically (``stats.path``):

* ``"analytic"`` -- every selected module is the model's output layer (e.g. the final ``nn.Linear``), its
  output is returned unchanged and the loss is built in. The per-sample gradient at the logits is known in
  closed form -- cross-entropy: ``delta_b = softmax(logits_b) - onehot(y_b)``; MSE (mean over ``d`` outputs):
  ``delta_b = 2 (out_b - y_b) / d`` -- so the layer's per-sample gradient ``delta_b ⊗ h_b`` (``h_b`` = the
  captured input) is projected as ``(P_out^T delta_b) ⊗ (P_in^T h_b)`` with **no extra backward**.
  Extra cost per step: ``O(B·(C·a + d_in·b + a·b))`` for the projection plus the weighting below.
* ``"autograd"`` -- anything else (several layers, a layer inside the network, a custom loss):
  ``torch.autograd.grad(loss.sum(), [selected layers' outputs], retain_graph=True)`` returns every sample's
  gradient at those outputs (row ``b`` belongs to sample ``b`` alone). Only gradients with respect to module
  *outputs* are requested, so no weight gradient is formed and ``param.grad`` is never touched. This costs
  **one extra backward through the part of the graph between the loss and the earliest selected layer**
  (without weight-gradient matmuls), plus the factored per-layer projections of
  :mod:`hardmine.factored` (cheap for ``Linear``; ``Conv2d`` unfolds patches chunk by chunk).

Both paths then cost, per step: one ``(B, D) @ (D, R)`` matmul for the agreement (``D`` = ``out_dim``,
``R`` = classes + 1), one device-to-host copy of ``B * (3 + R + C)`` numbers (``R`` replaced by 2 above 64
rows), ``O(B * C)`` NumPy for the output statistics, ``O(B)`` NumPy updates of the dynamics, and one
``(R, B) @ (B, D)`` matmul (or an ``index_add`` for many classes) for the EMA update -- no per-sample gradient
is ever formed. Measured overhead vs a plain training step (MLP and CNN, batch 256):
``scripts/bench_callbacks.py``.

**Weighting (GradTail-style; our formula -- the paper's exact function is not in our references).** ``u_b``
is sample ``b``'s projected gradient scaled to unit length. The miner keeps exponential moving averages of
the mean unit gradient per class, ``m_c``, and over all samples, ``m``. Agreement ``a_b = cos(u_b, m_{y_b})``
(classification) or ``cos(u_b, m)`` (regression: global only), in ``[-1, 1]``, measured *before* this batch
updates the averages (so a sample never agrees with its own vote). Then::

    r_b = 1 + strength * (1 - a_b) / 2            # 1 for full agreement, 1 + strength for opposition
    w_b = clip(c * r_b, min_weight, max_weight)   # c > 0 solved exactly so that mean_b(w_b) = 1

``c = 1 / mean(r)`` whenever no weight hits a bound. During the first ``warmup_steps`` observations every
weight is 1 (the averages are still being formed; they are updated from step 1). After each batch,
``m_c <- momentum * m_c + (1 - momentum) * mean_{b in batch, y_b = c} u_b`` (a class's first batch sets
``m_c`` to its mean; classes absent from the batch are left alone; cosine is scale-invariant, so no bias
correction is needed). A class never seen has ``m_c = 0``,
for which ``a_b = 0`` (neutral). Why unit vectors: the plain mean gradient is dominated by the few large
gradients of the hardest samples, and cosine to it ranked a rare sub-group *below random* on Fashion-MNIST
(see :mod:`hardmine.score`); the mean of unit vectors gives every sample one vote. Defaults:
:class:`WeightingConfig` (strength 2, momentum 0.9, warm-up 50 steps, weights in [0.25, 4]).

**Training dynamics** per sample id (``O(N)`` scalars: ~140 bytes of arrays plus the id index, ~250 bytes
per id in all; gradients are kept only with ``keep_gradients=True``), from each observation -- i.e. the
forward of the training step, *before* that step's update, in the model's training mode:

* Dataset Cartography (Swayamdipta et al. 2020): ``confidence_mean`` = mean of ``p(label)`` over
  observations, ``variability`` = its (population) standard deviation;
* forgetting events (Toneva et al. 2019): ``correct -> incorrect`` transitions between consecutive
  observations; ``never_learned`` samples (never correct) rank above every forgettable one in ``hardness``,
  as in the paper (which counts them as forgotten infinitely often);
* area under the margin (Pleiss et al. 2020): ``aum`` = mean over observations of ``logit_label - max other
  logit`` (lower = harder; negative = usually misclassified, the paper's mislabelling signal);
* last-seen values with the offline manifest's definitions (``hardmine.score``): ``loss``, ``confidence``,
  ``pred_confidence``, ``margin``, ``pred``, ``correct``, ``el2n``, ``grad_norm``, ``class_divergence`` /
  ``global_divergence`` (``1 - agreement`` against the EMA directions at that step), plus ``agreement`` (the
  one that set the weight), ``last_weight``, ``times_seen``, ``last_step``.

With one observation per epoch these are exactly the papers' per-epoch statistics; an oversampling sampler
that shows a sample several times per epoch makes them per-presentation.

**Manifest.** :meth:`OnlineMiner.manifest` returns one row per sample id (sorted by id) with the columns of
the offline manifest (``hardmine.manifest.REQUIRED_COLUMNS``; ``knn_outlier`` and
``neighbor_disagreement`` need a neighbour index over all gradients and are NaN online) and the dynamics
above. ``hardness`` is the weighted mean of rank-normalised signals, exactly as offline
(``hardmine.score``), over ``DEFAULT_ONLINE_WEIGHTS`` (classification) or
``DEFAULT_ONLINE_WEIGHTS_REGRESSION``; ``rank`` (1 = hardest), ``is_hard`` and ``weight`` come from
``hardmine.manifest.compute_weights``, so ``hardmine.ManifestSampler`` and ``export_manifest`` work on it
unchanged. Higher = harder everywhere.

**Restarts.** :meth:`OnlineMiner.state_dict` / :meth:`OnlineMiner.load_state_dict` hold everything above
(tensors, numbers, strings and lists only: ``torch.save`` / ``torch.load(weights_only=True)`` round-trip it).

**Distributed training.** ``observe`` calls the model it was given; under ``DistributedDataParallel`` run
the wrapped model's forward yourself inside ``with miner.capture():`` (hooks on the inner model's modules
fire) and call ``observe_output``, so DDP's gradient synchronisation stays in charge. Each rank records the
samples it sees.

**Hygiene.** Nothing is attached to the model: hooks live only inside ``capture()`` (removed in ``finally``),
the model's modes are not changed, ``close()`` drops every reference to captured tensors. The first
observation clones each selected module's output once, to learn whether the model modifies it in place
(``nn.ReLU(inplace=True)``); only those modules are cloned afterwards, and a module that starts doing so later
is a ``ValueError`` rather than a silently wrong gradient.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import Sampler

from ._io import model_fingerprint
from ._version import __version__
from .enums import LossKind, ProjectionKind, Strategy, TaskKind, parse_choice
from .extract import call_model, model_output_tensor
from .factored.capture import (
    Captured,
    FactoredUnit,
    apply_rules,
    capture_calls,
    check_calls,
    check_per_sample_loss,
    format_rejected,
    plan_factored,
)
from .factored.layout import ProjectionLayout
from .losses import LossFn, resolve_loss
from .manifest import FORMAT_VERSION, MANIFEST_FORMAT, compute_weights, write_manifest
from .params import select_parameters
from .sampler import ManifestSampler
from .score import (
    DEFAULT_BOOST,
    DEFAULT_CAP,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP,
    SCORE_TABLE,
    ScoreConfig,
    ScoreInfo,
    composite_hardness,
    config_from_dict,
    flag_scores,
    hardness_rank,
    validate_export_params,
)

__all__ = [
    "ONLINE_SCORE_TABLE",
    "DEFAULT_ONLINE_WEIGHTS",
    "DEFAULT_ONLINE_WEIGHTS_REGRESSION",
    "STATE_FORMAT",
    "WeightingConfig",
    "OnlineStats",
    "OnlineMiner",
    "MinerSampler",
    "solve_weights",
]

logger = logging.getLogger(__name__)

STATE_FORMAT = "hardmine-online-state"
_STATE_VERSION = 1
PATH_ANALYTIC = "analytic"
PATH_AUTOGRAD = "autograd"
_MASK_ROWS = 64  # direction updates by one dense matmul up to this many rows (classes + 1)

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


def _finite_number(v: Any) -> bool:
    return (
        isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)
    )


@dataclass(frozen=True)
class WeightingConfig:
    """Hyperparameters of the online weighting (formula in the module docstring).

    Attributes:
        strength: how much a disagreeing sample is upweighted before normalisation: raw weights run from 1
            (full agreement) to ``1 + strength`` (opposite direction). ``0`` disables reweighting (weights 1;
            agreement and dynamics are still recorded).
        momentum: EMA decay of the mean unit-gradient directions, in ``[0, 1)``; ``0.9`` averages over
            roughly the last 10 batches in which a class appears.
        warmup_steps: observations during which every weight is 1 while the averages form.
        min_weight, max_weight: bounds on a weight after normalisation to mean 1 (``0 < min <= 1 <= max``).
        by_class: classification agreement against the sample's class direction (``True``) or the global one.
    """

    strength: float = 2.0
    momentum: float = 0.9
    warmup_steps: int = 50
    min_weight: float = 0.25
    max_weight: float = 4.0
    by_class: bool = True

    def __post_init__(self) -> None:
        if not _finite_number(self.strength) or self.strength < 0:
            raise ValueError(f"WeightingConfig strength={self.strength!r} must be a finite number >= 0.")
        if not _finite_number(self.momentum) or not (0 <= self.momentum < 1):
            raise ValueError(f"WeightingConfig momentum={self.momentum!r} must be a number in [0, 1).")
        if (
            not isinstance(self.warmup_steps, (int, np.integer))
            or isinstance(self.warmup_steps, bool)
            or (self.warmup_steps < 0)
        ):
            raise ValueError(f"WeightingConfig warmup_steps={self.warmup_steps!r} must be an integer >= 0.")
        if not _finite_number(self.min_weight) or not (0 < self.min_weight <= 1):
            raise ValueError(f"WeightingConfig min_weight={self.min_weight!r} must be a number in (0, 1].")
        if not _finite_number(self.max_weight) or self.max_weight < 1:
            raise ValueError(f"WeightingConfig max_weight={self.max_weight!r} must be a finite number >= 1.")
        if not isinstance(self.by_class, bool):
            raise ValueError(f"WeightingConfig by_class={self.by_class!r} must be True or False.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WeightingConfig:
        return config_from_dict(cls, d)


def solve_weights(raw: np.ndarray, min_weight: float, max_weight: float) -> np.ndarray:
    """``clip(c * raw, min_weight, max_weight)`` with ``c > 0`` such that the mean is exactly 1.

    ``raw`` must be positive and ``min_weight <= 1 <= max_weight``. The mean of the clipped weights is a
    continuous, non-decreasing, piecewise-linear function of ``c`` (from ``min_weight`` to ``max_weight``),
    so ``c`` is found exactly from its breakpoints ``bound / raw_i`` with sorted cumulative sums.
    """
    r = np.asarray(raw, dtype=np.float64)
    if r.ndim != 1 or len(r) == 0 or not np.isfinite(r).all() or (r <= 0).any():
        raise ValueError(f"raw weights must be a non-empty 1-D array of finite numbers > 0, got {raw!r}.")
    if not _finite_number(min_weight) or not (0 < min_weight <= 1):
        raise ValueError(f"min_weight={min_weight!r} must be a number in (0, 1].")
    if not _finite_number(max_weight) or max_weight < 1:
        raise ValueError(f"max_weight={max_weight!r} must be a finite number >= 1.")
    return _solve_weights(r, float(min_weight), float(max_weight))


def _solve_weights(r: np.ndarray, min_weight: float, max_weight: float) -> np.ndarray:
    n = len(r)
    c0 = n / r.sum()
    w = c0 * r
    if w.min() >= min_weight and w.max() <= max_weight:
        return w  # the usual case: no weight at a bound
    rs = np.sort(r)
    cs = np.r_[0.0, np.cumsum(rs)]  # cs[k] = sum of the k smallest

    def mean_at(c: np.ndarray) -> np.ndarray:
        k_lo = np.searchsorted(rs, min_weight / c, side="left")  # count of c*r < min
        k_hi = np.searchsorted(rs, max_weight / c, side="right")  # count of c*r <= max
        return (k_lo * min_weight + (n - k_hi) * max_weight + c * (cs[k_hi] - cs[k_lo])) / n

    bps = np.unique(np.r_[min_weight / rs, max_weight / rs])  # (<= 2n,) ascending
    f = mean_at(bps)
    j = int(np.searchsorted(f, 1.0, side="left"))  # first breakpoint with mean >= 1
    if j >= len(bps):
        c = bps[-1]
    elif j == 0 or f[j] == 1.0:
        c = bps[j]
    else:  # linear between bps[j-1] and bps[j]
        lo, hi = bps[j - 1], bps[j]
        c = lo + (1.0 - f[j - 1]) * (hi - lo) / (f[j] - f[j - 1])
    return np.clip(c * r, min_weight, max_weight)


@dataclass
class OnlineStats:
    """What ``observe`` returns for one batch. Everything but ``loss`` and ``output`` is detached."""

    loss: torch.Tensor  # (B,) per-sample loss, attached to the graph
    weights: torch.Tensor  # (B,) detached training weights, mean 1 (all 1 during warm-up), loss dtype
    output: torch.Tensor  # (B, ...) model output (logits), attached
    z: torch.Tensor  # (B, out_dim) float32 projected per-sample gradients
    grad_norm: torch.Tensor  # (B,) exact L2 norm of the unprojected per-sample gradient of the selection
    agreement: torch.Tensor  # (B,) the agreement that set the weight (class, or global for regression)
    global_agreement: torch.Tensor  # (B,) cos(u, global EMA direction)
    confidence: torch.Tensor | None  # (B,) p[label]; None for regression
    margin: torch.Tensor | None  # (B,) p[label] - max other p (as the offline manifest); None for regression
    logit_margin: (
        torch.Tensor | None
    )  # (B,) logit[label] - max other logit (AUM's margin); None for regression
    correct: torch.Tensor | None  # (B,) bool; None for regression
    step: int  # 1-based observation count of the miner
    warmup: bool  # True when the weights were forced to 1
    path: str  # "analytic" or "autograd" (see the module docstring)

    def weighted_loss(self) -> torch.Tensor:
        """``(loss * weights).mean()``, the usual training objective."""
        return (self.loss * self.weights).mean()


# ------------------------------------------------------------------------------------------- sample ids
def _id_list(ids: Any, b: int) -> tuple[list[Any], str]:
    """User ids -> (python list, "int" | "str"), validated against the batch size."""
    if isinstance(ids, torch.Tensor):
        if torch.is_floating_point(ids) or ids.dtype == torch.bool or ids.ndim != 1:
            raise ValueError(
                f"sample ids must be a 1-D integer tensor or a list of ints/strings, got a {ids.dtype} "
                f"tensor of shape {tuple(ids.shape)}."
            )
        seq, kind = ids.tolist(), "int"
    elif isinstance(ids, np.ndarray) and ids.dtype.kind in "iu":
        if ids.ndim != 1:
            raise ValueError(f"sample ids must be 1-D, got shape {ids.shape}.")
        seq, kind = ids.tolist(), "int"
    elif isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, np.ndarray)):
        raise ValueError(f"sample ids must be a sequence with one id per sample, got {type(ids).__name__}.")
    else:
        seq = list(ids.tolist() if isinstance(ids, np.ndarray) else ids)
        if all(isinstance(v, str) for v in seq):
            kind = "str"
        elif all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in seq):
            seq, kind = [int(v) for v in seq], "int"
        else:
            kinds = sorted({type(v).__name__ for v in seq})
            raise ValueError(f"sample ids must be all integers or all strings, got {kinds}.")
    if len(seq) != b:
        raise ValueError(f"{len(seq)} sample ids for a batch of {b}; give exactly one id per sample.")
    return seq, kind


# Last-seen values per sample, one row per id (float64 matrix, column order below).
_LAST = (
    "label",
    "loss",
    "confidence",
    "pred_confidence",
    "margin",
    "pred",
    "el2n",
    "grad_norm",
    "class_agreement",
    "global_agreement",
    "agreement",
    "last_weight",
    "last_step",
)
_L = {name: i for i, name in enumerate(_LAST)}
# Running statistics per sample: name -> (dtype, fill value for a new id).
_RUNNING: dict[str, tuple[Any, Any]] = {
    "times_seen": (np.int64, 0),
    "conf_mean": (np.float64, 0.0),  # Welford running mean of p[label]
    "conf_m2": (np.float64, 0.0),  # Welford sum of squared deviations
    "aum_sum": (np.float64, 0.0),
    "forgetting": (np.int64, 0),
    "prev_correct": (np.int8, -1),  # -1: not observed yet
    "ever_correct": (np.bool_, False),
}


class _Dynamics:
    """Growable per-sample arrays keyed by sample id (O(N) scalars)."""

    def __init__(self, keep_dim: int | None) -> None:
        self.ids: list[Any] = []
        self.slot: dict[Any, int] = {}
        self.id_kind: str | None = None
        self.cap = 0
        self.last = np.empty((0, len(_LAST)), dtype=np.float64)  # (cap, L)
        self.run: dict[str, np.ndarray] = {n: np.empty(0, dtype=dt) for n, (dt, _) in _RUNNING.items()}
        self.keep_dim = keep_dim
        self.grads = np.empty((0, keep_dim), dtype=np.float32) if keep_dim else None

    @property
    def n(self) -> int:
        return len(self.ids)

    def grow(self, need: int) -> None:
        new_cap = max(need, 2 * self.cap, 1024)
        last = np.full((new_cap, len(_LAST)), np.nan)
        last[: self.cap] = self.last[: self.cap]
        self.last = last
        for name, (dt, fill) in _RUNNING.items():
            arr = np.full(new_cap, fill, dtype=dt)
            arr[: self.cap] = self.run[name][: self.cap]
            self.run[name] = arr
        if self.grads is not None:
            g = np.zeros((new_cap, self.grads.shape[1]), dtype=np.float32)
            g[: self.cap] = self.grads[: self.cap]
            self.grads = g
        self.cap = new_cap

    def slots(self, ids: list[Any], kind: str) -> np.ndarray:
        if self.id_kind is None:
            self.id_kind = kind
        elif kind != self.id_kind:
            raise ValueError(
                f"sample ids were {self.id_kind}s in earlier batches and are {kind}s now; use one id type."
            )
        get = self.slot.get
        found = [get(sid) for sid in ids]
        if None in found:
            for i, sid in enumerate(ids):
                if found[i] is None:
                    s = self.slot.get(sid)  # the same new id may appear twice in one batch
                    if s is None:
                        s = len(self.ids)
                        self.slot[sid] = s
                        self.ids.append(sid)
                    found[i] = s
        if self.n > self.cap:
            self.grow(self.n)
        return np.asarray(found, dtype=np.int64)

    def id_array(self) -> np.ndarray:
        return np.asarray(self.ids, dtype=np.int64 if self.id_kind == "int" else object)


@dataclass
class _Batch:
    """One batch's per-sample values on the host (numpy, float64 unless noted)."""

    last: np.ndarray  # (B, L) in _LAST order (last_weight / last_step filled in by the caller)
    logit_margin: np.ndarray  # (B,)
    correct: np.ndarray | None  # (B,) bool; None for regression
    inv: np.ndarray  # (B,) 1/|z_b|, 0 for a zero or non-finite gradient (which casts no vote)


# -------------------------------------------------------------------------------------------- the miner
class OnlineMiner:
    """Per-sample weights for the current batch and a manifest accumulated across epochs, from one forward.

    Args:
        model: the ``nn.Module`` being trained. Nothing is attached to it (see the module docstring).
        layers: names/globs of modules or parameters whose per-sample gradients are projected
            (``"classifier"``, ``"fc2"``, ``"layers.*.mlp.*"``); ``None`` = every trainable parameter. Every
            selected parameter must belong to an ``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding`` or
            ``nn.LayerNorm`` (the factored layer rules); select the output layer alone for the analytic path.
        num_classes: number of classes (classification). ``None``: taken from the output width of the first
            batch. Ignored for regression.
        dim: projection size per weight matrix (``(a, b) = kron_factors(dim)``), as in ``GradientExtractor``.
        seed: projection seed (same matrices as an offline scan with the same layers/dim/seed).
        loss_fn: ``"cross_entropy"``, ``"mse"``, ``None``/``"auto"`` (by target dtype) or a callable
            ``loss_fn(output, target) -> (B,)`` that does not mix samples (then the autograd path is used).
        kind: ``"rademacher"`` or ``"gaussian"`` projection entries.
        weighting: a :class:`WeightingConfig` (or a dict of its fields).
        keep_gradients: also keep each sample's last projected gradient (``N x out_dim`` float32), returned
            by :meth:`gradients`. Off by default: the miner's memory stays ``O(N)`` scalars.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: str | Sequence[str] | None = None,
        num_classes: int | None = None,
        dim: int = 256,
        seed: int = 0,
        loss_fn: str | LossFn | None = None,
        kind: ProjectionKind | str = ProjectionKind.RADEMACHER,
        weighting: WeightingConfig | Mapping[str, Any] | None = None,
        keep_gradients: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if num_classes is not None and (
            not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or num_classes < 1
        ):
            raise ValueError(f"num_classes={num_classes!r} must be a positive integer or None.")
        if loss_fn is not None and not callable(loss_fn):
            resolve_loss(loss_fn, torch.zeros(1, dtype=torch.long))  # reject unknown loss names now
        if weighting is None:
            weighting = WeightingConfig()
        elif isinstance(weighting, Mapping):
            weighting = WeightingConfig.from_dict(weighting)
        elif not isinstance(weighting, WeightingConfig):
            raise ValueError(
                "weighting must be a hardmine.WeightingConfig or a dict of its fields, got "
                f"{type(weighting).__name__}."
            )
        if not isinstance(keep_gradients, bool):
            raise ValueError(f"keep_gradients={keep_gradients!r} must be True or False.")
        self.model = model
        self.layers = layers
        self.loss_fn = loss_fn
        self.weighting = weighting
        self.param_names = select_parameters(model, layers)
        self.layout = ProjectionLayout(model, self.param_names, dim=dim, seed=seed, kind=kind)
        units, rejected = plan_factored(model, self.param_names)
        if rejected:
            raise ValueError(
                f"the online miner cannot project {format_rejected(rejected)}. Select layers with a factored "
                "rule (nn.Linear, nn.Conv2d, nn.Embedding, nn.LayerNorm), e.g. layers='classifier'."
            )
        self._units: dict[str, FactoredUnit] = units
        self._num_classes: int | None = int(num_classes) if num_classes is not None else None
        self._task: TaskKind | None = None
        self._step = 0
        self._probed = False
        self._protect: set[str] = set()
        self._capturing = False
        self._pending: Captured | None = None
        self._closed = False
        self._warned_bn = False
        self._dirs: torch.Tensor | None = None  # (R, D) EMA directions: one per class, then the global one
        self._seen: np.ndarray | None = None  # (R,) bool: the direction has been formed
        self._memo: dict[Any, Any] = {}  # per-unit matrices, looked up once (see RuleRunner)
        self._neg: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}
        self._dyn = _Dynamics(self.layout.out_dim if keep_gradients else None)
        logger.info(
            "OnlineMiner: layers %s, out_dim %d, weighting %s",
            self.param_names,
            self.out_dim,
            weighting.to_dict(),
        )

    # ------------------------------------------------------------------------------------ properties
    @property
    def out_dim(self) -> int:
        return self.layout.out_dim

    @property
    def step(self) -> int:
        """Observations so far."""
        return self._step

    @property
    def n_samples(self) -> int:
        """Distinct sample ids observed so far."""
        return self._dyn.n

    @property
    def task(self) -> TaskKind | None:
        return self._task

    @property
    def num_classes(self) -> int | None:
        return self._num_classes

    def __repr__(self) -> str:
        return (
            f"OnlineMiner(layers={self.param_names}, out_dim={self.out_dim}, step={self._step}, "
            f"samples={self.n_samples})"
        )

    def __enter__(self) -> OnlineMiner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop references to captured activations; the miner refuses further observations. Idempotent."""
        self._pending = None
        self._closed = True

    # --------------------------------------------------------------------------------------- capture
    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Hooks on the selected modules for the forward run inside the block; removed on exit (``finally``).

        Use it when a framework runs the forward: ``with miner.capture(): out = model(x)`` then
        ``miner.observe_output(out, y, ids)``.
        """
        self._check_open()
        if self._capturing:
            raise ValueError("miner.capture() is already open; run one forward per capture block.")
        self._pending = None
        self._capturing = True
        # Until the first observation has shown which outputs the model modifies in place, every module
        # hands the model a clone of its output (see check_calls).
        clone = self._protect if self._probed else set(self._units)
        try:
            with capture_calls(self._units, clone) as rec:
                yield
        finally:
            self._capturing = False
        self._pending = rec

    def observe(self, inputs: Any, target: torch.Tensor, ids: Any = None) -> OnlineStats:
        """Run the model once on ``inputs`` and return the batch's :class:`OnlineStats`.

        Args:
            inputs: a tensor, a tuple of tensors (positional arguments) or a mapping (keyword arguments).
            target: ``(B,)`` integer class ids (classification) or float targets (regression).
            ids: one sample id per row (ints or strings; e.g. dataset indices). ``None``: no per-sample
                dynamics are recorded (weights only).
        """
        self._check_open()
        with self.capture():
            raw = call_model(self.model, inputs)
        return self.observe_output(raw, target, ids)

    def observe_output(self, output: Any, target: torch.Tensor, ids: Any = None) -> OnlineStats:
        """Stats for a forward already run inside ``with miner.capture():``. ``output`` is the model's return
        value (a tensor, an object/mapping with ``logits``, or a tuple whose first element is the output)."""
        self._check_open()
        if self._capturing:
            raise ValueError("call observe_output after the `with miner.capture():` block has closed.")
        rec, self._pending = self._pending, None
        if rec is None:
            raise ValueError(
                "no captured forward: run the model inside `with miner.capture():` first (or use observe())."
            )
        out = model_output_tensor(output)
        fn, kind, task, b = self._validate(out, target)
        id_list = None if ids is None else _id_list(ids, b)
        return self._compute_observe(rec, out, target, fn, kind, task, b, id_list)

    # ----------------------------------------------------------------------------------- validation
    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this OnlineMiner is closed; create a new one (or load_state_dict into one).")

    def _validate(self, out: torch.Tensor, target: Any) -> tuple[LossFn, LossKind | None, TaskKind, int]:
        if not isinstance(target, torch.Tensor):
            raise ValueError(
                f"target is a {type(target).__name__}, not a torch.Tensor; convert it with torch.as_tensor."
            )
        if not torch.is_floating_point(out):
            raise ValueError(
                f"the model output has dtype {out.dtype}; return logits/scores, not predicted ids."
            )
        if out.ndim == 0 or target.ndim == 0:
            raise ValueError("the output and the target need a leading batch dimension.")
        b = int(out.shape[0])
        if b == 0 or int(target.shape[0]) != b:
            raise ValueError(
                f"the output has {b} rows but the target {int(target.shape[0])}; they must match (> 0)."
            )
        fn, kind = resolve_loss(self.loss_fn, target)
        if kind is LossKind.CROSS_ENTROPY:
            task = TaskKind.CLASSIFICATION
        elif kind is LossKind.MSE:
            task = TaskKind.REGRESSION
        else:
            is_class = not torch.is_floating_point(target) and target.ndim == 1 and out.ndim == 2
            task = TaskKind.CLASSIFICATION if is_class else TaskKind.REGRESSION
        if self._task is not None and task is not self._task:
            raise ValueError(
                f"this miner has seen {self._task.value} batches; this batch looks like {task.value} (target "
                f"dtype {target.dtype}). Use one miner per task."
            )
        if task is TaskKind.CLASSIFICATION:
            if torch.is_floating_point(target) or target.dtype == torch.bool or target.ndim != 1:
                raise ValueError(
                    f"classification targets must be 1-D integer class ids, got {target.dtype} of shape "
                    f"{tuple(target.shape)}; pass target.long(), or loss_fn='mse' for regression."
                )
            if out.ndim != 2:
                raise ValueError(
                    f"classification needs (B, num_classes) logits, got output shape {tuple(out.shape)}."
                )
            c = int(out.shape[1])
            if self._num_classes is not None and c != self._num_classes:
                raise ValueError(
                    f"the model returned {c} logits per sample but num_classes={self._num_classes}."
                )
            if target.device.type == "cpu":  # NumPy's min/max skip a dispatch and a sync
                t_np = target.numpy()
                lo, hi = int(t_np.min()), int(t_np.max())
            else:
                lo, hi = (int(v) for v in torch.aminmax(target))
            if lo < 0 or hi >= c:
                raise ValueError(
                    f"label {lo if lo < 0 else hi} is out of range for {c} classes (labels must be in [0, "
                    f"{c - 1}])."
                )
        elif kind is LossKind.MSE:
            if not torch.is_floating_point(target):
                raise ValueError(
                    f"regression (mse) targets must be floating point, got dtype {target.dtype}."
                )
            if target.numel() != out.numel():
                raise ValueError(
                    f"mse target shape {tuple(target.shape)} does not match the output shape "
                    f"{tuple(out.shape)}."
                )
        return fn, kind, task, b

    # ------------------------------------------------------------------------------------ the pass
    def _compute_observe(
        self,
        rec: Captured,
        out: torch.Tensor,
        target: torch.Tensor,
        fn: LossFn,
        kind: LossKind | None,
        task: TaskKind,
        b: int,
        id_list: tuple[list[Any], str] | None,
    ) -> OnlineStats:
        self._check_calls(rec, b)
        loss = fn(out, target)
        check_per_sample_loss(loss, b)
        deltas = self._output_deltas(rec, out, target, kind)
        if deltas is None:
            self._check_autograd(loss)
        z = self.layout.new_output(b, out.device)  # (B, out_dim); Kronecker blocks are written in place
        # The factored pass of hardmine.factored with the closed-form output gradient as its input (analytic
        # path), or with autograd's (keeping the graph for the user's backward).
        fg = apply_rules(
            self._units,
            rec,
            loss,
            out,
            self.layout,
            b,
            out=z,
            memo=self._memo,
            deltas=deltas,
            retain_graph=True,
        )
        fg.write_to(z, self.layout)
        sq = fg.sq_norm
        path = PATH_AUTOGRAD if deltas is None else PATH_ANALYTIC
        is_class = task is TaskKind.CLASSIFICATION
        if is_class and self._num_classes is None:
            self._num_classes = int(out.shape[1])
        self._task = task
        z_norm, along = self._projections(z)  # against the directions *before* this batch's update
        host = self._host_batch(out, target, loss, sq, z_norm, along, is_class)
        self._step += 1
        warm = self._step <= self.weighting.warmup_steps or self.weighting.strength == 0
        if warm:
            w = np.ones(b)
        else:
            # A non-finite gradient (NaN loss) counts as agreeing: it gets the smallest raw weight.
            a = np.clip(np.nan_to_num(host.last[:, _L["agreement"]], nan=1.0), -1.0, 1.0)
            w = _solve_weights(
                1.0 + self.weighting.strength * (1.0 - a) / 2.0,
                self.weighting.min_weight,
                self.weighting.max_weight,
            )
        host.last[:, _L["last_weight"]] = w
        host.last[:, _L["last_step"]] = self._step
        self._update_directions(z, target if is_class else None, host)
        if id_list is not None:
            self._record(id_list, host, z, task)
        dev = out.device

        def col(name: str) -> torch.Tensor:
            return torch.from_numpy(host.last[:, _L[name]].copy()).to(dev)

        return OnlineStats(
            loss=loss,
            weights=torch.from_numpy(w).to(device=dev, dtype=loss.dtype),
            output=out,
            z=z,
            grad_norm=sq.clamp_min(0).sqrt(),
            agreement=col("agreement"),
            global_agreement=col("global_agreement"),
            confidence=col("confidence") if is_class else None,
            margin=col("margin") if is_class else None,
            logit_margin=torch.from_numpy(host.logit_margin).to(dev) if is_class else None,
            correct=torch.from_numpy(host.correct).to(dev) if host.correct is not None else None,
            step=self._step,
            warmup=warm,
            path=path,
        )

    def _check_calls(self, rec: Captured, b: int) -> None:
        problems, modified = check_calls(self._units, rec, b)
        for name, why in problems.items():
            unit = self._units[name]
            if not rec[name]:
                why = (
                    "was not called in the captured forward (its weights used through F.* directly, or the "
                    "forward ran outside `miner.capture()`); select layers the forward calls"
                )
                raise ValueError(f"module {unit.label} {why}.")
            raise ValueError(f"module {unit.label}: {why}; the online miner cannot attribute it per sample.")
        # Which outputs does the model modify in place? Learnt on the first pass (every output cloned then),
        # checked on every later pass (only the protected ones are cloned).
        if not self._probed:
            self._protect |= modified
        elif modified - self._protect:
            unit = self._units[sorted(modified - self._protect)[0]]
            raise ValueError(
                f"module {unit.label}: its output was modified in place, which the first batch did not show; "
                "create a new OnlineMiner (the first observation learns which outputs to protect)."
            )
        self._probed = True

    def _output_deltas(
        self, rec: Captured, out: torch.Tensor, target: torch.Tensor, kind: LossKind | None
    ) -> dict[str, list[torch.Tensor]] | None:
        """The closed-form per-sample gradient at the logits, ``{module: [delta]}``, when every selected module
        is the output layer (its output returned unchanged) and the loss is built in; else None (autograd)."""
        analytic = kind is not None and all(
            len(calls) == 1 and calls[0].passed is out and out._version == calls[0].passed_version
            for calls in rec.values()
        )
        if not analytic:
            return None
        with torch.no_grad():
            o = out.detach()
            if kind is LossKind.CROSS_ENTROPY:
                delta = torch.softmax(o, dim=1)  # (B, C): d CE / d logits = softmax - onehot
                delta.scatter_add_(1, target.unsqueeze(1), self._minus_ones(delta))
            else:  # mse_per_sample = mean over the d outputs of (out - y)^2
                d = o[0].numel()
                delta = (o - target.reshape(o.shape).to(o.dtype)).mul_(2.0 / d)  # (B, ...)
        return {name: [delta] for name in self._units}

    def _check_autograd(self, loss: torch.Tensor) -> None:
        if not loss.requires_grad:
            raise ValueError(
                "the per-sample loss does not require grad (observe ran under torch.no_grad() or the "
                "model's parameters are frozen); the selected layers need the autograd path. Call observe "
                "with gradients enabled, or select only the output layer with a built-in loss (analytic "
                "path)."
            )
        self._warn_batchnorm()

    def _minus_ones(self, like: torch.Tensor) -> torch.Tensor:
        """A cached ``(B, 1)`` tensor of -1 (read-only) for the one-hot subtraction."""
        key = (like.shape[0], like.dtype, like.device)
        t = self._neg.get(key)
        if t is None:
            t = self._neg[key] = torch.full((like.shape[0], 1), -1.0, dtype=like.dtype, device=like.device)
        return t

    def _warn_batchnorm(self) -> None:
        if self._warned_bn:
            return
        self._warned_bn = True
        bn = [
            n or "<root>" for n, m in self.model.named_modules() if isinstance(m, _BatchNorm) and m.training
        ]
        if bn:
            logger.warning(
                "BatchNorm module(s) %s are in training mode: a sample's loss then depends on the rest of "
                "the batch, so the per-sample gradients of layers before them include that coupling (an "
                "approximation). Layers after the last BatchNorm are exact.",
                bn,
            )

    # ------------------------------------------------------------------------------------ weighting
    def _ensure_directions(self, d: int, device: torch.device) -> None:
        rows = (self._num_classes or 0) + 1 if self._task is TaskKind.CLASSIFICATION else 1
        if self._dirs is None:
            # Rows 0..C-1: per-class EMA directions; the last row: the global one.
            self._dirs = torch.zeros(rows, d, dtype=torch.float32, device=device)
            self._seen = np.zeros(rows, dtype=bool)
        elif self._dirs.device != device:  # e.g. a state loaded on the CPU, training on a GPU
            self._dirs = self._dirs.to(device)

    def _projections(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(|z_b| (B,), z_b . d_r / |d_r| (B, R))``: everything the cosines need, finished on the host
        (0 for a direction not formed yet)."""
        self._ensure_directions(z.shape[1], z.device)
        assert self._dirs is not None
        norms = torch.linalg.vector_norm(self._dirs, dim=1, keepdim=True).clamp_min(1e-30)  # (R, 1)
        return torch.linalg.vector_norm(z, dim=1), z @ (self._dirs / norms).T  # (B,), (B, R)

    def _update_directions(self, z: torch.Tensor, labels: torch.Tensor | None, host: _Batch) -> None:
        """EMA update of every direction with this batch's mean unit gradients (see the module docstring)."""
        assert self._dirs is not None and self._seen is not None
        r = self._dirs.shape[0]
        voted = host.inv > 0  # (B,)
        counts = np.zeros(r)
        counts[-1] = voted.sum()
        lab = host.last[:, _L["label"]].astype(np.int64) if labels is not None else None
        if lab is not None:
            counts[:-1] = np.bincount(lab[voted], minlength=r - 1)
        present = counts > 0
        beta = float(self.weighting.momentum)
        # Decay per row: 1 (absent: unchanged), 0 (first batch of the row: its mean), momentum otherwise.
        keep = np.where(present, np.where(self._seen, beta, 0.0), 1.0)  # (R,)
        coef = (1.0 - keep) / np.maximum(
            counts, 1.0
        )  # (R,): turns a row's sum of unit vectors into its share
        # Per-sample factors: 1/|z_b| (unit vector) times its row's coefficient; row 0 class, row 1 global.
        zc = z if voted.all() else torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)  # 0 * NaN is NaN
        b = len(host.inv)
        own = host.inv * (coef[lab] if lab is not None else 0.0)  # (B,) factor of each sample's class row
        if r <= _MASK_ROWS:
            # Few rows: one (R, B) @ (B, D) matmul does every row's weighted sum at once.
            mask = np.zeros((r, b), dtype=np.float32)
            if lab is not None:
                mask[lab, np.arange(b)] = own
            mask[-1] = host.inv * coef[-1]
            sums = torch.from_numpy(mask).to(z.device) @ zc  # (R, D)
        else:  # many classes: scatter the class rows, O(B * D) instead of O(R * B * D)
            f = torch.from_numpy(np.stack([own, host.inv * coef[-1]]).astype(np.float32)).to(
                z.device
            )  # (2, B)
            sums = torch.zeros_like(self._dirs)  # (R, D)
            if labels is not None:
                sums.index_add_(0, labels, zc * f[0][:, None])
            sums[-1] = f[1] @ zc
        keep_t = torch.from_numpy(keep.astype(np.float32)).to(z.device)
        self._dirs = torch.addcmul(sums, self._dirs, keep_t[:, None])  # keep * old + (1 - keep) * mean
        self._seen |= present

    # ------------------------------------------------------------------------------------ host side
    def _host_batch(
        self,
        out: torch.Tensor,
        target: torch.Tensor,
        loss: torch.Tensor,
        sq: torch.Tensor,
        z_norm: torch.Tensor,
        along: torch.Tensor,
        is_class: bool,
    ) -> _Batch:
        """Copy what the weights and dynamics need to the host in one transfer and compute the agreement and
        the output statistics there (output statistics with the offline definitions, ``hardmine.score``)."""
        b = out.shape[0]
        r = along.shape[1]
        few = r <= _MASK_ROWS
        if not few:  # many classes: pick each sample's class column on the device, not (B, R) to the host
            along = torch.stack([along.gather(1, target.unsqueeze(1))[:, 0], along[:, -1]], dim=1)  # (B, 2)
        logits = out.detach().reshape(b, -1)  # (B, C) or (B, outputs)
        cols = [loss.detach().unsqueeze(1), sq.unsqueeze(1), z_norm.unsqueeze(1), along, logits]
        host = torch.cat(cols, dim=1).cpu().numpy().astype(np.float64)  # (B, 3 + R' + C): one transfer
        tgt = target.detach().cpu().numpy()
        loss_h, sq_h, norm_h = host[:, 0], host[:, 1], host[:, 2]
        along_h, logits = host[:, 3 : 3 + along.shape[1]], host[:, 3 + along.shape[1] :]
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / norm_h
        inv[~np.isfinite(inv)] = 0.0  # a zero or non-finite gradient: no vote, agreement 0
        rows = np.arange(b)
        own = along_h[rows, tgt] if is_class and few else along_h[:, 0]  # (B,) the sample's class column
        with np.errstate(invalid="ignore"):
            class_a = own * inv
            global_a = along_h[:, -1] * inv
        last = np.full((b, len(_LAST)), np.nan)
        last[:, _L["loss"]] = loss_h
        last[:, _L["grad_norm"]] = np.sqrt(np.maximum(sq_h, 0.0))
        last[:, _L["global_agreement"]] = global_a
        by_class = is_class and self.weighting.by_class
        last[:, _L["agreement"]] = class_a if by_class else global_a
        if not is_class:
            last[:, _L["pred"]] = logits[:, 0] if logits.shape[1] == 1 else np.nan
            t = tgt.reshape(b, -1)  # (B, targets)
            last[:, _L["label"]] = t[:, 0] if t.shape[1] == 1 else np.nan
            return _Batch(last, np.full(b, np.nan), None, inv)
        last[:, _L["class_agreement"]] = class_a
        last[:, _L["label"]] = tgt
        top = logits.max(axis=1)  # (B,)
        lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))  # (B,) log-sum-exp
        x_y = logits[rows, tgt]
        conf = np.exp(x_y - lse)  # p[label]
        pred = logits.argmax(axis=1)  # ties -> lowest class id, as offline
        if logits.shape[1] > 1:
            others = logits.copy()
            others[rows, tgt] = -np.inf
            best_other = others.max(axis=1)
            logit_margin = x_y - best_other
            margin = conf - np.exp(best_other - lse)  # softmax is monotone in the logit
        else:  # a one-output "classifier" has no other class to compare with
            logit_margin = margin = np.full(b, np.nan)
        diff = np.exp(logits - lse[:, None])  # (B, C) softmax
        diff[rows, tgt] -= 1.0
        last[:, _L["confidence"]] = conf
        last[:, _L["pred_confidence"]] = np.exp(top - lse)
        last[:, _L["margin"]] = margin
        last[:, _L["pred"]] = pred
        last[:, _L["el2n"]] = np.linalg.norm(diff, axis=1)  # ||p - onehot||
        return _Batch(last, logit_margin, pred == tgt, inv)

    def _record(self, id_list: tuple[list[Any], str], host: _Batch, z: torch.Tensor, task: TaskKind) -> None:
        slots = self._dyn.slots(*id_list)
        zh = z.cpu().numpy() if self._dyn.grads is not None else None
        if len(set(slots.tolist())) == len(slots):
            self._update(slots, np.arange(len(slots)), host, zh, task)
            return
        # The same id twice in a batch (a sampler with replacement): apply the observations in batch order.
        order = np.argsort(slots, kind="stable")
        s_sorted = slots[order]
        starts = np.r_[True, s_sorted[1:] != s_sorted[:-1]]
        run_start = np.maximum.accumulate(np.where(starts, np.arange(len(slots)), 0))
        occurrence = np.empty(len(slots), dtype=np.int64)
        occurrence[order] = np.arange(len(slots)) - run_start
        for k in range(int(occurrence.max()) + 1):
            pos = np.flatnonzero(occurrence == k)
            self._update(slots[pos], pos, host, zh, task)

    def _update(
        self, s: np.ndarray, pos: np.ndarray, host: _Batch, zh: np.ndarray | None, task: TaskKind
    ) -> None:
        """Apply one observation to each of the distinct slots ``s`` (batch rows ``pos``)."""
        run = self._dyn.run
        n = run["times_seen"][s] + 1
        run["times_seen"][s] = n
        if task is TaskKind.CLASSIFICATION and host.correct is not None:
            x = host.last[pos, _L["confidence"]]
            d = x - run["conf_mean"][s]  # Welford: numerically stable running mean and variance
            mean = run["conf_mean"][s] + d / n
            run["conf_mean"][s] = mean
            run["conf_m2"][s] += d * (x - mean)
            run["aum_sum"][s] += host.logit_margin[pos]
            corr = host.correct[pos]
            run["forgetting"][s] += (run["prev_correct"][s] == 1) & ~corr
            run["prev_correct"][s] = corr
            run["ever_correct"][s] |= corr
        self._dyn.last[s] = host.last[pos]
        if zh is not None and self._dyn.grads is not None:
            self._dyn.grads[s] = zh[pos]

    # ------------------------------------------------------------------------------------ manifest
    def manifest(
        self,
        *,
        weights: Mapping[str, float] | None = None,
        strategy: Strategy | str = Strategy.TOP_K,
        top: float = DEFAULT_TOP,
        boost: float = DEFAULT_BOOST,
        temperature: float = DEFAULT_TEMPERATURE,
        cap: float | None = DEFAULT_CAP,
    ) -> pd.DataFrame:
        """One row per observed sample id (sorted by id): offline manifest columns + training dynamics.

        Args:
            weights: hardness weight per column of ``ONLINE_SCORE_TABLE`` with a direction; default
                ``DEFAULT_ONLINE_WEIGHTS`` (classification) / ``DEFAULT_ONLINE_WEIGHTS_REGRESSION``.
            strategy, top, boost, temperature, cap: the export that fills ``is_hard`` and ``weight``
                (``hardmine.manifest.compute_weights``). ``top-k`` by default here, unlike the offline scan's
                per-class: it is what the quality benchmark measured for "online weighting + MinerSampler
                refreshed per epoch", the best worst-sub-class row on clean labels.

        ``df.attrs["hardmine"]`` holds the metadata :meth:`write_manifest` embeds.
        """
        strategy = parse_choice(Strategy, strategy, "strategy")
        validate_export_params(top, boost, temperature, cap)
        if self._dyn.n == 0:
            raise ValueError(
                "no sample has been observed with ids yet; pass ids to observe() to build a manifest."
            )
        is_class = self._task is TaskKind.CLASSIFICATION
        weights = dict(
            weights
            if weights is not None
            else (DEFAULT_ONLINE_WEIGHTS if is_class else DEFAULT_ONLINE_WEIGHTS_REGRESSION)
        )
        _check_hardness_weights(weights)
        df = self._frame()
        hardness, used = _online_hardness(df, weights)
        if not used:
            raise ValueError(
                f"none of the weighted signals {sorted(weights)} exists for a "
                f"{self._task.value if self._task else ''} miner; weight signals that do (regression: loss, "
                "grad_norm, global_divergence, agreement)."
            )
        df["hardness"] = hardness
        df["rank"] = hardness_rank(hardness)
        w, is_hard = compute_weights(df, strategy, top, boost, temperature, cap)
        df["is_hard"] = pd.array(is_hard, dtype="boolean")
        df["weight"] = w
        export = {
            "strategy": strategy.value,
            "top": top,
            "boost": boost,
            "temperature": temperature,
            "cap": cap,
        }
        df.attrs["hardmine"] = self._metadata(used, export, len(df))
        return df

    def _frame(self) -> pd.DataFrame:
        dyn = self._dyn
        order = np.argsort(dyn.id_array(), kind="stable")
        n = len(order)
        last = dyn.last[: dyn.n][order]  # (N, L)
        run = {k: v[: dyn.n][order] for k, v in dyn.run.items()}

        def col(name: str) -> np.ndarray:
            return last[:, _L[name]].copy()

        is_class = self._task is TaskKind.CLASSIFICATION
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
        flags = flag_scores(
            correct, col("pred_confidence"), col("margin"), ScoreConfig()
        )  # offline thresholds
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

    def _metadata(self, used: dict[str, float], export: dict[str, Any], n: int) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "format_version": FORMAT_VERSION,
            "hardmine_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": "online",
            "task": self._task.value if self._task else None,
            "num_classes": self._num_classes,
            "n_samples": n,
            "steps": self._step,
            "model_fingerprint": model_fingerprint(self.model),
            "model_class": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
            "layers": list(self.param_names),
            "layers_requested": self.layers
            if self.layers is None or isinstance(self.layers, str)
            else list(self.layers),
            "projection": {
                "dim": self.layout.dim,
                "out_dim": self.out_dim,
                "seed": self.layout.seed,
                "kind": self.layout.kind.value,
                "factors": [self.layout.a, self.layout.b],
            },
            "layout": self.layout.describe(),
            "loss": _loss_name(self.loss_fn),
            "weighting": self.weighting.to_dict(),
            "hardness_weights_used": used,
            "scores": {name: s.to_dict() for name, s in ONLINE_SCORE_TABLE.items()},
            "export": export,
        }

    def write_manifest(self, path: str | os.PathLike[str], **kwargs: Any) -> Path:
        """Write :meth:`manifest` (same keyword arguments) to ``path`` atomically as a hardmine manifest."""
        df = self.manifest(**kwargs)
        return write_manifest(df, path, df.attrs["hardmine"])

    def gradients(self) -> tuple[np.ndarray, np.ndarray]:
        """``(sample_ids, Z (N, out_dim) float32)``: each sample's last projected gradient, in manifest order.
        Needs ``keep_gradients=True``."""
        if self._dyn.grads is None:
            raise ValueError("gradients are not kept; create the miner with keep_gradients=True.")
        ids = self._dyn.id_array()
        order = np.argsort(ids, kind="stable")
        return ids[order], self._dyn.grads[: self._dyn.n][order]

    # ---------------------------------------------------------------------------------------- state
    def _config(self) -> dict[str, Any]:
        return {
            "params": list(self.param_names),
            "dim": self.layout.dim,
            "seed": self.layout.seed,
            "kind": self.layout.kind.value,
            "loss": _loss_name(self.loss_fn),
            "keep_gradients": self._dyn.grads is not None,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: directions, step, per-sample dynamics (CPU tensors and plain "
        "values)."""
        dyn = self._dyn
        n = dyn.n
        return {
            "format": STATE_FORMAT,
            "version": _STATE_VERSION,
            "config": self._config(),
            "weighting": self.weighting.to_dict(),
            "task": self._task.value if self._task else None,
            "num_classes": self._num_classes,
            "step": self._step,
            "probed": self._probed,
            "protect": sorted(self._protect),
            "dirs": None if self._dirs is None else self._dirs.detach().cpu().clone(),
            "dirs_seen": None if self._seen is None else torch.from_numpy(self._seen.copy()),
            "id_kind": dyn.id_kind,
            "ids": list(dyn.ids),
            "last": torch.from_numpy(dyn.last[:n].copy()),
            "running": {k: torch.from_numpy(v[:n].copy()) for k, v in dyn.run.items()},
            "gradients": None if dyn.grads is None else torch.from_numpy(dyn.grads[:n].copy()),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` into a miner built with the same layers, dim, seed, kind and loss."""
        self._check_open()
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ValueError("not a hardmine OnlineMiner state (missing format 'hardmine-online-state').")
        if int(state.get("version", 0)) > _STATE_VERSION:
            raise ValueError(
                f"the state has version {state.get('version')}; this hardmine reads version {_STATE_VERSION} "
                "or older. Upgrade hardmine."
            )
        mine, theirs = self._config(), dict(state["config"])
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            text = "; ".join(f"{k}: state {a!r} vs miner {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"the state was saved by a differently configured miner ({text}); build it the same way."
            )
        self.weighting = WeightingConfig.from_dict(state["weighting"])
        self._task = TaskKind(state["task"]) if state["task"] is not None else None
        self._num_classes = state["num_classes"]
        self._step = int(state["step"])
        self._probed = bool(state["probed"])
        self._protect = set(state["protect"])
        self._dirs = None if state["dirs"] is None else state["dirs"].clone()
        self._seen = None if state["dirs_seen"] is None else state["dirs_seen"].numpy().copy()
        dyn = _Dynamics(self.layout.out_dim if self._dyn.grads is not None else None)
        ids = list(state["ids"])
        dyn.id_kind = state["id_kind"]
        dyn.ids = ids
        dyn.slot = {sid: i for i, sid in enumerate(ids)}
        if ids:
            dyn.grow(len(ids))
            dyn.last[: len(ids)] = state["last"].numpy()
            for k in _RUNNING:
                dyn.run[k][: len(ids)] = state["running"][k].numpy()
            if dyn.grads is not None:
                dyn.grads[: len(ids)] = state["gradients"].numpy()
        self._dyn = dyn
        self._pending = None


def _loss_name(loss_fn: Any) -> str:
    if loss_fn is None:
        return LossKind.AUTO.value
    if isinstance(loss_fn, (str, LossKind)):
        return parse_choice(LossKind, loss_fn, "loss").value
    name = getattr(loss_fn, "__qualname__", type(loss_fn).__name__)
    return f"callable:{getattr(loss_fn, '__module__', '?')}.{name}"


def _check_hardness_weights(weights: Mapping[str, float]) -> None:
    allowed = [n for n, info in ONLINE_SCORE_TABLE.items() if info.orientation != 0]
    if not weights:
        raise ValueError(f"hardness weights are empty; give some of {allowed} a weight > 0.")
    for name, w in weights.items():
        if name not in allowed:
            raise ValueError(
                f"hardness weight for {name!r}: not a weightable online score; use some of {allowed}."
            )
        if not _finite_number(w) or w < 0:
            raise ValueError(f"hardness weight {name}={w!r} must be a finite number >= 0.")
    if not any(w > 0 for w in weights.values()):
        raise ValueError(f"hardness weights {dict(weights)!r} are all zero; give one signal a weight > 0.")


def _online_hardness(df: pd.DataFrame, weights: Mapping[str, float]) -> tuple[np.ndarray, dict[str, float]]:
    """``hardmine.score.composite_hardness`` with the orientations of ``ONLINE_SCORE_TABLE``."""
    columns: dict[str, Any] = {name: df[name] for name in weights if name in df}
    if "forgetting_events" in columns:
        # Toneva et al.: a never-learned sample counts as forgotten more often than any learned one.
        f = df["forgetting_events"].to_numpy(dtype=np.float64)
        never = df["never_learned"].to_numpy(dtype=bool, na_value=False)
        top = np.nanmax(f) + 1.0 if np.isfinite(f).any() else 1.0
        columns["forgetting_events"] = np.where(never, top, f)
    return composite_hardness(columns, weights, ONLINE_SCORE_TABLE)


# -------------------------------------------------------------------------------------------- sampler
class MinerSampler(Sampler[int]):
    """Dataset indices ``0..num_samples-1`` drawn by the latest manifest's ``weight``; uniform before that.

    >>> sampler = MinerSampler(len(train_set), seed=0)
    >>> loader = DataLoader(train_set, batch_size=256, sampler=sampler)
    >>> for epoch in range(epochs):
    ...     sampler.set_epoch(epoch)
    ...     for x, y, ids in loader: ...
    ...     sampler.refresh(miner.manifest())     # next epoch oversamples what was hard

    Before the first ``refresh`` each epoch is a seeded permutation (every index once). After it, indices are
    drawn with ``hardmine.ManifestSampler`` (``num_samples`` draws, probability proportional to ``weight``,
    seeded by ``(seed, epoch)``); ids absent from the manifest (not observed yet) get weight 1, the
    manifest's mean weight. Sample ids must be the dataset indices.
    """

    def __init__(self, num_samples: int, *, seed: int = 0, replacement: bool = True) -> None:
        if not isinstance(num_samples, (int, np.integer)) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples={num_samples!r} must be a positive integer (the dataset length).")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed={seed!r} must be a non-negative integer.")
        if not isinstance(replacement, bool):
            raise ValueError(f"replacement={replacement!r} must be True or False.")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.replacement = replacement
        self.epoch = 0
        self.refreshes = 0
        self._weights: np.ndarray | None = None  # (num_samples,) after the first refresh
        self._inner: ManifestSampler | None = None

    def refresh(self, manifest: pd.DataFrame) -> None:
        """Draw from now on by ``manifest``'s ``weight`` (its ``sample_id`` = dataset index)."""
        if not isinstance(manifest, pd.DataFrame) or not {"sample_id", "weight"} <= set(manifest.columns):
            raise ValueError("refresh() needs a manifest DataFrame with 'sample_id' and 'weight' columns.")
        ids = manifest["sample_id"].to_numpy()
        if ids.dtype.kind not in "iu" or (len(ids) and (ids.min() < 0 or ids.max() >= self.num_samples)):
            raise ValueError(
                f"manifest sample ids must be dataset indices in [0, {self.num_samples - 1}] for a "
                "MinerSampler; pass the dataset index as the id to observe()."
            )
        w = np.ones(self.num_samples)
        w[ids.astype(np.int64)] = manifest["weight"].to_numpy(dtype=np.float64)
        self._set_weights(w)
        self.refreshes += 1

    def _set_weights(self, w: np.ndarray) -> None:
        frame = pd.DataFrame({"sample_id": np.arange(self.num_samples), "weight": w})
        self._inner = ManifestSampler(frame, seed=self.seed, replacement=self.replacement)
        self._weights = w

    def state_dict(self) -> dict[str, Any]:
        """The current weights (``None`` before the first refresh), epoch and refresh count."""
        return {
            "num_samples": self.num_samples,
            "seed": self.seed,
            "epoch": self.epoch,
            "refreshes": self.refreshes,
            "weights": None if self._weights is None else torch.from_numpy(self._weights.copy()),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["num_samples"]) != self.num_samples or int(state["seed"]) != self.seed:
            raise ValueError(
                f"the sampler state is for num_samples={state['num_samples']}, seed={state['seed']}; this "
                f"sampler has num_samples={self.num_samples}, seed={self.seed}."
            )
        self.epoch = int(state["epoch"])
        self.refreshes = int(state["refreshes"])
        if state["weights"] is None:
            self._weights, self._inner = None, None
        else:
            self._set_weights(state["weights"].numpy().astype(np.float64))

    def set_epoch(self, epoch: int) -> None:
        if not isinstance(epoch, (int, np.integer)) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch={epoch!r} must be a non-negative integer.")
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        if self._inner is None:
            rng = np.random.default_rng([self.seed, self.epoch])
            return iter(rng.permutation(self.num_samples).tolist())
        self._inner.set_epoch(self.epoch)
        return iter(self._inner)

    def __len__(self) -> int:
        return self.num_samples
