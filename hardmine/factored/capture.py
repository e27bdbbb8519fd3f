"""The factored pass: one ordinary batched forward + backward, read through forward hooks.

Forward hooks on the selected modules capture each call's input ``x`` and output ``y``. Then
``torch.autograd.grad(per_sample_loss.sum(), [y, ...])`` returns ``delta = d(sum_b L_b)/dy``; because sample
``b``'s loss depends only on row ``b`` of ``y`` (no batch coupling), row ``b`` of ``delta`` is exactly
``dL_b/dy_b``. Only gradients with respect to module *outputs* are requested, so autograd computes no weight
gradient, never touches ``param.grad``, and no per-sample weight gradient is formed: each layer rule turns
``(x, delta)`` into a Kronecker projection, an exact ghost norm and the exact gradients of small vector
parameters.

What the hooks can see is checked, not assumed (:func:`probe_units` on a few samples, then every pass): a
module whose hook never fires (its weights used through ``F.*`` directly), a module that does not see the batch
on dimension 0 (``batch_first=False`` models, reshaped batches), and inputs modified in place are refused with a
clear error instead of returning garbage. A module
whose *output* is modified in place afterwards (``nn.ReLU(inplace=True)``) gets a copy handed to the model
so the captured output keeps its place in the graph.

Inputs broadcast over the batch: a module called on ``(1, ...)`` while the batch has ``B > 1`` samples (Hugging
Face position embeddings are looked up for ``position_ids`` of shape ``(1, T)`` and added to every sample's
token embeddings) has a well-defined per-sample gradient, but its output gradient sums the samples. The hook
therefore hands the model a per-sample copy, ``out.expand(B, ...).clone()``, and records the input expanded
the same way: autograd then delivers each sample's own row and the rules need no special case. The model
computes the same numbers (it broadcast the ``(1, ...)`` output anyway). The probe checks that the model
really uses such an output row by row (:func:`broadcast_problems`), and refuses the module otherwise.

A module whose rule *reforwards* (``nn.MultiheadAttention``, which passes its weights to
``F.multi_head_attention_forward``, where no hook can see its projections) gets one forward hook that computes
its output again with its linear maps as tensors of the graph and hands the model that output; the hook records
the calls of the module itself and of the children it covers (``out_proj``), as ``FactoredUnit.host`` says
(see :mod:`.attention`).

A parameter of shape ``(1, ...)`` the model uses without a module (a ViT's class token) is swapped on its module
for a copy expanded to the batch for the forward (:mod:`.parameter`), checked by the probe like a broadcast
module's output, and put back in ``finally``.

Nothing is attached to the model: hooks are removed and swapped parameters put back in ``finally``, modes are
restored by ``forward_mode``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..batches import (
    Inputs,
    call_model,
    forward_error,
    model_output_tensor,
    split_batch,
    validate_batch,
    validate_output,
)
from ..enums import LossKind, Randomness, parse_choice
from ..extract import forward_mode
from ..losses import LossFn, resolve_loss
from .apply import FactoredGrads, RuleRunner
from .layout import ProjectionLayout
from .plan import FactoredUnit, format_rejected, plan_factored, tied_holders
from .registry import LayerRule, rule_for

__all__ = [
    "Captured",
    "CapturedCall",
    "FactoredUnit",
    "FactoredGrads",
    "plan_factored",
    "probe_units",
    "factored_pass",
    "format_rejected",
    "capture_calls",
    "call_problem",
    "check_calls",
    "check_per_sample_loss",
    "broadcast_problems",
    "apply_rules",
    "output_gradients",
    "compute_factored",
]

logger = logging.getLogger(__name__)

# How many samples the probe forward uses: more than one, so a tensor that does not carry the batch on
# dimension 0 (shape[0] stays 1 or equals a sequence length) is told apart from one that does.
_PROBE_SAMPLES = 3

# {module name: [one record per call, in call order]}
Captured = dict[str, list["CapturedCall"]]


# ------------------------------------------------------------------------------------------------ hooks
@dataclass
class CapturedCall:
    """One call of a hooked module, as its forward hook saw it."""

    x: Any  # the module's (first) input as it saw it
    out: Any  # the module's own output (keeps its autograd identity); dropped once its hook is registered
    passed: Any  # what the model continued with: ``out``, or a clone of it when the module is protected
    x_version: int | None
    passed_version: int | None
    broadcast: bool = False  # the call saw a (1, ...) input and output, expanded here to the batch
    problem: str | None = None  # why it cannot be attributed per sample, as a reforward found (else None)
    hosted: bool = False  # recorded by its host's reforward (the call inside the attention), not its own hook

    @property
    def output_modified(self) -> bool:
        """Whether the model modified the output it continued with in place after the call."""
        return isinstance(self.passed, torch.Tensor) and self.passed._version != self.passed_version


def _version(t: Any) -> int | None:
    return t._version if isinstance(t, torch.Tensor) else None


def _is_broadcast(x: Any, out: Any, batch_size: int | None) -> bool:
    """Whether a call saw one ``(1, ...)`` input and output for a batch of ``batch_size > 1`` samples."""
    return (
        batch_size is not None
        and batch_size > 1
        and isinstance(x, torch.Tensor)
        and isinstance(out, torch.Tensor)
        and x.ndim >= 1
        and out.ndim >= 1
        and x.shape[0] == 1
        and out.shape[0] == 1
    )


def _record(
    store: list[CapturedCall],
    clone: bool,
    batch_size: int | None,
    module: nn.Module,
    args: tuple,
    kwargs: dict,
    out: Any,
) -> Any:
    x = args[0] if args else next(iter(kwargs.values()), None)
    if _is_broadcast(x, out, batch_size):
        assert batch_size is not None
        x = x.expand(batch_size, *x.shape[1:])  # (B, ...): the input every sample saw
        out = out.expand(batch_size, *out.shape[1:])  # (B, ...): one row per sample, so the gradient keeps B
        # The model continues with a copy: an expanded tensor cannot be modified in place, and the copy keeps
        # the captured (expanded) output's place in the graph whatever the model does with it.
        passed = out.clone()
        store.append(CapturedCall(x, out, passed, _version(x), _version(passed), broadcast=True))
        return passed
    passed = out.clone() if clone and isinstance(out, torch.Tensor) else out
    store.append(CapturedCall(x, out, passed, _version(x), _version(passed)))
    # Returning the clone makes the model continue with it, so an in-place op of the model cannot rewrite the
    # captured output and autograd.grad returns the gradient at the module's true output.
    return passed if passed is not out else None


@contextlib.contextmanager
def capture_calls(
    units: Mapping[str, FactoredUnit],
    clone: Collection[str] = (),
    batch_size: int | None = None,
    expand: Collection[str] | None = None,
) -> Iterator[Captured]:
    """Forward hooks on the units' modules for the block; yields ``{module: [CapturedCall, ...]}``, filled as
    the model runs. The modules in ``clone`` hand the model a copy of their output (they are known, or to be
    checked, to have it modified in place). With ``batch_size``, calls of the modules in ``expand`` (None:
    every unit) that are broadcast over the batch (``(1, ...)`` input and output) are expanded to it (see the
    module docstring); other calls are recorded as seen (and a ``(1, ...)`` one refused by
    :func:`check_calls`). Units with a ``host`` (attention and its ``out_proj``) are recorded by one hook on
    the host, which computes its output again (``LayerRule.reforward``); a hosted child keeps its own hook
    for the model's direct calls of it. The hooks are removed on exit (``finally``)."""
    rec: Captured = {name: [] for name in units}
    handles = []
    # Units recorded by a host's reforward (attention and its out_proj): one hook per host, {role: unit}
    hosts: dict[int, tuple[nn.Module, dict[str, str]]] = {}
    for name, unit in units.items():
        if unit.host is not None:
            hosts.setdefault(id(unit.host), (unit.host, {}))[1][unit.role] = name
    try:
        for name, unit in units.items():
            if unit.swaps_parameter:
                size = batch_size if expand is None or name in expand or batch_size == 1 else None
                handles.extend(_swap_parameter(unit, rec[name], batch_size, size))
                continue
            if unit.host is unit.module:
                continue  # recorded by its reforward alone
            # A hosted child (out_proj) keeps a hook of its own too: the host uses its weights without calling
            # it, so this one sees only the model's direct calls of it, which are part of its gradient as well.
            size = batch_size if expand is None or name in expand else None
            hook = functools.partial(_record, rec[name], name in clone, size)
            # First among the module's forward hooks: the output recorded (and the gradient taken there) is the
            # module's own; a user's hook that changes it then runs on what this one hands on, as it would
            handles.append(unit.module.register_forward_hook(hook, with_kwargs=True, prepend=True))
        for host, roles in hosts.values():
            rule = rule_for(host)
            assert rule is not None and rule.reforwards  # the plan hosts units only under such a rule
            stores = {role: rec[name] for role, name in roles.items()}
            protected = {role for role, name in roles.items() if name in clone}
            rng: dict[str, Any] = {}
            if rule.draws_random(host):  # after the user's pre-hooks: the state the forward starts from
                handles.append(host.register_forward_pre_hook(functools.partial(_keep_rng, rng), with_kwargs=True))
            hook = functools.partial(_record_reforward, rule, stores, protected, rng)
            # First among the module's forward hooks: the user's own then see (and may change) the recomputed
            # output, as they would have seen the module's.
            handles.append(host.register_forward_hook(hook, with_kwargs=True, prepend=True))
        yield rec
    finally:
        for h in handles:
            h.remove()


