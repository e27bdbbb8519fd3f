"""The online weighting: EMA directions of the mean unit gradient and the per-sample training weights.

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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..checks import as_bool, finite_number, is_finite_number, non_negative_int
from ..score import config_from_dict

__all__ = [
    "MASK_ROWS",
    "Directions",
    "WeightingConfig",
    "device_training_weights",
    "directions_along",
    "never_clipped",
    "solve_weights",
    "training_weights",
    "updated_directions",
]

MASK_ROWS = 64  # direction updates by one dense matmul up to this many rows (classes + 1)


@dataclass(frozen=True)
class WeightingConfig:
    """Hyperparameters of the online weighting (formula in the module docstring of
    :mod:`hardmine.online.weighting`).

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
        finite_number(self.strength, "WeightingConfig strength", at_least=0)
        if not is_finite_number(self.momentum) or not (0 <= self.momentum < 1):
            raise ValueError(f"WeightingConfig momentum={self.momentum!r} must be a number in [0, 1).")
        non_negative_int(self.warmup_steps, "WeightingConfig warmup_steps")
        _check_bounds(self.min_weight, self.max_weight, "WeightingConfig ")
        as_bool(self.by_class, "WeightingConfig by_class")

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
    _check_bounds(min_weight, max_weight, "")
    return _solve_weights(r, float(min_weight), float(max_weight))


def _check_bounds(min_weight: Any, max_weight: Any, prefix: str) -> None:
    if not is_finite_number(min_weight) or not (0 < min_weight <= 1):
        raise ValueError(f"{prefix}min_weight={min_weight!r} must be a number in (0, 1].")
    finite_number(max_weight, f"{prefix}max_weight", at_least=1)


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


def training_weights(agreement: np.ndarray, config: WeightingConfig, warm: bool) -> np.ndarray:
    """``(B,)`` float64 weights of mean 1 from the agreements ``a_b`` (all 1 while ``warm``)."""
    if warm:
        return np.ones(len(agreement))
    # A non-finite gradient (NaN loss) counts as agreeing: it gets the smallest raw weight.
    a = np.clip(np.nan_to_num(agreement, nan=1.0), -1.0, 1.0)
    return _solve_weights(1.0 + config.strength * (1.0 - a) / 2.0, config.min_weight, config.max_weight)


def device_training_weights(agreement: torch.Tensor, config: WeightingConfig, warm: bool) -> torch.Tensor:
    """:func:`training_weights` on the agreements' device and dtype, without a host sync (the training step
    needs the weights on the device; reading the agreements on the host would stall it every step)."""
    if warm:
        return torch.ones_like(agreement)
    a = torch.nan_to_num(agreement, nan=1.0).clamp(-1.0, 1.0)
    half = config.strength / 2.0
    raw = a.mul(-half).add_(1.0 + half)  # (B,) 1 + strength * (1 - a) / 2, in two kernels instead of four
    if never_clipped(config):
        # Every raw weight is in [1, 1 + strength], so r_b / mean(r) is in [1 / (1 + strength), 1 + strength]:
        # inside the bounds, the usual solution is the solution, and the ~30 kernels of the general one (sort,
        # breakpoints, selection) are not launched. Decided from the configuration, so no host sync.
        return raw.mul_(raw.shape[0] / raw.sum())
    return _solve_weights_device(raw, float(config.min_weight), float(config.max_weight))


def never_clipped(config: WeightingConfig) -> bool:
    """Whether no weight can reach a bound, whatever the agreements: raw weights run from 1 to ``1 + strength``,
    so after normalisation to mean 1 each lies in ``[1 / (1 + strength), 1 + strength]`` (true of the
    defaults: strength 2, bounds 0.25 and 4)."""
    top = 1.0 + config.strength
    return top <= config.max_weight and 1.0 / top >= config.min_weight


