"""Planning the factored pass: which selected parameters a layer rule covers, grouped by module.

A parameter is refused (with the reason) when its module has no rule, the rule does not handle it, the
module's configuration is outside the rule's maths, it sits inside ``nn.MultiheadAttention`` (whose
submodules' hooks never fire) or it is shared by several modules (tied weights).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from .layout import split_param_name
from .registry import LayerRule, registered_types, rule_for

__all__ = ["FactoredUnit", "plan_factored", "format_rejected"]


@dataclass(frozen=True)
class FactoredUnit:
    """One selected module handled by a layer rule, and which of its parameters are selected."""

    name: str  # module name ("" for the root module)
    module: nn.Module
    rule: LayerRule
    matrix: str | None  # full name of the selected matrix parameter, if selected
    vectors: tuple[str, ...]  # local names of the selected vector parameters

    def full_name(self, local: str) -> str:
        return f"{self.name}.{local}" if self.name else local

    @property
    def params(self) -> list[str]:
        return ([self.matrix] if self.matrix else []) + [self.full_name(v) for v in self.vectors]

    @property
    def label(self) -> str:
        return f"{self.name or '<root>'} ({type(self.module).__name__})"


def plan_factored(model: nn.Module, names: Sequence[str]) -> tuple[dict[str, FactoredUnit], dict[str, str]]:
    """Split selected parameters into factored units (by module) and ``{param: reason}`` for the rest."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    inside_mha: dict[str, str] = {}
    for mname, m in modules.items():
        if isinstance(m, nn.MultiheadAttention):
            for sub, _ in m.named_modules(prefix=mname):
                if sub != mname:
                    inside_mha[sub] = mname or "<root>"
    holders: dict[int, list[str]] = {}  # a parameter object held by several modules is shared (tied)
    for mname, m in modules.items():
        for local, p in m.named_parameters(recurse=False):
            holders.setdefault(id(p), []).append(f"{mname}.{local}" if mname else local)
    known = ", ".join(t.__name__ for t in registered_types())
    rejected: dict[str, str] = {}
    grouped: dict[str, list[str]] = {}
    for name in names:
        mname, local = split_param_name(name)
        module = modules[mname]
        rule = rule_for(module)
        why = None if rule is None else rule.unsupported_reason(module)
        if mname in inside_mha:
            reason = (
                f"inside nn.MultiheadAttention {inside_mha[mname]!r}, which passes its submodules' "
                "weights to F.multi_head_attention_forward directly, so their hooks never fire"
            )
        elif rule is None:
            reason = f"{type(module).__name__} has no factored layer rule (rules exist for {known})"
        elif local not in rule.handled_params:
            reason = f"the {type(module).__name__} rule does not handle parameter {local!r}"
        elif why is not None:
            reason = f"{type(module).__name__} with {why}"
        elif len(holders[id(params[name])]) > 1:
            reason = f"the parameter is shared by {holders[id(params[name])]} (tied weights)"
        else:
            grouped.setdefault(mname, []).append(local)
            continue
        rejected[name] = reason
    units = {}
    for mname, locals_ in grouped.items():
        module = modules[mname]
        rule = rule_for(module)
        assert rule is not None  # grouped only holds modules with a rule
        unit = FactoredUnit(
            name=mname,
            module=module,
            rule=rule,
            matrix=None,
            vectors=tuple(v for v in locals_ if v != rule.matrix_param),
        )
        if rule.matrix_param in locals_:
            unit = FactoredUnit(mname, module, rule, unit.full_name(rule.matrix_param), unit.vectors)
        units[mname] = unit
    return units, rejected


def format_rejected(rejected: Mapping[str, str]) -> str:
    return "; ".join(f"{name}: {reason}" for name, reason in rejected.items())
