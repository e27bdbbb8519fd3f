"""Per-sample losses: ``loss_fn(output, target) -> (B,)`` tensors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .enums import LossKind, TokenReduction, parse_choice

__all__ = [
    "IGNORE_INDEX", "LossFn", "bce_per_sample", "causal_lm_per_sample", "causal_lm_sum_per_sample",
    "causal_lm_token_losses", "class_count", "class_logits", "cross_entropy_per_sample", "loss_name", "mse_per_sample", "resolve_loss",
]

# The label of a token that is not a target (padding, prompt): the Hugging Face / PyTorch convention.
IGNORE_INDEX = -100

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def class_logits(output: torch.Tensor) -> torch.Tensor:
    """Logits ``(B, C)`` of a classifier. A single-logit binary model (``(B, 1)`` or ``(B,)``, the logit ``z`` of
    class 1, trained with BCE-with-logits) becomes the two-class model ``[0, z]``: its softmax is
    ``[1 - sigmoid(z), sigmoid(z)]``, so its cross-entropy *is* BCE-with-logits and every classification score
    (confidence, margin, EL2N, ...) applies unchanged, with labels 0 and 1."""
    if output.ndim == 1:
        output = output[:, None]  # (B,) -> (B, 1)
    if output.ndim == 2 and output.shape[1] == 1:
        return torch.cat([torch.zeros_like(output), output], dim=1)  # (B, 2): [0, z]
    return output


def class_count(output: torch.Tensor) -> int:
    """How many classes a classifier's ``(B, C)`` / ``(B, 1)`` / ``(B,)`` output has: ``C``, or 2 for a
    single-logit binary model (:func:`class_logits`), read from the shape alone (no op on the output)."""
    return 2 if output.ndim == 1 or int(output.shape[1]) == 1 else int(output.shape[1])


def cross_entropy_per_sample(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits ``(B, C)`` against integer labels ``(B,)``, one value per sample (a single-logit
    output: BCE-with-logits, see ``class_logits``)."""
    return F.cross_entropy(class_logits(output), target, reduction="none")  # (B,)


def mse_per_sample(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, averaged over all non-batch dimensions."""
    diff = output - target.reshape(output.shape).to(output.dtype)
    return diff.pow(2).reshape(diff.shape[0], -1).mean(dim=1)  # (B,)


def bce_per_sample(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Multi-label loss: BCE-with-logits of ``(B, C)`` logits against ``(B, C)`` 0/1 targets, averaged over the
    ``C`` labels, one value per sample."""
    t = target.reshape(output.shape).to(output.dtype)
    per_label = F.binary_cross_entropy_with_logits(output, t, reduction="none")  # (B, C)
    return per_label.reshape(per_label.shape[0], -1).mean(dim=1)  # (B,)


def causal_lm_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token NLL (B, T-1), target mask (B, T-1))`` of a causal LM: position ``t``'s logits predict label
    ``t + 1`` (the shift Hugging Face models apply to ``labels``); labels ``-100`` are not targets (NLL 0).
    Half-precision logits are upcast to float32 first."""
    pred, gold = logits[:, :-1], labels[:, 1:]  # (B, T-1, V), (B, T-1): position t predicts token t+1
    if pred.dtype in (torch.float16, torch.bfloat16):
        pred = pred.float()  # as Hugging Face's LM loss: a half-precision log-softmax over the vocabulary loses digits
    nll = F.cross_entropy(pred.transpose(1, 2), gold, ignore_index=IGNORE_INDEX, reduction="none")  # (B, T-1)
    return nll, gold != IGNORE_INDEX


def causal_lm_per_sample(
    logits: torch.Tensor, labels: torch.Tensor, reduction: TokenReduction | str = TokenReduction.MEAN
) -> torch.Tensor:
    """One loss per sample of a causal LM: ``(B, T, V)`` logits against ``(B, T)`` token labels, shifted as
    Hugging Face models do (position ``t`` predicts label ``t + 1``), labels ``-100`` masked (padding, prompt
    tokens). ``reduction="mean"``: the mean NLL over the sample's target tokens; ``"sum"``: their total. A
    sample without any target token has loss 0 (and no gradient)."""
    red = parse_choice(TokenReduction, reduction, "reduction")
    nll, keep = causal_lm_token_losses(logits, labels)  # (B, T-1) each; masked tokens have NLL 0 already
    total = nll.sum(dim=1)  # (B,)
    if red is TokenReduction.SUM:
        return total
    # clamp: a sample with no target token gets 0 / 1 = 0 rather than 0 / 0
    return total / keep.sum(dim=1).clamp_min(1).to(total.dtype)  # (B,)


def causal_lm_sum_per_sample(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``causal_lm_per_sample`` summed over the target tokens instead of averaged (``token_reduction="sum"``)."""
    return causal_lm_per_sample(logits, labels, TokenReduction.SUM)  # (B,)


def resolve_loss(loss: LossKind | str | LossFn | None, target: torch.Tensor) -> tuple[LossFn, LossKind | None]:
    """Pick the per-sample loss. Returns the callable and the built-in kind (``None`` for a user callable)."""
    if callable(loss) and not isinstance(loss, (str, LossKind)):
        return loss, None
    kind = parse_choice(LossKind, "auto" if loss is None else loss, "loss")
    if kind is LossKind.AUTO:
        kind = LossKind.MSE if torch.is_floating_point(target) else LossKind.CROSS_ENTROPY
    fns = {LossKind.CROSS_ENTROPY: cross_entropy_per_sample, LossKind.MSE: mse_per_sample, LossKind.BCE: bce_per_sample,
           LossKind.CAUSAL_LM: causal_lm_per_sample, LossKind.CAUSAL_LM_SUM: causal_lm_sum_per_sample}
    return fns[kind], kind


def loss_name(loss: Any, task: str | None) -> str | None:
    """The loss a manifest records, the same way for every door: the built-in kind it resolves to
    (``"cross_entropy"`` / ``"mse"``; ``None`` and ``"auto"`` resolve by ``task`` and stay ``None`` while the
    task is unknown), or ``"callable:<module>.<qualname>"`` for a user function. A string that is already
    such a name is returned as it is."""
    if callable(loss) and not isinstance(loss, (str, LossKind)):
        name = getattr(loss, "__qualname__", type(loss).__name__)
        return f"callable:{getattr(loss, '__module__', '?')}.{name}"
    value = LossKind.AUTO.value if loss is None else str(getattr(loss, "value", loss))
    if value != LossKind.AUTO.value:
        return value
    if task is None:
        return None
    if task == "multilabel":
        return LossKind.BCE.value
    if task == "causal-lm":
        return LossKind.CAUSAL_LM.value
    return (LossKind.MSE if task == "regression" else LossKind.CROSS_ENTROPY).value
