"""Training dynamics per sample id, and each batch's per-sample values on the host.

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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..enums import TaskKind

__all__ = ["COL", "LAST_COLUMNS", "RUNNING", "HostBatch", "SampleDynamics", "host_batch"]


# Last-seen values per sample, one row per id (float64 matrix, column order below).
LAST_COLUMNS = (
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
COL = {name: i for i, name in enumerate(LAST_COLUMNS)}
# Running statistics per sample: name -> (dtype, fill value for a new id).
RUNNING: dict[str, tuple[Any, Any]] = {
    "times_seen": (np.int64, 0),
    "conf_mean": (np.float64, 0.0),  # Welford running mean of p[label]
    "conf_m2": (np.float64, 0.0),  # Welford sum of squared deviations
    "aum_sum": (np.float64, 0.0),
    "forgetting": (np.int64, 0),
    "prev_correct": (np.int8, -1),  # -1: not observed yet
    "ever_correct": (np.bool_, False),
}


@dataclass
class HostBatch:
    """One batch's per-sample values on the host (numpy, float64 unless noted)."""

    last: np.ndarray  # (B, L) in LAST_COLUMNS order (last_weight / last_step filled in by the caller)
    logit_margin: np.ndarray  # (B,)
    correct: np.ndarray | None  # (B,) bool; None for regression
    inv: np.ndarray  # (B,) 1/|z_b|, 0 for a zero or non-finite gradient (which casts no vote)


def host_batch(
    out: torch.Tensor,
    target: torch.Tensor,
    loss: torch.Tensor,
    sq: torch.Tensor,
    z_norm: torch.Tensor,
    along: torch.Tensor,
    *,
    is_class: bool,
    gathered: bool,
    by_class: bool,
) -> HostBatch:
    """Copy what the weights and dynamics need to the host in one transfer and compute the agreement and
    the output statistics there (output statistics with the offline definitions, ``hardmine.score``).

    ``z_norm``, ``along``: from ``Directions.along`` (``gathered``: its ``(B, 2)`` form, the sample's class
    column first); ``by_class``: the agreement that sets the weight is the class one, else the global one.
    """
    b = out.shape[0]
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
    own = along_h[:, 0] if gathered or not is_class else along_h[rows, tgt]  # (B,) the sample's class column
    with np.errstate(invalid="ignore"):
        class_a = own * inv
        global_a = along_h[:, -1] * inv
    last = np.full((b, len(LAST_COLUMNS)), np.nan)
    last[:, COL["loss"]] = loss_h
    last[:, COL["grad_norm"]] = np.sqrt(np.maximum(sq_h, 0.0))
    last[:, COL["global_agreement"]] = global_a
    by_class = is_class and by_class
    last[:, COL["agreement"]] = class_a if by_class else global_a
    if not is_class:
        last[:, COL["pred"]] = logits[:, 0] if logits.shape[1] == 1 else np.nan
        t = tgt.reshape(b, -1)  # (B, targets)
        last[:, COL["label"]] = t[:, 0] if t.shape[1] == 1 else np.nan
        return HostBatch(last, np.full(b, np.nan), None, inv)
    last[:, COL["class_agreement"]] = class_a
    last[:, COL["label"]] = tgt
    if logits.shape[1] == 1:  # a single-logit binary model: the two-class model [0, z] (losses.class_logits)
        logits = np.concatenate([np.zeros_like(logits), logits], axis=1)  # (B, 2)
    top = logits.max(axis=1)  # (B,)
    lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))  # (B,) log-sum-exp
    x_y = logits[rows, tgt]
    conf = np.exp(x_y - lse)  # p[label]
    pred = logits.argmax(axis=1)  # ties -> lowest class id, as offline
    others = logits.copy()
    others[rows, tgt] = -np.inf
    best_other = others.max(axis=1)
    logit_margin = x_y - best_other
    margin = conf - np.exp(best_other - lse)  # softmax is monotone in the logit
    diff = np.exp(logits - lse[:, None])  # (B, C) softmax
    diff[rows, tgt] -= 1.0
    last[:, COL["confidence"]] = conf
    last[:, COL["pred_confidence"]] = np.exp(top - lse)
    last[:, COL["margin"]] = margin
    last[:, COL["pred"]] = pred
    last[:, COL["el2n"]] = np.linalg.norm(diff, axis=1)  # ||p - onehot||
    return HostBatch(last, logit_margin, pred == tgt, inv)


