"""The batch contract: what a batch is, how the model is called on it, and the checks at that boundary.

Every consumer (the vmap and factored engines, ``GradientExtractor``, ``scan`` and the online miner) reads
batches through these functions, so they accept the same shapes and fail with the same messages.

A batch is

* ``(inputs, target)`` or ``(inputs, target, sample_ids)`` (a tuple or list), or
* a mapping carrying its target under ``"labels"`` (or ``label``/``target``/``targets``/``y``) and,
  optionally, its ids under ``"sample_id"``; the remaining keys are the model's keyword arguments.

``inputs`` is a tensor (``model(x)``), a tuple of tensors (positional arguments, ``model(*x)``) or a mapping
of tensors (keyword arguments, ``model(**x)``, e.g. ``input_ids`` + ``attention_mask``). Every input tensor
and the target share the leading batch dimension ``B``.

Sample ids are ints or strings, one per sample: a 1-D integer tensor, a NumPy array, or any sequence;
``sample_ids`` returns them as an array (int64, or object holding ``str``) and ``sample_id_list`` as a
Python list, each with their kind (``"int"`` or ``"str"``).

Functions that take ``where`` (e.g. ``"batch 3"``) prefix their error messages with it, so a streaming
caller can say which batch was bad; ``None`` gives the bare message.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_map

from .checks import is_int
from .enums import LossKind, TaskKind
from .losses import IGNORE_INDEX

__all__ = [
    "DeferredChecks",
    "IdKind",
    "Inputs",
    "SAMPLE_ID_KEY",
    "TARGET_KEYS",
    "call_model",
    "check_causal_lm_target",
    "check_class_target",
    "check_labels",
    "check_lm_labels",
    "is_causal_lm_batch",
    "check_multilabel_target",
    "check_regression_target",
    "check_target",
    "clamped_labels",
    "detached",
    "forward_error",
    "is_causal_lm",
    "infer_task",
    "input_leaves",
    "label_flag",
    "labels_outside",
    "model_output_tensor",
    "sample_id_list",
    "sample_id_tensor",
    "sample_ids",
    "split_batch",
    "split_batch_ids",
    "split_unlabelled",
    "to_device",
    "to_host_async",
    "validate_batch",
    "validate_inputs",
    "validate_output",
]

logger = logging.getLogger(__name__)

Inputs = torch.Tensor | tuple[torch.Tensor, ...] | Mapping[str, torch.Tensor]
IdKind = Literal["int", "str"]
TARGET_KEYS = ("labels", "label", "target", "targets", "y")
SAMPLE_ID_KEY = "sample_id"


def _prefix(where: str | None) -> str:
    return f"{where}: " if where else ""


# ---------------------------------------------------------------------------------------------- splitting
def split_batch(batch: Any) -> tuple[Inputs, torch.Tensor]:
    """``(inputs, target)`` from ``(inputs, target)`` (extra elements ignored) or a mapping with a
    ``labels``-like key (the first of ``TARGET_KEYS`` present; the other keys are the inputs)."""
    if isinstance(batch, Mapping):
        keys = [k for k in TARGET_KEYS if k in batch]
        if not keys:
            raise ValueError(
                f"batch is a mapping with keys {sorted(batch)} but none of {list(TARGET_KEYS)}; "
                "put the target under 'labels' or pass an (inputs, target) pair."
            )
        inputs = {k: v for k, v in batch.items() if k != keys[0]}
        return inputs, batch[keys[0]]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        inputs = batch[0]
        if isinstance(inputs, list):
            inputs = tuple(inputs)
        return inputs, batch[1]
    raise ValueError(
        f"batch of type {type(batch).__name__} is not understood; pass (inputs, target) or a mapping with 'labels'."
    )


def split_batch_ids(batch: Any, where: str | None = None) -> tuple[Inputs, torch.Tensor, Any]:
    """``(inputs, target, ids or None)`` from ``(x, y)``, ``(x, y, ids)`` or a mapping with ``labels`` (and
    optionally ``sample_id``). The ids are returned as given (parse them with ``sample_ids``); the target is
    checked to be a tensor with a non-empty batch dimension."""
    ids = None
    if isinstance(batch, Mapping):
        ids = batch.get(SAMPLE_ID_KEY)
        batch = {k: v for k, v in batch.items() if k != SAMPLE_ID_KEY}
    elif isinstance(batch, (tuple, list)):
        if len(batch) == 3:
            ids = batch[2]
            batch = (batch[0], batch[1])
        elif len(batch) != 2:
            raise ValueError(
                f"{_prefix(where)}a batch sequence must be (inputs, target) or (inputs, target, sample_ids), got "
                f"{len(batch)} elements."
            )
    else:
        raise ValueError(
            f"{_prefix(where)}batch of type {type(batch).__name__} is not understood; yield (inputs, target), "
            "(inputs, target, sample_ids) or a mapping with 'labels' (and optionally 'sample_id')."
        )
    inputs, target = split_batch(batch)
    check_target(target, where)
    if target.ndim == 0 or target.shape[0] == 0:
        raise ValueError(
            f"{_prefix(where)}target has shape {tuple(target.shape)}; it needs a non-empty batch dimension."
        )
    return inputs, target, ids


def split_unlabelled(batch: Any, where: str | None = None) -> tuple[Inputs, Any]:
    """``(inputs, ids or None)`` of a batch of unlabelled data: ``x``, ``(x,)``, ``(x, target)``,
    ``(x, target, ids)`` or a mapping (any ``labels``-like key and ``sample_id`` taken out). A target that is
    present is ignored: an unlabelled scan predicts its own."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k != SAMPLE_ID_KEY and k not in TARGET_KEYS}
        return inputs, batch.get(SAMPLE_ID_KEY)
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 3:
        inputs = tuple(batch[0]) if isinstance(batch[0], list) else batch[0]
        return inputs, batch[2] if len(batch) == 3 else None
    raise ValueError(
        f"{_prefix(where)}batch of type {type(batch).__name__} is not understood; for unlabelled data yield x, "
        "(x,), (x, ignored_target, sample_ids) or a mapping of inputs (optionally with 'sample_id')."
    )


