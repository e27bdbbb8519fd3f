"""Checks for user-supplied settings, with one message style.

Each check returns the value (integers as a Python ``int``) when it is acceptable and otherwise raises ``ValueError``
quoting the offending value and what to pass instead: ``"{name}={value!r} must be a positive integer."``,
with `` or None`` when ``None`` is allowed and the optional ``hint`` in parentheses. ``name`` is written
as the user spells the setting (``"chunk_size"``, ``"ScoreConfig k"``).

``bool`` is a subclass of ``int`` in Python, so ``True`` would pass a plain ``isinstance(v, int)``;
every check here refuses bools where a number is asked for, and accepts NumPy integers and floats
where Python ones are.

The predicates (``is_int``, ``is_number``, ``is_finite_number``) are for callers that phrase their own
message (a range like ``(0, 1]``) or that discriminate between kinds of input.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal, TypeVar, overload

import numpy as np
from torch import nn

from .enums import ProjectionKind, parse_choice

__all__ = [
    "projection_kind",
    "as_bool",
    "as_module",
    "finite_number",
    "is_finite_number",
    "is_int",
    "is_number",
    "non_negative_int",
    "number_in",
    "positive_int",
]

T = TypeVar("T")


def is_int(value: Any) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    """A Python or NumPy integer or float (NaN and inf included), not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def is_finite_number(value: Any) -> bool:
    """``is_number`` and neither NaN nor infinite."""
    return is_number(value) and math.isfinite(value)


def _fail(name: str, value: Any, what: str, allow_none: bool, hint: str) -> ValueError:
    alternative = " or None" if allow_none else ""
    note = f" ({hint})" if hint else ""
    return ValueError(f"{name}={value!r} must be {what}{alternative}{note}.")


def _int_at_least(value: Any, name: str, minimum: int, what: str, allow_none: bool, hint: str) -> int | None:
    if value is None and allow_none:
        return None
    if not is_int(value) or value < minimum:
        raise _fail(name, value, what, allow_none, hint)
    return int(value)


@overload
def positive_int(value: Any, name: str, *, allow_none: Literal[False] = False, hint: str = "") -> int: ...
@overload
def positive_int(value: Any, name: str, *, allow_none: bool, hint: str = "") -> int | None: ...
def positive_int(value: Any, name: str, *, allow_none: bool = False, hint: str = "") -> int | None:
    """``value`` as a Python ``int`` if it is an integer >= 1 (or ``None`` with ``allow_none``)."""
    return _int_at_least(value, name, 1, "a positive integer", allow_none, hint)


@overload
def non_negative_int(value: Any, name: str, *, allow_none: Literal[False] = False, hint: str = "") -> int: ...
@overload
def non_negative_int(value: Any, name: str, *, allow_none: bool, hint: str = "") -> int | None: ...
def non_negative_int(value: Any, name: str, *, allow_none: bool = False, hint: str = "") -> int | None:
    """``value`` as a Python ``int`` if it is an integer >= 0 (or ``None`` with ``allow_none``)."""
    return _int_at_least(value, name, 0, "a non-negative integer", allow_none, hint)


def finite_number(
    value: T,
    name: str,
    *,
    at_least: float | None = None,
    above: float | None = None,
    allow_none: bool = False,
    hint: str = "",
) -> T:
    """``value`` if it is a finite number, ``>= at_least`` and ``> above`` where those are given."""
    if value is None and allow_none:
        return value
    bound = f" >= {at_least}" if at_least is not None else f" > {above}" if above is not None else ""
    ok = is_finite_number(value) and (at_least is None or value >= at_least) and (above is None or value > above)  # type: ignore[operator]
    if not ok:
        raise _fail(name, value, f"a finite number{bound}", allow_none, hint)
    return value


def number_in(value: T, name: str, lo: float, hi: float, *, hint: str = "") -> T:
    """``value`` if it is a number in the closed range ``[lo, hi]`` (NaN is not)."""
    if not is_number(value) or not (lo <= value <= hi):  # type: ignore[operator]
        raise _fail(name, value, f"a number in [{lo}, {hi}]", False, hint)
    return value


def as_bool(value: Any, name: str) -> bool:
    """``value`` if it is ``True`` or ``False`` (not a truthy stand-in such as ``1`` or ``"yes"``)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be True or False.")
    return value


def as_module(value: Any, name: str = "model") -> nn.Module:
    """``value`` if it is a ``torch.nn.Module``."""
    if not isinstance(value, nn.Module):
        raise ValueError(f"{name} must be a torch.nn.Module, got {type(value).__name__}.")
    return value


def projection_kind(projection: ProjectionKind | str | None, kind: ProjectionKind | str | None, owner: str) -> ProjectionKind:
    """The projection kind from ``projection=`` or its deprecated alias ``kind=`` of ``owner`` (warned about;
    refused when both are given and disagree). ``None`` for both: Rademacher."""
    if kind is None:
        return parse_choice(ProjectionKind, ProjectionKind.RADEMACHER if projection is None else projection, "projection")
    warnings.warn(
        f"{owner}(kind=...) is deprecated; pass projection=... (the name scan and the CLI use).",
        DeprecationWarning,
        stacklevel=3,
    )
    from_kind = parse_choice(ProjectionKind, kind, "kind")
    if projection is not None and parse_choice(ProjectionKind, projection, "projection") is not from_kind:
        raise ValueError(
            f"projection={projection!r} and kind={kind!r} disagree; pass only projection= (kind= is deprecated)."
        )
    return from_kind
