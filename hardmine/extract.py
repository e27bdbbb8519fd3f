"""Exact per-sample gradients with ``torch.func`` and a slow, obviously-correct reference.

``per_sample_grads`` differentiates only the selected parameters (everything else is a constant in the
functional call), returns the per-sample loss, the model output and the per-sample gradient norm from the
same pass, and leaves the model exactly as it found it.

Batches follow the contract in ``hardmine.batches`` (``(inputs, target)`` or a mapping with ``labels``);
the batch helpers (``split_batch``, ``call_model``, ``validate_batch``...) live there and are re-exported
here for existing imports.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_map

from .batches import (
    Inputs,
    call_model,
    check_target,
    forward_error,
    model_output_tensor,
    split_batch,
    validate_batch,
    validate_inputs,
    validate_output,
)
from .checks import as_module, positive_int
from .enums import LossKind, Randomness, parse_choice
from .losses import LossFn, resolve_loss
from .params import select_parameters

__all__ = [
    "Inputs",
    "PerSampleGrads",
    "per_sample_grads",
    "per_sample_grads_checked",
    "reference_per_sample_grads",
    "split_batch",
    "model_output_tensor",
    "forward_mode",
    "validate_batch",
    "validate_inputs",
    "validate_output",
    "forward_error",
    "call_model",
]

logger = logging.getLogger(__name__)



@dataclass
class PerSampleGrads:
    """Per-sample gradients of the selected parameters, with the quantities scores need."""

    grads: dict[str, torch.Tensor]  # name -> (B, *param.shape)
    loss: torch.Tensor  # (B,)
    output: torch.Tensor  # (B, ...) model output (logits for classifiers)
    grad_norm: torch.Tensor  # (B,) L2 norm over all selected parameters

    @property
    def batch_size(self) -> int:
        return int(self.loss.shape[0])

    def flat(self) -> torch.Tensor:
        """All selected gradients flattened and concatenated in parameter order: ``(B, P)``."""
        b = self.batch_size
        return torch.cat([g.reshape(b, -1) for g in self.grads.values()], dim=1)  # (B, P)


# ---------------------------------------------------------------------------------------------- batches
def _functional(model: nn.Module, params: dict[str, torch.Tensor], inputs: Inputs) -> Any:
    # tie_weights=False: ``params`` names every slot itself (see _slots); torch's own untying also swaps a
    # module held under two names twice and puts the swapped tensor back last, leaving it on the model.
    if isinstance(inputs, torch.Tensor):
        return functional_call(model, params, (inputs,), tie_weights=False)
    if isinstance(inputs, Mapping):
        return functional_call(model, params, (), dict(inputs), tie_weights=False)
    return functional_call(model, params, tuple(inputs), tie_weights=False)


def _slots(model: nn.Module) -> dict[str, list[str]]:
    """``{canonical name: the names of every attribute that holds it}``: a parameter or buffer tied between
    modules (an embedding reused as the LM head) has a slot in each, and a module held under two names (a
    block shared by two layers) has one slot per attribute, listed once. ``functional_call`` with every slot
    named and ``tie_weights=False`` replaces each attribute once and restores it once."""
    canonical = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
    seen: set[tuple[int, str]] = set()
    out: dict[str, list[str]] = {}
    every = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in every:
        owner, _, local = name.rpartition(".")
        slot = (id(model.get_submodule(owner)), local)
        if slot not in seen:
            seen.add(slot)
            out.setdefault(canonical[id(t)], []).append(name)
    return out


# ------------------------------------------------------------------------------------------------ modes
@contextlib.contextmanager
def forward_mode(model: nn.Module, randomness: Randomness) -> Iterator[None]:
    """Put the model in the mode the gradient pass needs and restore every module's flag afterwards."""
    as_module(model)
    saved = [(m, m.training) for m in model.modules()]
    # Without running statistics a BatchNorm normalises with the batch's own, in eval mode too (checked first:
    # model.eval(), the training-mode advice, cannot fix that)
    if any(isinstance(m, _BatchNorm) and m.running_mean is None for m, _ in saved):
        batch_stats = [n or "<root>" for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.running_mean is None]
        raise ValueError(
            f"BatchNorm module(s) {batch_stats} keep no running statistics (track_running_stats=False), so even in "
            "eval mode they normalise with the batch's statistics: each sample's output depends on the rest of the "
            "batch and per-sample gradients are undefined. Use a model whose norms keep running statistics, or a "
            "per-sample norm (GroupNorm, LayerNorm)."
        )
    if any(training and isinstance(m, _BatchNorm) for m, training in saved):
        bn_train = [n or "<root>" for n, m in model.named_modules() if m.training and isinstance(m, _BatchNorm)]
        raise ValueError(
            f"BatchNorm module(s) {bn_train} are in training mode, where each sample's output depends on the "
            "rest of the batch, so per-sample gradients are undefined. Call model.eval() before scanning."
        )
    try:
        # Only flags that change are touched (a model already in eval mode, the usual case, costs nothing
        # here); model.eval() would walk and re-set every module on every batch.
        if randomness is Randomness.EVAL and any(training for _, training in saved):
            try:
                model.eval()
            except NotImplementedError:
                # torch.export modules refuse .eval(): their graph's mode was fixed at export time.
                for m, _ in saved:
                    m.training = False
        yield
    finally:
        for m, flag in saved:
            if m.training != flag:
                m.training = flag