class _Restore:
    """A removable handle that puts a swapped parameter back on its module."""

    def __init__(self, module: nn.Module, local: str, param: nn.Parameter) -> None:
        self.module, self.local, self.param = module, local, param

    def remove(self) -> None:
        self.module._parameters[self.local] = self.param


def _swap_parameter(
    unit: FactoredUnit, store: list[CapturedCall], batch_size: int | None, size: int | None
) -> list[_Restore]:
    """Swap the parameter of a :mod:`.parameter` unit for a copy expanded to ``size`` rows (recorded as its one
    call) until the returned handle is removed. Nothing is swapped or recorded without a batch size; a batch of
    several samples after a probe of one sample (``size`` None: the probe could not check the copy) is recorded
    as refused."""
    if batch_size is None:
        return []
    if size is None:
        store.append(
            CapturedCall(
                None,
                None,
                None,
                None,
                None,
                problem="it is used broadcast over the batch, which the probe batch did not show (a probe of one "
                "sample cannot), so no per-sample copy of it was checked",
            )
        )
        return []
    local = unit.vectors[0]
    param = unit.module._parameters[local]
    assert param is not None  # planned from named_parameters
    out = param.expand(size, *param.shape[1:])  # (B, ...): one row per sample, so the gradient keeps B
    # The model reads a copy: an expanded tensor cannot be modified in place, and autograd delivers the gradient
    # at `out` row by row whatever the model does with the copy. Stored in _parameters directly (as
    # torch.func.functional_call does), since a plain tensor cannot be set as a parameter attribute.
    passed = out.clone()
    unit.module._parameters[local] = passed
    store.append(CapturedCall(out, out, passed, _version(out), _version(passed), broadcast=size > 1))
    return [_Restore(unit.module, local, param)]