def _solve_weights_device(r: torch.Tensor, min_weight: float, max_weight: float) -> torch.Tensor:
    """:func:`_solve_weights` as tensor operations with no data-dependent branch: both the usual solution
    (no weight at a bound) and the breakpoint solution are computed and the right one selected on the
    device. Breakpoints are not deduplicated (that would need their count on the host): a repeated
    breakpoint repeats its mean, so the first breakpoint reaching mean 1 and the one before it are the same
    as after deduplication."""
    n = r.shape[0]
    w0 = r * (n / r.sum())  # (B,) the usual case
    rs = torch.sort(r).values  # (B,)
    cs = torch.cat([r.new_zeros(1), torch.cumsum(rs, 0)])  # (B + 1,) cs[k] = sum of the k smallest
    bps = torch.sort(torch.cat([min_weight / rs, max_weight / rs])).values  # (2B,) ascending
    k_lo = torch.searchsorted(rs, min_weight / bps, side="left")  # (2B,) count of c*r < min
    k_hi = torch.searchsorted(rs, max_weight / bps, side="right")  # (2B,) count of c*r <= max
    n_lo, n_hi = k_lo.to(r.dtype), k_hi.to(r.dtype)  # (an integer tensor times a float would be float32)
    f = (n_lo * min_weight + (n - n_hi) * max_weight + bps * (cs[k_hi] - cs[k_lo])) / n  # (2B,) mean at bps
    m = bps.shape[0]
    j = torch.searchsorted(f, f.new_ones(1), side="left")  # (1,) first breakpoint with mean >= 1
    # index_select with (1,) indices: indexing with a 0-d tensor would read it on the host (.item())
    hi_i, lo_i = j.clamp(max=m - 1), (j - 1).clamp(min=0)
    lo, hi = bps.index_select(0, lo_i), bps.index_select(0, hi_i)  # (1,)
    f_lo, f_hi = f.index_select(0, lo_i), f.index_select(0, hi_i)  # (1,)
    between = lo + (1.0 - f_lo) * (hi - lo) / (f_hi - f_lo)  # linear between bps[j-1] and bps[j]
    c = torch.where(j >= m, bps[-1:], torch.where((j == 0) | (f_hi == 1.0), hi, between))  # (1,)
    clipped = torch.clamp(c * r, min_weight, max_weight)
    inside = (w0.min() >= min_weight) & (w0.max() <= max_weight)
    return torch.where(inside, w0, clipped)


