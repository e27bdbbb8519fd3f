"""The factored pass: one ordinary batched forward + backward, read through forward hooks.

Forward hooks on the selected modules capture each call's input ``x`` and output ``y``. Then
``torch.autograd.grad(per_sample_loss.sum(), [y, ...])`` returns ``delta = d(sum_b L_b)/dy``; because sample
``b``'s loss depends only on row ``b`` of ``y`` (no batch coupling), row ``b`` of ``delta`` is exactly
``dL_b/dy_b``. Only gradients with respect to module *outputs* are requested, so autograd computes no weight
gradient, never touches ``param.grad``, and no per-sample weight gradient is formed: each layer rule turns
``(x, delta)`` into a Kronecker projection, an exact ghost norm and the exact gradients of small vector
parameters.

What the hooks can see is checked, not assumed (:func:`probe_units` on a few samples, then every pass): a
module whose hook never fires (its weights used through ``F.*`` directly, like ``nn.MultiheadAttention``'s
``out_proj``), a module that does not see the batch on dimension 0 (``batch_first=False`` models, reshaped
batches), and inputs modified in place are refused with a clear error instead of returning garbage. A module
whose *output* is modified in place afterwards (``nn.ReLU(inplace=True)``) gets a copy handed to the model
so the captured output keeps its place in the graph.

Nothing is attached to the model: hooks are removed in ``finally``, modes are restored by ``forward_mode``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..enums import LossKind, Randomness, parse_choice
from ..extract import (
    Inputs,
    call_model,
    forward_error,
    forward_mode,
    model_output_tensor,
    split_batch,
    validate_batch,
    validate_output,
)
from ..losses import LossFn, resolve_loss
from .layout import ProjectionLayout, split_param_name
from .registry import Call, GramCache, LayerRule, RuleRequest, RuleResult, registered_types, rule_for

__all__ = [
    "FactoredUnit",
    "FactoredGrads",
    "plan_factored",
    "probe_units",
    "factored_pass",
    "format_rejected",
]

# How many samples the probe forward uses: more than one, so a tensor that does not carry the batch on
# dimension 0 (shape[0] stays 1 or equals a sequence length) is told apart from one that does.
_PROBE_SAMPLES = 3


@dataclass(frozen=True)
class FactoredUnit:
    """One selected module handled by a layer rule, and which of its parameters are selected."""

    name: str  # module name ("" for the root module)
    module: nn.Module
    rule: LayerRule
    matrix: str | None  # full name of the selected matrix parameter, if selected
    vectors: tuple[str, ...]  # local names of the selected vector parameters

    def full_name(self, local: str) -> str:
        return f"{self.name}.{local}" if self.name else local

    @property
    def params(self) -> list[str]:
        return ([self.matrix] if self.matrix else []) + [self.full_name(v) for v in self.vectors]

    @property
    def label(self) -> str:
        return f"{self.name or '<root>'} ({type(self.module).__name__})"


@dataclass
class FactoredGrads:
    """What one factored pass returns, in the model's dtype."""

    kron: dict[str, torch.Tensor]  # matrix param -> (B, a*b) Kronecker projection of its per-sample gradient
    vectors: dict[str, torch.Tensor]  # vector param -> (B, *shape) exact per-sample gradient
    sq_norm: torch.Tensor  # (B,) exact squared gradient norm over every parameter above
    loss: torch.Tensor  # (B,)
    output: torch.Tensor  # (B, ...)
    written: set[str] = field(default_factory=set)  # kron params already written into the caller's `out`
    # vector param -> (B, width) dense projection a rule computed itself (float32, same matrix as
    # ``layout.project_dense``); the caller projects the other vectors
    vector_proj: dict[str, torch.Tensor] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- planning
