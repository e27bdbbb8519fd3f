"""``transformers.pytorch_utils.Conv1D`` (GPT-2's attention and MLP layers): a Linear with its weight stored
transposed, ``y = x @ weight + bias`` with ``weight`` of shape ``(d_in, d_out)``.

Sample ``b``'s weight gradient is therefore ``sum_t x_t delta_t^T`` ``(d_in, d_out)``: the Linear maths with
the two factors swapped, so ``P_out`` (the weight's rows) multiplies the inputs and ``P_in`` the output
gradients. The layout treats the weight like any matrix parameter (rows = ``shape[0]`` = ``d_in``).

Registered by qualified class name, not by type: ``transformers`` is an optional dependency, and a name
registration neither imports it nor fails without it (see :mod:`.registry`). Only that exact class is
claimed; a subclass (which may change ``forward``) is not.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import (
    Call,
    GradFactors,
    LayerRule,
    RuleRequest,
    RuleResult,
    batch_chunks,
    project_and_norm,
    register_layer_rule,
    route_elements,
)

__all__ = ["Conv1DRule", "CONV1D_CLASS"]

CONV1D_CLASS = "transformers.pytorch_utils.Conv1D"


@register_layer_rule(CONV1D_CLASS)
class Conv1DRule(LayerRule):
    matrix_param = "weight"
    vector_params = ("bias",)
    min_input_ndim = 2  # (B, d_in) or (B, ..., d_in)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            return "no 2-D weight (not the (d_in, d_out) Conv1D this rule knows)"
        return None

    def compute(self, module: nn.Module, calls: list[Call], request: RuleRequest) -> RuleResult:
        f = self.gradient_factors(module, calls)
        x, delta = f.rows, f.cols  # (B, N, d_in), (B, N, d_out)
        b, n, d_in = x.shape
        d_out = delta.shape[2]
        res = RuleResult()
        if request.matrix is not None:
            p_out, p_in = request.matrix  # (d_in, a), (d_out, b)
            proj = request.out if request.out is not None else x.new_empty(b, p_out.shape[1], p_in.shape[1])
            res.matrix_proj = proj  # (B, a, b)
            res.matrix_sq_norm = x.new_empty(b)  # (B,)
            # project_and_norm computes sum_n u_n v_n^T for (u, v) = its (delta, x) arguments: passing
            # (x, delta) gives the transposed Linear gradient, in the weight's own (d_in, d_out) orientation.
            for s in batch_chunks(b, route_elements(1, n, d_in, d_out)):
                _, res.matrix_sq_norm[s] = project_and_norm(
                    x[s, None], delta[s, None], p_out[None], p_in, proj[s]
                )
        if "bias" in request.vectors:
            res.vectors["bias"] = delta[:, 0] if n == 1 else delta.sum(1)  # (B, d_out)
        return res

    def gradient_factors(self, module: nn.Module, calls: list[Call]) -> GradFactors:
        b = calls[0].delta.shape[0]
        d_in, d_out = module.weight.shape
        delta = _cat([c.delta.reshape(b, -1, d_out) for c in calls])  # (B, N, d_out)
        x = _cat([c.x.reshape(b, -1, d_in) for c in calls]).to(delta.dtype)  # (B, N, d_in)
        return GradFactors(x, delta)


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
