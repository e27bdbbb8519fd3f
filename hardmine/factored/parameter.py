"""Parameters a model uses without a module: a ViT's class token and position embedding, learned query tokens.

Such a parameter ``P`` of shape ``(1, ...)`` is broadcast over the batch by the model's own code
(``torch.cat([P.expand(B, -1, -1), x], 1)``, ``x + P``); no module hook sees it. For the pass, the attribute
is swapped (on its owning module, for the forward only, restored in ``finally``) for a copy of
``P.expand(B, *P.shape[1:])``: the model computes the same numbers (every row is ``P``, and it broadcast ``P``
to the batch anyway, unless its code reads the parameter's first dimension), and the gradient at the expanded tensor is ``(B, *P.shape[1:])`` with row ``b`` sample
``b``'s own gradient of ``P`` -- exactly the per-sample gradient, as for a module called on an input broadcast
over the batch (:mod:`.capture`). The gradient has ``P``'s size per sample (a ViT-B position embedding: 151k
numbers), small next to the weight matrices'; it is projected with ``P``'s dense block, as the vmap engine
projects it, so the vectors are the same whichever engine runs.

That the model really uses the copy row by row (sample ``b`` only reads row ``b``) is checked by the first
batch's probe (``capture.broadcast_problems``), as is that its forward accepts a ``(B, ...)`` tensor where it
had ``(1, ...)``, and that each probe sample's gradient reaches its own row (else the check showed nothing); a
parameter failing any of these goes to vmap under ``engine="auto"``, with the reason (a failing forward does not
say which copy it failed on: every parameter swapped in it is refused). The probe sees the first three samples
of the first batch only: a later batch the model cannot run with the copies (a position embedding interpolated
to a new image size by ``reshape(1, ...)``) is computed again with them by vmap under ``engine="auto"`` (and
probed again), which then keeps that plan. What no probe of a few samples can rule out is a model that reads
another sample's row (``P[0]``) only for inputs the probe did not have: code that indexes the parameter's
first dimension for some inputs only is outside this rule (leave the parameter out of ``layers``, or use
``engine="vmap"``).

Only a parameter whose module has no layer rule is handled here (a rule's module is hooked instead), held
by one module under one name (a swap of one holder would miss the other's uses), of shape ``(1, d, ...)``
and held by a module of the model's own code (:func:`broadcast_parameter`).
A vector like LayerScale's ``gamma`` ``(d,)``, multiplied into every position, is not broadcast over the
batch by a leading 1: it stays with the vmap engine.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import Call, LayerRule, RuleRequest, RuleResult

__all__ = ["ParameterRule", "PARAMETER_RULE", "broadcast_parameter"]


def broadcast_parameter(module: nn.Module, p: torch.Tensor) -> bool:
    """Whether ``p``, held by ``module`` (which has no layer rule), looks like a parameter its model broadcasts
    over the batch: shape ``(1, d, ...)``, held by a module of the model's own code. A ``(1,)`` parameter is
    taken for a scalar (a temperature, ``nn.PReLU``'s one slope), and torch's own modules (and subclasses of
    them) use theirs as weights (a ``Conv1d`` with one output channel has a ``(1, c, k)`` weight), so neither
    is tried."""
    own = all(not c.__module__.startswith("torch.") for c in type(module).__mro__ if c not in (nn.Module, object))
    return p.ndim >= 2 and p.shape[0] == 1 and own


class ParameterRule(LayerRule):
    """The rule of a parameter used without a module (see the module docstring): its one "call" per forward
    is the swapped ``(B, *shape[1:])`` copy, whose output gradient is the per-sample gradient itself (recorded
    as both the call's input and output, so the base class's check of the batch dimension holds by
    construction)."""

    matrix_param = None
    vector_params = ()

    def compute(self, module: nn.Module, calls: list[Call], request: RuleRequest) -> RuleResult:
        (local,) = request.vectors  # one parameter per unit
        shape = getattr(module, local).shape
        # One call per forward: every use of the attribute reads the one swapped copy, so autograd has already
        # summed them at its output.
        (call,) = calls
        b = call.delta.shape[0]
        res = RuleResult()
        res.vectors[local] = call.delta.reshape(b, *shape)  # (B, 1, ...): the parameter's shape per sample
        return res


#: the one instance every parameter unit shares (the rule keeps no state)
PARAMETER_RULE = ParameterRule()
