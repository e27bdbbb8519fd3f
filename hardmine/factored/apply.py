"""Rule application: from each unit's captured inputs and output gradients to projections and norms.

:class:`RuleRunner` is the one place where a factored pass turns ``(x, delta)`` per call into what the layer
rules return: it offers each rule its Kronecker matrices, the float32 dense matrices of its vector
parameters (so a rule may project them itself, fused with ``P_out``), the per-pass :class:`GramCache` of
inputs several modules read and the rule's own memo; it checks every result's shape, sums the exact squared
norms and collects the results in a :class:`FactoredGrads`. Who computes ``delta`` (autograd, or a closed
form for the output layer) is the caller's business (``hardmine.factored.capture.apply_rules``).

Tied weights (one parameter held by several units, see ``plan_factored``): the per-sample gradient is the sum
``G = sum_i G_i`` of every holder's use. Projections are linear, so the holders' projections are summed (none
is written in place); the squared norm is ``sum_i ||G_i||^2 + 2 sum_{i<j} <G_i, G_j>``, the cross terms from
the holders' :class:`~hardmine.factored.registry.GradFactors` (kept until the last holder has run: an LM
head's factors are its ``(B, T, vocab)`` output gradient, the size of the logits the pass returns anyway).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .layout import ProjectionLayout
from .plan import FactoredUnit, tied_holders
from .registry import Call, GradFactors, GramCache, RuleRequest, RuleResult, factors_inner

__all__ = ["FactoredGrads", "RuleRunner", "zero_result"]


@dataclass
class FactoredGrads:
    """What one factored pass returns, in the model's dtype."""

    kron: dict[str, torch.Tensor]  # matrix param -> (B, a*b) Kronecker projection of its per-sample gradient
    vectors: dict[str, torch.Tensor]  # vector param -> (B, *shape) exact per-sample gradient
    sq_norm: torch.Tensor  # (B,) exact squared gradient norm over every parameter above
    loss: torch.Tensor  # (B,)
    output: torch.Tensor  # (B, ...)
    written: set[str] = field(default_factory=set)  # kron params already written into the caller's `out`
    # vector param -> (B, width) dense projection a rule computed itself (float32, same matrix as
    # ``layout.project_dense``); the caller projects the other vectors
    vector_proj: dict[str, torch.Tensor] = field(default_factory=dict)

    def write_to(self, z: torch.Tensor, layout: ProjectionLayout) -> None:
        """Write every projection into ``z`` ``(B, layout.out_dim)``: the Kronecker blocks not already written
        in place (computed in another dtype) and the vector parameters, projected densely unless their rule
        projected them itself."""
        b = z.shape[0]
        for name, proj in self.kron.items():
            if name not in self.written:
                layout.write(z, name, proj)
        for name, grad in self.vectors.items():
            part = self.vector_proj.get(name)
            if part is None:
                part = layout.project_dense(name, grad.reshape(b, -1))  # (B, numel) -> (B, width)
            layout.write(z, name, part)


