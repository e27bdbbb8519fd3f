"""``nn.Conv2d``: a convolution is a Linear layer applied to unfolded patches, summed over positions.

With ``patches_l`` the input patch under output position ``l`` (``F.unfold``; channel-major rows, the same
order as ``weight.reshape(C_out, -1)``), sample ``b``'s weight gradient is ``sum_l delta_l patches_l^T``,
group by group. Any stride, dilation, groups, integer or ``"same"``/``"valid"`` padding and every
``padding_mode`` is handled (non-zero padding modes are applied with ``F.pad`` first, as ``nn.Conv2d`` does).
The batch is processed in chunks so unfolded patches and per-chunk temporaries stay within
``CHUNK_ELEMENTS``. On the CPU, a layer with many input channels per group (``GROUPED_MIN_CHANNELS``) whose
per-sample gradients are materialised anyway builds them with one grouped convolution backward per chunk
instead (same gradients, no unfolded patches).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .registry import (
    Call,
    LayerRule,
    RuleRequest,
    RuleResult,
    batch_chunks,
    ghost_route,
    project_and_norm,
    register_layer_rule,
    route_elements,
)

__all__ = ["Conv2dRule", "GROUPED_MIN_CHANNELS"]

# Input channels per group from which a layer on the CPU builds its per-sample weight gradients with one
# grouped convolution backward (the batch folded into the groups) instead of unfolded patches and a batched
# matmul.
# A convolution over a few channels per group runs poorly, so layers with few input channels keep the unfold
# route; both routes timed on the shapes this threshold separates: scripts/results/conv_routes.md
# (scripts/bench_conv_routes.py). Either route is exact; the choice depends only on the layer, so a given
# model always takes the same one.
GROUPED_MIN_CHANNELS = 16
# Where the grouped route may be taken. On a GPU it would run cuDNN's grouped convolution backward (in float32:
# see _float32_convolutions), with fewer multiply-adds than the unfold route at large projections and no
# unfolded patches in memory, but whether cuDNN runs thousands of groups fast is unmeasured: a GPU takes the
# unfold route until `scripts/bench_conv_routes.py --device cuda` shows otherwise.
GROUPED_DEVICES = frozenset({"cpu"})


@register_layer_rule(nn.Conv2d)
class Conv2dRule(LayerRule):
    matrix_param = "weight"
    vector_params = ("bias",)

    def check_call(self, module: nn.Module, x: object, output: object, batch_size: int) -> str | None:
        reason = super().check_call(module, x, output, batch_size)
        if reason is None and isinstance(x, torch.Tensor) and x.ndim != 4:
            reason = f"it was called on an input of shape {tuple(x.shape)}, not (B, C, H, W)"
        return reason

    def compute(self, module: nn.Module, calls: list[Call], request: RuleRequest) -> RuleResult:
        b = calls[0].delta.shape[0]
        dtype = calls[0].delta.dtype
        g = module.groups
        c_out = module.out_channels
        cout_g = c_out // g
        cols = module.weight[0].numel()  # C_in/groups * kh * kw
        res = RuleResult()
        if "bias" in request.vectors:
            bias = calls[0].delta.reshape(b, c_out, -1).sum(2)  # (B, C_out)
            for c in calls[1:]:  # several calls of one module add up
                bias = bias + c.delta.reshape(b, c_out, -1).sum(2)  # (B, C_out)
            res.vectors["bias"] = bias
        if request.matrix is None:
            return res
        p_out, p_in = request.matrix
        p_out_g = p_out.reshape(g, cout_g, -1)  # (G, cout_g, a): the rows of P_out each group writes
        n_pos = sum(c.delta[0].numel() // c_out for c in calls)  # output positions over all calls
        res.matrix_proj = request.out
        if res.matrix_proj is None:
            res.matrix_proj = calls[0].delta.new_empty(b, p_out.shape[1], p_in.shape[1])  # (B, a, b)
        res.matrix_sq_norm = calls[0].delta.new_empty(b)  # (B,)
        cin_g = module.in_channels // g
        if (
            len(calls) == 1
            and not ghost_route(n_pos, cout_g, cols)
            and cin_g >= GROUPED_MIN_CHANNELS
            and calls[0].delta.device.type in GROUPED_DEVICES
        ):
            x, delta = calls[0].x, calls[0].delta
            # Per sample: its gradient block, the product with P_in and the padded copy of its input.
            left, right, top, bottom = _pad_amounts(module)
            padded = 0
            if left or right or top or bottom:
                padded = module.in_channels * (x.shape[2] + top + bottom) * (x.shape[3] + left + right)
            for s in batch_chunks(b, 2 * c_out * cols + padded):
                grad = _grouped_weight_grads(module, x[s].to(dtype), delta[s])  # (c, C_out, cols)
                res.matrix_sq_norm[s] = torch.linalg.vector_norm(grad, dim=(1, 2)).square()  # (c,)
                res.matrix_proj[s] = p_out.t() @ (grad @ p_in)  # (a, C_out) @ (c, C_out, b) -> (c, a, b)
            return res
        per_sample = g * cols * n_pos + route_elements(g, n_pos, cout_g, cols)
        for s in batch_chunks(b, per_sample):
            n = s.stop - s.start
            patches = _cat([_unfold(module, c.x[s].to(dtype)) for c in calls])  # (c, G*cols, L)
            patches = patches.reshape(n, g, cols, -1).transpose(-1, -2)  # (c, G, L, cols)
            delta = _cat([c.delta[s].reshape(n, c_out, -1) for c in calls])  # (c, C_out, L)
            delta = delta.reshape(n, g, cout_g, -1).transpose(-1, -2)  # (c, G, L, cout_g)
            _, res.matrix_sq_norm[s] = project_and_norm(delta, patches, p_out_g, p_in, res.matrix_proj[s])
        return res


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)  # along output positions


def _grouped_weight_grads(module: nn.Conv2d, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients ``(c, C_out, C_in/groups*kh*kw)`` of a chunk, rows and columns ordered like
    ``weight.reshape(C_out, -1)``: the chunk is folded into the channels, ``(1, c*C_in, H, W)``, and one
    convolution backward with ``c * groups`` groups gives every sample its own ``(C_out, C_in/groups, kh,
    kw)`` block (the weight gradient of a grouped convolution is per group, so nothing mixes samples)."""
    c = x.shape[0]
    x = _pad_input(module, x)  # (c, C_in, H + pads, W + pads)
    w_shape = (c * module.out_channels, *module.weight.shape[1:])
    with _float32_convolutions(x.device):
        grad = _grouped_backward(module, x, delta, c, w_shape)
    return grad.reshape(c, module.out_channels, -1)  # (c, C_out, cols)


