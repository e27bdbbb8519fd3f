"""``nn.LayerNorm``: ``y = x_hat * weight + bias`` with ``x_hat`` normalised over ``normalized_shape``.

Sample ``b``'s gradients are ``sum_t delta_t * x_hat_t`` (weight) and ``sum_t delta_t`` (bias) over the
positions ``t`` in front of the normalised dimensions. Both are small, so the rule returns them exactly and
the caller projects them densely; ``x_hat`` is recomputed from the captured input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Call, LayerRule, RuleRequest, RuleResult, register_layer_rule

__all__ = ["LayerNormRule"]


@register_layer_rule(nn.LayerNorm)
class LayerNormRule(LayerRule):
    matrix_param = None
    vector_params = ("weight", "bias")

    def check_call(self, module: nn.Module, x: object, output: object, batch_size: int) -> str | None:
        reason = super().check_call(module, x, output, batch_size)
        if reason is None and isinstance(x, torch.Tensor) and x.ndim <= len(module.normalized_shape):
            reason = f"it was called on an unbatched input of shape {tuple(x.shape)}"
        return reason

    def compute(self, module: nn.Module, calls: list[Call], request: RuleRequest) -> RuleResult:
        shape = tuple(module.normalized_shape)
        b = calls[0].delta.shape[0]
        res = RuleResult()
        for c in calls:
            delta = c.delta.reshape(b, -1, *shape)  # (B, N, *normalized_shape)
            parts: dict[str, torch.Tensor] = {}
            if "weight" in request.vectors:
                x_hat = F.layer_norm(c.x.to(delta.dtype), shape, None, None, module.eps)
                parts["weight"] = (delta * x_hat.reshape(delta.shape)).sum(1)  # (B, *normalized_shape)
            if "bias" in request.vectors:
                parts["bias"] = delta.sum(1)  # (B, *normalized_shape)
            for k, v in parts.items():  # several calls of one module add up
                res.vectors[k] = v if k not in res.vectors else res.vectors[k] + v
        return res