def directions_along(
    dirs: torch.Tensor, z: torch.Tensor, labels: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(|z_b| (B,), z_b . d_r / |d_r|)`` for the directions ``dirs`` ``(R, D)`` (on ``z``'s device):
    :meth:`Directions.along`."""
    norms = torch.linalg.vector_norm(dirs, dim=1, keepdim=True).clamp_min(1e-30)  # (R, 1)
    along = z @ (dirs / norms).T  # (B, R)
    if dirs.shape[0] > MASK_ROWS and labels is not None:
        along = torch.stack([along.gather(1, labels.unsqueeze(1))[:, 0], along[:, -1]], dim=1)  # (B, 2)
    return torch.linalg.vector_norm(z, dim=1), along


def updated_directions(
    dirs: torch.Tensor,
    seen: torch.Tensor,
    z: torch.Tensor,
    labels: torch.Tensor | None,
    inv: torch.Tensor,
    momentum: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dirs, seen)`` after the EMA update of every row with this batch's mean unit gradients (see the module
    docstring), on the device (no host sync), as new tensors: the inputs are not changed (so a CUDA graph of a
    step can hold it, ``hardmine.online.device_step``).

    ``dirs`` ``(R, D)`` float32, ``seen`` ``(R,)`` bool; ``labels``: the class ids on the device (``None`` for
    regression); ``inv``: ``(B,)`` ``1/|z_b|``, 0 for a sample that casts no vote (zero or non-finite
    gradient)."""
    r, b = dirs.shape[0], z.shape[0]
    dt = inv.dtype
    voted = inv.sign()  # (B,) 1 for a voting sample, 0 otherwise (inv is 0 exactly for a non-voter)
    if r <= MASK_ROWS:
        # Few rows: the (R, B) membership matrix (each sample's class row and the global row) gives the
        # voter counts by one matrix-vector product and, scaled, every row's weighted sum by one matmul.
        member = torch.zeros(r, b, dtype=dt, device=z.device)  # (R, B)
        if labels is not None:
            member.scatter_(0, labels[None, :], 1.0)
        member[-1].fill_(1.0)
        counts = member.mv(voted)  # (R,) voters per row
    else:
        counts = torch.zeros(r, dtype=dt, device=z.device)  # (R,) voters per row
        counts[-1] = voted.sum()
        if labels is not None:
            counts[:-1].index_add_(0, labels, voted)
    present = counts > 0
    # Decay per row: 1 (absent: unchanged), 0 (first batch of the row: its mean), momentum otherwise.
    keep = torch.where(present, seen.to(dt) * float(momentum), 1.0)  # (R,)
    coef = (1.0 - keep) / counts.clamp_min(1.0)  # (R,): turns a row's sum of unit vectors into its share
    # Per-sample factors: 1/|z_b| (unit vector) times its row's coefficient.
    # A zero factor times a NaN row is NaN: non-voting rows are zeroed (finite rows are left as they are).
    zc = torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)
    if r <= MASK_ROWS:
        sums = (member * coef[:, None] * inv).to(torch.float32) @ zc  # (R, B) @ (B, D) -> (R, D)
    else:  # many classes: scatter the class rows, O(B * D) instead of O(R * B * D)
        sums = torch.zeros_like(dirs)  # (R, D)
        if labels is not None:
            own = inv * coef[labels]  # (B,) factor of each sample's class row
            sums.index_add_(0, labels, zc * own.to(torch.float32)[:, None])
        sums[-1] = (inv * coef[-1]).to(torch.float32) @ zc
    return torch.addcmul(sums, dirs, keep.to(torch.float32)[:, None]), seen | present  # keep*old + (1-keep)*mean


class Directions:
    """EMA directions of the mean unit gradient: rows ``0..C-1`` per class, the last row over all samples.

    Created (:meth:`new`) once the task and the class count are known.
    """

    def __init__(self, dirs: torch.Tensor, seen: torch.Tensor) -> None:
        self.dirs = dirs  # (R, D) float32
        self.seen = seen  # (R,) bool, on the device of dirs: the row has been formed

    @classmethod
    def new(cls, num_classes: int | None, dim: int, device: torch.device | str = "cpu") -> Directions:
        """Zero directions: ``num_classes`` rows plus the global one (``None``: the global row only)."""
        rows = num_classes + 1 if num_classes is not None else 1
        dirs = torch.zeros(rows, dim, dtype=torch.float32, device=device)
        return cls(dirs, torch.zeros(rows, dtype=torch.bool, device=device))

    @property
    def rows(self) -> int:
        return self.dirs.shape[0]

    @property
    def gathers(self) -> bool:
        """Whether :meth:`along` picks each sample's class column on the device (many classes) instead of
        returning every row's column."""
        return self.rows > MASK_ROWS

    def along(self, z: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(|z_b| (B,), z_b . d_r / |d_r|)``: everything the cosines need, finished on the host (0 for a row
        not formed yet). The second is ``(B, R)``, or ``(B, 2)`` (the sample's class row, the global row)
        when :attr:`gathers`, so that a ``(B, R)`` matrix never goes to the host for many classes."""
        self.move_to(z.device)
        return directions_along(self.dirs, z, labels)

    def move_to(self, device: torch.device) -> None:
        """Move the directions to ``device`` (e.g. a state loaded on the CPU, training on a GPU)."""
        if self.dirs.device != device:
            self.dirs, self.seen = self.dirs.to(device), self.seen.to(device)

    def update_host(
        self,
        z: torch.Tensor,
        labels: torch.Tensor | None,
        lab: np.ndarray | None,
        inv: np.ndarray,
        momentum: float,
    ) -> None:
        """:func:`updated_directions` with the per-row bookkeeping in NumPy (the CPU path, ``HOST_STATS_DEVICES``).

        ``labels`` / ``lab``: the class ids on the device / host (``None`` for regression); ``inv``: ``(B,)``
        ``1/|z_b|``, 0 for a sample that casts no vote (zero or non-finite gradient)."""
        r = self.rows
        voted = inv > 0  # (B,)
        counts = np.zeros(r)
        counts[-1] = voted.sum()
        if lab is not None:
            counts[:-1] = np.bincount(lab[voted], minlength=r - 1)
        present = counts > 0
        # Decay per row: 1 (absent: unchanged), 0 (first batch of the row: its mean), momentum otherwise.
        seen = self.seen.cpu().numpy()  # a CPU tensor on this path: no copy
        keep = np.where(present, np.where(seen, float(momentum), 0.0), 1.0)  # (R,)
        coef = (1.0 - keep) / np.maximum(
            counts, 1.0
        )  # (R,): turns a row's sum of unit vectors into its share
        # Per-sample factors: 1/|z_b| (unit vector) times its row's coefficient; row 0 class, row 1 global.
        zc = z if voted.all() else torch.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)  # 0 * NaN is NaN
        b = len(inv)
        own = inv * (coef[lab] if lab is not None else 0.0)  # (B,) factor of each sample's class row
        if r <= MASK_ROWS:
            # Few rows: one (R, B) @ (B, D) matmul does every row's weighted sum at once.
            mask = np.zeros((r, b), dtype=np.float32)
            if lab is not None:
                mask[lab, np.arange(b)] = own
            mask[-1] = inv * coef[-1]
            sums = torch.from_numpy(mask).to(z.device) @ zc  # (R, D)
        else:  # many classes: scatter the class rows, O(B * D) instead of O(R * B * D)
            f = torch.from_numpy(np.stack([own, inv * coef[-1]]).astype(np.float32)).to(z.device)  # (2, B)
            sums = torch.zeros_like(self.dirs)  # (R, D)
            if labels is not None:
                sums.index_add_(0, labels, zc * f[0][:, None])
            sums[-1] = f[1] @ zc
        keep_t = torch.from_numpy(keep.astype(np.float32)).to(z.device)
        self.dirs = torch.addcmul(sums, self.dirs, keep_t[:, None])  # keep * old + (1 - keep) * mean
        self.seen = self.seen | torch.from_numpy(present).to(self.seen.device)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """This object's keys of the miner's state (CPU tensors)."""
        return {"dirs": self.dirs.detach().cpu().clone(), "dirs_seen": self.seen.detach().cpu().clone()}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Directions | None:
        """The directions saved in a miner state, or None when it had none yet (no observation)."""
        if state["dirs"] is None:
            return None
        return cls(state["dirs"].clone(), torch.as_tensor(state["dirs_seen"], dtype=torch.bool).clone())
