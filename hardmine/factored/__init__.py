"""Factored per-sample gradient projections: one batched forward + backward, no per-sample gradient formed.

* :mod:`.registry` -- ``register_layer_rule`` and the :class:`LayerRule` base class (one per module type);
* one file per supported layer type: :mod:`.linear`, :mod:`.conv2d`, :mod:`.embedding`, :mod:`.layernorm`;
* :mod:`.layout` -- the engine-independent projection layout (Kronecker ``P_out ⊗ P_in`` per weight matrix,
  dense seeded blocks for everything else);
* :mod:`.capture` -- the hook-driven pass.

``hardmine.engine.GradientExtractor(engine="factored" | "auto")`` is the usual entry point.
"""

from __future__ import annotations

# Importing the rule files registers them.
from . import conv2d, embedding, layernorm, linear  # noqa: F401
from .capture import FactoredGrads, FactoredUnit, factored_pass, plan_factored, probe_units
from .layout import Block, ProjectionLayout, kron_factors
from .registry import (
    Call,
    LayerRule,
    RuleRequest,
    RuleResult,
    register_layer_rule,
    registered_types,
    rule_for,
)

__all__ = [
    "Block",
    "Call",
    "FactoredGrads",
    "FactoredUnit",
    "LayerRule",
    "ProjectionLayout",
    "RuleRequest",
    "RuleResult",
    "factored_pass",
    "kron_factors",
    "plan_factored",
    "probe_units",
    "register_layer_rule",
    "registered_types",
    "rule_for",
]
