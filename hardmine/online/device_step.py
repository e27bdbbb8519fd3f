"""The online miner's step where the batch is (a GPU; ``dynamics.HOST_STATS_DEVICES`` keeps the CPU on NumPy):
everything after the user's forward, the per-sample loss and (autograd path) the gradients at the selected
outputs -- the projections, the agreement and output statistics, the weights, the EMA directions' update
and the values the dynamics record -- as one pure function of tensors (:class:`DeviceStep`).

A small model's step on a GPU is bound by the host: this part is about a hundred small kernels, and Python and
the dispatcher take longer to issue them than the GPU takes to run them (measured on an H200:
``docs/benchmarks.md``). With ``OnlineMiner(cuda_graphs=True)`` the function is replayed from a CUDA graph
(:class:`hardmine.factored.graphs.PassGraphs`, as the offline extractor's pass): the step's tensors are
copied into static inputs, one launch runs every kernel, and the results are cloned out. Nothing else
changes: a graph is captured only past the warm-up (the weights are then no longer all 1), after two eager
steps of one signature (the batch's shapes and dtypes, the task, the loss, the weighting and the numerics
settings); the first replay on another step is compared with the eager function; a failure or a difference
switches graphs off with one warning; a change of the selected modules' tensors or hooks captures again.
What a graph would freeze beyond that is Python-side state of the selected modules' rules (e.g. a norm's
``eps``), read at capture.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch

from ..batches import detached, labels_outside
from ..enums import LossKind, TaskKind
from ..factored.graphs import PlanGraphs, batch_signature, module_state
from ..factored.registry import GramCache
from .dynamics import device_batch
from .gradients import Prepared, StepGradients
from .weighting import (
    MASK_ROWS,
    Directions,
    WeightingConfig,
    device_training_weights,
    directions_along,
    updated_directions,
)

__all__ = ["SHOWN", "DeviceStep", "StepValues"]

# The per-sample columns OnlineStats shows besides the weights, in the order of StepValues.shown's columns
# (classification; regression has the first two).
SHOWN = ("agreement", "global_agreement", "confidence", "margin", "logit_margin")


@dataclass
class StepValues:
    """What one step computes on the device (every tensor its own: a replay's outputs are cloned)."""

    z: torch.Tensor  # (B, out_dim) float32 projected per-sample gradients
    grad_norm: torch.Tensor  # (B,) exact gradient norm
    weights: torch.Tensor  # (B,) training weights, in the loss's dtype
    packed: tuple[torch.Tensor, tuple[str, ...]]  # what the dynamics record: DeviceBatch.packed
    shown: torch.Tensor  # (B, 5) or (B, 2): the SHOWN columns (float64; float32 where the device has none)
    correct: torch.Tensor | None  # (B,) bool; None for regression
    dirs: torch.Tensor  # (R, D) the updated EMA directions
    seen: torch.Tensor  # (R,) bool
    label_flag: torch.Tensor | None  # () bool: some given label was outside the classes; None unless given

    def columns(self) -> dict[str, torch.Tensor]:
        """The SHOWN columns by name, each a ``(B,)`` view of ``shown`` (one ``unbind``, not a slice each)."""
        return dict(zip(SHOWN, self.shown.unbind(1)))


class DeviceStep:
    """Runs the step's device part (module docstring), eagerly or from CUDA graphs (``cuda_graphs``)."""

    def __init__(self, grads: StepGradients, cuda_graphs: bool) -> None:
        self.grads = grads
        self.graphs = PlanGraphs(cuda_graphs, "the online miner's step")  # .backend: a stand-in in tests
        self._names: dict[Hashable, tuple[str, ...]] = {}  # graph key -> the names of its packed columns

    def state(self) -> dict[str, Any]:
        """What ``cuda_graphs`` did: asked for, graphs captured and replayed, and why they are off (if so)."""
        return self.graphs.state()

    def on_host(self, device: torch.device) -> None:
        """A step ran on the host's path (NumPy, ``dynamics.HOST_STATS_DEVICES``): no graph there."""
        self.graphs.for_plan(("host", device), device, lambda: "the step runs on the host (NumPy)")

    def __call__(
        self,
        prep: Prepared,
        out: torch.Tensor,
        target: torch.Tensor,
        kind: LossKind | None,
        task: TaskKind,
        dirs: Directions,
        weighting: WeightingConfig,
        warm: bool,
        given: torch.Tensor | None = None,
    ) -> StepValues:
        """The step's values from its checked forward (``prep``), the output, the target the loss was computed
        on, the directions before this step and the weighting. A classifier's labels are checked here, without
        a sync: ``target`` holds them clamped into range (``batches.label_flag``), ``given`` as the batch gave
        them, and the step says whether any differs (``StepValues.label_flag``)."""
        is_class = task is TaskKind.CLASSIFICATION
        dirs.move_to(out.device)
        # The inputs several modules read (q, k and v of one tensor) go in once, so they still share one Gram.
        unique: dict[Any, int] = {}
        xs: list[torch.Tensor] = []
        x_map: list[tuple[str, tuple[int, ...]]] = []
        for name, calls in prep.inputs.items():
            idx = []
            for x in calls:
                key = GramCache.key(x)
                if key not in unique:
                    unique[key] = len(xs)
                    xs.append(x)
                idx.append(unique[key])
            x_map.append((name, tuple(idx)))
        grads: list[torch.Tensor] = []
        g_map: tuple[tuple[str, tuple[int, ...]], ...] | None = None
        if prep.received is not None:
            g_map = tuple((name, tuple(sorted(got))) for name, got in prep.received.items())
            grads = [prep.received[name][i] for name, calls in g_map for i in calls]
        # A causal LM's logits are read for their dtype, device and batch size only (no output statistics, and
        # never the analytic path): an empty slice stands in, so a graph does not copy (B, T, vocab) per step.
        o = out.detach()[:, :0] if task is TaskKind.CAUSAL_LM else out.detach()
        given_leaf = [] if given is None else [detached(given)]
        leaves = [*xs, *grads, o, detached(target), *given_leaf, prep.loss.detach(), dirs.dirs, dirs.seen]
        loss_dtype = prep.loss.dtype
        n_x, n_g = len(xs), len(grads)

        def fn(ls: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
            x_in, g_in = ls[:n_x], ls[n_x : n_x + n_g]
            o, tgt, *given_in, loss, d, s = ls[n_x + n_g :]
            inputs = {name: [x_in[i] for i in idx] for name, idx in x_map}
            received = None
            if g_map is not None:
                it = iter(g_in)
                received = {name: {i: next(it) for i in calls} for name, calls in g_map}
            res, names = _step(
                self.grads, inputs, received, o, tgt, loss, d, s, kind, task, weighting, warm, loss_dtype,
                given_in[0] if given_in else None,
            )
            ran.append(names)
            return res

        ran: list[tuple[str, ...]] = []  # the packed columns' names, from each run of fn (none when replayed)
        # Asked every step, so what cuda_graph_state() says follows the device; used past the warm-up only
        ready = self.graphs.for_plan(out.device, out.device, self._do_not_apply)
        graphs = None if warm else ready
        key = None
        if graphs is None:
            res = fn(leaves)
        else:
            settings = self.graphs.numerics(out.device.type)
            structure = (tuple(x_map), g_map, kind, task, weighting, loss_dtype, settings)
            key = batch_signature(leaves, structure) if settings is not None else None
            res = graphs(fn, leaves, key, self._state())
        if ran:
            names = ran[-1]
            if key is not None:
                self._names[key] = names  # the same for every step of the key: what its replays return
        else:
            names = self._names[key]
        return _values(res, names, is_class)

    def _do_not_apply(self) -> str | None:
        if self.grads.layout.uncached_dense()[0]:
            return "some projection matrices are regenerated per step (past the projector's cache)"
        return None

    def _state(self) -> Hashable:
        """What a graph of the step reads besides its inputs: the selected modules' tensors and hooks (a rule
        may read its module: the RMSNorm rule runs the module's own forward)."""
        return module_state(unit.module for unit in self.grads.units.values())


def _values(res: tuple[torch.Tensor, ...], names: tuple[str, ...], is_class: bool) -> StepValues:
    z, grad_norm, w, packed, shown, new_dirs, new_seen, *rest = res
    correct = rest.pop(0) if is_class else None
    flag = rest[0] if rest else None  # the label flag, where the labels as given went in
    return StepValues(z, grad_norm, w, (packed, names), shown, correct, new_dirs, new_seen, flag)


def _step(
    grads: StepGradients,
    inputs: dict[str, list[torch.Tensor]],
    received: dict[str, dict[int, torch.Tensor]] | None,
    o: torch.Tensor,
    tgt: torch.Tensor,
    loss: torch.Tensor,
    dirs: torch.Tensor,
    seen: torch.Tensor,
    kind: LossKind | None,
    task: TaskKind,
    weighting: WeightingConfig,
    warm: bool,
    loss_dtype: torch.dtype,
    given: torch.Tensor | None,
) -> tuple[tuple[torch.Tensor, ...], tuple[str, ...]]:
    """The step's device part as a pure function (nothing read or written besides its arguments, the rules'
    matrices and the modules the rules read): ``((z, grad_norm, weights, packed, shown, dirs, seen[, correct,
    label flag]), the names of packed's columns)``; the label flag only where ``given`` is."""
    b = o.shape[0]
    is_class = task is TaskKind.CLASSIFICATION
    with torch.no_grad():
        # The labels' range check (batches.label_flag) finished inside the step, so a graph runs it
        flag = None if given is None else labels_outside(tgt, given)
        z, sq = grads.project(inputs, received, o, tgt, kind, b)
        labels = tgt if is_class else None
        z_norm, along = directions_along(dirs, z, labels)  # against the directions *before* this update
        # A causal LM has no per-sample output statistics here (its logits are (B, T, V)): no output column,
        # so pred and label stay NaN as for a multi-output regression.
        stats_out = o.new_empty((b, 0)) if task is TaskKind.CAUSAL_LM else o
        batch = device_batch(
            stats_out, tgt, loss, sq, z_norm, along,
            is_class=is_class, gathered=dirs.shape[0] > MASK_ROWS, by_class=weighting.by_class,
        )
        w = device_training_weights(batch.cols["agreement"], weighting, warm)  # (B,)
        new_dirs, new_seen = updated_directions(dirs, seen, z, labels, batch.inv, weighting.momentum)
        packed, names = batch.packed(w)  # last_step is filled in on the host: a graph must not freeze it
        cols = dict(batch.cols, logit_margin=batch.logit_margin)
        shown = torch.stack([cols[n] for n in (SHOWN if is_class else SHOWN[:2])], dim=1)  # (B, 5) or (B, 2)
        res = (z, sq.clamp_min(0).sqrt(), w.to(loss_dtype), packed, shown, new_dirs, new_seen)
        if batch.correct is not None:
            res = (*res, batch.correct)
        return ((*res, flag) if flag is not None else res), names