@contextmanager
def _float32_convolutions(device: torch.device) -> Iterator[None]:
    """cuDNN convolutions in float32 inside the block on a CUDA device (its default is TF32, which rounds
    products to about three digits and would move the vectors); nothing elsewhere. Through torch's
    ``fp32_precision`` setting where it exists (reading the legacy flag raises once the two were mixed)."""
    if device.type != "cuda":
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        old = conv.fp32_precision
        conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = old
        return
    cudnn = torch.backends.cudnn
    with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                     allow_tf32=False):
        yield


def _grouped_backward(
    module: nn.Conv2d, x: torch.Tensor, delta: torch.Tensor, c: int, w_shape: tuple[int, ...]
) -> torch.Tensor:
    return torch.ops.aten.convolution_backward(
        delta.reshape(1, c * module.out_channels, *delta.shape[2:]),  # (1, c*C_out, H', W')
        x.reshape(1, c * module.in_channels, *x.shape[2:]),  # (1, c*C_in, H, W)
        delta.new_empty(w_shape),  # only its shape is read: no input gradient is requested
        None,
        list(module.stride),
        [0, 0],  # padding already applied
        list(module.dilation),
        False,
        [0, 0],
        c * module.groups,
        [False, True, False],
    )[1]  # (c*C_out, C_in/groups, kh, kw)


def _unfold(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Patches ``(c, C_in*kh*kw, L)`` exactly as ``module`` sees them, padding included (= ``F.unfold``).

    Built from strided windows of the padded input (``Tensor.unfold`` views, one copy by ``reshape``),
    which is faster here than ``F.unfold``'s im2col.
    """
    x = _pad_input(module, x)  # (c, C, H + pads, W + pads)
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    win = x.unfold(2, (kh - 1) * dh + 1, sh).unfold(
        3, (kw - 1) * dw + 1, sw
    )  # (c, C, H', W', span_h, span_w)
    win = win[..., ::dh, ::dw]  # (c, C, H', W', kh, kw)
    c, ch, ho, wo = win.shape[:4]
    return win.permute(0, 1, 4, 5, 2, 3).reshape(c, ch * kh * kw, ho * wo)  # (c, C*kh*kw, L)


def _pad_input(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``x`` padded exactly as ``module`` pads it (any ``padding_mode``), so a convolution without padding
    over it sees the module's windows."""
    pad = _pad_amounts(module)
    if not any(pad):
        return x
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, pad, mode=mode)


def _pad_amounts(module: nn.Conv2d) -> list[int]:
    """``[left, right, top, bottom]`` (``F.pad`` order) as ``module`` pads; ``"same"`` puts the odd pixel
    right/bottom like ``nn.Conv2d``."""
    padding = module.padding
    if isinstance(padding, str):
        pad: list[int] = []
        if padding == "same":  # nn.Conv2d's split: the odd pixel goes right/bottom
            for d, k in zip(reversed(module.dilation), reversed(module.kernel_size), strict=True):
                total = d * (k - 1)
                pad += [total // 2, total - total // 2]
        else:  # "valid"
            pad = [0, 0, 0, 0]
    else:
        pad = [padding[1], padding[1], padding[0], padding[0]]
    return pad
