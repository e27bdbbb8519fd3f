"""The online miner's per-step gradient pass: the factored pass of :mod:`hardmine.factored` on the training
step's own forward.

:class:`StepGradients` holds the factored units of the selected layers and captures one forward at a time
(``capture()``, then ``take()``); ``prepare`` checks the captured calls, computes the per-sample loss and, on
the autograd path, the per-sample gradients at the selected outputs (keeping the graph for the user's
backward); ``project`` -- tensor work only, so a CUDA graph can hold it (:mod:`.device_step`) -- takes those, or
the closed-form gradient at the logits when every selected module is the output layer (the analytic path), to
:func:`hardmine.factored.capture.apply_rules`, the rule application every factored pass shares.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..batches import detached
from ..enums import LossKind
from ..factored.capture import (
    Captured,
    CapturedCall,
    apply_rules,
    broadcast_problems,
    capture_calls,
    check_calls,
    check_per_sample_loss,
    format_rejected,
    output_gradients,
    plan_factored,
)
from ..factored.layout import ProjectionLayout
from ..factored.plan import FactoredUnit
from ..losses import LossFn

__all__ = ["PATH_ANALYTIC", "PATH_AUTOGRAD", "Prepared", "StepGradients"]

logger = logging.getLogger(__name__)

PATH_ANALYTIC = "analytic"
PATH_AUTOGRAD = "autograd"


@dataclass
class Prepared:
    """One step's forward, checked, as :meth:`StepGradients.project` takes it."""

    loss: torch.Tensor  # (B,) attached to the graph
    inputs: dict[str, list[torch.Tensor]]  # module -> its captured inputs (detached), one per call
    received: dict[str, dict[int, torch.Tensor]] | None  # module -> {call: output gradient}; None: analytic
    path: str  # PATH_ANALYTIC or PATH_AUTOGRAD