def input_leaves(inputs: Inputs) -> list[tuple[str, torch.Tensor]]:
    """``[(name, tensor)]`` for every input tensor: ``"inputs"``, ``"inputs[i]"`` or the mapping's keys.
    ValueError for anything that is not a tensor / tuple / mapping of tensors."""
    if isinstance(inputs, torch.Tensor):
        return [("inputs", inputs)]
    if isinstance(inputs, Mapping):
        items = list(inputs.items())
    elif isinstance(inputs, tuple):
        items = [(f"inputs[{i}]", v) for i, v in enumerate(inputs)]
    else:
        raise ValueError(
            f"inputs of type {type(inputs).__name__} are not supported; pass a tensor, a tuple of tensors "
            "or a mapping of tensors."
        )
    for name, v in items:
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"input {name!r} is a {type(v).__name__}, not a torch.Tensor; convert it first.")
    return [(str(n), v) for n, v in items]


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor moved to ``device`` (tensors already there are returned as they are);
    mappings become dicts and lists become tuples, anything else is passed through. A pinned tensor (e.g. from
    a ``DataLoader(pin_memory=True)``) goes to a GPU without blocking the host."""
    if isinstance(obj, torch.Tensor):
        if obj.device == device:
            return obj
        return obj.to(device, non_blocking=torch.device(device).type == "cuda" and obj.is_pinned())
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return tuple(to_device(v, device) for v in obj)
    return obj


def detached(t: torch.Tensor) -> torch.Tensor:
    """``t`` without its autograd history: ``t`` itself where it has none (a per-step hot path: ``detach`` is
    an op the dispatcher runs even then)."""
    return t.detach() if t.requires_grad else t


def to_host_async(tensors: Iterable[torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
    """``(host copies, CUDA event or None)``: CUDA tensors are copied into pinned host memory without blocking
    and the event completes once the copies have landed (``event.query()`` polls, ``event.synchronize()``
    waits); host tensors are returned detached as they are (event None: readable at once). Read the copies
    (e.g. ``.numpy()``) only after the event."""
    out: list[torch.Tensor] = []
    devices: list[torch.device] = []
    for t in tensors:
        t = detached(t)
        if t.device.type == "cuda":
            out.append(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True))
            if t.device not in devices:
                devices.append(t.device)
        elif t.device.type == "cpu":
            out.append(t)
        else:  # another accelerator: an ordinary (blocking) copy
            out.append(t.cpu())
    # A copy is queued on the current stream of the tensor's own device, which need not be the current device
    # (a model on cuda:1 in a process whose current device is cuda:0): the event goes on that stream, after
    # the copies, or it would complete at once and the copies be read before they land.
    events = []
    for dev in devices:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(dev))
        events.append(event)
    if not events:
        return out, None
    return out, events[0] if len(events) == 1 else _AllLanded(events)


class _AllLanded:
    """The events of copies from several devices, answering like one event: done when all are."""

    def __init__(self, events: list[Any]) -> None:
        self.events = events

    def query(self) -> bool:
        return all(e.query() for e in self.events)

    def synchronize(self) -> None:
        for e in self.events:
            e.synchronize()


# ------------------------------------------------------------------------------------------ calling
def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)``, ``model(**inputs)`` or ``model(*inputs)`` for a tensor, a mapping or a tuple/list."""
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    raise ValueError(
        f"inputs of type {type(inputs).__name__} are not supported; pass a tensor, a tuple of tensors "
        "(positional arguments) or a mapping of tensors (keyword arguments)."
    )


def model_output_tensor(out: Any) -> torch.Tensor:
    """The tensor to apply the loss to: the output itself, its ``logits`` (HF style), or its first element."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValueError(
        f"the model returned a {type(out).__name__}; hardmine needs a tensor, a mapping/object with 'logits', "
        "or a tuple whose first element is the output tensor."
    )


def forward_error(inputs: Inputs, exc: BaseException) -> ValueError:
    """A ``ValueError`` for a failed model forward that quotes the per-sample input shapes."""
    shapes = {n: tuple(t.shape[1:]) for n, t in input_leaves(inputs)}
    return ValueError(f"the model's forward failed on per-sample input shapes {shapes}: {exc}")


# --------------------------------------------------------------------------------------- sample ids
def sample_ids(ids: Any, b: int, where: str | None = None) -> tuple[np.ndarray, IdKind]:
    """User ids -> ``(array, kind)``: an int64 array (``"int"``) or an object array of ``str`` (``"str"``),
    checked to hold exactly ``b`` ids.

    Accepts a 1-D integer tensor, a NumPy array, or any iterable of ints (not bools) or of strings
    (not a single string, a mapping or a set, which have no per-sample order).
    """
    pre = _prefix(where)
    if isinstance(ids, torch.Tensor):
        arr = sample_id_tensor(ids, b, where).detach().cpu().numpy().astype(np.int64)
        kind: IdKind = "int"
    elif isinstance(ids, np.ndarray) and ids.dtype.kind in "iu":
        if ids.ndim != 1:
            raise ValueError(f"{pre}sample ids must be 1-D, got shape {ids.shape}.")
        arr, kind = ids.astype(np.int64), "int"
    elif isinstance(ids, (str, bytes, Mapping, set, frozenset)) or not isinstance(ids, Iterable):
        raise ValueError(f"{pre}sample ids must be a sequence with one id per sample, got {type(ids).__name__}.")
    else:
        seq = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)  # NumPy scalars -> int / str
        if all(isinstance(v, str) for v in seq):
            arr, kind = np.array(seq, dtype=object), "str"
        elif all(is_int(v) for v in seq):
            arr, kind = np.asarray(seq, dtype=np.int64), "int"
        else:
            kinds = sorted({type(v).__name__ for v in seq})
            raise ValueError(f"{pre}sample ids must be all integers or all strings, got {kinds}.")
    if len(arr) != b:
        # Streaming callers (``where`` given) count samples; the online miner speaks of its batch.
        count = f"{b} samples" if where else f"a batch of {b}"
        raise ValueError(f"{pre}{len(arr)} sample ids for {count}; give exactly one id per sample.")
    return arr, kind


def sample_id_tensor(ids: torch.Tensor, b: int, where: str | None = None) -> torch.Tensor:
    """``ids`` checked as a tensor of ``b`` sample ids (1-D, integer) by its shape and dtype only: its values are
    not read, so ids on a GPU cost no host sync here (the online miner copies them with its dynamics)."""
    pre = _prefix(where)
    if torch.is_floating_point(ids) or ids.dtype == torch.bool or ids.ndim != 1:
        raise ValueError(
            f"{pre}sample ids must be a 1-D integer tensor or a list of ints/strings, got a {ids.dtype} "
            f"tensor of shape {tuple(ids.shape)}."
        )
    if len(ids) != b:
        count = f"{b} samples" if where else f"a batch of {b}"  # as sample_ids says it
        raise ValueError(f"{pre}{len(ids)} sample ids for {count}; give exactly one id per sample.")
    return ids


def sample_id_list(ids: Any, b: int, where: str | None = None) -> tuple[list[Any], IdKind]:
    """``sample_ids`` as a Python list (of ``int`` or ``str``) with its kind."""
    arr, kind = sample_ids(ids, b, where)
    return arr.tolist(), kind


# ------------------------------------------------------------------------------------------- targets
def check_target(target: Any, where: str | None = None) -> torch.Tensor:
    """``target`` if it is a tensor, else a ValueError naming its type."""
    if not isinstance(target, torch.Tensor):
        raise ValueError(
            f"{_prefix(where)}target is a {type(target).__name__}, not a torch.Tensor; convert it with "
            "torch.as_tensor."
        )
    return target


def check_class_target(target: torch.Tensor) -> None:
    """Classification targets: integer class ids of shape ``(B,)``."""
    if torch.is_floating_point(target) or target.dtype == torch.bool or torch.is_complex(target):
        raise ValueError(
            f"classification targets must be integer class ids, got dtype {target.dtype}; pass "
            "target.long(), or loss='mse' for regression."
        )
    if target.ndim != 1:
        raise ValueError(f"classification targets must be 1-D (B,), got shape {tuple(target.shape)}.")


def check_multilabel_target(target: torch.Tensor, flags: list[torch.Tensor] | None = None) -> None:
    """Multi-label (bce) targets: ``(B, C)`` with every value 0 or 1 (any dtype). With ``flags`` the value
    check appends a device flag instead of raising (see :class:`DeferredChecks`)."""
    if target.ndim != 2:
        raise ValueError(
            f"multi-label (bce) targets must be (B, num_labels) 0/1 rows, got shape {tuple(target.shape)}; for one "
            "class per sample use the default cross-entropy."
        )
    t = target.detach()
    if flags is not None:  # deferred: no device sync (see DeferredChecks)
        flags.append(((t != 0) & (t != 1)).any())
    elif not bool(((t == 0) | (t == 1)).all()):
        raise ValueError("multi-label (bce) targets must be 0 or 1 for every label; found other values.")


def is_causal_lm(loss_kind: LossKind | None) -> bool:
    """Whether a resolved loss kind is a causal-LM loss (either token reduction)."""
    return loss_kind in (LossKind.CAUSAL_LM, LossKind.CAUSAL_LM_SUM)


def check_causal_lm_target(
    target: torch.Tensor, where: str | None = None, flags: list[torch.Tensor] | None = None
) -> None:
    """Causal-LM labels: integer ``(B, T)`` token ids with ``T >= 2``, ``-100`` where a token is not a target,
    and at least one target per sample after position 0 (the logits at ``t`` predict the label at ``t + 1``,
    so a label at position 0 is never one). One device sync; with ``flags``, a device flag appended instead
    (:class:`DeferredChecks`)."""
    pre = _prefix(where)
    if torch.is_floating_point(target) or target.dtype == torch.bool or torch.is_complex(target):
        raise ValueError(f"{pre}causal-LM labels must be integer token ids (-100 = not a target), got dtype {target.dtype}.")
    if target.ndim != 2 or target.shape[1] < 2:
        raise ValueError(
            f"{pre}causal-LM labels must be (B, T) token ids with T >= 2 (the same shape as input_ids), got shape "
            f"{tuple(target.shape)}."
        )
    empty = ~(target[:, 1:] != IGNORE_INDEX).any(dim=1)  # (B,)
    if flags is not None:
        flags.append(empty.any())
    elif bool(empty.any()):
        i = int(empty.nonzero()[0, 0])
        raise ValueError(
            f"{pre}sample at batch position {i} has no target token (every label after position 0 is "
            f"{IGNORE_INDEX}), so its loss is undefined; drop it or give it a completion."
        )


def check_regression_target(
    target: torch.Tensor, *, finite: bool = True, flags: list[torch.Tensor] | None = None
) -> None:
    """Regression (mse) targets: floating point and, with ``finite``, free of NaN/inf (one device sync; with
    ``flags``, a device flag appended instead, see :class:`DeferredChecks`)."""
    if not torch.is_floating_point(target):
        raise ValueError(f"regression (mse) targets must be floating point, got dtype {target.dtype}.")
    if finite and flags is not None:
        flags.append(not_finite_flag(target.detach().sum()))  # a NaN/inf anywhere makes the sum non-finite
    elif finite and not torch.isfinite(target).all():
        raise ValueError("regression targets contain NaN/inf; clean or drop those samples.")


def check_labels(target: torch.Tensor, num_outputs: int, where: str | None = None) -> None:
    """Every class id in ``target`` lies in ``[0, num_outputs)``; else a ValueError quoting the first bad
    extreme. One reduction (NumPy's min/max on the CPU, skipping a dispatch; ``aminmax`` elsewhere)."""
    if target.device.type == "cpu":
        t_np = target.detach().numpy()
        lo, hi = int(t_np.min()), int(t_np.max())
    else:
        lo, hi = (int(v) for v in torch.aminmax(target))
    classes = max(num_outputs, 2)  # a single logit is a binary model: labels 0 and 1 (losses.class_logits)
    if lo < 0 or hi >= classes:
        what = "1 output (a binary model)" if num_outputs == 1 else f"{num_outputs} outputs"
        raise ValueError(
            f"{_prefix(where)}label {lo if lo < 0 else hi} is out of range for a model with {what} "
            f"(labels must be in [0, {classes - 1}]); check the label column or the model."
        )


def not_finite_flag(total: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor, True when the 0-d float ``total`` is NaN or infinite, without a device sync: ``x - x``
    is 0 exactly for a finite ``x`` and NaN otherwise. Two kernels where ``~torch.isfinite`` launches about
    five on a GPU (once per input per batch, where each launch is host time)."""
    return (total - total).ne(0)


def label_flag(target: torch.Tensor, num_outputs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`check_labels` without a device sync: ``(flag, safe_target)``, a 0-d bool tensor that is True when
    some label lies outside ``[0, classes)`` and the target with its labels clamped into that range. A loss
    computed on ``safe_target`` cannot fail (on a GPU an out-of-range class id is a device-side assert that
    ends the process); its results are discarded when the flag is found set (:class:`DeferredChecks`). Its two
    halves may run apart (the online miner clamps before its loss and compares inside its graphed step)."""
    safe = clamped_labels(target, num_outputs)
    return labels_outside(safe, target), safe


def clamped_labels(target: torch.Tensor, num_outputs: int) -> torch.Tensor:
    """``target`` with its class ids clamped into ``[0, classes)`` (:func:`label_flag`'s safe target)."""
    classes = max(num_outputs, 2)  # a single logit is a binary model: labels 0 and 1 (losses.class_logits)
    return target.clamp(0, classes - 1)


def labels_outside(safe: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """:func:`label_flag`'s flag from its clamped ``safe`` target: an integer label changes under the clamp
    exactly when it is out of range (two kernels, no sync)."""
    return (safe != target.detach()).any()


def is_causal_lm_batch(output: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether ``(output, target)`` look like a causal LM's: ``(B, T, V)`` floating logits and ``(B, T)`` integer
    token labels (``-100`` for tokens that are not targets)."""
    return (
        output.ndim == 3
        and target.ndim == 2
        and torch.is_floating_point(output)
        and not torch.is_floating_point(target)
        and target.dtype != torch.bool
        and tuple(target.shape) == tuple(output.shape[:2])
    )


def check_lm_labels(labels: torch.Tensor, vocab_size: int, where: str | None = None) -> None:
    """Every causal-LM label is a token id in ``[0, vocab_size)`` or ``-100`` (not a target); else a ValueError
    quoting the first bad value."""
    bad = labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))]
    if bad.numel():
        raise ValueError(
            f"{_prefix(where)}token label {int(bad[0])} is out of range for a vocabulary of {vocab_size} "
            f"(labels must be token ids in [0, {vocab_size - 1}] or {IGNORE_INDEX} for tokens that are not "
            "targets); check the tokenizer and the model."
        )


def infer_task(loss_kind: LossKind | None, target: torch.Tensor, output: torch.Tensor) -> TaskKind:
    """The task a batch belongs to, from the resolved loss kind (``resolve_loss``): cross-entropy is
    classification, mse regression; a custom loss (``None``) is classification when the targets are 1-D
    class ids and the output is ``(B, C)``."""
    if loss_kind is LossKind.CROSS_ENTROPY:
        return TaskKind.CLASSIFICATION
    if loss_kind is LossKind.MSE:
        return TaskKind.REGRESSION
    if loss_kind is LossKind.BCE:
        return TaskKind.MULTILABEL
    if is_causal_lm(loss_kind):
        return TaskKind.CAUSAL_LM
    is_class = not torch.is_floating_point(target) and target.ndim == 1 and output.ndim in (1, 2)
    return TaskKind.CLASSIFICATION if is_class else TaskKind.REGRESSION


# ------------------------------------------------------------------------------------- whole batches
def validate_batch(
    model: nn.Module, inputs: Inputs, target: torch.Tensor, loss_kind: LossKind | None
) -> int:
    """Check a batch at the boundary and return its size. Runs the model on the first sample to learn the
    output shape (and to turn shape mismatches into a clear error).

    Hot paths that run the model on the whole batch anyway use ``validate_inputs`` before the pass and
    ``validate_output`` on the pass's own output instead, which saves this one-sample forward per batch.
    """
    b = validate_inputs(inputs, target, loss_kind)
    first = tree_map(lambda t: t[:1], inputs)
    try:
        with torch.no_grad():
            out = model_output_tensor(call_model(model, first))
    except ValueError:
        raise
    except Exception as exc:  # shape mismatches etc. surface here with the user's shapes quoted
        raise forward_error(inputs, exc) from exc
    validate_output(out, target, loss_kind)
    return b


def validate_inputs(
    inputs: Inputs,
    target: torch.Tensor,
    loss_kind: LossKind | None,
    flags: list[torch.Tensor] | None = None,
) -> int:
    """The model-free part of ``validate_batch``: batch sizes, NaN/inf inputs, target dtype and shape.

    With ``flags`` (a list), the checks of values (NaN/inf, label values) append 0-d bool device tensors to
    it instead of reading the data on the host, so the call makes no device sync; shapes and dtypes are
    still checked at once (:class:`DeferredChecks` says how the flags are read)."""
    leaves = input_leaves(inputs)
    check_target(target)
    if target.ndim == 0:
        raise ValueError("target is a 0-d tensor; it needs a leading batch dimension.")
    b = int(target.shape[0])
    if b == 0:
        raise ValueError("the batch is empty (0 samples); pass at least one sample.")
    for name, t in leaves:
        if t.ndim == 0 or t.shape[0] != b:
            raise ValueError(
                f"input {name!r} has shape {tuple(t.shape)} but the target has {b} samples; every input needs the "
                "same leading batch dimension as the target."
            )
        # sum() first: any NaN/inf makes it non-finite, and it costs far less than an elementwise check.
        # (A deferred flag may also be a sum that overflowed; the recheck on the host tells them apart.)
        if flags is not None:
            if torch.is_floating_point(t):
                wide = torch.float32 if t.element_size() < 4 else None  # a half-precision sum overflows soon
                flags.append(not_finite_flag(t.detach().sum(dtype=wide)))
        elif torch.is_floating_point(t) and not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
            bad = (~torch.isfinite(t.reshape(b, -1))).any(dim=1).nonzero().flatten()  # (B, numel) -> rows
            raise ValueError(
                f"input {name!r} has NaN/inf values in {len(bad)} sample(s) (first at batch position "
                f"{int(bad[0])}); clean or drop them before scanning."
            )
    if loss_kind is LossKind.CROSS_ENTROPY:
        check_class_target(target)
    elif loss_kind is LossKind.MSE:
        check_regression_target(target, flags=flags)
    elif loss_kind is LossKind.BCE:
        check_multilabel_target(target, flags)
    elif is_causal_lm(loss_kind):
        check_causal_lm_target(target, flags=flags)
    return b


def validate_output(
    out: torch.Tensor,
    target: torch.Tensor,
    loss_kind: LossKind | None,
    flags: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Check the model's output (for any number of samples) against the targets, before the loss runs:
    a differentiable dtype, ``(B, C)`` logits for cross-entropy, and every label in ``[0, C)``.

    Returns the target to compute the loss on: ``target`` itself, or with ``flags`` (no device sync, see
    :func:`label_flag`) a cross-entropy target whose labels are clamped into range, its flag appended."""
    if not torch.is_floating_point(out):
        raise ValueError(
            f"the model output has dtype {out.dtype}, which is not differentiable; return logits/scores, not "
            "predicted ids."
        )
    if loss_kind is LossKind.CROSS_ENTROPY:
        if out.ndim not in (1, 2):
            raise ValueError(
                f"cross-entropy needs (B, num_classes) logits, the model returned per-sample shape {tuple(out.shape[1:])}."
            )
        num_outputs = int(out.shape[1]) if out.ndim == 2 else 1  # one logit: a binary model
        if flags is None:
            check_labels(target, num_outputs)
        else:
            flag, target = label_flag(target, num_outputs)
            flags.append(flag)
    elif is_causal_lm(loss_kind):
        if out.ndim != 3 or out.shape[1] != target.shape[1]:  # out may hold only a probe's first sample
            raise ValueError(
                f"a causal-LM scan needs (B, T, vocab) logits for (B, T) labels; the model returned per-sample shape "
                f"{tuple(out.shape[1:])} for labels of per-sample shape {tuple(target.shape[1:])}."
            )
        if flags is not None:  # no device sync: out-of-range labels are ignored by the loss until the recheck
            outside = (target != IGNORE_INDEX) & ((target < 0) | (target >= out.shape[2]))  # (B, T)
            flags.append(outside.any())
            return target.masked_fill(outside, IGNORE_INDEX)
        real = target[target != IGNORE_INDEX]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= out.shape[2]):
            bad = int(real.min()) if int(real.min()) < 0 else int(real.max())
            raise ValueError(
                f"label {bad} is not a token id of a model with a vocabulary of {out.shape[2]} (labels must be in "
                f"[0, {out.shape[2] - 1}] or {IGNORE_INDEX}); check the tokenizer matches the model."
            )
    elif loss_kind is LossKind.MSE and math.prod(out.shape[1:]) != math.prod(target.shape[1:]):
        # (out may hold only a probe's first sample: the values per sample must match)
        raise ValueError(
            f"regression (mse) needs one output per target value: the model returned per-sample shape "
            f"{tuple(out.shape[1:])} for targets of per-sample shape {tuple(target.shape[1:])}; for class labels "
            "use --loss cross_entropy (loss_fn='cross_entropy') with integer labels."
        )
    elif loss_kind is LossKind.BCE and tuple(out.shape[1:]) != tuple(target.shape[1:]):
        raise ValueError(
            f"multi-label (bce) needs one logit per label: the model returned per-sample shape "
            f"{tuple(out.shape[1:])} for targets of per-sample shape {tuple(target.shape[1:])}."
        )
    return target


class DeferredChecks:
    """Value checks of batches read on the host only when the device has got there: no sync per batch.

    A data check (NaN/inf inputs, labels in range) reads the data on the host, which on a GPU stalls the
    host until every queued kernel has run. Steady-state passes instead collect 0-d bool device tensors
    (``flags`` of :func:`validate_inputs` / :func:`validate_output`) and :meth:`submit` them with a
    ``recheck`` that runs the usual syncing checks. On a GPU the combined flag is copied to pinned host
    memory without blocking and read once its CUDA event has completed (:meth:`poll`); on the CPU it is
    read at once. A set flag runs ``recheck``, which raises the usual message (a flag set by a sum that
    overflowed, with finite data, raises nothing). ``poll(wait=True)`` waits for every batch still queued.
    """

    def __init__(self) -> None:
        # (host flag, CUDA event or None, recheck) per submitted batch, oldest first
        self._pending: list[tuple[torch.Tensor, Any, Callable[[], None]]] = []

    def __len__(self) -> int:
        return len(self._pending)

    def submit(self, flags: list[torch.Tensor], recheck: Callable[[], None]) -> None:
        if not flags:
            return
        # () bool on the data's device: a flag of an input left on the host joins the GPU's (not the other way
        # round, which would read every GPU flag on the host, a wait per batch)
        dev = next((f.device for f in flags if f.device.type != "cpu"), flags[0].device)
        bad = flags[0] if len(flags) == 1 else torch.stack([f.to(dev) for f in flags]).any()
        (host,), event = to_host_async([bad])
        self._pending.append((host, event, recheck))

    def poll(self, wait: bool = False) -> None:
        """Read the flags whose batches the device has finished (all of them with ``wait``), oldest first;
        run the recheck of the first set one (its ``ValueError`` propagates; later batches are dropped)."""
        while self._pending:
            host, event, recheck = self._pending[0]
            if event is not None:
                if wait:
                    event.synchronize()
                elif not event.query():
                    return
            self._pending.pop(0)
            if bool(host.numpy()):  # a host tensor: NumPy reads it without a device round trip
                self._pending.clear()
                recheck()
