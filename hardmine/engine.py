"""Batch -> projected per-sample gradients, whichever engine computes them.

``GradientExtractor`` is what the streaming driver and the training-loop API call: one batch in, one
``ProjectedBatch`` out (projected gradients, per-sample loss, model output, exact gradient norm).

Engines (``hardmine.enums.Engine``):

* ``"vmap"`` -- exact per-sample gradients with ``torch.func`` (any model), then projected;
* ``"factored"`` -- one ordinary batched forward + backward read through forward hooks; each supported
  layer (``Linear`` incl. token inputs, ``Conv2d``, ``Embedding``, ``LayerNorm``, RMSNorm-style norms and
  transformers' ``Conv1D``; tied weights once) is projected from its
  factors and its gradient norm computed exactly by the ghost-norm trick, never forming a per-sample
  gradient. Every selected parameter must belong to a supported module;
* ``"auto"`` (default) -- factored for the supported modules, vmap for the rest.

The projection (``hardmine.factored.layout``) is defined per selected parameter, independently of the engine,
so the three engines return the same vectors up to float rounding: the engine changes speed, never results.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from .batches import (
    DeferredChecks,
    check_target,
    split_batch,
    validate_batch,
    validate_inputs,
    validate_output,
)
from .checks import as_bool, as_module, positive_int, projection_kind
from .enums import Engine, ProjectionKind, Randomness, parse_choice
from .extract import forward_mode, per_sample_grads, per_sample_grads_checked
from .factored.capture import FactoredUnit, compute_factored, format_rejected, plan_factored, probe_units
from .factored.graphs import PassGraphs, PlanGraphs, autocast_state, batch_signature, module_state
from .factored.layout import ProjectionLayout
from .losses import LossFn, resolve_loss
from .params import check_one_device, select_parameters, warn_uncached_projections

__all__ = ["ProjectedBatch", "GradientExtractor"]

logger = logging.getLogger(__name__)


@dataclass
class ProjectedBatch:
    z: torch.Tensor  # (B, out_dim) float32 projected per-sample gradients
    loss: torch.Tensor  # (B,)
    output: torch.Tensor  # (B, ...) model output (logits)
    grad_norm: torch.Tensor  # (B,) exact L2 norm of the full (unprojected) selected gradient

    def to_host(self) -> ProjectedBatch:
        """The same batch on the CPU, detached. From a GPU the four tensors are copied into pinned memory
        without blocking and waited for once (one host sync instead of one per tensor)."""
        parts = (self.z, self.loss, self.output, self.grad_norm)
        if all(t.device.type == "cpu" for t in parts):
            return ProjectedBatch(*(t.detach() for t in parts))
        host = []
        for t in parts:
            cuda = t.device.type == "cuda"
            h = torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda)
            host.append(h.copy_(t.detach(), non_blocking=cuda))
        for dev in {t.device for t in parts if t.device.type == "cuda"}:
            torch.cuda.current_stream(dev).synchronize()  # the one wait: the copies were queued after the pass
        return ProjectedBatch(*host)


class GradientExtractor:
    """Projected per-sample gradients of the selected layers of ``model``.

    Args:
        model: any ``nn.Module``; left unchanged (modes restored, no hooks or attributes left behind).
        layers: names/globs of modules or parameters (``"fc2"``, ``"encoder.*.weight"``); ``None`` = all.
        dim: projection size of each selected *weight matrix*. A weight of a Linear/Conv2d/Embedding
            (``(rows, cols)`` after flattening trailing dims) is projected with ``P_out ⊗ P_in`` to
            ``a * b == dim`` coordinates, ``(a, b) = kron_factors(dim)`` (256 -> 16 x 16; ``dim`` must split
            into factors at most 4x apart). Vector parameters (biases, LayerNorm) get ``a`` coordinates,
            other parameters of modules without a rule ``dim``. ``out_dim`` is the total; ``metadata()
            ["layout"]`` lists every block. See ``hardmine.factored.layout``.
        seed: the projection matrices depend only on ``(seed, parameter name, shape, dim, projection)``.
        engine: ``"auto"`` | ``"factored"`` | ``"vmap"`` (see the module docstring).
        loss_fn: ``"cross_entropy"``, ``"mse"``, ``None``/``"auto"`` (by target dtype) or a callable
            ``loss_fn(output, target) -> (B,)`` that does not mix samples.
        projection: ``"rademacher"`` (default) or ``"gaussian"`` projection entries. ``kind=`` is the
            deprecated name of this argument (accepted with a ``DeprecationWarning``).
        chunk_size: vmap chunk size (memory bound) for the parameters computed by vmap.
        randomness: ``"eval"`` (dropout off), ``"different"`` or ``"same"`` (vmap only). Under ``"auto"``,
            ``"same"`` -- and ``"different"`` when the plan would mix engines, since two passes would draw
            different dropout masks -- sends every parameter to vmap.
        cuda_graphs: on a CUDA device, replay the steady-state factored pass as a CUDA graph
            (``hardmine.factored.graphs``): the same vectors, with far less host time per batch. It applies when
            every selected parameter is factored and ``randomness="eval"``; a batch shape is captured after two
            eager batches of it (following the first batch's plan check), and a capture that fails or a replay
            that differs from the eager pass switches it off with a warning (``cuda_graph_state()`` says what
            happened). Off by default. ``docs/guide.md`` ("CUDA graphs") lists what a graph freezes.

    ``auto``/``factored`` check the plan on the first batch (a 3-sample probe forward): a module whose hook
    never fires or that does not see the batch on dimension 0 moves to vmap under ``auto`` (with a warning;
    ``metadata()["plan"]`` shows the plan in use) and is a ``ValueError`` under ``factored``. Parameters the
    model uses without a module (a ViT's class token, ``hardmine.factored.parameter``) are swapped for per-sample
    copies after the same check; under ``auto`` a later batch that fails with them swapped is computed again with
    them by vmap (and probed again), which keeps that plan if the batch then works.
    The factored engine assumes each sample's loss depends on that sample alone (true unless the model
    mixes samples, e.g. BatchNorm in training mode, which is refused).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: str | Sequence[str] | None = None,
        dim: int = 256,
        seed: int = 0,
        engine: Engine | str = Engine.AUTO,
        loss_fn: str | LossFn | None = None,
        projection: ProjectionKind | str | None = None,
        chunk_size: int | None = None,
        randomness: Randomness | str = Randomness.EVAL,
        kind: ProjectionKind | str | None = None,
        cuda_graphs: bool = False,
    ) -> None:
        as_module(model)
        as_bool(cuda_graphs, "cuda_graphs")
        self.engine = parse_choice(Engine, engine, "engine")
        self.randomness = parse_choice(Randomness, randomness, "randomness")
        positive_int(chunk_size, "chunk_size", allow_none=True)
        if loss_fn is not None and not callable(loss_fn):
            resolve_loss(loss_fn, torch.zeros(1, dtype=torch.long))  # reject unknown loss names now
        self.model = model
        self.layers = layers
        self.loss_fn = loss_fn
        self.chunk_size = chunk_size
        self.param_names = select_parameters(model, layers)
        projection = projection_kind(projection, kind, "GradientExtractor")
        self.layout = ProjectionLayout(model, self.param_names, dim=dim, seed=seed, kind=projection)

        units, rejected = plan_factored(model, self.param_names)
        self._reasons: dict[str, str] = {}  # vmap-bound parameter -> why
        if self.engine is Engine.VMAP:
            units = {}
            self._reasons = {n: "engine='vmap'" for n in self.param_names}
        elif self.engine is Engine.FACTORED:
            if self.randomness is Randomness.SAME:
                raise ValueError(
                    "randomness='same' (one dropout mask shared by the batch) needs the vmap engine; use "
                    "engine='vmap', or randomness='eval'/'different' with engine='factored'."
                )
            if rejected:
                raise ValueError(
                    f"engine='factored' cannot handle {format_rejected(rejected)}. Use engine='auto' to send "
                    "these parameters to the vmap engine, or select only supported layers with `layers`."
                )
        else:
            self._reasons = dict(rejected)
        self._units: dict[str, FactoredUnit] = units
        self._protect: set[str] = set()
        self._memo: dict[Any, Any] = {}  # per-unit matrices looked up once (see compute_factored)
        self._verified = not units
        # the batch size the plan was checked on: a check on one sample cannot tell a module called on a (1, ...)
        # input broadcast over the batch from one called per sample, so the first larger batch is checked again
        self._checked_rows = 0
        self._checks = DeferredChecks()  # value checks of later batches, read when the device is done
        self.cuda_graphs = cuda_graphs
        self._graphs = PlanGraphs(cuda_graphs, "the factored pass")  # made on the first steady-state batch
        self._settle_auto()
        # Both engines sum each sample's squared norm over every selected parameter: one device.
        check_one_device(model, self.param_names, "GradientExtractor")
        self._log_plan()
        warn_uncached_projections(self.layout, "GradientExtractor")

    # ------------------------------------------------------------------------------------------- plan
    def _settle_auto(self) -> None:
        """Under auto, fall back to vmap for everything where one pass cannot serve both engines."""
        if self.engine is not Engine.AUTO or not self._units:
            return
        why = None
        if self.randomness is Randomness.SAME:
            why = "randomness='same' needs the vmap engine"
        elif self.randomness is Randomness.DIFFERENT and self._reasons:
            why = "randomness='different' with a mixed plan (two passes would draw different dropout masks)"
        if why is not None:
            for unit in self._units.values():
                for p in unit.params:
                    self._reasons[p] = why
            self._units = {}
            self._verified = True

    @property
    def plan(self) -> dict[str, str]:
        """``{parameter: "factored" | "vmap"}`` in model order (the plan in use)."""
        fact = {p for u in self._units.values() for p in u.params}
        return {n: (Engine.FACTORED.value if n in fact else Engine.VMAP.value) for n in self.param_names}

    @property
    def _vmap_names(self) -> list[str]:
        plan = self.plan
        return [n for n in self.param_names if plan[n] == Engine.VMAP.value]

    def _log_plan(self) -> None:
        fact = ", ".join(u.label for u in self._units.values()) or "none"
        by_reason: dict[str, list[str]] = {}
        for n in self._vmap_names:
            by_reason.setdefault(self._reasons.get(n, ""), []).append(n)
        vm = "; ".join(f"{names} ({why})" for why, names in by_reason.items()) or "none"
        logger.info("engine=%s: factored layers: %s | vmap parameters: %s", self.engine.value, fact, vm)

    def _verify(self, inputs: Any, target: torch.Tensor, fn: LossFn, kind: Any, b: int) -> None:
        problems, protect = probe_units(self.model, inputs, self._units, b)
        self._protect = protect
        rest = {m: u for m, u in self._units.items() if m not in problems}
        problems.update(self._inexact_units(inputs, target, fn, kind, b, rest))
        if not problems:
            self._verified = True
            return
        text = "; ".join(f"{self._units[m].label}: {why}" for m, why in problems.items())
        if self.engine is Engine.FACTORED:  # stays unverified: every later call probes (and refuses) again
            raise ValueError(
                f"engine='factored' cannot attribute these modules per sample: {text}. Use engine='auto' to "
                "send them to the vmap engine."
            )
        self._verified = True
        logger.warning("engine=auto: moving to vmap after checking the first batch: %s", text)
        for m, why in problems.items():
            for p in self._units[m].params:
                self._reasons[p] = why
            del self._units[m]
        self._settle_auto()
        self._log_plan()

    def _device(self) -> torch.device:
        """Where the pass computes: the device of the first selected parameter, looked up per call (the
        model may have been moved since the extractor was built)."""
        return self.model.get_parameter(self.param_names[0]).device

    # ---------------------------------------------------------------------------------------- public
    @property
    def out_dim(self) -> int:
        return self.layout.out_dim

    def metadata(self) -> dict[str, Any]:
        return {
            "engine": self.engine.value,
            "plan": self.plan,
            "plan_reasons": {n: self._reasons.get(n, "") for n in self._vmap_names},
            "plan_checked": self._verified,
            "params": list(self.param_names),
            "dim": self.layout.dim,
            "factors": [self.layout.a, self.layout.b],
            "out_dim": self.out_dim,
            "seed": self.layout.seed,
            "projection": self.layout.kind.value,
            "layout": self.layout.describe(),
        }

    def cuda_graph_state(self) -> dict[str, Any]:
        """What ``cuda_graphs`` did: asked for, graphs captured and replayed, and why they are off (if so). Kept
        out of :meth:`metadata`, which a scan's resume check compares: it changes speed, never results."""
        return self._graphs.state()

    def _graph_runner(self) -> PassGraphs | None:
        """The graphs of this extractor's steady-state factored pass, or ``None`` where they do not apply. Set
        up again whenever the plan changes (a later batch moved units to vmap) or the model's device does: a
        graph holds the pass of the plan and device it was captured with."""
        if not self.cuda_graphs:
            return None  # (the default path: nothing to read)
        device = self._device()
        plan = (device, tuple(self._units), frozenset(self._protect))
        return self._graphs.for_plan(plan, device, self._graphs_do_not_apply)

    def _graphs_do_not_apply(self) -> str | None:
        """Why the plan in use cannot be replayed from a graph (``None``: it can)."""
        if self._vmap_names:
            return "part of the plan runs by vmap"
        if self.randomness is not Randomness.EVAL:
            return f"randomness={self.randomness.value!r} draws random numbers a replay would repeat"
        if self.layout.uncached_dense()[0]:
            return "some projection matrices are regenerated per batch (past the projector's cache)"
        return None

    def _graph_key(self, leaves: list[Any], spec: Any, kind: Any) -> Any:
        """The batch's graph signature, with the settings that change the kernels a pass runs; ``None``
        (eagerly) for a tensor not on the model's device, whose host-side work a graph would freeze."""
        device = self._device()
        if any(isinstance(t, torch.Tensor) and t.device != device for t in leaves):
            return None
        settings = self._graphs.numerics(device.type)
        if settings is None:
            return None
        loss = self.loss_fn if _hashable(self.loss_fn) else id(self.loss_fn)  # a callable the user may swap
        return batch_signature(leaves, (spec, kind, loss, torch.is_grad_enabled(), settings))

    def _graph_state(self) -> Hashable:
        """What a graph of the pass reads besides the batch: the model's tensors and hooks
        (:func:`hardmine.factored.graphs.module_state`)."""
        return module_state(self.model.modules())

    def flush_checks(self) -> None:
        """Wait for the device and raise the ``ValueError`` of any batch whose value checks failed.

        After the first batch, the factored pass checks values (NaN/inf inputs, labels in range) on the
        device, without a host sync (:class:`hardmine.batches.DeferredChecks`): on the CPU a bad batch still
        raises in its own call; on a GPU its error is raised by a later call, once the device has finished
        it, or here. Call this after the last batch (``hardmine.scan`` does) before trusting the results."""
        self._checks.poll(wait=True)

    def __call__(self, batch: Any) -> ProjectedBatch:
        # Earlier batches whose device work has finished, polled once here: their errors are then never
        # mistaken for this batch's (see _without_swapped).
        self._checks.poll()
        try:
            return self._compute(batch)
        except _SwappedPassFailed as failed:
            return self._without_swapped(batch, failed.error)

    def _without_swapped(self, batch: Any, error: ValueError) -> ProjectedBatch:
        """Under auto, after the first batch, when the factored pass of a later batch failed with parameters
        swapped for per-sample copies (``hardmine.factored.parameter``): compute the batch again with them by vmap,
        and keep that plan if it works. The first batch's probe saw a few samples only: a later batch may need
        the parameter's own shape (a position embedding interpolated to a new image size by ``reshape(1, ...)``).
        A batch that fails without the
        copies too is not their doing: the plan is put back and that batch's own error raised. The batch is
        probed again (the modules a copy fed were probed with its rows, not with the parameter)."""
        saved = dict(self._units), dict(self._reasons), self._protect, self._verified
        swapped = [m for m, u in self._units.items() if u.swaps_parameter]
        first = str(error).splitlines()[0].split(". The factored engine needs")[0][:300]  # the pass's own words
        why = f"a later batch failed with it swapped for a per-sample copy ({first})"
        for m in swapped:
            for p in self._units[m].params:
                self._reasons[p] = why
            del self._units[m]
        self._settle_auto()
        self._verified = not self._units
        try:
            result = self._compute(batch)
        except Exception:
            self._units, self._reasons, self._protect, self._verified = saved
            raise
        logger.warning("engine=auto: moved %s to vmap: %s", ", ".join(swapped), why)
        self._log_plan()
        self._graph_runner()  # the plan changed: graphs of the old one are dropped (also with no unit left)
        return result

    def _inexact_units(
        self, inputs: Any, target: torch.Tensor, fn: LossFn, kind: Any, b: int, units: dict[str, FactoredUnit]
    ) -> dict[str, str]:
        """``{module: problem}`` for the units whose factored vectors of the first samples differ from exact
        ones (vmap): what the structural probe cannot see, e.g. a weight also used outside its module (a tied
        head written as a matmul), or an input laid out with another dimension of the probe's size first. Run
        once, on the first batch, when the units' parameters are few enough to hold one sample's gradient of
        (:data:`EXACTNESS_PROBE_ELEMENTS`) and dropout is off; skipped where the vmap engine cannot run the
        model."""
        if not units or self.randomness is not Randomness.EVAL:
            return {}
        params = dict(self.model.named_parameters())
        names = [p for u in units.values() for p in u.params]
        if sum(params[n].numel() for n in names) > EXACTNESS_PROBE_ELEMENTS:
            logger.info("the factored units' exactness check on the first batch is skipped: too many parameters")
            return {}
        n = min(b, EXACTNESS_PROBE_SAMPLES)
        sub_in = pytree.tree_map(lambda t: t[:n] if isinstance(t, torch.Tensor) else t, inputs)  # (n, ...)
        sub_t = target[:n]
        z = self.layout.new_output(n, self._device())  # (n, out_dim)
        fg = compute_factored(
            self.model, sub_in, sub_t, fn, kind, units, self.layout, self._protect, n, out=z, memo=self._memo
        )
        fg.write_to(z, self.layout)
        try:
            exact = per_sample_grads_checked(self.model, sub_in, sub_t, fn, names, chunk_size=1)
        except Exception as exc:  # noqa: BLE001  a model vmap cannot run: the check is skipped, not the scan
            logger.info("the factored units' exactness check is skipped (vmap: %s)", type(exc).__name__)
            return {}
        pairs = {
            p: (
                self.layout.block_view(z, p).reshape(n, -1).double(),  # (n, width) factored
                self.layout.project_exact(p, exact.grads[p]).reshape(n, -1).double(),  # (n, width) exact
            )
            for p in names
        }
        # Each sample's block is compared at its own scale, but never below a small share of all of that sample's
        # blocks: a gradient that is zero in exact arithmetic (a key bias under softmax) is rounding noise in both,
        # and differs by all of it. A unit fails on the lower median of its samples: a use the rule misses changes
        # every sample, while in low precision a sample's activation can round across a ReLU's kink in one engine
        # and not the other (see _exactness_tolerance)
        total = torch.linalg.vector_norm(torch.cat([want for _, want in pairs.values()], dim=1), dim=1)  # (n,)
        problems: dict[str, str] = {}
        autocast_on, autocast_dtype = autocast_state(z.device.type)  # a pass under autocast rounds as its dtype
        for m, unit in units.items():
            for p in unit.params:
                got, want = pairs[p]
                scale = torch.stack(
                    [torch.linalg.vector_norm(want, dim=1), torch.linalg.vector_norm(got, dim=1), 1e-4 * total]
                ).amax(dim=0)  # (n,)
                gaps = (torch.linalg.vector_norm(got - want, dim=1) / scale).nan_to_num(0.0, posinf=0.0)  # (n,) 0/0
                gaps[(got - want).isnan().any(dim=1)] = float("nan")
                gap = float(gaps.sort().values[(n - 1) // 2]) if not gaps.isnan().any() else float("nan")
                tolerance = _exactness_tolerance(params[p].dtype)
                if autocast_on:
                    tolerance = max(tolerance, _exactness_tolerance(autocast_dtype))
                if not gap <= tolerance:  # (NaN too)
                    problems[m] = (
                        f"its factored gradients differ from the exact ones on the first {n} sample(s) (relative "
                        f"difference {gap:.2g} in {p}): the model uses it in a way its layer rule does not see, "
                        "e.g. its weight also used outside the module, or an input whose first dimension is not "
                        "the batch"
                    )
                    break
        return problems

    def _factored(
        self, inputs: Any, target: torch.Tensor, fn: Any, kind: Any, flags: list[torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z, squared norm, loss, output)`` of the factored units, device work only once the plan is checked
        (``flags`` given: the values' checks are appended to it), so that a CUDA graph can hold it."""
        b = validate_inputs(inputs, target, kind, flags) if flags is not None else int(target.shape[0])
        # (B, out_dim) on the model's device: Kronecker blocks are written in place, and a batch is copied to
        # the host once, whole (ProjectedBatch.to_host), not block by block
        z = self.layout.new_output(b, self._device())
        fg = compute_factored(
            self.model,
            inputs,
            target,
            fn,
            kind,
            self._units,
            self.layout,
            self._protect,
            b,
            out=z,
            memo=self._memo,
            flags=flags,
        )
        fg.write_to(z, self.layout)
        return z, fg.sq_norm, fg.loss, fg.output

    def _compute(self, batch: Any) -> ProjectedBatch:
        z: torch.Tensor | None = None
        sq: torch.Tensor | None = None
        loss = output = None
        flags: list[torch.Tensor] | None = None
        checked: tuple[Any, torch.Tensor, Any] | None = None  # (inputs, loss target, loss) the factored part checked
        vmap_names: list[str] | None = None
        if self._units:
            with forward_mode(self.model, self.randomness):
                inputs, target = split_batch(batch)
                check_target(target)
                fn, kind = resolve_loss(self.loss_fn, target)
                if not self._verified or (self._checked_rows == 1 and target.ndim and int(target.shape[0]) > 1):
                    # The first batch gets the full check (a one-sample probe forward quotes shape errors
                    # clearly) and the per-module probe; later batches check their inputs inside the pass
                    # (shapes at once, values on the device: no host sync per batch) and the output too,
                    # saving a forward per batch.
                    b = validate_batch(self.model, inputs, target, kind)
                    self._verify(inputs, target, fn, kind, b)
                    self._checked_rows = b
                else:
                    flags = []
                if self._units:
                    try:
                        graphs = self._graph_runner() if flags is not None else None
                        if graphs is None:
                            z, sq, loss, output = self._factored(inputs, target, fn, kind, flags)
                        else:
                            leaves, spec = pytree.tree_flatten((inputs, target))

                            def run(ls: list[Any]) -> tuple[torch.Tensor, ...]:
                                ins, tgt = pytree.tree_unflatten(ls, spec)
                                fl: list[torch.Tensor] = []
                                four = self._factored(ins, tgt, fn, kind, fl)  # appends the flags to fl
                                return (*fl, *four)

                            out = graphs(run, leaves, self._graph_key(leaves, spec, kind), self._graph_state())
                            flags.extend(out[:-4])
                            z, sq, loss, output = out[-4:]
                    except ValueError as exc:
                        if self.engine is Engine.AUTO and any(u.swaps_parameter for u in self._units.values()):
                            raise _SwappedPassFailed(exc) from exc
                        raise
                    vmap_names = self._vmap_names  # final now: the first batch's probe may have moved modules
                    if vmap_names:
                        # The vmap part of a mixed plan takes this batch as checked: on later batches the labels
                        # clamped like the factored loss's (their flag is already queued), so no second validation.
                        loss_target = target if flags is None else validate_output(output, target, kind, [])
                        checked = (inputs, loss_target, fn)
                    if flags:
                        # The recheck reads the output's shape and dtype only: a stand-in without data, so a
                        # pending batch does not keep its logits alive (a causal LM's (B, T, vocab)).
                        shape_of = torch.empty(output.shape, dtype=output.dtype, device="meta")
                        self._checks.submit(flags, _Recheck(inputs, target, kind, shape_of))
        if vmap_names is None:
            vmap_names = self._vmap_names
        if vmap_names:
            if checked is not None:
                psg = per_sample_grads_checked(
                    self.model, *checked, vmap_names, chunk_size=self.chunk_size, randomness=self.randomness
                )
            else:
                psg = per_sample_grads(
                    self.model,
                    batch,
                    self.loss_fn,
                    params=vmap_names,
                    chunk_size=self.chunk_size,
                    randomness=self.randomness,
                )
            if z is None:
                z = self.layout.new_output(psg.batch_size, psg.grad_norm.device)  # (B, out_dim)
            for n in vmap_names:
                self.layout.write(z, n, self.layout.project_exact(n, psg.grads[n]))
            vsq = psg.grad_norm.pow(2)  # (B,)
            sq = vsq if sq is None else sq + vsq.to(sq.dtype)
            if loss is None:
                loss, output = psg.loss, psg.output
        # At least one parameter is selected, so one of the two branches ran.
        assert z is not None and sq is not None and loss is not None and output is not None
        self._checks.poll()  # on the CPU this batch's own checks: a bad batch raises in its own call
        return ProjectedBatch(z=z, loss=loss, output=output, grad_norm=sq.clamp_min(0).sqrt())


# The first batch's exactness check (GradientExtractor._inexact_units): how many samples, and how many
# per-sample gradient elements of the factored parameters per sample (vmap runs one sample at a time, but holds
# every probe sample's gradients: 3 x 64 MiB in float32; a tied matrix counts once per holder)
EXACTNESS_PROBE_SAMPLES = 3
EXACTNESS_PROBE_ELEMENTS = 1 << 24


def _exactness_tolerance(dtype: torch.dtype) -> float:
    """Relative difference above which a unit's vectors are not the exact ones. Loose on purpose: a use the
    rules miss changes a vector by a large share, while rounding, and TF32 convolutions on a GPU (cuDNN's
    default, about 1e-3 apart), must never move a model off the factored engine. bfloat16 (8 bits of mantissa)
    is looser still: there rounding alone moves activations across a ReLU's kink, in one engine and not the other,
    on several samples at once (the bench MLP, 784-512-256-10, in bfloat16 or under autocast: the lower median of
    three samples 0.11 apart on one of ten seeds, 0.004-0.044 on the others)."""
    if dtype == torch.float64:
        return 1e-4
    if dtype == torch.bfloat16:
        return 2.5e-1
    return 2e-2 if dtype == torch.float32 else 5e-2


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


class _SwappedPassFailed(Exception):
    """The factored pass of a later batch failed while parameters were swapped for per-sample copies."""

    def __init__(self, error: ValueError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class _Recheck:
    """The syncing checks of one batch whose device flags were set: raises their usual message."""

    inputs: Any
    target: torch.Tensor
    kind: Any
    output: torch.Tensor  # its shape and dtype (a meta tensor): validate_output reads no output value

    def __call__(self) -> None:
        validate_inputs(self.inputs, self.target, self.kind)
        validate_output(self.output, self.target, self.kind)