def _checkpoint_problem() -> str | None:
    """Why a reforward cannot run here: inside non-reentrant activation checkpointing, whose backward runs the
    block's forward again without hardmine's hooks (and checks that it saves the same tensors), so the output
    computed again in the hook would not be computed again there. Read from the saved-tensor hooks in force
    (a private torch function: where it is missing, nothing is detected and torch's own error remains)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    hooks = top(False) if top is not None else None
    if hooks and "_checkpoint_hook" in getattr(hooks[0], "__qualname__", ""):
        return (
            "it runs inside activation checkpointing (torch.utils.checkpoint), whose backward would run its "
            "forward again without the computation its factored rule adds"
        )
    return None


def _keep_rng(rng: dict[str, Any], module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: the random state the module's forward starts from (CPU, and CUDA where it runs)."""
    rng["cpu"] = torch.get_rng_state()
    first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
    if first is not None and first.device.type == "cuda":
        rng["cuda"] = (first.device, torch.cuda.get_rng_state(first.device))


def _record_reforward(
    rule: LayerRule,
    stores: Mapping[str, list[CapturedCall]],
    clone: Collection[str],
    rng: dict[str, Any],
    module: nn.Module,
    args: tuple,
    kwargs: dict,
    out: Any,
) -> Any:
    """The forward hook of a module whose rule reforwards (see ``LayerRule.reforward``): the model continues
    with the output computed again, whose linear maps are recorded for the roles in ``stores``. With ``rng``
    (kept by :func:`_keep_rng`), the reforward draws the random numbers the module's forward drew."""
    why = _checkpoint_problem() or rule.reforward_problem(module, args, kwargs)
    if why is not None:  # refused: the module's own output stands, and nothing is drawn again
        rng.clear()
        for store in stores.values():
            store.append(CapturedCall(None, None, None, None, None, problem=why, hosted=True))
        return None
    if "cpu" in rng:
        torch.set_rng_state(rng.pop("cpu"))
    if "cuda" in rng:
        device, state = rng.pop("cuda")
        torch.cuda.set_rng_state(state, device)
    new_out, calls = rule.reforward(module, args, kwargs, out, clone)
    for role, store in stores.items():
        c = calls[role]
        store.append(CapturedCall(c.x, c.out, c.passed, _version(c.x), _version(c.passed), hosted=True))
    return new_out


