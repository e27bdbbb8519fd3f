"""``nn.Linear``: the per-sample weight gradient is ``sum_t delta_t x_t^T`` over token positions ``t``.

Inputs may be ``(B, d_in)`` or ``(B, *, d_in)`` (token inputs, e.g. ``(B, T, d_in)``); every non-batch,
non-feature dimension is a position that is summed over. Padding positions need no special case: their
``delta`` is whatever the model makes it (zero when the model masks them out); the sum is exact either way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .registry import (
    Call,
    GradFactors,
    LayerRule,
    RuleRequest,
    RuleResult,
    batch_chunks,
    ghost_route,
    large_product,
    project_and_norm,
    register_layer_rule,
    route_elements,
)

__all__ = ["LinearRule", "linear_compute"]


@register_layer_rule(nn.Linear)
class LinearRule(LayerRule):
    matrix_param = "weight"
    vector_params = ("bias",)
    min_input_ndim = 2  # (B, d_in) or (B, ..., d_in)
    shares_input_gram = True  # attention's q/k/v read one input: its Gram is computed once per pass

    def compute(self, module: nn.Module, calls: list[Call], request: RuleRequest) -> RuleResult:
        return linear_compute(calls, request, module.in_features, module.out_features)

    def gradient_factors(self, module: nn.Module, calls: list[Call]) -> GradFactors:
        # G_b = sum_n delta_n x_n^T: rows are the output gradients, columns the inputs (weight is (out, in)).
        b = calls[0].delta.shape[0]
        delta = _cat([c.delta.reshape(b, -1, module.out_features) for c in calls])  # (B, N, d_out)
        x = _cat([c.x.reshape(b, -1, module.in_features) for c in calls])  # (B, N, d_in)
        return GradFactors(delta, x.to(delta.dtype))


# nn.MultiheadAttention's out_proj: an nn.Linear subclass with Linear's forward (it exists only to mark the
# module for quantization), whose calls the attention rule records (hardmine.factored.attention).
register_layer_rule(NonDynamicallyQuantizableLinear)(LinearRule)


def linear_compute(
    calls: list[Call], request: RuleRequest, d_in: int, d_out: int, bias: str = "bias"
) -> RuleResult:
    """The rule of a linear map ``y = x W^T + b`` over any leading positions: ``W`` is the request's matrix
    (``(d_out, d_in)``) and ``bias`` the local name of ``b`` (``nn.Linear``'s ``"bias"``; other modules that
    apply a linear map, e.g. attention's packed input projection, name theirs differently)."""
    b = calls[0].delta.shape[0]
    bias_mat = request.vector_mats.get(bias) if bias in request.vectors else None
    one = calls[0]
    if (
        len(calls) == 1
        and one.delta.numel() == b * d_out  # one position per sample: (B, d_out) or (B, 1, d_out)
        and request.matrix is not None
        and bias_mat is not None
        and one.delta.dtype == bias_mat.dtype
    ):
        # The common case of MLP layers and heads, taken before the general setup below: on small models
        # the per-batch Python work is a visible share of the pass.
        if request.grams is not None:
            request.grams.release(request.grams.key(one.x))  # counted as a reader; takes no Gram
        delta = one.delta.reshape(b, d_out)  # (B, d_out)
        return _one_position_with_bias(delta, one.x.reshape(b, d_in).to(delta.dtype), request, bias_mat, bias)
    # Positions of every call are concatenated: a module called twice contributes both sums.
    x = _cat([c.x.reshape(b, -1, d_in) for c in calls])  # (B, N, d_in)
    delta = _cat([c.delta.reshape(b, -1, d_out) for c in calls])  # (B, N, d_out)
    x = x.to(delta.dtype)
    res = RuleResult()
    n = x.shape[1]
    chunks = list(batch_chunks(b, route_elements(1, n, d_out, d_in)))
    gram_x = _shared_gram(calls, request, x, chunks, n, d_out, d_in)
    if request.matrix is not None:
        p_out, p_in = request.matrix
        proj = (
            request.out if request.out is not None else delta.new_empty(b, p_out.shape[1], p_in.shape[1])
        )
        res.matrix_proj = proj  # (B, a, b)
        res.matrix_sq_norm = delta.new_empty(b)  # (B,)
        for s in chunks:
            # delta[s, None]: (c, 1, N, d_out), a single group
            _, res.matrix_sq_norm[s] = project_and_norm(
                delta[s, None], x[s, None], p_out[None], p_in, proj[s], gram_x=gram_x
            )
    if bias in request.vectors:
        res.vectors[bias] = delta[:, 0] if delta.shape[1] == 1 else delta.sum(1)  # (B, d_out)
    return res


def _shared_gram(
    calls: list[Call],
    request: RuleRequest,
    x: torch.Tensor,
    chunks: list[slice],
    n: int,
    d_out: int,
    d_in: int,
) -> Callable[[], torch.Tensor] | None:
    """The input Gram from ``request.grams`` when this call can use it, else None (and this reader is
    released). Used only on the ghost route, when the whole batch is one chunk (a held Gram costs no more
    than one chunk) and the input needed no cast (the key describes the captured tensor)."""
    if request.grams is None or len(calls) != 1:
        return None  # not counted as a reader
    key = request.grams.key(calls[0].x)
    uses = (
        request.matrix is not None
        and n > 1
        and ghost_route(n, d_out, d_in)
        and len(chunks) == 1
        and calls[0].x.dtype == x.dtype
    )
    if not uses:
        request.grams.release(key)
        return None
    xg = x[:, None]  # (B, 1, N, d_in)
    gram = functools.partial(large_product, xg, xg.transpose(-1, -2))  # -> (B, 1, N, N)
    return functools.partial(request.grams.get, key, gram)


def _one_position_with_bias(
    delta: torch.Tensor, x: torch.Tensor, request: RuleRequest, bias_mat: torch.Tensor, bias: str
) -> RuleResult:
    """One position per sample (2-D inputs), weight and bias both selected: the per-sample gradients are
    ``delta_b x_b^T`` and ``delta_b``, so ``P_out^T delta_b`` and the bias projection ``P_bias^T delta_b``
    come from ONE matmul of ``delta`` with ``[P_out | P_bias]`` (a wider matmul is cheaper than two thin ones;
    the results are the same numbers)."""
    assert request.matrix is not None
    p_out, p_in = request.matrix
    b, a = delta.shape[0], p_out.shape[1]
    key = "out+bias"  # the memo is per module, dtype and device already
    fused = request.memo.get(key)
    if fused is None:
        fused = request.memo[key] = torch.cat([p_out, bias_mat], dim=1)  # (d_out, a + width)
    both = delta @ fused  # (B, a + width)
    xp = x @ p_in  # (B, b)
    proj = request.out if request.out is not None else delta.new_empty(b, a, p_in.shape[1])
    res = RuleResult()
    res.matrix_proj = torch.mul(both[:, :a, None], xp[:, None, :], out=proj)  # (B, a, b) outer products
    # ||delta x^T||_F = ||delta|| ||x||: the norm of an outer product needs no matrix.
    delta_sq = torch.linalg.vector_norm(delta, dim=1).square()  # (B,)
    res.matrix_sq_norm = delta_sq * torch.linalg.vector_norm(x, dim=1).square()  # (B,)
    res.vectors[bias] = delta  # (B, d_out)
    res.vector_sq_norm[bias] = delta_sq
    res.vector_proj[bias] = both[:, a:]  # (B, width)
    return res


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
