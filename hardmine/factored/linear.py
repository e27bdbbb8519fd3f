"""``nn.Linear``: the per-sample weight gradient is ``sum_t delta_t x_t^T`` over token positions ``t``.

Inputs may be ``(B, d_in)`` or ``(B, *, d_in)`` (token inputs, e.g. ``(B, T, d_in)``); every non-batch,
non-feature dimension is a position that is summed over. Padding positions need no special case: their
``delta`` is whatever the model makes it (zero when the model masks them out); the sum is exact either way.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import (
    Call,
    LayerRule,
    RuleRequest,
    RuleResult,
    batch_chunks,
    project_and_norm,
    register_layer_rule,
    route_elements,
)

__all__ = ["LinearRule"]


@register_layer_rule(nn.Linear)
class LinearRule(LayerRule):
    matrix_param = "weight"
    vector_params = ("bias",)

    def check_call(self, module: nn.Module, x: object, output: object, batch_size: int) -> str | None:
        reason = super().check_call(module, x, output, batch_size)
        if reason is None and isinstance(x, torch.Tensor) and x.ndim < 2:
            reason = f"it was called on an unbatched input of shape {tuple(x.shape)}"
        return reason

    def compute(self, module: nn.Module, calls: list[Call], request: RuleRequest) -> RuleResult:
        b = calls[0].delta.shape[0]
        d_in, d_out = module.in_features, module.out_features
        # Positions of every call are concatenated: a module called twice contributes both sums.
        x = _cat([c.x.reshape(b, -1, d_in) for c in calls])  # (B, N, d_in)
        delta = _cat([c.delta.reshape(b, -1, d_out) for c in calls])  # (B, N, d_out)
        x = x.to(delta.dtype)
        res = RuleResult()
        if request.matrix is not None:
            p_out, p_in = request.matrix
            proj = (
                request.out if request.out is not None else delta.new_empty(b, p_out.shape[1], p_in.shape[1])
            )
            res.matrix_proj = proj  # (B, a, b)
            res.matrix_sq_norm = delta.new_empty(b)  # (B,)
            for s in batch_chunks(b, route_elements(1, x.shape[1], d_out, d_in)):
                # delta[s, None]: (c, 1, N, d_out), a single group
                _, res.matrix_sq_norm[s] = project_and_norm(
                    delta[s, None], x[s, None], p_out[None], p_in, proj[s]
                )
        if "bias" in request.vectors:
            res.vectors["bias"] = delta[:, 0] if delta.shape[1] == 1 else delta.sum(1)  # (B, d_out)
        return res


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
