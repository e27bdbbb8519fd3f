"""``nn.MultiheadAttention``: its packed input projection (``in_proj_weight``, ``in_proj_bias``) and its
``out_proj``, factored like any linear map, by computing the attention again with those maps in the graph.

The module passes its weights to ``F.multi_head_attention_forward``, so no hook can see the projections'
inputs or outputs. Its forward hook therefore computes the same output again from the call's arguments
(:meth:`MultiheadAttentionRule.reforward`): ``qkv = x W_in^T + b_in``, the heads' attention (the masks, the
causal hint, dropout and the returned weights as torch has them), ``out = o W_out^T + b_out``, and hands the
model that output instead of the module's own. ``qkv`` and ``out`` are then outputs like any other module's:
autograd delivers each sample's gradient at them, and the rules are those of a linear map,
``G_b = sum_t delta_t x_t^T`` (:func:`~hardmine.factored.linear.linear_compute`; ``out_proj`` is an
``nn.Linear`` subclass with the Linear rule). The model's own attention output is discarded: the pass
costs one more attention forward than the model, not a per-sample gradient.

Cross-attention (``query`` not ``key``) projects the queries with the first third of ``in_proj_weight`` and the
keys and values with the rest. Its per-sample gradient is still ``sum_n delta_n x_n^T`` over the query, key
(and value, when it is a third input) positions together, each with the rows of ``delta`` it does not use at
zero: the reforward projects the concatenated inputs with the whole matrix (up to three times the projection's
arithmetic, but exact and one call) and takes each part's own rows.

Dropout (training mode): the forward pre-hook keeps the random state (CPU, and CUDA where the call runs there)
and the reforward starts from it, so it draws the masks the module's own forward drew and the random stream
after the call is the one the model would have without hardmine. The hook runs before any forward hook of
the user's on the module, which then sees the recomputed output.

Activation checkpointing (``torch.utils.checkpoint``, non-reentrant): its backward runs the block's forward
again without hardmine's hooks, so it would not repeat the reforward; a call inside it is refused (its
parameters go to vmap under ``engine="auto"``).

Not covered (the parameters go to vmap under ``engine="auto"``, with the reason): separate q/k/v weights
(``kdim``/``vdim`` other than ``embed_dim``), ``add_bias_kv``, ``add_zero_attn``, unbatched inputs, inputs
broadcast over the batch (a ``(1, L, E)`` query), subclasses, calls inside activation checkpointing, and an
``out_proj`` module that is also another module's (shared with another attention, or registered under another
name), whose other uses the reforward does not see. ``out_proj`` called directly by the model (besides inside the
attention) is recorded by its own hook, like any Linear; it is refused when its attention's hook was not seen
running (a model calling ``attn.forward(...)`` bypasses every hook), since that attention's use of the weight
would be missed.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Collection
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .linear import linear_compute
from .registry import Call, LayerRule, Reforwarded, RuleRequest, RuleResult, register_layer_rule

__all__ = ["MultiheadAttentionRule", "attention_forward"]

# forward's signature without ``self``: what a forward hook's (args, kwargs) bind to
_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)
_SIGNATURE = _SIGNATURE.replace(parameters=list(_SIGNATURE.parameters.values())[1:])


@register_layer_rule(nn.MultiheadAttention)
class MultiheadAttentionRule(LayerRule):
    matrix_param = "in_proj_weight"
    vector_params = ("in_proj_bias",)
    min_input_ndim = 3  # (B, N, E) as the reforward records it
    reforwarded_children = ("out_proj",)

    def reforward_problem(self, module: nn.Module, args: tuple, kwargs: dict) -> str | None:
        # query is forward's first parameter; a tensor: the module's own forward has run (and checked) the call
        query = args[0] if args else kwargs["query"]
        if query.ndim != 3:
            return f"it was called on an unbatched query of shape {tuple(query.shape)}"
        return None

    def draws_random(self, module: nn.Module) -> bool:
        assert isinstance(module, nn.MultiheadAttention)
        return module.training and module.dropout > 0

    def unsupported_reason(self, module: nn.Module) -> str | None:
        assert isinstance(module, nn.MultiheadAttention)
        if not module._qkv_same_embed_dim:
            return (
                f"kdim={module.kdim}, vdim={module.vdim} unlike embed_dim={module.embed_dim} (separate q/k/v "
                "projection weights)"
            )
        if module.bias_k is not None:
            return "add_bias_kv=True"
        if module.add_zero_attn:
            return "add_zero_attn=True"
        return None

    def compute(self, module: nn.Module, calls: list[Call], request: RuleRequest) -> RuleResult:
        e = module.embed_dim
        # Not a reader of the pass's shared input Grams (it was not counted as one: shares_input_gram).
        return linear_compute(calls, dataclasses.replace(request, grams=None), e, 3 * e, bias="in_proj_bias")

    def reforward(
        self, module: nn.Module, args: tuple, kwargs: dict, output: Any, clone: Collection[str]
    ) -> tuple[Any, dict[str, Reforwarded]]:
        assert isinstance(module, nn.MultiheadAttention)
        a = _arguments(args, kwargs)
        out, weights, calls = attention_forward(
            module,
            a["query"],
            a["key"],
            a["value"],
            key_padding_mask=a["key_padding_mask"],
            need_weights=a["need_weights"],
            attn_mask=a["attn_mask"],
            average_attn_weights=a["average_attn_weights"],
            is_causal=a["is_causal"],
            clone="out_proj" in clone,
        )
        return (out, weights), calls


def _arguments(args: tuple, kwargs: dict) -> dict[str, Any]:
    """A forward hook's ``(args, kwargs)`` of ``nn.MultiheadAttention.forward`` by parameter name, defaults
    filled in."""
    call = _SIGNATURE.bind(*args, **kwargs)
    call.apply_defaults()
    return call.arguments


def attention_forward(
    module: nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    clone: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Reforwarded]]:
    """``module``'s forward on batched inputs with its two linear maps as tensors of the graph:
    ``(attention output, attention weights or None, {"": input projection, "out_proj": output projection})``.
    Same maths as ``F.multi_head_attention_forward`` for the configurations :class:`MultiheadAttentionRule`
    covers, and the output in the module's layout and memory format (``(B, L, E)`` or ``(L, B, E)``, a
    transposed view where torch's is one, so a model's ``.view`` of it works the same); the recorded calls are
    batch first. ``clone``: the model is handed a copy of the output projection (``Reforwarded.passed``)."""
    e, h = module.embed_dim, module.num_heads
    hd = e // h
    self_attention, kv_same = query is key and key is value, key is value  # as the caller passed them
    if not module.batch_first:  # (L, B, E) -> (B, L, E) views
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    b, tq, _ = query.shape
    tk = key.shape[1]
    w, bias = module.in_proj_weight, module.in_proj_bias
    if self_attention:
        x = query  # (B, L, E)
        qkv = F.linear(x, w, bias)  # (B, L, 3E)
        q, k, v = qkv.split(e, dim=-1)  # 3 x (B, L, E)
    else:
        # Every input through the whole matrix, each part keeping its own rows (see the module docstring).
        x = torch.cat([query, key] if kv_same else [query, key, value], dim=1)  # (B, L + S or L + 2S, E)
        qkv = F.linear(x, w, bias)  # (B, N, 3E)
        q = qkv[:, :tq, :e]  # (B, L, E)
        k = qkv[:, tq : tq + tk, e : 2 * e]  # (B, S, E)
        v = qkv[:, tq : tq + tk, 2 * e :] if kv_same else qkv[:, tq + tk :, 2 * e :]  # (B, S, E)
    q = q.reshape(b, tq, h, hd).transpose(1, 2)  # (B, H, L, hd)
    k = k.reshape(b, tk, h, hd).transpose(1, 2)  # (B, H, S, hd)
    v = v.reshape(b, tk, h, hd).transpose(1, 2)  # (B, H, S, hd)
    p = module.dropout if module.training else 0.0
    kpm = _additive(key_padding_mask, q.dtype)
    causal_only = is_causal and kpm is None and not need_weights  # torch then drops attn_mask for the hint
    mask = None if causal_only else _additive(attn_mask, q.dtype)
    if mask is not None:
        mask = mask.reshape(b, h, tq, tk) if mask.ndim == 3 else mask  # (B, H, L, S) or (L, S)
    if kpm is not None:
        kpm = kpm.reshape(b, 1, 1, tk)  # (B, 1, 1, S)
        mask = kpm if mask is None else mask + kpm
    weights = None
    if need_weights:
        scores = (q * math.sqrt(1.0 / hd)) @ k.transpose(-2, -1)  # (B, H, L, S)
        if mask is not None:
            # torch adds it in baddbmm, in the products' dtype (autocast casts a float32 mask to bfloat16 there;
            # without autocast a mask of another dtype already failed in the module's own forward)
            scores = scores + mask.to(scores.dtype)
        attn = scores.softmax(dim=-1)  # (B, H, L, S)
        if p > 0.0:
            attn = F.dropout(attn, p=p)
        o = attn @ v  # (B, H, L, hd)
        weights = attn.mean(dim=1) if average_attn_weights else attn  # (B, L, S) or (B, H, L, S)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal_only)
    # torch projects the (L, B, E) rows, so its output is (L, B, E) in memory: so is this one
    o = o.permute(2, 0, 1, 3).reshape(tq, b, e)  # (L, B, E)
    out = F.linear(o, module.out_proj.weight, module.out_proj.bias).transpose(0, 1)  # (B, L, E) view
    passed = out.clone() if clone else out  # (B, L, E), the same strides
    calls = {
        "": Reforwarded(x, qkv, qkv),
        "out_proj": Reforwarded(o.transpose(0, 1), out, passed),  # both (B, L, E) views
    }
    return (passed if module.batch_first else passed.transpose(0, 1)), weights, calls


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A mask as torch's attention adds it to the scores: boolean ``True`` -> ``-inf`` in the query's dtype, a
    float mask as it is (torch does not cast one: a float32 mask of a bfloat16 attention stays float32)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask
