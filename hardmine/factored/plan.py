"""Planning the factored pass: which selected parameters a layer rule covers, grouped by module.

A parameter is refused (with the reason) when its module has no rule, the rule does not handle it, the
module's configuration is outside the rule's maths or it sits inside a module that passes its submodules'
weights to ``F.*`` directly (their hooks never fire) and whose rule does not compute them again
(``nn.MultiheadAttention`` when its rule's maths do not cover the configuration, or a subclass of it).

A module whose rule *reforwards* (``LayerRule.reforward``: attention) hosts its own unit and those of its
:attr:`~hardmine.factored.registry.LayerRule.reforwarded_children` (``out_proj``): their calls inside the host
are recorded by the host's forward hook (``FactoredUnit.host`` and ``role``), a child's direct calls by its own.
A child module that is also held elsewhere (by another host, or under another name) is refused: the other
holder's uses of it would not be recorded.

A parameter object held by several modules (tied weights: the input embedding reused as the LM head) is the
*matrix* parameter of one unit per holder, every unit naming it by its canonical name (the one
``named_parameters`` reports): the pass sums the holders' projections and the cross terms of the norm (see
``RuleRunner``). It is refused unless every holder's rule handles it as its matrix and can describe its
gradient as factors (``LayerRule.supports_tied``).

A parameter of shape ``(1, d, ...)`` held by a module of the model's own code without a rule (a ViT's class
token) is its own unit, keyed by the parameter's name, under :data:`~hardmine.factored.parameter.PARAMETER_RULE`:
the pass swaps it for a copy expanded to the batch (:mod:`.parameter`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from .parameter import PARAMETER_RULE, broadcast_parameter
from .registry import LayerRule, registered_names, registered_types, rule_for

__all__ = ["FactoredUnit", "plan_factored", "format_rejected", "tied_holders"]


@dataclass(frozen=True)
class FactoredUnit:
    """One selected module handled by a layer rule, and which of its parameters are selected."""

    name: str  # module name ("" for the root module)
    module: nn.Module
    rule: LayerRule
    # canonical full name of the selected matrix parameter, if selected (a tied one: not this module's own)
    matrix: str | None
    vectors: tuple[str, ...]  # local names of the selected vector parameters
    # the module whose rule records this unit's calls by computing its forward again (LayerRule.reforward),
    # and the role this unit has there ("" the host itself, else its local name); None: its own hook
    host: nn.Module | None = None
    role: str = ""

    @property
    def swaps_parameter(self) -> bool:
        """Whether this unit is a parameter used without a module, swapped for the pass (:mod:`.parameter`)."""
        return self.rule is PARAMETER_RULE

    def full_name(self, local: str) -> str:
        return f"{self.name}.{local}" if self.name else local

    @property
    def params(self) -> list[str]:
        """The selected parameters by their canonical names (a tied matrix: the name its layout block has)."""
        return ([self.matrix] if self.matrix else []) + [self.full_name(v) for v in self.vectors]

    @property
    def held_params(self) -> list[str]:
        """The same parameters by this module's own names (``lm_head.weight`` for a tied LM head)."""
        local = [self.rule.matrix_param] if self.matrix and self.rule.matrix_param else []
        return [self.full_name(n) for n in local + list(self.vectors)]

    @property
    def label(self) -> str:
        if self.swaps_parameter:
            return f"{self.full_name(self.vectors[0])} (parameter of {type(self.module).__name__})"
        return f"{self.name or '<root>'} ({type(self.module).__name__})"


