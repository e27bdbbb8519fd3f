"""Training dynamics per sample id, and each batch's per-sample values (computed on the device, recorded on the
host once their asynchronous copy has landed).

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

from ..batches import to_host_async
from ..enums import TaskKind

__all__ = [
    "COL",
    "HOST_STATS_DEVICES",
    "LAST_COLUMNS",
    "RECORD_BYTES",
    "RECORD_EVERY",
    "RUNNING",
    "DeviceBatch",
    "HostBatch",
    "SampleDynamics",
    "device_batch",
    "host_batch",
    "stats_on_host",
    "unpack",
]


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


# Device types whose per-step values are computed with NumPy on the host (host_batch) rather than with tensor
# ops where the batch is (device_batch): on the CPU there is no sync to save, and a few dozen small tensor
# ops cost more than NumPy's. Everything else (CUDA) takes the device path, which never waits for the device.
HOST_STATS_DEVICES: tuple[str, ...] = ("cpu",)


# On a GPU the landed copies of this many steps are recorded together (one NumPy update instead of one per step:
# on a small model the per-step recording cost the host about as much as a tenth of a training step), or sooner
# once they hold RECORD_BYTES. Anything that reads the dynamics records every step first (``poll(wait=True)``).
RECORD_EVERY = 16
RECORD_BYTES = 64 << 20


def stats_on_host(device: torch.device) -> bool:
    """Whether a batch on ``device`` takes the host path (:data:`HOST_STATS_DEVICES`, read at each call)."""
    return device.type in HOST_STATS_DEVICES


@dataclass
class HostBatch:
    """One batch's per-sample values on the host (numpy, float64 unless noted)."""

    last: np.ndarray  # (B, L) in LAST_COLUMNS order (last_weight / last_step filled in by the caller)
    logit_margin: np.ndarray  # (B,)
    correct: np.ndarray | None  # (B,) bool; None for regression
    inv: np.ndarray | None = None  # (B,) 1/|z_b|, 0 for a zero or non-finite gradient (which casts no vote)


@dataclass
class DeviceBatch:
    """One batch's per-sample values on the model's device (float64; float32 where the device has none)."""

    cols: dict[str, torch.Tensor]  # LAST_COLUMNS name -> (B,); absent: NaN (last_weight / last_step: the caller's)
    logit_margin: torch.Tensor | None  # (B,); None for regression
    correct: torch.Tensor | None  # (B,) bool; None for regression
    inv: torch.Tensor  # (B,) 1/|z_b|, 0 for a zero or non-finite gradient (which casts no vote)

    def packed(self, weights: torch.Tensor) -> tuple[torch.Tensor, tuple[str, ...]]:
        """``((B, k) values, their k names)``: the LAST_COLUMNS this batch has (``last_weight`` = ``weights``;
        ``last_step`` is the caller's, filled in on the host, so that a CUDA graph of the step does not freeze
        it), then ``logit_margin`` and ``correct`` (0/1) where classification has them -- stacked by one kernel
        for one copy to the host (:meth:`SampleDynamics.submit`). Only what was computed goes: no column of
        NaN (which would also keep a graph's replays from ever being checked)."""
        dt = self.inv.dtype
        cols = dict(self.cols, last_weight=weights.to(dt))
        names = [name for name in LAST_COLUMNS if name in cols]
        parts = [cols[name] for name in names]
        if self.logit_margin is not None:
            names.append("logit_margin")
            parts.append(self.logit_margin)
        if self.correct is not None:
            names.append("correct")
            parts.append(self.correct.to(dt))
        return torch.stack(parts, dim=1), tuple(names)  # (B, k)


def unpack(values: np.ndarray, names: tuple[str, ...], step: int | np.ndarray) -> HostBatch:
    """The :class:`HostBatch` of :meth:`DeviceBatch.packed`'s values once on the host (``(B, k)``): NaN for every
    column the batch has not, ``last_step`` = ``step`` (one step, or ``(B,)`` steps for the rows of several
    batches stacked)."""
    b = values.shape[0]
    last = np.full((b, len(LAST_COLUMNS)), np.nan)
    got = {name: j for j, name in enumerate(names)}
    for name, j in got.items():
        if name in COL:
            last[:, COL[name]] = values[:, j]
    last[:, COL["last_step"]] = step
    margin = values[:, got["logit_margin"]] if "logit_margin" in got else np.full(b, np.nan)
    correct = values[:, got["correct"]] > 0.5 if "correct" in got else None
    return HostBatch(last, margin, correct)


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
    the output statistics there with NumPy (offline definitions, ``hardmine.score``): the CPU path
    (``HOST_STATS_DEVICES``), where the copy is free and NumPy is cheaper than many small tensor ops.
    :func:`device_batch` computes the same on a GPU without a host sync.

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