def _hooked_forward(
    model: nn.Module,
    inputs: Inputs,
    units: Mapping[str, FactoredUnit],
    protect: Collection[str],
    b: int | None,
    expand: Collection[str] | None = None,
) -> tuple[Any, Captured]:
    with capture_calls(units, protect, b, expand) as rec, torch.enable_grad():
        out = call_model(model, inputs)
    return out, rec


# ----------------------------------------------------------------------------------------------- checks
def call_problem(
    unit: FactoredUnit, calls: list[CapturedCall], batch_size: int, *, uncalled_ok: bool
) -> str | None:
    """Why ``unit``'s captured calls cannot be attributed per sample, or None. ``uncalled_ok``: a batch after
    the probe, whose probe saw the module called: a module the forward skips on this batch (a branch the data
    picks, an expert no token is routed to) has a zero gradient for every sample, which is what its rule gives
    without calls."""
    if not calls and uncalled_ok:
        return None
    if not calls:
        return (
            "its forward hook never fired: the model uses its parameters without calling the module "
            "(e.g. F.linear(x, m.weight))"
        )
    if unit.host is not None and unit.role and not any(c.hosted for c in calls):
        return (
            f"its host {type(unit.host).__name__} was not seen running (called through .forward(), or not at "
            "all), so the host's use of its weights cannot be told"
        )
    for c in calls:
        if c.problem is not None:
            return c.problem
        why = unit.rule.check_call(unit.module, c.x, c.out, batch_size)
        if why is not None:
            return why
        if c.x._version != c.x_version:
            return "its input is modified in place after the layer ran"
    return None


def check_calls(
    units: Mapping[str, FactoredUnit], rec: Captured, batch_size: int, later: torch.Tensor | None = None
) -> tuple[dict[str, str], set[str]]:
    """``({module: problem}, modules whose output the model modified in place)`` for one captured forward.

    A modified output is a problem only where the module did not hand the model a clone (see
    :func:`capture_calls`); the caller decides (a probe learns which modules to protect from it).
    ``later``: the loss (or model output) of a batch after the probe, which saw every module called: a module
    this forward skipped has zero gradients (see :func:`call_problem`), unless its parameters reach ``later``
    all the same (used without calling the module: refused). ``None``: a module not called is refused."""
    problems: dict[str, str] = {}
    modified: set[str] = set()
    for name, unit in units.items():
        why = call_problem(unit, rec[name], batch_size, uncalled_ok=later is not None)
        if why is not None:
            problems[name] = why
        elif any(c.output_modified for c in rec[name]):
            modified.add(name)
    if later is not None:
        problems.update(_used_uncalled(units, rec, later))
    # A tied parameter is exact only when every holder is: one refused holder refuses them all (the caller
    # then sends the parameter to vmap with its other holders, instead of summing some uses only).
    for param, holders in tied_holders(units).items():
        bad = next((h for h in holders if h in problems), None)
        if bad is not None:
            for h in holders:
                problems.setdefault(h, f"it shares {param} with {units[bad].label}, where {problems[bad]}")
    return problems, modified


