"""Factored per-sample gradient projections: one batched forward + backward, no per-sample gradient formed.

* :mod:`.registry` -- ``register_layer_rule`` and the :class:`LayerRule` base class (one per module type);
* one file per supported layer type: :mod:`.linear`, :mod:`.conv2d`, :mod:`.embedding`, :mod:`.layernorm`,
  :mod:`.rmsnorm` (weight-only norms, by class-name pattern), :mod:`.conv1d` (``transformers``' Conv1D, by
  qualified class name, so ``transformers`` is never imported) and :mod:`.attention` (``nn.MultiheadAttention``
  and its ``out_proj``: its forward hook computes the attention again with both projections in the graph,
  ``LayerRule.reforward``); :mod:`.parameter` covers parameters of shape ``(1, ...)`` a model uses without a module
  (a ViT's class token), swapped for the pass for a copy with one row per sample;
* :mod:`.layout` -- the engine-independent projection layout (Kronecker ``P_out ⊗ P_in`` per weight matrix,
  dense seeded blocks for everything else);
* :mod:`.plan` -- which selected parameters a rule covers (:func:`plan_factored`);
* :mod:`.capture` -- the hook-driven pass: forward hooks, call checks, the backward to the captured outputs
  (:func:`apply_rules`, shared by ``GradientExtractor`` and ``OnlineMiner``);
* :mod:`.apply` -- :class:`RuleRunner`, the rule application and result checks of every pass;
* :mod:`.graphs` -- :class:`PassGraphs`: a pure pass captured once per batch shape as a CUDA graph and replayed
  (the steady-state pass of ``GradientExtractor(cuda_graphs=True)``, the step of ``OnlineMiner(cuda_graphs=True)``);
  :class:`PlanGraphs`: a caller's graphs for the plan in use.

``hardmine.engine.GradientExtractor(engine="factored" | "auto")`` is the usual entry point.
"""

from __future__ import annotations

# Importing the rule files registers them.
from . import attention, conv1d, conv2d, embedding, layernorm, linear, rmsnorm  # noqa: F401
from .apply import FactoredGrads, RuleRunner
from .capture import (
    CapturedCall,
    apply_rules,
    capture_calls,
    check_calls,
    compute_factored,
    factored_pass,
    probe_units,
)
from .layout import Block, ProjectionLayout, kron_factors
from .plan import FactoredUnit, plan_factored
from .registry import (
    Call,
    GradFactors,
    LayerRule,
    RuleRequest,
    RuleResult,
    factors_inner,
    register_layer_rule,
    registered_names,
    registered_types,
    rule_for,
)

__all__ = [
    "Block",
    "Call",
    "CapturedCall",
    "FactoredGrads",
    "FactoredUnit",
    "GradFactors",
    "LayerRule",
    "ProjectionLayout",
    "RuleRequest",
    "RuleResult",
    "RuleRunner",
    "apply_rules",
    "capture_calls",
    "check_calls",
    "compute_factored",
    "factored_pass",
    "factors_inner",
    "kron_factors",
    "plan_factored",
    "probe_units",
    "register_layer_rule",
    "registered_names",
    "registered_types",
    "rule_for",
]