class RuleRunner:
    """Runs the layer rules of one pass, unit by unit, in whatever order their output gradients arrive.

    Args:
        units: the planned units of the pass.
        inputs: ``{module: [captured input per call]}`` in call order.
        layout: the projection layout of the selected parameters.
        b: the batch size.
        dtype, device: of the model output (the dtype of a unit that received no gradient).
        out: optional ``(B, layout.out_dim)`` tensor; Kronecker projections of the model's dtype are written
            straight into its block (see ``FactoredGrads.written``).
        memo: a dict the caller keeps across passes over the same units and layout (e.g. one per
            ``GradientExtractor`` or ``OnlineMiner``): each unit's matrices are looked up once per dtype and
            device, and rules keep what they derive from them (``RuleRequest.memo``).
    """

    def __init__(
        self,
        units: Mapping[str, FactoredUnit],
        inputs: Mapping[str, list[Any]],
        layout: ProjectionLayout,
        b: int,
        dtype: torch.dtype,
        device: torch.device,
        out: torch.Tensor | None = None,
        memo: dict[Any, Any] | None = None,
    ) -> None:
        self.units, self.layout, self.b, self.out = units, layout, b, out
        self.dtype, self.device = dtype, device  # of a unit that received no gradient
        self.memo = {} if memo is None else memo
        self._inputs = dict(inputs)  # entries are dropped as their units finish
        self.kron: dict[str, torch.Tensor] = {}
        self.vectors: dict[str, torch.Tensor] = {}
        self.vector_proj: dict[str, torch.Tensor] = {}
        self.written: set[str] = set()
        self.done: set[str] = set()
        self._sq: torch.Tensor | None = None  # (B,) the sum so far of every part's squared norm
        # (B, numel) vector gradients whose squared norms are not in _sq yet: summed by one norm at the end
        self._vector_rows: list[torch.Tensor] = []
        # tied parameter -> its holder units, and the gradient factors of the holders that have run so far
        self._tied = tied_holders(units)
        self._factors: dict[str, dict[str, GradFactors | None]] = {p: {} for p in self._tied}
        # Modules called once on the same input tensor (q/k/v) share its Gram matrix within this pass; None
        # when no input has two such readers (the rules then skip the cache's bookkeeping).
        readers: dict[Any, int] = {}
        for name in units if len(units) > 1 else ():  # one unit shares with nobody
            if self._shares_gram(name):
                key = GramCache.key(self._inputs[name][0])
                readers[key] = readers.get(key, 0) + 1
        shared = {k: n for k, n in readers.items() if n > 1}
        self.grams = GramCache(shared) if shared else None

    def _shares_gram(self, name: str) -> bool:
        xs = self._inputs[name]
        return self.units[name].rule.shares_input_gram and len(xs) == 1 and isinstance(xs[0], torch.Tensor)

    def run(self, name: str, deltas: Mapping[int, torch.Tensor]) -> None:
        """Run unit ``name``'s rule on the output gradients ``{call index: delta}`` it received (calls without
        one got no gradient) and record its results. Call under ``torch.no_grad()``."""
        unit, xs = self.units[name], self._inputs[name]
        calls = [Call(xs[i].detach(), deltas[i]) for i in sorted(deltas)]  # in call order
        dtype = calls[0].delta.dtype if calls else self.dtype
        device = calls[0].delta.device if calls else self.device
        mats, vmats, rule_memo = self._matrices(unit, dtype, device)
        out = self.out
        view = None
        tied = unit.matrix is not None and unit.matrix in self._tied
        # A tied parameter's block is the sum of its holders' projections: none of them writes it in place.
        if (
            not tied
            and unit.matrix is not None
            and out is not None
            and out.dtype == dtype
            and out.device == device
        ):
            view = self.layout.block_view(out, unit.matrix)  # (B, a, b): the rule writes straight into `out`
        if calls:
            request = RuleRequest(mats, unit.vectors, view, vmats, self.grams, rule_memo)
            res = unit.rule.compute(unit.module, calls, request)
        else:  # no gradient reaches this module's output: every gradient is zero
            if self.grams is not None and self._shares_gram(name):
                self.grams.release(GramCache.key(xs[0]))  # it was counted as a reader of a shared Gram
            res = zero_result(unit, mats, self.b, dtype, device)
        self._record(unit, res, mats, vmats, view)
        if tied:
            self._add_cross_terms(name, unit, calls)
        self.done.add(name)
        # Drop the captured inputs as soon as they are used: autograd frees its own saved copies as the
        # backward pass moves down, and a reference held here until the end would keep those buffers from
        # being reused.
        self._inputs[name] = []

    @property
    def sq(self) -> torch.Tensor:
        """``(B,)`` exact squared gradient norm over every parameter recorded so far."""
        if self._vector_rows:
            # One norm over every vector gradient side by side (biases, norm weights): three kernels for all
            # of them instead of three each, which on a GPU is host time (a transformer has dozens).
            rows, self._vector_rows = self._vector_rows, []
            both = rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)  # (B, sum of numel)
            wide = torch.float32 if both.element_size() < 4 else None  # a half-precision square overflows soon
            self._add_sq(torch.linalg.vector_norm(both, dim=1, dtype=wide).square())  # (B,)
        if self._sq is None:
            return torch.zeros(self.b, dtype=self.dtype, device=self.device)
        return self._sq

    def _add_sq(self, part: torch.Tensor) -> None:
        # Out of place: the first part may be a rule's own tensor, which must not be changed. Starting from
        # the first part instead of zeros gives the same sums (0 + x == x) for one kernel less per unit.
        part = part.to(self.dtype)
        self._sq = part if self._sq is None else self._sq + part

    def _add_cross_terms(self, name: str, unit: FactoredUnit, calls: list[Call]) -> None:
        """Keep this holder's gradient factors; once every holder of the tied parameter has run, add
        ``2 <G_i, G_j>`` of every pair to the squared norm (a holder without gradient has ``G_i = 0``)."""
        assert unit.matrix is not None
        got = self._factors[unit.matrix]
        got[name] = unit.rule.gradient_factors(unit.module, calls) if calls else None
        if len(got) < len(self._tied[unit.matrix]):
            return
        parts = [f for f in got.values() if f is not None]
        for i, f in enumerate(parts):
            for g in parts[i + 1 :]:
                self._add_sq(2 * factors_inner(f, g))
        got.clear()  # the factors hold output gradients: drop them as soon as they are used

    def result(self, loss: torch.Tensor, output: torch.Tensor) -> FactoredGrads:
        return FactoredGrads(
            self.kron, self.vectors, self.sq, loss.detach(), output.detach(), self.written, self.vector_proj
        )

    def _record(
        self,
        unit: FactoredUnit,
        res: RuleResult,
        mats: tuple[torch.Tensor, torch.Tensor] | None,
        vmats: Mapping[str, torch.Tensor],
        view: torch.Tensor | None,
    ) -> None:
        """Check one rule result's shapes and add it to the pass's results."""
        b, rule = self.b, type(unit.rule).__name__
        if unit.matrix is not None:
            assert mats is not None
            want = (b, mats[0].shape[1], mats[1].shape[1])
            if res.matrix_proj is None or tuple(res.matrix_proj.shape) != want or res.matrix_sq_norm is None:
                raise ValueError(f"layer rule {rule} returned no/wrong-shaped projection; expected {want}.")
            if view is not None and res.matrix_proj is view:
                self.written.add(unit.matrix)
            proj = res.matrix_proj.reshape(b, -1)  # (B, a*b)
            before = self.kron.get(unit.matrix)  # another holder's part of a tied parameter
            self.kron[unit.matrix] = proj if before is None else before + proj.to(before.dtype)
            self._add_sq(res.matrix_sq_norm)
        for local in unit.vectors:
            g = res.vectors[local]
            full = unit.full_name(local)
            if tuple(g.shape) != (b, *getattr(unit.module, local).shape):
                raise ValueError(f"layer rule {rule} returned shape {tuple(g.shape)} for {full!r}.")
            self.vectors[full] = g
            g_sq = res.vector_sq_norm.get(local)
            if g_sq is None:
                self._vector_rows.append(g.reshape(b, -1))  # (B, numel): its norm with the others' (sq)
            else:
                self._add_sq(g_sq)
            vp = res.vector_proj.get(local)
            if vp is not None:
                if local not in vmats or tuple(vp.shape) != (b, vmats[local].shape[1]):
                    raise ValueError(
                        f"layer rule {rule} returned a projection of {full!r} of shape {tuple(vp.shape)} "
                        "without / unlike the matrix it was offered."
                    )
                self.vector_proj[full] = vp

    def _matrices(
        self, unit: FactoredUnit, dtype: torch.dtype, device: torch.device
    ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, dict[str, torch.Tensor], dict[Any, Any]]:
        """``(kron matrices or None, {vector local name: dense matrix}, the rule's memo)`` of one unit, looked
        up in the layout once per dtype and device (the layout caches the matrices; this saves the lookups
        per batch)."""
        key = (unit.name, unit.matrix, unit.vectors, dtype, device)
        got = self.memo.get(key)
        if got is None:
            mats = self.layout.kron_matrices(unit.matrix, dtype, device) if unit.matrix else None
            vmats = {}
            for local in unit.vectors:
                m = self.layout.dense_block_matrix(unit.full_name(local), dtype, device)
                if m is not None:
                    vmats[local] = m
            got = self.memo[key] = (mats, vmats, {})
        return got


def zero_result(
    unit: FactoredUnit,
    mats: tuple[torch.Tensor, torch.Tensor] | None,
    b: int,
    dtype: torch.dtype,
    device: torch.device,
) -> RuleResult:
    """The rule result of a unit whose outputs received no gradient: every projection and gradient is 0."""
    res = RuleResult()
    if mats is not None:
        res.matrix_proj = torch.zeros(b, mats[0].shape[1], mats[1].shape[1], dtype=dtype, device=device)
        res.matrix_sq_norm = torch.zeros(b, dtype=dtype, device=device)
    for local in unit.vectors:
        shape = getattr(unit.module, local).shape
        res.vectors[local] = torch.zeros(b, *shape, dtype=dtype, device=device)  # (B, *param.shape)
    return res