# ----------------------------------------------------------------------------------------------- checks
def _prepare(
    model: nn.Module, batch: Any, loss_fn: LossKind | str | LossFn | None, params: str | Sequence[str] | None
) -> tuple[Inputs, torch.Tensor, LossFn, list[str], int]:
    as_module(model)
    inputs, target = split_batch(batch)
    check_target(target)
    fn, kind = resolve_loss(loss_fn, target)
    names = select_parameters(model, params)
    b = validate_batch(model, inputs, target, kind)
    return inputs, target, fn, names, b


# ---------------------------------------------------------------------------------------------- engines
def per_sample_grads(
    model: nn.Module,
    batch: Any,
    loss_fn: LossKind | str | LossFn | None = None,
    *,
    params: str | Sequence[str] | None = None,
    chunk_size: int | None = None,
    randomness: Randomness | str = Randomness.EVAL,
) -> PerSampleGrads:
    """Exact per-sample gradients via ``vmap(grad(functional_call))``.

    Args:
        model: any ``nn.Module``; it is left unchanged (modes restored, nothing attached).
        batch: ``(inputs, target)`` or a mapping with ``labels``.
        loss_fn: ``"cross_entropy"``, ``"mse"``, ``"auto"``/``None`` (by target dtype), or a callable
            ``loss_fn(output, target) -> (B,)`` per-sample loss.
        params: names/globs of modules or parameters to differentiate (``"fc2.*"``, ``"classifier"``);
            ``None`` = all trainable parameters. Unselected parameters are constants (never differentiated).
        chunk_size: vmap over at most this many samples at a time to bound memory.
        randomness: ``"eval"`` (default: dropout off for the pass), ``"different"`` or ``"same"``.
    """
    rnd = parse_choice(Randomness, randomness, "randomness")
    positive_int(chunk_size, "chunk_size", allow_none=True)
    with forward_mode(model, rnd):
        inputs, target, fn, names, _ = _prepare(model, batch, loss_fn, params)
        return _compute_per_sample_grads(model, inputs, target, fn, names, chunk_size, rnd)


def per_sample_grads_checked(
    model: nn.Module,
    inputs: Inputs,
    target: torch.Tensor,
    loss_fn: LossFn,
    names: list[str],
    *,
    chunk_size: int | None = None,
    randomness: Randomness | str = Randomness.EVAL,
) -> PerSampleGrads:
    """:func:`per_sample_grads` of a batch its caller has already split and validated, with the loss resolved
    to a callable ``loss_fn(output, target) -> (B,)`` and the parameters selected: no checks of the data of its
    own, so no host sync (``GradientExtractor`` runs the vmap part of a mixed plan on the batch its factored
    part checked, with labels clamped like that part's loss). Labels out of range are the caller's to check."""
    rnd = parse_choice(Randomness, randomness, "randomness")
    positive_int(chunk_size, "chunk_size", allow_none=True)
    with forward_mode(model, rnd):
        return _compute_per_sample_grads(model, inputs, target, loss_fn, names, chunk_size, rnd)