def _used_uncalled(units: Mapping[str, FactoredUnit], rec: Captured, later: torch.Tensor) -> dict[str, str]:
    """``{module: problem}`` for the modules this forward did not call whose parameters the autograd graph of
    ``later`` reaches all the same: a weight used without its module on this batch (``F.linear(x, m.weight)`` in
    a branch the probe did not take) has gradients the module's rule, given no calls, would write as zeros.
    Host-side only (a walk of the graph, no device work), and only on a batch that skipped a module. A parameter
    a called module holds too (tied) reaches the graph through that module and is not evidence here."""
    uncalled = [name for name in units if not rec[name]]
    if not uncalled:
        return {}
    called = {id(p) for name, unit in units.items() if rec[name] for p in _unit_parameters(unit)}
    wanted = {id(p): name for name in uncalled for p in _unit_parameters(units[name]) if id(p) not in called}
    found: set[str] = set()
    stack = [later.grad_fn] if later.grad_fn is not None else []
    seen = set(stack)  # every node is walked once (a node several paths reach: a diamond of the graph)
    while stack:
        node = stack.pop()
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf's (a parameter's) gradient
        if variable is not None and id(variable) in wanted:
            found.add(wanted[id(variable)])
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:  # None: an input that needs no gradient
                seen.add(nxt)
                stack.append(nxt)
    return {
        name: "its forward hook did not fire on this batch, yet its parameters reach the loss: the model uses them "
        "without calling the module (e.g. F.linear(x, m.weight))"
        for name in uncalled
        if name in found
    }


def _unit_parameters(unit: FactoredUnit) -> list[torch.Tensor]:
    """The module's own tensors of ``unit``'s selected parameters (a tied matrix: the module's own name for it)."""
    local = ([unit.rule.matrix_param] if unit.matrix and unit.rule.matrix_param else []) + list(unit.vectors)
    return [p for n in local if (p := unit.module._parameters.get(n)) is not None]


def check_per_sample_loss(loss: Any, b: int) -> None:
    """``ValueError`` unless ``loss`` is a tensor of shape ``(b,)``: one loss per sample."""
    if not isinstance(loss, torch.Tensor) or tuple(loss.shape) != (b,):
        raise ValueError(
            f"the loss function returned {getattr(loss, 'shape', type(loss).__name__)}; it must return "
            f"one loss per sample, shape ({b},)."
        )


def probe_units(
    model: nn.Module, inputs: Inputs, units: Mapping[str, FactoredUnit], batch_size: int
) -> tuple[dict[str, str], set[str]]:
    """Run the model on the first few samples with hooks and check each unit can be attributed per sample.

    Returns ``({module: problem}, modules to protect)``: the modules that must hand the model a copy of their
    output in the pass, because the model modifies it in place or because it is broadcast over the batch and
    passed the checks below (only those are expanded by the pass: a module the probe did not see broadcast,
    e.g. on a first batch of one sample, is refused in a later batch rather than expanded unchecked; the
    extractor probes again on its first larger batch). Call
    inside ``forward_mode`` so the probe sees the same code path as the pass. Modules called on an input
    broadcast over the batch get three more checks (see the module docstring): the model's forward must
    accept their per-sample outputs, use them row by row (:func:`broadcast_problems`) and the input must not
    depend on the batch's samples (:func:`batch_dependent_inputs`).
    """
    n = min(batch_size, _PROBE_SAMPLES)
    sub = tree_map(lambda t: t[:n], inputs)  # (n, ...) leading samples
    with capture_calls(units, (), n) as rec:
        try:
            with torch.enable_grad():
                raw = call_model(model, sub)
        except Exception as exc:
            expanded = [name for name, calls in rec.items() if any(c.broadcast for c in calls)]
            if not expanded:
                raise
            failure = (
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}" if str(exc) else type(exc).__name__
            )
        else:
            failure = None
    swapped = [name for name in expanded if units[name].swaps_parameter] if failure is not None else []
    if swapped:
        # Probe again with the parameters left as they are: the modules' own checks then stand, and the
        # parameters are refused (under engine='auto' they go to vmap). Expanded modules, if the model fails
        # on them as well, are refused by that probe.
        rest = {name: unit for name, unit in units.items() if name not in swapped}
        problems, protect = probe_units(model, inputs, rest, batch_size) if rest else ({}, set())
        for name in swapped:
            problems[name] = (
                "it is a parameter of shape (1, ...) the model broadcasts over the batch, and the model's forward "
                f"fails when it is expanded to one row per sample ({failure})"
            )
        return problems, protect
    if failure is not None:
        # The model cannot take a per-sample copy where it expected (1, ...): probe again as the model wants it,
        # and refuse the modules that were expanded (they go to vmap under engine='auto', as before).
        _, rec = _hooked_forward(model, sub, units, (), None)
        problems, modified = check_calls(units, rec, n)
        for name in expanded:
            problems[name] = (
                f"it was called on an input of shape (1, ...) broadcast over the batch, and the model's forward "
                f"fails when its output is expanded to one row per sample ({failure})"
            )
        return problems, modified
    problems, modified = check_calls(units, rec, n)
    expanded = [name for name, calls in rec.items() if any(c.broadcast for c in calls)]
    if expanded:
        logger.debug("inputs broadcast over the batch, expanded per sample: %s", ", ".join(expanded))
    for name, why in {
        **batch_dependent_inputs(model, sub, units, rec, n),
        **broadcast_problems(
            raw, rec, n, [name for name, unit in units.items() if unit.swaps_parameter], own_rows=True
        ),
    }.items():
        problems.setdefault(name, why)
    return problems, modified | {name for name in expanded if name not in problems}