def plan_factored(model: nn.Module, names: Sequence[str]) -> tuple[dict[str, FactoredUnit], dict[str, str]]:
    """Split selected parameters into factored units (by module) and ``{param: reason}`` for the rest."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    inside_mha: dict[str, str] = {}
    for mname, m in modules.items():
        if isinstance(m, nn.MultiheadAttention):
            for sub, _ in m.named_modules(prefix=mname):
                if sub != mname:
                    inside_mha[sub] = mname or "<root>"
    holders: dict[int, list[str]] = {}  # a parameter object held by several modules is shared (tied)
    for mname, m in modules.items():
        for local, p in m.named_parameters(recurse=False):
            holders.setdefault(id(p), []).append(f"{mname}.{local}" if mname else local)
    known = ", ".join(t.__name__ for t in registered_types())
    rejected: dict[str, str] = {}
    grouped: dict[str, list[str]] = {}
    for name in names:
        mname, local = split_param_name(name)
        module = modules[mname]
        rule = rule_for(module)
        why = None if rule is None else rule.unsupported_reason(module)
        if mname in inside_mha:
            reason = (
                f"inside nn.MultiheadAttention {inside_mha[mname]!r}, which passes its submodules' "
                "weights to F.multi_head_attention_forward directly, so their hooks never fire"
            )
        elif rule is None:
            reason = f"{type(module).__name__} has no factored layer rule (rules exist for {known})"
        elif local not in rule.handled_params:
            reason = f"the {type(module).__name__} rule does not handle parameter {local!r}"
        elif why is not None:
            reason = f"{type(module).__name__} with {why}"
        elif len(holders[id(params[name])]) > 1:
            reason = f"the parameter is shared by {holders[id(params[name])]} (tied weights)"
        else:
            grouped.setdefault(mname, []).append(local)
            continue
        rejected[name] = reason
    units = {}
    for mname, locals_ in grouped.items():
        module = modules[mname]
        rule = rule_for(module)
        assert rule is not None  # grouped only holds modules with a rule
        unit = FactoredUnit(
            name=mname,
            module=module,
            rule=rule,
            matrix=None,
            vectors=tuple(v for v in locals_ if v != rule.matrix_param),
        )
        if rule.matrix_param in locals_:
            unit = FactoredUnit(mname, module, rule, unit.full_name(rule.matrix_param), unit.vectors)
        units[mname] = unit
    return units, rejected


def format_rejected(rejected: Mapping[str, str]) -> str:
    return "; ".join(f"{name}: {reason}" for name, reason in rejected.items())


# ------------------------------------------------------------------------------------------------ hooks
@dataclass
class _Capture:
    x: Any
    out: Any
    x_version: int | None
    out_version: int | None


def _record(
    store: list[_Capture], protect: bool, module: nn.Module, args: tuple, kwargs: dict, out: Any
) -> Any:
    x = args[0] if args else next(iter(kwargs.values()), None)
    store.append(
        _Capture(
            x,
            out,
            x._version if isinstance(x, torch.Tensor) else None,
            out._version if isinstance(out, torch.Tensor) else None,
        )
    )
    if protect and isinstance(out, torch.Tensor):
        # The model modifies this output in place later; give it a copy so the captured tensor keeps its
        # own autograd identity and autograd.grad returns the gradient at the module's true output.
        return out.clone()
    return None


def _hooked_forward(
    model: nn.Module, inputs: Inputs, units: Mapping[str, FactoredUnit], protect: set[str]
) -> tuple[Any, dict[str, list[_Capture]]]:
    rec: dict[str, list[_Capture]] = {name: [] for name in units}
    handles = []
    try:
        for name, unit in units.items():
            hook = functools.partial(_record, rec[name], name in protect)
            handles.append(unit.module.register_forward_hook(hook, with_kwargs=True))
        with torch.enable_grad():
            out = call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return out, rec


def _call_problem(unit: FactoredUnit, caps: list[_Capture], batch_size: int) -> str | None:
    if not caps:
        return (
            "its forward hook never fired: the model uses its parameters without calling the module "
            "(e.g. F.linear(x, m.weight))"
        )
    for cap in caps:
        why = unit.rule.check_call(unit.module, cap.x, cap.out, batch_size)
        if why is not None:
            return why
        if cap.x._version != cap.x_version:
            return "its input is modified in place after the layer ran"
    return None


def probe_units(
    model: nn.Module, inputs: Inputs, units: Mapping[str, FactoredUnit], batch_size: int
) -> tuple[dict[str, str], set[str]]:
    """Run the model on the first few samples with hooks and check each unit can be attributed per sample.

    Returns ``({module: problem}, modules whose output is modified in place)``. Call inside
    ``forward_mode`` so the probe sees the same code path as the pass.
    """
    n = min(batch_size, _PROBE_SAMPLES)
    sub = tree_map(lambda t: t[:n], inputs)  # (n, ...) leading samples
    _, rec = _hooked_forward(model, sub, units, set())
    problems: dict[str, str] = {}
    protect: set[str] = set()
    for name, unit in units.items():
        why = _call_problem(unit, rec[name], n)
        if why is not None:
            problems[name] = why
        elif any(c.out._version != c.out_version for c in rec[name]):
            protect.add(name)
    return problems, protect


# ------------------------------------------------------------------------------------------------ pass
def factored_pass(
    model: nn.Module,
    batch: Any,
    layout: ProjectionLayout,
    loss_fn: LossKind | str | LossFn | None = None,
    *,
    randomness: Randomness | str = Randomness.EVAL,
) -> FactoredGrads:
    """Factored projections, exact vector gradients and ghost norms of ``layout``'s parameters for one batch.

    Every parameter of ``layout`` must belong to a module with a layer rule (``ValueError`` otherwise).
    ``GradientExtractor(engine="factored"|"auto")`` is the usual entry point; this is the bare pass.
    """
    rnd = parse_choice(Randomness, randomness, "randomness")
    if rnd is Randomness.SAME:
        raise ValueError(
            "randomness='same' (one dropout mask shared by the batch) needs the vmap engine; use "
            "randomness='eval' or 'different' with the factored engine."
        )
    units, rejected = plan_factored(model, layout.names)
    if rejected:
        raise ValueError(
            f"the factored engine cannot handle {format_rejected(rejected)}. Use engine='auto' to send "
            "these parameters to the vmap engine."
        )
    with forward_mode(model, rnd):
        inputs, target = split_batch(batch)
        if not isinstance(target, torch.Tensor):
            raise ValueError(
                f"target is a {type(target).__name__}, not a torch.Tensor; convert it with torch.as_tensor."
            )
        fn, kind = resolve_loss(loss_fn, target)
        b = validate_batch(model, inputs, target, kind)
        problems, protect = probe_units(model, inputs, units, b)
        if problems:
            raise ValueError(
                "the factored engine cannot attribute these modules per sample: "
                + "; ".join(f"{units[m].label}: {why}" for m, why in problems.items())
                + ". Use engine='auto' to send them to the vmap engine."
            )
        return _compute_factored(model, inputs, target, fn, kind, units, layout, protect, b)


def _compute_factored(
    model: nn.Module,
    inputs: Inputs,
    target: torch.Tensor,
    loss_fn: LossFn,
    loss_kind: LossKind | None,
    units: Mapping[str, FactoredUnit],
    layout: ProjectionLayout,
    protect: set[str],
    b: int,
    out: torch.Tensor | None = None,
    memo: dict[Any, Any] | None = None,
) -> FactoredGrads:
    """The pass itself (inputs already validated with ``validate_inputs``, units already probed). The output
    is checked against the targets here, before the loss, so no separate probe forward is needed per batch.
    Kronecker projections are written straight into ``out`` (``(B, layout.out_dim)``) where its dtype matches
    the model's; see ``written``. ``memo`` is a dict the caller keeps across passes over the same units and
    layout (e.g. a ``GradientExtractor``): each unit's matrices are looked up once per dtype and device, and
    rules keep what they derive from them (``RuleRequest.memo``)."""
    if memo is None:
        memo = {}
    try:
        raw, rec = _hooked_forward(model, inputs, units, protect)
    except (ValueError, torch.OutOfMemoryError, MemoryError):
        raise  # already clear, or not the user's input (callers catch OOM to shrink the batch)
    except Exception as exc:  # e.g. a shape mismatch in a later batch: quote the shapes
        raise forward_error(inputs, exc) from exc
    with torch.enable_grad():
        output = model_output_tensor(raw)
        validate_output(output, target, loss_kind)
        loss = loss_fn(output, target)
    if not isinstance(loss, torch.Tensor) or tuple(loss.shape) != (b,):
        raise ValueError(
            f"the loss function returned {getattr(loss, 'shape', type(loss).__name__)}; it must return "
            f"one loss per sample, shape ({b},)."
        )
    for name, unit in units.items():
        why = _call_problem(unit, rec[name], b)
        if why is None and any(c.out._version != c.out_version for c in rec[name]):
            why = "its output was modified in place, which the probe batch did not show"
        if why is not None:
            raise ValueError(
                f"module {unit.label}: {why}. The factored engine needs each selected module to see the "
                "batch on dimension 0 and be called on this batch; use engine='vmap'."
            )

    kron: dict[str, torch.Tensor] = {}
    vectors: dict[str, torch.Tensor] = {}
    vector_proj: dict[str, torch.Tensor] = {}
    written: set[str] = set()
    sq = torch.zeros(b, dtype=output.dtype, device=output.device)
    # Each unit's parameters, from its module (a dict of model.named_parameters() per batch walks the model).
    params = {u.full_name(local): getattr(u.module, local) for u in units.values() for local in u.vectors}
    received: dict[str, dict[int, torch.Tensor]] = {name: {} for name in units}
    done: set[str] = set()
    # Modules called once on the same input tensor (q/k/v) share its Gram matrix within this pass.
    readers: dict[Any, int] = {}
    for name, unit in units.items():
        if unit.rule.shares_input_gram and len(rec[name]) == 1 and isinstance(rec[name][0].x, torch.Tensor):
            key = GramCache.key(rec[name][0].x)
            readers[key] = readers.get(key, 0) + 1
    grams = GramCache({k: n for k, n in readers.items() if n > 1})

    def finish(name: str) -> None:
        """Run the unit's rule on the output gradients received and record its results."""
        unit, caps, got = units[name], rec[name], received[name]
        calls = [Call(caps[i].x.detach(), got[i]) for i in sorted(got)]  # in call order
        dtype = calls[0].delta.dtype if calls else output.dtype
        device = calls[0].delta.device if calls else output.device
        mats, vmats, rule_memo = _unit_matrices(memo, unit, layout, dtype, device)
        view = None
        if unit.matrix is not None and out is not None and out.dtype == dtype and out.device == device:
            view = layout.block_view(out, unit.matrix)  # (B, a, b): the rule writes straight into `out`
        if calls:
            request = RuleRequest(mats, unit.vectors, view, vmats, grams, rule_memo)
            res = unit.rule.compute(unit.module, calls, request)
        else:  # no gradient reaches this module's output: every gradient is zero
            if unit.rule.shares_input_gram and len(caps) == 1 and isinstance(caps[0].x, torch.Tensor):
                grams.release(GramCache.key(caps[0].x))  # it was counted as a reader of a shared Gram
            res = _zero_result(unit, mats, params, b, dtype, device)
        if unit.matrix is not None:
            assert mats is not None
            want = (b, mats[0].shape[1], mats[1].shape[1])
            if res.matrix_proj is None or tuple(res.matrix_proj.shape) != want or res.matrix_sq_norm is None:
                raise ValueError(
                    f"layer rule {type(unit.rule).__name__} returned no/wrong-shaped projection; "
                    f"expected {want}."
                )
            if view is not None and res.matrix_proj is view:
                written.add(unit.matrix)
            kron[unit.matrix] = res.matrix_proj.reshape(b, -1)  # (B, a*b)
            sq.add_(res.matrix_sq_norm.to(sq.dtype))
        for local in unit.vectors:
            g = res.vectors[local]
            full = unit.full_name(local)
            if tuple(g.shape) != (b, *params[full].shape):
                raise ValueError(
                    f"layer rule {type(unit.rule).__name__} returned shape {tuple(g.shape)} for {full!r}."
                )
            vectors[full] = g
            g_sq = res.vector_sq_norm.get(local)
            if g_sq is None:
                g_sq = torch.linalg.vector_norm(g.reshape(b, -1), dim=1).square()  # (B,)
            sq.add_(g_sq.to(sq.dtype))
            vp = res.vector_proj.get(local)
            if vp is not None:
                if local not in vmats or tuple(vp.shape) != (b, vmats[local].shape[1]):
                    raise ValueError(
                        f"layer rule {type(unit.rule).__name__} returned a projection of {full!r} of shape "
                        f"{tuple(vp.shape)} without / unlike the matrix it was offered."
                    )
                vector_proj[full] = vp
        done.add(name)
        received[name] = {}  # drop the output gradients as soon as they are used
        # ... and the captured tensors: autograd frees its own saved copies as the backward pass moves
        # down, and a reference held here until the end would keep those buffers from being reused.
        rec[name] = []

    # Output gradients are consumed inside tensor hooks, as the backward pass produces them, and then
    # dropped: holding every one until the end (what autograd.grad(loss, outputs) does) keeps autograd
    # from reusing their buffers and costs time and memory.
    live = [(name, i) for name in units for i, c in enumerate(rec[name]) if c.out.grad_fn is not None]
    expected = {name: sum(1 for n, _ in live if n == name) for name in units}

    def on_grad(name: str, i: int, grad: torch.Tensor) -> None:
        received[name][i] = grad
        if len(received[name]) == expected[name]:
            with torch.no_grad():
                finish(name)

    handles = [rec[name][i].out.register_hook(functools.partial(on_grad, name, i)) for name, i in live]
    try:
        if loss.requires_grad and live:
            # Asking for the gradient at the lowest captured outputs runs every backward node above them,
            # so every captured output's hook fires; no weight gradient is computed and `param.grad` is not
            # touched. The loss is the SUM of per-sample losses, so row b of each gradient is sample b's own.
            lowest = _lowest([rec[name][i].out for name, i in live])
            for caps in rec.values():
                for c in caps:
                    c.out = None  # the hooks stay registered on the graph; see finish() for why drop it
            torch.autograd.grad(loss.sum(), lowest, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        for name in units:
            if name not in done:  # some (or all) of its calls got no gradient
                finish(name)
    return FactoredGrads(kron, vectors, sq, loss.detach(), output.detach(), written, vector_proj)


def _lowest(outs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The captured outputs with no other captured output below them in the autograd graph.

    Requesting gradients at these makes autograd run every node between the loss and them, which includes
    the ``grad_fn`` of every other captured output (each has a captured output below it).
    """
    targets = {o.grad_fn for o in outs}
    clear: set[Any] = set()  # nodes known to have no captured node at or below them
    return [o for o in outs if not _captured_below(o.grad_fn, targets, clear)]


def _captured_below(root: Any, targets: set[Any], clear: set[Any]) -> bool:
    """Whether a node of ``targets`` lies strictly below ``root``. Stops at the first one found (usually the
    next layer down), so each search covers only the graph between two captured layers; a search that finds
    none adds what it walked to ``clear``, so no later search walks it again."""
    seen: set[Any] = set()
    stack = [nxt for nxt, _ in root.next_functions if nxt is not None]
    while stack:
        node = stack.pop()
        if node in targets:
            return True
        if node in seen or node in clear:
            continue
        seen.add(node)
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    clear |= seen
    return False


def _unit_matrices(
    memo: dict[Any, Any],
    unit: FactoredUnit,
    layout: ProjectionLayout,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, dict[str, torch.Tensor], dict[Any, Any]]:
    """``(kron matrices or None, {vector local name: dense matrix}, the rule's memo)`` of one unit, looked up
    in the layout once per dtype and device (the layout caches the matrices; this saves the lookups per
    batch)."""
    key = (unit.name, unit.matrix, unit.vectors, dtype, device)
    got = memo.get(key)
    if got is None:
        mats = layout.kron_matrices(unit.matrix, dtype, device) if unit.matrix else None
        vmats = {}
        for local in unit.vectors:
            m = layout.dense_block_matrix(unit.full_name(local), dtype, device)
            if m is not None:
                vmats[local] = m
        got = memo[key] = (mats, vmats, {})
    return got


def _zero_result(
    unit: FactoredUnit,
    mats: tuple[torch.Tensor, torch.Tensor] | None,
    params: Mapping[str, nn.Parameter],
    b: int,
    dtype: torch.dtype,
    device: torch.device,
) -> RuleResult:
    res = RuleResult()
    if mats is not None:
        res.matrix_proj = torch.zeros(b, mats[0].shape[1], mats[1].shape[1], dtype=dtype, device=device)
        res.matrix_sq_norm = torch.zeros(b, dtype=dtype, device=device)
    for local in unit.vectors:
        res.vectors[local] = torch.zeros(b, *params[unit.full_name(local)].shape, dtype=dtype, device=device)
    return res