def _stats_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def device_batch(
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
) -> DeviceBatch:
    """The agreement and the output statistics of one batch (offline definitions, ``hardmine.score``),
    computed where the batch is: no host sync, so a GPU training step is not stalled by them.

    ``z_norm``, ``along``: from ``Directions.along`` (``gathered``: its ``(B, 2)`` form, the sample's class
    column first); ``by_class``: the agreement that sets the weight is the class one, else the global one;
    ``target``: class ids in range (classification).

    Written for few kernels (each is a launch on a GPU, where a small model's step is bound by them): the
    vectors go through one stack, the softmax statistics come from one ``log_softmax`` and one gather of the
    three probabilities they need, and the columns are stacked for the host by :meth:`DeviceBatch.packed`.
    """
    b = out.shape[0]
    dt = _stats_dtype(out.device)
    vec = torch.stack([loss.detach(), sq.detach(), z_norm.detach()], dim=1).to(dt)  # (B, 3)
    loss_h, sq_h, norm_h = vec.unbind(1)
    # 1/|z|, and 0 for a zero or non-finite gradient: no vote
    inv = torch.nan_to_num(norm_h.reciprocal(), nan=0.0, posinf=0.0, neginf=0.0)  # (B,)
    cos = along.detach().to(dt) * inv[:, None]  # (B, R) or (B, 2): cosines with the direction rows
    tgt = target.detach()
    global_a = cos[:, -1]
    if is_class:
        tgt = tgt.long()
        own = cos[:, 0] if gathered else cos.gather(1, tgt[:, None])[:, 0]  # (B,) own class row
    else:
        own = cos[:, 0]
    by_class = is_class and by_class
    cols = {
        "loss": loss_h,
        "grad_norm": sq_h.clamp_min(0.0).sqrt(),
        "global_agreement": global_a,
        "agreement": own if by_class else global_a.clone(),  # not the same memory as another column
    }
    logits = out.detach().reshape(b, -1).to(dt)  # (B, C) or (B, outputs)
    if not is_class:
        if logits.shape[1] == 1:
            cols["pred"] = logits[:, 0]
        t = tgt.reshape(b, -1)  # (B, targets)
        if t.shape[1] == 1:
            cols["label"] = t[:, 0].to(dt)
        return DeviceBatch(cols, None, None, inv)
    if logits.shape[1] == 1:  # a single-logit binary model: the two-class model [0, z] (losses.class_logits)
        logits = torch.cat([torch.zeros_like(logits), logits], dim=1)  # (B, 2)
    col = tgt[:, None]  # (B, 1) each sample's label column
    pred = logits.argmax(dim=1)  # ties -> lowest class id, as offline
    x_y = logits.gather(1, col)[:, 0]  # (B,)
    best_other, other = logits.scatter(1, col, float("-inf")).max(dim=1)  # (B,) the best other class
    logp = torch.log_softmax(logits, dim=1)  # (B, C)
    p = logp.gather(1, torch.stack([tgt, pred, other], dim=1)).exp()  # (B, 3): p[label], p[pred], p[other]
    conf = p[:, 0]
    # ||p - onehot||: the other classes' probabilities and 1 - p[label]
    diff = logp.exp().scatter(1, col, 0.0)  # (B, C) softmax with the label's entry zeroed
    el2n = torch.linalg.vector_norm(diff, dim=1).hypot(1.0 - conf)
    # No other class can be chosen when every other logit is -inf (masked out): then max() points at column 0,
    # which may be the label's own, and the best other probability is 0.
    p_other = p[:, 2].masked_fill(best_other.isneginf(), 0.0)
    cols.update(
        label=tgt.to(dt),
        class_agreement=own,
        confidence=conf,
        pred_confidence=p[:, 1],
        margin=conf - p_other,  # softmax is monotone in the logit
        pred=pred.to(dt),
        el2n=el2n,
    )
    return DeviceBatch(cols, x_y - best_other, pred == tgt, inv)


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
        # batches submitted and not recorded yet: ((ids, kind), host copies, CUDA event or None, the names of the
        # packed columns, task, the batch's step)
        self._pending: list[tuple[tuple[list[Any], str], list[torch.Tensor], Any, tuple[str, ...], TaskKind, int]] = []
        self._pending_bytes = 0  # host memory the queued copies hold

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

    def check_kind(self, kind: str) -> None:
        if self.id_kind is None:
            self.id_kind = kind
        elif kind != self.id_kind:
            raise ValueError(
                f"sample ids were {self.id_kind}s in earlier batches and are {kind}s now; use one id type."
            )

    def slots(self, ids: list[Any], kind: str) -> np.ndarray:
        self.check_kind(kind)
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

    def submit(
        self,
        id_list: tuple[list[Any] | torch.Tensor, str],
        packed: tuple[torch.Tensor, tuple[str, ...]],
        z: torch.Tensor,
        task: TaskKind,
        step: int,
    ) -> None:
        """Queue one batch's observations: its values (``packed``, :meth:`DeviceBatch.packed`; and ``z`` when
        gradients are kept) start their copy to the host without blocking (pinned memory, from a GPU) and are
        recorded by :meth:`poll` once there. ``id_list``: ``(ids, kind)``, the ids a list or an integer tensor
        (copied with the values); ``step``: the batch's ``last_step``."""
        self.check_kind(id_list[1])  # at once: the error belongs to this batch
        values, names = packed
        parts = [values]  # (B, k): one copy
        if self.grads is not None:
            # z is the caller's OnlineStats.z: a host tensor (no copy to wait for) is copied now, since it is
            # recorded steps later (RECORD_EVERY)
            parts.append(z.clone() if z.device.type == "cpu" else z)
        ids = id_list[0]
        if isinstance(ids, torch.Tensor):
            # A host tensor is kept as it is until the poll: a copy, so the caller may reuse its own
            parts.append(ids.clone() if ids.device.type == "cpu" else ids)
        host, event = to_host_async(parts)
        if isinstance(ids, torch.Tensor):
            host, id_list = host[:-1], (host[-1], id_list[1])
        self._pending.append((id_list, host, event, names, task, step))
        self._pending_bytes += _host_bytes(host)

    def poll(self, wait: bool = False, least: int = 1) -> None:
        """Record the queued batches whose copies have landed (every one with ``wait``), in order; without
        ``wait``, only once ``least`` batches (or ``RECORD_BYTES``) are queued. Consecutive landed batches are
        recorded as one (the same result as one by one: :meth:`record` applies repeated ids in order)."""
        if not wait and len(self._pending) < least and self._pending_bytes < RECORD_BYTES:
            return
        landed = 0
        for _, _, event, *_ in self._pending:
            if event is not None:
                if wait:
                    event.synchronize()
                elif not event.query():
                    break
            landed += 1
        while landed:
            # a run of batches alike (their columns, task and gradients) is stacked into one record; it leaves
            # the queue before it is recorded, so a record that fails loses that run only, never applies one twice
            first = self._pending[0]
            n = 1
            while n < landed and _alike(self._pending[n], first):
                n += 1
            run = self._pending[:n]
            del self._pending[:n]
            landed -= n
            self._pending_bytes -= sum(_host_bytes(item[1]) for item in run)
            ids: list[Any] = []
            for (batch_ids, _), *_ in run:
                # ids that landed with the values: read now, no wait
                ids += batch_ids.numpy().astype(np.int64).tolist() if isinstance(batch_ids, torch.Tensor) else batch_ids
            values = [np.asarray(host[0].numpy(), dtype=np.float64) for _, host, *_ in run]  # (B_i, k) each
            steps = np.repeat([item[5] for item in run], [len(v) for v in values])  # (sum B_i,)
            hb = unpack(np.concatenate(values), first[3], steps if n > 1 else first[5])  # (sum B_i, L)
            zh = np.concatenate([host[1].numpy() for _, host, *_ in run]) if len(first[1]) > 1 else None
            self.record((ids, first[0][1]), hb, zh, first[4])

    def record(
        self, id_list: tuple[list[Any], str], host: HostBatch, zh: np.ndarray | None, task: TaskKind
    ) -> None:
        """Apply one batch's observations (``host``, projected gradients ``zh``) to its sample ids."""
        slots = self.slots(*id_list)
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


def _host_bytes(host: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in host)


def _alike(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Whether two queued batches can be recorded as one: the same packed columns, task and gradient copy."""
    return a[3] == b[3] and a[4] is b[4] and len(a[1]) == len(b[1])