class StepGradients:
    """Projected per-sample gradients of ``param_names`` from a forward captured with :meth:`capture`.

    The first observation hands the model a clone of every selected module's output to learn which ones
    the model modifies in place (``nn.ReLU(inplace=True)``); only those are cloned afterwards (``protect``),
    and a module that starts doing so later is a ``ValueError`` rather than a silently wrong gradient.
    """

    def __init__(self, model: nn.Module, param_names: Sequence[str], layout: ProjectionLayout) -> None:
        units, rejected = plan_factored(model, param_names)
        for name in [k for k, unit in units.items() if unit.swaps_parameter]:
            # The offline scan swaps such a parameter for a per-sample copy only after a probe forward has
            # shown the model accepts it; here the forward is the user's training step, which must not fail.
            rejected[name] = (
                f"{units.pop(name).label} is used by the model without a module; only the offline scan "
                "(hardmine.scan / GradientExtractor) handles such parameters"
            )
        if rejected:
            raise ValueError(
                f"the online miner cannot project {format_rejected(rejected)}. Select layers with a factored "
                "rule (nn.Linear, nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.MultiheadAttention, ...: "
                "`hardmine layers` lists them), e.g. layers='classifier'."
            )
        self.model = model
        self.layout = layout
        self.units: dict[str, FactoredUnit] = units
        self.probed = False  # the first observation has shown which outputs are modified in place
        self.protect: set[str] = set()  # modules whose output the model modifies in place
        self._memo: dict[Any, Any] = {}  # per-unit matrices, looked up once (see RuleRunner)
        self._neg: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}
        self._warned_bn = False
        self._open = False  # a capture() block is running
        self._broadcast_checked = False  # some forward had a broadcast call and passed broadcast_problems
        self._captured: Captured | None = None  # the forward captured and not yet taken

    # ------------------------------------------------------------------------------------- capture
    @contextlib.contextmanager
    def capture(self, batch_size: int | None = None) -> Iterator[None]:
        """Hooks on the selected modules for the block (removed on exit); its forward is kept for
        :meth:`take`.

        ``batch_size``: the batch's size, so a module called on an input broadcast over the batch (``(1, ...)``,
        e.g. Hugging Face position embeddings on ``position_ids`` of shape ``(1, T)``) hands the model one
        output row per sample and keeps its per-sample gradients (``hardmine.factored.capture``). ``None``:
        read from the first tensor the model's own forward receives whose first dimension is not 1 (the first
        tensor where all are; a pre-hook on the model); a forward
        that does not go through the model's ``__call__`` is captured without expansion.
        """
        if self._open:
            raise ValueError("miner.capture() is already open; run one forward per capture block.")
        self._captured = None
        self._open = True
        # Until the first observation has shown which outputs the model modifies in place, every module
        # hands the model a clone of its output.
        clone = self.protect if self.probed else set(self.units)
        try:
            if batch_size is not None:
                with capture_calls(self.units, clone, batch_size) as rec:
                    yield
            else:
                with self._capture_sized_by_model(clone) as box:
                    yield
                rec = box[0]
        finally:
            self._open = False
        self._captured = rec

    @contextlib.contextmanager
    def _capture_sized_by_model(self, clone: set[str]) -> Iterator[list[Captured]]:
        """``capture_calls`` whose batch size is read from the model's forward when it starts: the unit hooks
        are registered at once without a size (a forward that bypasses the model's ``__call__`` is still
        captured) and re-registered with the size by a pre-hook on the model, before any unit has run.
        Yields a one-item list holding the live record."""
        hooks = contextlib.ExitStack()
        box = [hooks.enter_context(capture_calls(self.units, clone))]

        def sized(module: nn.Module, args: tuple, kwargs: dict) -> None:
            # the first tensor argument with a batch dimension (HF: input_ids / inputs_embeds / pixel_values),
            # passing over those of one row, which may be broadcast over the batch ((1, T) position_ids)
            sized_by = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.ndim >= 1]
            first = next((v for v in sized_by if v.shape[0] != 1), sized_by[0] if sized_by else None)
            if any(box[0].values()) or first is None:
                return  # units already ran outside the model's forward (keep them), or nothing to size by
            b = int(first.shape[0])
            hooks.close()  # nothing recorded yet: swap for hooks that know the batch size
            box[0] = hooks.enter_context(capture_calls(self.units, clone, b))

        pre = self.model.register_forward_pre_hook(sized, with_kwargs=True)
        try:
            yield box
        finally:
            pre.remove()
            hooks.close()

    def take(self) -> Captured:
        """The forward captured by the last closed :meth:`capture` block (once)."""
        if self._open:
            raise ValueError("call observe_output after the `with miner.capture():` block has closed.")
        rec, self._captured = self._captured, None
        if rec is None:
            raise ValueError(
                "no captured forward: run the model inside `with miner.capture():` first (or use observe())."
            )
        return rec

    def drop(self) -> None:
        """Forget a captured forward (its activations) that was not taken."""
        self._captured = None

    # ----------------------------------------------------------------------------------------- pass
    def prepare(
        self,
        rec: Captured,
        out: torch.Tensor,
        target: torch.Tensor,
        loss_fn: LossFn,
        kind: LossKind | None,
        b: int,
    ) -> Prepared:
        """What :meth:`project` needs from the step's forward: the captured calls checked, the per-sample loss
        (attached) and, on the autograd path, the per-sample gradients at the selected outputs (one
        ``autograd.grad`` that keeps the graph for the user's backward)."""
        self._check_calls(rec, b, out)
        self._check_broadcast(rec, out, b)
        loss = loss_fn(out, target)
        check_per_sample_loss(loss, b)
        inputs = {name: [detached(c.x) for c in calls] for name, calls in rec.items()}
        if self._analytic(rec, out, kind):
            return Prepared(loss, inputs, None, PATH_ANALYTIC)
        self._check_autograd(loss)
        return Prepared(loss, inputs, output_gradients(rec, loss), PATH_AUTOGRAD)

    def project(
        self,
        inputs: Mapping[str, list[torch.Tensor]],
        received: Mapping[str, Mapping[int, torch.Tensor]] | None,
        out: torch.Tensor,
        target: torch.Tensor,
        kind: LossKind | None,
        b: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z (B, out_dim) float32, exact squared norms (B,))`` from each unit's captured inputs and the
        gradients at its outputs (``received``; ``None``: the analytic path, the closed-form gradient at the
        logits ``out`` from ``target``). Tensor work only, no check and no autograd: a CUDA graph can hold it
        (``hardmine.online.device_step``)."""
        if received is None:
            delta = self._delta(out, target, kind)
            received = {name: {0: delta} for name in self.units}
        z = self.layout.new_output(b, out.device)  # (B, out_dim); Kronecker blocks are written in place
        calls = {name: [CapturedCall(x, None, None, None, None) for x in xs] for name, xs in inputs.items()}
        fg = apply_rules(self.units, calls, out, out, self.layout, b, out=z, memo=self._memo, deltas=received)
        fg.write_to(z, self.layout)
        return z, fg.sq_norm

    def _check_calls(self, rec: Captured, b: int, out: torch.Tensor) -> None:
        # After the first observation (which saw every module called), a module the forward skips on a step has
        # a zero gradient for every sample (a branch, an unrouted expert), unless its weights reach the output
        problems, modified = check_calls(self.units, rec, b, later=out if self.probed else None)
        for name, why in problems.items():
            unit = self.units[name]
            if not rec[name]:
                raise ValueError(
                    f"module {unit.label} was not called in the captured forward (its weights used through "
                    "F.* directly, or the forward ran outside `miner.capture()`); select layers the forward "
                    "calls."
                )
            raise ValueError(f"module {unit.label}: {why}; the online miner cannot attribute it per sample.")
        # Learnt on the first pass (every output cloned then), checked on every later pass (only the
        # protected ones are cloned).
        if not self.probed:
            self.protect |= modified
        elif modified - self.protect:
            unit = self.units[sorted(modified - self.protect)[0]]
            raise ValueError(
                f"module {unit.label}: its output was modified in place, which the first batch did not show; "
                "create a new OnlineMiner (the first observation learns which outputs to protect)."
            )
        self.probed = True

    def _check_broadcast(self, rec: Captured, out: torch.Tensor, b: int) -> None:
        """The first forward with calls broadcast over the batch (expanded per sample by the hooks): the model
        must use each expanded row for its own sample only (``broadcast_problems``: one backward from each of
        the first three samples' outputs to the expanded outputs, once per miner). Unlike the offline probe,
        the online pass does not run the model again, so it trusts that a ``(1, ...)`` input is the same for
        any batch (position ids, learned tokens)."""
        if self._broadcast_checked or not any(c.broadcast for calls in rec.values() for c in calls):
            return
        n = min(b, 3)  # a few samples show whether rows are mixed; each costs one backward, on the first step only
        problems = broadcast_problems(out[:n], rec, n)
        for name, why in problems.items():
            raise ValueError(
                f"module {self.units[name].label}: {why}; the online miner cannot attribute it per sample. "
                "Select other layers (layers=...)."
            )
        self._broadcast_checked = True

    def _analytic(self, rec: Captured, out: torch.Tensor, kind: LossKind | None) -> bool:
        """Whether the closed-form gradient at the logits applies: every selected module is the output layer
        (its output returned unchanged) and the loss is built in."""
        # A causal LM's loss is left to autograd: its gradient at the logits is as large as the logits.
        return kind in (LossKind.CROSS_ENTROPY, LossKind.MSE) and all(
            len(calls) == 1 and calls[0].passed is out and out._version == calls[0].passed_version
            for calls in rec.values()
        )

    def _delta(self, o: torch.Tensor, target: torch.Tensor, kind: LossKind | None) -> torch.Tensor:
        """The closed-form per-sample gradient of the built-in loss at the logits ``o`` (detached)."""
        with torch.no_grad():
            if kind is LossKind.CROSS_ENTROPY and (o.ndim == 1 or o.shape[1] == 1):
                # A single logit z (the two-class model [0, z]): d BCE-with-logits / dz = sigmoid(z) - y.
                return torch.sigmoid(o) - target.to(o.dtype).reshape(o.shape)  # (B,) or (B, 1)
            if kind is LossKind.CROSS_ENTROPY:
                delta = torch.softmax(o, dim=1)  # (B, C): d CE / d logits = softmax - onehot
                return delta.scatter_add_(1, target.unsqueeze(1), self._minus_ones(delta))
            # mse_per_sample = mean over the d outputs of (out - y)^2
            d = o[0].numel()
            return (o - target.reshape(o.shape).to(o.dtype)).mul_(2.0 / d)  # (B, ...)

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

    # ---------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """This object's keys of the miner's state."""
        return {"probed": self.probed, "protect": sorted(self.protect)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.probed = bool(state["probed"])
        self.protect = set(state["protect"])
        self._captured = None
