"""Which task a scan runs (``scan(task=...)``) and so which loss it scans with, resolved before anything is
written.

``task="auto"`` (default) with the automatic loss: a causal LM when the model says so — its class is a
``*ForCausalLM`` / ``*LMHeadModel`` (a PEFT wrapper's too), or, for a model whose class names no head, its
Hugging Face ``config.architectures`` does — or when the first batch looks like one: ``(B, T)`` integer labels
for which the model returns ``(B, T, V)`` logits (one no-grad forward of the first sample). Otherwise the
task is inferred per batch from the targets, as it always was (``hardmine.batches.infer_task``). An explicit
``loss_fn`` under ``"auto"`` decides the task itself.

``task="causal-lm"`` scans with the next-token loss (``LossKind.CAUSAL_LM``, or ``CAUSAL_LM_SUM`` for
``token_reduction="sum"``); ``"classification"`` / ``"regression"`` / ``"multilabel"`` with cross-entropy / mse
/ bce (a ``loss_fn`` naming another built-in loss is refused; a callable is used as given).
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..batches import call_model, model_output_tensor, split_batch_ids, to_device
from ..enums import LossKind, TaskKind, TokenReduction, parse_choice
from ..lm import is_causal_lm_architecture

__all__ = ["looks_causal_lm", "resolve_task"]

logger = logging.getLogger(__name__)

_LOSS_OF_TASK = {
    TaskKind.CLASSIFICATION: LossKind.CROSS_ENTROPY,
    TaskKind.REGRESSION: LossKind.MSE,
    TaskKind.MULTILABEL: LossKind.BCE,
}


def looks_causal_lm(model: nn.Module) -> bool | None:
    """``True``/``False`` when the model's class (or, for a class that names no head, its Hugging Face config's
    ``architectures``) says whether it is a causal LM; ``None`` when nothing says."""
    name = type(model).__name__
    if is_causal_lm_architecture(name):
        return True
    if re.search(r"\wFor[A-Z]", name):  # e.g. GPT2ForSequenceClassification, PeftModelForTokenClassification
        return False
    archs = getattr(getattr(model, "config", None), "architectures", None) or []
    if any(is_causal_lm_architecture(a) for a in archs):
        return True
    return False if archs else None


def _first_batch_is_lm(model: nn.Module, batch: Any) -> bool:
    """Whether a batch has ``(B, T)`` integer labels and the model returns ``(B, T, V)`` logits for it."""
    try:
        inputs, target, _ = split_batch_ids(batch, "batch 0")
    except ValueError:
        return False  # the extraction pass reports a bad batch with its own message
    if torch.is_floating_point(target) or target.dtype == torch.bool or target.ndim != 2:
        return False
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    first = to_device(_first_row(inputs), device)
    try:
        with torch.no_grad():
            out = model_output_tensor(call_model(model, first))
    except Exception:  # noqa: BLE001 - not an LM-shaped forward; the extraction pass quotes real errors
        return False
    return out.ndim == 3 and tuple(out.shape[:2]) == (1, int(target.shape[1]))


def _first_row(inputs: Any) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs[:1]
    if isinstance(inputs, dict) or hasattr(inputs, "items"):
        return {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return tuple(v[:1] if isinstance(v, torch.Tensor) else v for v in inputs)


def _is_auto(loss_fn: Any) -> bool:
    return loss_fn is None or (isinstance(loss_fn, (str, LossKind)) and str(getattr(loss_fn, "value", loss_fn)) == "auto")


def resolve_task(
    model: nn.Module,
    data: Iterable[Any],
    task: TaskKind | str,
    loss_fn: Any,
    token_reduction: TokenReduction | str,
    *,
    labelled: bool,
) -> tuple[TaskKind | None, Any, Iterable[Any]]:
    """``(task or None, loss_fn, data)``: the task (``None``: inferred per batch, as before tasks could be
    asked for), the loss to scan with and the data (a one-shot iterator whose first batch was looked at is
    handed back with that batch put in front)."""
    kind = parse_choice(TaskKind, task, "task")
    reduction = parse_choice(TokenReduction, token_reduction, "token_reduction")
    if kind is TaskKind.AUTO:
        if not _is_auto(loss_fn):
            kind = TaskKind.CAUSAL_LM if str(getattr(loss_fn, "value", loss_fn)).startswith("causal_lm") else None
            if kind is None:
                _only_mean(reduction)
                return None, loss_fn, data
        else:
            said = looks_causal_lm(model)
            if said is None and labelled:
                it = iter(data)
                first = next(it, None)
                if it is data and first is not None:  # a one-shot iterator: keep the batch we took
                    data = itertools.chain([first], it)
                said = first is not None and _first_batch_is_lm(model, first)
            if not said:
                _only_mean(reduction)
                return None, loss_fn, data
            kind = TaskKind.CAUSAL_LM
            if said is True and looks_causal_lm(model) is None:  # only the output shape said so: say it loudly
                logger.warning(
                    "task=auto: scanning %s as a causal LM (next-token loss, shifted) because its first batch has "
                    "(B, T) integer labels and (B, T, V) outputs; a per-token tagger is not a causal LM: pass "
                    "task='causal-lm' to silence this", type(model).__name__,
                )
            else:
                logger.info("task=auto: scanning %s as a causal LM", type(model).__name__)
    if kind is TaskKind.CAUSAL_LM:
        lm = LossKind.CAUSAL_LM if reduction is TokenReduction.MEAN else LossKind.CAUSAL_LM_SUM
        if not _is_auto(loss_fn) and str(getattr(loss_fn, "value", loss_fn)) not in (lm.value, LossKind.CAUSAL_LM.value):
            raise ValueError(
                f"task='causal-lm' scans with its own loss (the next-token NLL of the target tokens, averaged or "
                f"summed by token_reduction); drop loss_fn={loss_fn!r}."
            )
        if not labelled:
            raise ValueError(
                "a causal-LM scan needs labels (the token ids, -100 where a token is not a target); unlabelled "
                "scans (labels=None) are for classifiers."
            )
        return kind, lm.value, data
    _only_mean(reduction)
    want = _LOSS_OF_TASK[kind]
    if _is_auto(loss_fn):
        return kind, want.value, data
    if callable(loss_fn) and not isinstance(loss_fn, (str, LossKind)):
        return kind, loss_fn, data
    given = parse_choice(LossKind, loss_fn, "loss")
    if given is not want:
        raise ValueError(
            f"task={kind.value!r} scans with loss {want.value!r}, but loss_fn={given.value!r} was given; drop one "
            "of them, or pass the task that loss belongs to."
        )
    return kind, want.value, data


def _only_mean(reduction: TokenReduction) -> None:
    if reduction is not TokenReduction.MEAN:
        raise ValueError(
            f"token_reduction={reduction.value!r} applies to causal-LM scans only; pass task='causal-lm' (--task "
            "causal-lm) or leave token_reduction at 'mean'."
        )
