"""``nn.Embedding``: sample ``b``'s weight gradient is ``sum_t e_{id_t} delta_t^T``
(row ``id_t`` receives ``delta_t``).

So ``P_out^T G P_in = sum_t P_out[id_t]^T (delta_t^T P_in)``: rows of ``P_out`` are gathered by token id and
no ``(vocab, d)`` gradient is ever formed. Positions holding ``padding_idx`` get no gradient, as in
``nn.Embedding``'s own backward. The squared norm is ``sum_{t,s} [id_t == id_s] delta_t . delta_s``.
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
    register_layer_rule,
)

__all__ = ["EmbeddingRule"]


@register_layer_rule(nn.Embedding)
class EmbeddingRule(LayerRule):
    matrix_param = "weight"
    vector_params = ()

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if module.max_norm is not None:
            return "max_norm is set (the forward renormalises weight rows in place)"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq=True (the gradient depends on token counts across the batch)"
        return None

    def check_call(self, module: nn.Module, x: object, output: object, batch_size: int) -> str | None:
        reason = super().check_call(module, x, output, batch_size)
        if reason is None and isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex()):
            reason = f"its input has dtype {x.dtype}, not integer token ids"
        return reason

    def compute(self, module: nn.Module, calls: list[Call], request: RuleRequest) -> RuleResult:
        b = calls[0].delta.shape[0]
        d = module.embedding_dim
        ids = torch.cat([c.x.reshape(b, -1) for c in calls], dim=1)  # (B, N)
        delta = torch.cat([c.delta.reshape(b, -1, d) for c in calls], dim=1)  # (B, N, d)
        # Padding positions get no gradient. The mask is applied to the small per-token factors (rows of
        # P_out, pairs of equal ids) rather than to delta, which would cost a pass over (B, N, d).
        keep = None if module.padding_idx is None else ids != module.padding_idx  # (B, N)
        res = RuleResult()
        if request.matrix is None:
            return res
        p_out, p_in = request.matrix
        rows = p_out[ids]  # (B, N, a): P_out row of each token
        if keep is not None:
            rows = rows * keep.unsqueeze(-1).to(rows.dtype)  # (B, N, a): padding rows zeroed
        dp = delta @ p_in  # (B, N, b)
        res.matrix_proj = rows.transpose(1, 2) @ dp  # (B, a, b)
        if request.out is not None:
            res.matrix_proj = request.out.copy_(res.matrix_proj)
        res.matrix_sq_norm = _sq_norm(ids, keep, delta, module.num_embeddings)
        return res

    def gradient_factors(self, module: nn.Module, calls: list[Call]) -> GradFactors:
        # G_b = sum_t e_{id_t} delta_t^T: the rows are one-hot ids (kept as ids), padding positions add nothing.
        b = calls[0].delta.shape[0]
        ids = torch.cat([c.x.reshape(b, -1) for c in calls], dim=1)  # (B, N)
        delta = torch.cat([c.delta.reshape(b, -1, module.embedding_dim) for c in calls], dim=1)  # (B, N, d)
        if module.padding_idx is not None:
            delta = delta * (ids != module.padding_idx).unsqueeze(-1).to(delta.dtype)  # (B, N, d)
        return GradFactors(ids, delta)


def _sq_norm(ids: torch.Tensor, keep: torch.Tensor | None, delta: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exact squared norm of each sample's gradient; positions where ``keep`` is False contribute nothing."""
    b, n, d = delta.shape
    out = torch.empty(b, dtype=delta.dtype, device=delta.device)
    if n * n <= vocab * d:  # ghost form: tokens pair up when they are the same (kept) id
        for s in batch_chunks(b, n * n):
            same = ids[s].unsqueeze(2) == ids[s].unsqueeze(1)  # (c, N, N)
            if keep is not None:
                same &= keep[s].unsqueeze(2)  # a padding token pairs with nothing (nor itself)
            gram = delta[s] @ delta[s].transpose(1, 2)  # (c, N, N)
            c = s.stop - s.start
            out[s] = torch.linalg.vecdot(same.to(delta.dtype).reshape(c, -1), gram.reshape(c, -1))  # (c,)
    else:  # long inputs over a small table: build each sample's (vocab, d) gradient, a chunk at a time
        for s in batch_chunks(b, vocab * d):
            ds = delta[s] if keep is None else delta[s] * keep[s].unsqueeze(-1).to(delta.dtype)  # (c, N, d)
            g = torch.zeros(s.stop - s.start, vocab, d, dtype=delta.dtype, device=delta.device)  # (c, V, d)
            g.scatter_add_(1, ids[s].unsqueeze(-1).expand(-1, -1, d), ds)
            out[s] = g.pow(2).sum((1, 2))
    return out