def _compute_per_sample_grads(
    model: nn.Module,
    inputs: Inputs,
    target: torch.Tensor,
    loss_fn: LossFn,
    names: list[str],
    chunk_size: int | None,
    randomness: Randomness,
) -> PerSampleGrads:
    all_params = dict(model.named_parameters())
    selected = {n: all_params[n].detach() for n in names}
    # Unselected parameters enter as constants: grad() only differentiates its first argument.
    constants = {n: p.detach() for n, p in all_params.items() if n not in selected}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    slots = _slots(model)

    def sample_loss(sel: dict[str, torch.Tensor], x: Inputs, y: torch.Tensor):
        x1 = tree_map(lambda t: t.unsqueeze(0), x)  # (1, ...) one-sample batch
        every = {s: t for d in (sel, constants, buffers) for n, t in d.items() for s in slots.get(n, [n])}
        out = model_output_tensor(_functional(model, every, x1))
        loss = loss_fn(out, y.unsqueeze(0))  # (1,)
        return loss.sum(), (loss.reshape(()), out.squeeze(0))

    vrand = "error" if randomness is Randomness.EVAL else randomness.value
    fn = vmap(grad(sample_loss, has_aux=True), in_dims=(None, 0, 0), chunk_size=chunk_size, randomness=vrand)
    try:
        grads, (loss, output) = fn(selected, inputs, target)
    except RuntimeError as exc:
        if "saved tensor hooks" in str(exc):
            raise ValueError(
                "the model uses activation checkpointing (torch.utils.checkpoint) or other saved-tensor hooks, "
                "which torch.func (the vmap engine) cannot run. Turn checkpointing off for the scan (it only saves "
                "memory in training), or select layers the factored engine covers outside the checkpointed "
                f"blocks. (torch said: {str(exc).splitlines()[0][:200]})"
            ) from exc
        if "vmap" not in str(exc):
            raise
        # e.g. Hugging Face mask helpers branch on tensor values; vmap cannot batch data-dependent control flow.
        raise ValueError(
            "the model's forward cannot run under torch.func.vmap (it has data-dependent control flow such as "
            "`if mask.all():` or calls .item()). Use engine='factored' or 'auto' for Linear/Conv2d/Embedding/RMSNorm/Conv1D/"
            f"LayerNorm layers, which needs no vmap. (torch said: {str(exc).splitlines()[0][:200]})"
        ) from exc
    grads = {n: grads[n] for n in names}  # keep model order
    return PerSampleGrads(grads=grads, loss=loss.detach(), output=output.detach(), grad_norm=_norm(grads))


def _norm(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    sq = sum(g.reshape(g.shape[0], -1).pow(2).sum(dim=1) for g in grads.values())  # (B,)
    return torch.as_tensor(sq).sqrt()


def reference_per_sample_grads(
    model: nn.Module,
    batch: Any,
    loss_fn: LossKind | str | LossFn | None = None,
    *,
    params: str | Sequence[str] | None = None,
    randomness: Randomness | str = Randomness.EVAL,
) -> PerSampleGrads:
    """Slow reference: one forward + ``torch.autograd.grad`` per sample. Use it to check the fast paths."""
    rnd = parse_choice(Randomness, randomness, "randomness")
    per: dict[str, list[torch.Tensor]] = {}
    losses, outputs = [], []
    with forward_mode(model, rnd):
        inputs, target, fn, names, b = _prepare(model, batch, loss_fn, params)
        all_params = dict(model.named_parameters())
        wrt = [all_params[n] for n in names]
        per = {n: [] for n in names}
        for i in range(b):
            xi = tree_map(lambda t, i=i: t[i : i + 1], inputs)  # (1, ...)
            out = model_output_tensor(call_model(model, xi))
            loss = fn(out, target[i : i + 1])  # (1,)
            gs = torch.autograd.grad(loss.sum(), wrt, allow_unused=True)
            for n, p, g in zip(names, wrt, gs):
                per[n].append(torch.zeros_like(p) if g is None else g)
            losses.append(loss.detach().reshape(()))
            outputs.append(out.detach().squeeze(0))
    grads = {n: torch.stack(per[n]) for n in names}  # (B, *shape)
    return PerSampleGrads(grads=grads, loss=torch.stack(losses), output=torch.stack(outputs), grad_norm=_norm(grads))