class SampleDynamics:
    """Growable per-sample arrays keyed by sample id (O(N) scalars)."""

    def __init__(self, keep_dim: int | None) -> None:
        self.ids: list[Any] = []
        self.slot: dict[Any, int] = {}
        self.id_kind: str | None = None
        self.cap = 0
        self.last = np.empty((0, len(LAST_COLUMNS)), dtype=np.float64)  # (cap, L)
        self.run: dict[str, np.ndarray] = {n: np.empty(0, dtype=dt) for n, (dt, _) in RUNNING.items()}
        self.keep_dim = keep_dim
        self.grads = np.empty((0, keep_dim), dtype=np.float32) if keep_dim else None

    @property
    def n(self) -> int:
        return len(self.ids)

    def grow(self, need: int) -> None:
        new_cap = max(need, 2 * self.cap, 1024)
        last = np.full((new_cap, len(LAST_COLUMNS)), np.nan)
        last[: self.cap] = self.last[: self.cap]
        self.last = last
        for name, (dt, fill) in RUNNING.items():
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

    def record(
        self, id_list: tuple[list[Any], str], host: HostBatch, z: torch.Tensor, task: TaskKind
    ) -> None:
        """Apply one batch's observations (``host``, projected gradients ``z``) to its sample ids."""
        slots = self.slots(*id_list)
        zh = z.cpu().numpy() if self.grads is not None else None
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
        self, s: np.ndarray, pos: np.ndarray, host: HostBatch, zh: np.ndarray | None, task: TaskKind
    ) -> None:
        """Apply one observation to each of the distinct slots ``s`` (batch rows ``pos``)."""
        run = self.run
        n = run["times_seen"][s] + 1
        run["times_seen"][s] = n
        if task is TaskKind.CLASSIFICATION and host.correct is not None:
            x = host.last[pos, COL["confidence"]]
            d = x - run["conf_mean"][s]  # Welford: numerically stable running mean and variance
            mean = run["conf_mean"][s] + d / n
            run["conf_mean"][s] = mean
            run["conf_m2"][s] += d * (x - mean)
            run["aum_sum"][s] += host.logit_margin[pos]
            corr = host.correct[pos]
            run["forgetting"][s] += (run["prev_correct"][s] == 1) & ~corr
            run["prev_correct"][s] = corr
            run["ever_correct"][s] |= corr
        self.last[s] = host.last[pos]
        if zh is not None and self.grads is not None:
            self.grads[s] = zh[pos]

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """This object's keys of the miner's state (CPU tensors, plain lists)."""
        n = self.n
        return {
            "id_kind": self.id_kind,
            "ids": list(self.ids),
            "last": torch.from_numpy(self.last[:n].copy()),
            "running": {k: torch.from_numpy(v[:n].copy()) for k, v in self.run.items()},
            "gradients": None if self.grads is None else torch.from_numpy(self.grads[:n].copy()),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], keep_dim: int | None) -> SampleDynamics:
        """The dynamics saved in a miner state (``keep_dim``: the miner's, checked equal by the caller)."""
        dyn = cls(keep_dim)
        ids = list(state["ids"])
        dyn.id_kind = state["id_kind"]
        dyn.ids = ids
        dyn.slot = {sid: i for i, sid in enumerate(ids)}
        if ids:
            dyn.grow(len(ids))
            dyn.last[: len(ids)] = state["last"].numpy()
            for k in RUNNING:
                dyn.run[k][: len(ids)] = state["running"][k].numpy()
            if dyn.grads is not None:
                dyn.grads[: len(ids)] = state["gradients"].numpy()
        return dyn