def batch_dependent_inputs(
    model: nn.Module, sub: Inputs, units: Mapping[str, FactoredUnit], rec: Captured, n: int
) -> dict[str, str]:
    """``{module: problem}`` for broadcast calls whose ``(1, ...)`` input depends on the batch's samples (e.g. a
    batch mean): expanding it would hand every sample the batch's value where the per-sample loop has the
    sample's own. Position ids and learned tokens are the same for any batch; the check runs the model again
    on one sample fewer and asks for bit-identical inputs."""
    # A parameter (swaps_parameter) is the same for any batch: only module inputs are checked.
    expanded = {
        name: units[name]
        for name, calls in rec.items()
        if any(c.broadcast for c in calls) and not units[name].swaps_parameter
    }
    if not expanded:
        return {}
    fewer = tree_map(lambda t: t[: n - 1], sub)  # (n - 1, ...): a different batch, same per-sample inputs
    _, again = _hooked_forward(model, fewer, expanded, (), None)
    problems: dict[str, str] = {}
    for name in expanded:
        first, second = rec[name], again[name]
        same = len(first) == len(second) and all(
            not c.broadcast or (isinstance(d.x, torch.Tensor) and torch.equal(c.x[:1], d.x[:1]))
            for c, d in zip(first, second, strict=False)
        )
        if not same:
            problems[name] = (
                "it was called on an input of shape (1, ...) that changes with the batch's samples (e.g. a batch "
                "statistic), so it cannot be attributed per sample"
            )
    return problems


def broadcast_problems(
    raw: Any, rec: Captured, n: int, parameters: Collection[str] = (), own_rows: bool = False
) -> dict[str, str]:
    """``{module: problem}`` for modules whose broadcast output (expanded per sample by the hooks) the model
    does not use row by row.

    Sample ``c``'s output may depend on row ``c`` of the expanded output only (a model that, say, took row 0
    for every sample would otherwise get every gradient in row 0): for each probe sample, the gradient of
    its output must vanish exactly on every other row. One small backward per probe sample, on the probe's
    few samples only, and only when some module's input was broadcast. ``parameters``: the units among them that
    are parameters the model broadcasts itself (:mod:`.parameter`), named so in the problems.

    That check proves nothing for a sample whose gradient does not reach its own row (a zero-initialised head
    makes every gradient below it zero on the probe). A parameter (swapped on every later batch whatever the
    probe showed) is refused unless every probe sample's gradient reaches its own row; with ``own_rows`` (the
    offline probe) so is a module whose output the probe reached with a zero gradient. A module whose output no
    gradient reached at all is not used by the loss, and its per-sample gradient, zero, is exact. The online
    miner checks its user's first training step, which may start from a zero head, without ``own_rows``.
    """
    live = [
        (name, c.out)
        for name, calls in rec.items()
        for c in calls
        if c.broadcast and isinstance(c.out, torch.Tensor) and c.out.requires_grad
    ]
    if not live:
        return {}
    try:
        output = model_output_tensor(raw)
    except ValueError as exc:
        return {
            name: f"its input is broadcast over the batch and the model output cannot be checked ({exc})"
            for name, _ in live
        }
    problems: dict[str, str] = {}
    if not (output.requires_grad and output.is_floating_point() and output.shape[:1] == (n,)):
        return {
            name: "its input is broadcast over the batch and the model output does not show it is used "
            "sample by sample"
            for name, _ in live
        }
    outs = [o for _, o in live]
    # unit -> the probe samples whose gradient reached their own row of its (copy's) expanded output
    own: dict[str, set[int]] = {name: set() for name, _ in live if name in parameters}
    with torch.enable_grad():
        for c in range(n):
            grads = torch.autograd.grad(output[c].sum(), outs, retain_graph=True, allow_unused=True)
            for (name, _), g in zip(live, grads, strict=True):
                if g is None or name in problems:
                    continue
                if own_rows:
                    own.setdefault(name, set())
                if name in own and bool((g[c] != 0).any()):
                    own[name].add(c)
                others = torch.cat([g[:c], g[c + 1 :]])  # (n - 1, ...) rows of the other samples
                if bool((others != 0).any()):
                    what = (
                        "it is a parameter of shape (1, ...) the model broadcasts over the batch, and sample "
                        f"{c}'s output depends on other samples' rows of its copy expanded to the batch"
                        if name in parameters
                        else f"it was called on an input of shape (1, ...) broadcast over the batch, and sample {c}'s "
                        "output depends on other samples' rows of its output"
                    )
                    problems[name] = f"{what} (the model does not use it row by row)"
    for name, seen in own.items():
        # Swapped on every later batch whatever it shows, so a probe that proves nothing refuses it: a sample whose
        # gradient does not reach its own row (the model did not read it for that sample, read another row, or a
        # zero layer above, a zero-initialised head, hid how it is read) leaves the row check without evidence.
        if len(seen) < n:
            what = (
                "it is a parameter of shape (1, ...) the model broadcasts over the batch, and on the first batch no "
                f"gradient reached sample {min(set(range(n)) - seen)}'s own row of its copy"
                if name in parameters
                else "it was called on an input of shape (1, ...) broadcast over the batch, and on the first batch no "
                f"gradient reached sample {min(set(range(n)) - seen)}'s own row of its output"
            )
            problems.setdefault(name, f"{what}, so how the model reads it could not be checked")
    return problems


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
        return compute_factored(model, inputs, target, fn, kind, units, layout, protect, b)