def plan_factored(model: nn.Module, names: Sequence[str]) -> tuple[dict[str, FactoredUnit], dict[str, str]]:
    """Split selected parameters into factored units (by module; a parameter used without a module by its
    own name) and ``{param: reason}`` for the rest."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    hosted: dict[str, tuple[nn.Module, str]] = {}  # module -> (the module recording its calls, its role)
    host_refusal: dict[str, str] = {}  # hosting rules that refuse this instance: module -> why
    shared: dict[str, list[str]] = {}  # reforwarded child held under other names too: its name -> those
    name_of = {id(m): name for name, m in modules.items()}  # a module held twice is listed once, first name
    for mname, m in modules.items():
        rule = rule_for(m)
        if rule is None or not rule.reforwards:
            continue
        why = rule.unsupported_reason(m)
        if why is not None:
            host_refusal[mname] = why
            continue
        hosted[mname] = (m, "")
        for child in rule.reforwarded_children:
            sub = getattr(m, child)
            name = name_of[id(sub)]
            if name != _full(mname, child):
                # Held under another name first (another attention's, or the model's own): its calls inside the
                # other holders would be missed. (Of two attentions sharing it, the first one listed hosts it and
                # the second finds it here: the module is then refused.)
                shared.setdefault(name, []).append(_full(mname, child))
            else:
                hosted[name] = (m, child)
    child_refusal = {  # module -> why
        name: f"the module is also held as {others} (shared), and only one holder's uses of it would be recorded"
        for name, others in shared.items()
    }
    inside_mha: dict[str, str] = {}
    for mname, m in modules.items():
        if isinstance(m, nn.MultiheadAttention):
            for sub, _ in m.named_modules(prefix=mname):
                if sub != mname and sub not in hosted:
                    inside_mha[sub] = mname
    holders: dict[int, list[tuple[str, str]]] = {}  # a parameter object held by several modules is tied
    for mname, m in modules.items():
        for local, p in m.named_parameters(recurse=False):
            holders.setdefault(id(p), []).append((mname, local))
    # Subclasses of a listed type are left out of the list (attention's out_proj class, an nn.Linear)
    types = registered_types()
    listed = [t.__name__ for t in types if not any(t is not u and issubclass(t, u) for u in types)]
    known = ", ".join(listed + [repr(n) for n in registered_names()])

    def refusal(mname: str, local: str) -> str | None:
        module = modules[mname]
        rule = rule_for(module)
        if mname in child_refusal:
            return child_refusal[mname]
        if mname in inside_mha:
            host = inside_mha[mname]
            why = host_refusal.get(host)
            cover = "" if why is None else f" (its factored rule does not cover it: {why})"
            return (
                f"inside nn.MultiheadAttention {host or '<root>'!r}{cover}, which passes its submodules' "
                "weights to F.multi_head_attention_forward directly, so their hooks never fire"
            )
        if rule is None:
            return f"{type(module).__name__} has no factored layer rule (rules exist for {known})"
        if local not in rule.handled_params:
            return f"the {type(module).__name__} rule does not handle parameter {local!r}"
        why = rule.unsupported_reason(module)
        return None if why is None else f"{type(module).__name__} with {why}"

    rejected: dict[str, str] = {}
    grouped: dict[str, dict[str, str]] = {}  # module -> {local name: canonical parameter name}
    units = {}
    for name in names:
        held = holders[id(params[name])]
        (owner, local), *_ = held
        if (
            len(held) == 1
            and rule_for(modules[owner]) is None  # (so not a reforwarded child either: those have rules)
            and owner not in inside_mha
            and broadcast_parameter(modules[owner], params[name])
        ):
            units[name] = FactoredUnit(owner, modules[owner], PARAMETER_RULE, None, (local,))
            continue
        reason = None
        for mname, local in held:
            reason = refusal(mname, local)
            if reason is not None:
                break
            rule = rule_for(modules[mname])
            assert rule is not None
            if len(held) > 1 and (local != rule.matrix_param or not rule.supports_tied):
                reason = (
                    f"the parameter is shared by {[_full(m, loc) for m, loc in held]} (tied weights) and the "
                    f"{type(modules[mname]).__name__} rule cannot sum a shared {local!r}"
                )
                break
        if len(held) > 1 and reason is not None and "tied" not in reason:
            reason = f"{reason} (it is shared by {[_full(m, loc) for m, loc in held]})"
        if reason is not None:
            rejected[name] = reason
            continue
        for mname, local in held:
            grouped.setdefault(mname, {})[local] = name
    for mname, locals_ in grouped.items():
        module = modules[mname]
        rule = rule_for(module)
        assert rule is not None  # grouped only holds modules with a rule
        vectors = tuple(v for v in locals_ if v != rule.matrix_param)
        matrix = locals_.get(rule.matrix_param) if rule.matrix_param else None  # canonical name
        host, role = hosted.get(mname, (None, ""))
        units[mname] = FactoredUnit(mname, module, rule, matrix, vectors, host, role)
    return units, rejected


def tied_holders(units: Mapping[str, FactoredUnit]) -> dict[str, list[str]]:
    """``{matrix parameter: [unit, ...]}`` for the parameters several units hold (tied weights)."""
    by_param: dict[str, list[str]] = {}
    for name, unit in units.items():
        if unit.matrix is not None:
            by_param.setdefault(unit.matrix, []).append(name)
    return {p: names for p, names in by_param.items() if len(names) > 1}


def _full(mname: str, local: str) -> str:
    return f"{mname}.{local}" if mname else local


def format_rejected(rejected: Mapping[str, str]) -> str:
    return "; ".join(f"{name}: {reason}" for name, reason in rejected.items())
