"""Weight-only norms, ``y = weight * g(x)`` (RMSNorm: ``g(x) = x / rms(x)``; ``torch.nn.RMSNorm``, Llama,
Mistral, Qwen, T5's ``T5LayerNorm``...).

Sample ``b``'s gradient of ``weight`` is ``sum_t delta_t * g(x_t)`` over the positions in front of the
normalised dimensions: small, so the rule returns it exactly (the caller projects it densely). ``g(x)`` is the
module's own forward with ``weight`` replaced by ones (``torch.func.functional_call``), so every variant's
exact arithmetic is reproduced (Llama normalises in float32 and casts back, ``nn.RMSNorm`` in the input
dtype, epsilons differ) without a formula per variant.

Registered by *class-name pattern*, because every Hugging Face model file defines its own copy of the class
(``LlamaRMSNorm``, ``MistralRMSNorm``...): ``*RMSNorm`` (which includes ``torch.nn.RMSNorm``) and
``*.T5LayerNorm``. A name proves nothing about the maths, so each instance is checked before it is claimed
(:meth:`WeightOnlyNormRule.unsupported_reason`): its only parameter must be ``weight`` and, on a seeded test
input, ``module(x; w) == w * module(x; 1)`` for a random ``w``. Variants that scale differently (Gemma's
``(1 + weight)``) fail that check and go to vmap with the reason. Both the check (at planning) and ``g(x)``
(once per call per pass) run the module itself, so hooks a user put on a norm module see those calls too.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from .registry import Call, LayerRule, RuleRequest, RuleResult, register_layer_rule

__all__ = ["WeightOnlyNormRule", "NORM_PATTERNS"]

NORM_PATTERNS = ("*RMSNorm", "*.T5LayerNorm")

# Positions in the self-check's test input, per sample (several, so a norm over the wrong axis shows).
_CHECK_POSITIONS = 3


@register_layer_rule(NORM_PATTERNS[1])
@register_layer_rule(NORM_PATTERNS[0])
class WeightOnlyNormRule(LayerRule):
    matrix_param = None
    vector_params = ("weight",)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        names = [n for n, _ in module.named_parameters()]
        if names != ["weight"]:
            return f"parameters {names} (the weight-only norm rule covers a single 'weight')"
        return _scaling_problem(module)

    def check_call(self, module: nn.Module, x: object, output: object, batch_size: int) -> str | None:
        reason = super().check_call(module, x, output, batch_size)
        if reason is None and isinstance(x, torch.Tensor) and x.ndim <= module.weight.ndim:
            reason = f"it was called on an unbatched input of shape {tuple(x.shape)}"
        return reason

    def compute(self, module: nn.Module, calls: list[Call], request: RuleRequest) -> RuleResult:
        weight = module.weight
        b = calls[0].delta.shape[0]
        key = ("ones", weight.dtype, weight.device)
        ones = request.memo.get(key)
        if ones is None:
            ones = request.memo[key] = torch.ones_like(weight, memory_format=torch.contiguous_format)
        res = RuleResult()
        for c in calls:
            delta = c.delta.reshape(b, -1, *weight.shape)  # (B, N, *weight.shape)
            # g(x): the module's own forward at weight = 1 (multiplying by one is exact, so this is the very
            # tensor the model multiplied its weight with).
            g = functional_call(module, {"weight": ones}, (c.x,))
            part = (delta * g.reshape(delta.shape).to(delta.dtype)).sum(1)  # (B, *weight.shape)
            res.vectors["weight"] = part if "weight" not in res.vectors else res.vectors["weight"] + part
        return res


def _scaling_problem(module: nn.Module) -> str | None:
    """Why ``module`` is not ``weight * g(x)``, from one seeded test input, or None."""
    weight = module.weight
    if weight.is_meta or not weight.is_floating_point():
        return f"a {weight.dtype} weight on {weight.device} (cannot check its maths on a test input)"
    gen = torch.Generator().manual_seed(0)
    shape = (2, _CHECK_POSITIONS, *weight.shape)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(weight.dtype).to(weight.device)
    w = (
        (torch.rand(weight.shape, generator=gen, dtype=torch.float64) + 0.5)
        .to(weight.dtype)
        .to(weight.device)
    )
    try:
        with torch.no_grad():
            y = functional_call(module, {"weight": w}, (x,))
            g = functional_call(module, {"weight": torch.ones_like(w)}, (x,))
    except Exception as exc:  # any failure means the maths is not what this rule assumes
        return f"a forward that fails on a test input of shape {shape} ({type(exc).__name__}: {exc})"
    if not isinstance(y, torch.Tensor) or not isinstance(g, torch.Tensor) or y.shape != shape:
        return "an output that is not one tensor of its input's shape"
    # Loose enough for half precision rounding, far tighter than a different scaling (e.g. 1 + weight).
    tol = 2e-2 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-4
    if not torch.allclose(y.double(), (w * g).double(), rtol=tol, atol=tol):
        return "an output that is not weight * f(input) (e.g. a (1 + weight) scaling)"
    return None