def compute_factored(
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
    flags: list[torch.Tensor] | None = None,
) -> FactoredGrads:
    """The pass itself (inputs already validated with ``validate_inputs``, units already probed; ``protect``
    from :func:`probe_units`, whose broadcast modules are expanded here): the hooked forward, the checks and
    :func:`apply_rules`. The output is checked against the targets here, before the
    loss, so no separate probe forward is needed per batch. ``out`` and ``memo``: see :func:`apply_rules`.
    ``flags``: check label values on the device instead (no host sync; see ``batches.validate_output``)."""
    try:
        raw, rec = _hooked_forward(model, inputs, units, protect, b, expand=protect)
    except (ValueError, torch.OutOfMemoryError, MemoryError):
        raise  # already clear, or not the user's input (callers catch OOM to shrink the batch)
    except Exception as exc:  # e.g. a shape mismatch in a later batch: quote the shapes
        raise forward_error(inputs, exc) from exc
    with torch.enable_grad():
        output = model_output_tensor(raw)
        loss_target = validate_output(output, target, loss_kind, flags)  # clamped labels under `flags`
        loss = loss_fn(output, loss_target)
    check_per_sample_loss(loss, b)
    problems, modified = check_calls(units, rec, b, later=loss)  # (the probe refused modules never called)
    for name in modified - protect:  # protected modules handed the model a clone: theirs may change
        problems.setdefault(name, "its output was modified in place, which the probe batch did not show")
    for name, why in problems.items():
        raise ValueError(
            f"module {units[name].label}: {why}. The factored engine needs each selected module to see the "
            "batch on dimension 0 as the probe batch did; use engine='vmap'."
        )
    return apply_rules(units, rec, loss, output, layout, b, out=out, memo=memo)


def apply_rules(
    units: Mapping[str, FactoredUnit],
    rec: Captured,
    loss: torch.Tensor,
    output: torch.Tensor,
    layout: ProjectionLayout,
    b: int,
    *,
    out: torch.Tensor | None = None,
    memo: dict[Any, Any] | None = None,
    deltas: Mapping[str, list[torch.Tensor] | Mapping[int, torch.Tensor]] | None = None,
    retain_graph: bool = False,
) -> FactoredGrads:
    """Every unit's layer rule on its captured calls (already checked with :func:`check_calls`) and the
    gradients at its outputs: the one rule application of every factored pass (``GradientExtractor``,
    ``OnlineMiner``).

    Args:
        units, rec: the units and what :func:`capture_calls` recorded for them in the forward of ``loss``.
        loss: ``(B,)`` per-sample losses; output: the model output (its dtype and device are the default for
            a unit without gradient).
        out: optional ``(B, layout.out_dim)`` tensor the Kronecker projections are written straight into
            where its dtype matches the model's (see ``FactoredGrads.written``; ``FactoredGrads.write_to``
            writes the rest).
        memo: see :class:`~hardmine.factored.apply.RuleRunner`.
        deltas: ``{module: [output gradient per call]}`` (or ``{module: {call index: output gradient}}``, as
            :func:`output_gradients` returns them: a call without an entry received none) the caller computed
            itself (e.g. the closed-form gradient at the logits of an output layer); then no backward runs. ``None``: autograd computes
            them from ``loss`` (below).
        retain_graph: keep the autograd graph for the caller's own backward (training loops); the output
            gradients are then asked for all at once instead of streamed through hooks.

    Without ``deltas``, ``torch.autograd.grad(loss.sum(), outputs)`` runs: the loss is the SUM of per-sample
    losses and no sample's loss depends on another row, so row ``b`` of each output gradient is sample
    ``b``'s own; only gradients with respect to module outputs are requested, so no weight gradient is
    computed and ``param.grad`` is not touched.
    """
    inputs = {name: [c.x for c in calls] for name, calls in rec.items()}
    runner = RuleRunner(units, inputs, layout, b, output.dtype, output.device, out=out, memo=memo)
    if deltas is not None:
        received = {name: ds if isinstance(ds, Mapping) else dict(enumerate(ds)) for name, ds in deltas.items()}
    elif retain_graph:
        received = output_gradients(rec, loss)
    else:
        received = _streamed(rec, loss, runner)
    with torch.no_grad():
        for name in units:
            if name not in runner.done:  # not run inside the backward: no (or not every) gradient reached it
                runner.run(name, received.get(name, {}))
    return runner.result(loss, output)


def _live(rec: Captured) -> list[tuple[str, int]]:
    """``(module, call index)`` of every captured output the loss can reach."""
    return [
        (name, i) for name, calls in rec.items() for i, c in enumerate(calls) if c.out.grad_fn is not None
    ]


def output_gradients(rec: Captured, loss: torch.Tensor) -> dict[str, dict[int, torch.Tensor]]:
    """``{module: {call index: output gradient}}`` from one ``autograd.grad`` call that keeps the graph: a
    training loop keeps it for its own backward anyway, so holding the gradients until the end costs little
    and no per-output hook is needed. A call the loss does not reach has no entry."""
    live = _live(rec)
    received: dict[str, dict[int, torch.Tensor]] = {name: {} for name in rec}
    if loss.requires_grad and live:
        outs = [rec[name][i].out for name, i in live]
        got = torch.autograd.grad(loss.sum(), outs, retain_graph=True, allow_unused=True)
        for (name, i), g in zip(live, got, strict=True):
            if g is not None:
                received[name][i] = g
    return received


def _streamed(rec: Captured, loss: torch.Tensor, runner: RuleRunner) -> dict[str, dict[int, torch.Tensor]]:
    """Output gradients consumed inside tensor hooks, as the backward pass produces them, and then dropped:
    holding every one until the end (what ``autograd.grad(loss, outputs)`` returns) keeps autograd from
    reusing their buffers and costs time and memory. Returns the gradients of units that did not receive
    all of theirs (some calls got none)."""
    live = _live(rec)
    received: dict[str, dict[int, torch.Tensor]] = {name: {} for name in rec}
    if not (loss.requires_grad and live):
        return received  # no gradient reaches any captured output: every unit's gradients are zero
    expected = {name: 0 for name in rec}
    for name, _ in live:
        expected[name] += 1

    def on_grad(name: str, i: int, grad: torch.Tensor) -> None:
        received[name][i] = grad
        if len(received[name]) == expected[name]:
            with torch.no_grad():
                runner.run(name, received.pop(name))  # the gradients are dropped once used

    outs = [rec[name][i].out for name, i in live]
    handles = [o.register_hook(functools.partial(on_grad, name, i)) for o, (name, i) in zip(outs, live)]
    try:
        # Asking for the gradient at the lowest captured outputs runs every backward node above them, so
        # every captured output's hook fires; no weight gradient is computed and `param.grad` is not touched.
        lowest = _lowest(outs)
        del outs
        for calls in rec.values():
            for c in calls:
                c.out = None  # the hooks stay registered on the graph; see RuleRunner.run for why drop it
        torch.autograd.grad(loss.sum(), lowest, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return received


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
