"""Selecting which parameters of a model to take per-sample gradients of.

Patterns are matched against parameter names (``"fc2.weight"``) and module names (``"classifier"``
selects every parameter below that module), with shell-style globs (``"fc2.*"``, ``"layers.*.attn.*"``).
Selection happens before any gradient is computed: unselected parameters are treated as constants.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from .factored.layout import ProjectionLayout

logger = logging.getLogger(__name__)

__all__ = ["select_parameters", "normalize_patterns", "check_one_device", "warn_uncached_projections"]


def normalize_patterns(patterns: str | Sequence[str] | None) -> list[str] | None:
    """``"a,b"`` or ``["a", "b"]`` -> ``["a", "b"]``; ``None``/``"all"``/``"*"`` -> ``None`` (everything)."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        items = [p.strip() for p in patterns.split(",")]
    else:
        items = []
        for p in patterns:
            if not isinstance(p, str):
                raise ValueError(f"layer pattern {p!r} is not a string; pass names or globs like 'fc2.*'.")
            items.extend(q.strip() for q in p.split(","))
    items = [p for p in items if p]
    if not items:
        raise ValueError(f"layer patterns {patterns!r} are empty; pass e.g. 'classifier' or 'fc2.*', or None for all.")
    if any(p in ("all", "*") for p in items):
        return None
    return items


def _matches(name: str, pattern: str) -> bool:
    # A module name selects everything below it; a glob is matched against the full parameter name.
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def select_parameters(model: nn.Module, patterns: str | Sequence[str] | None = None) -> list[str]:
    """Return the names of the trainable parameters of ``model`` selected by ``patterns``, in model order.

    Raises ``ValueError`` naming the pattern when one matches nothing, listing the model's modules.
    """
    pats = normalize_patterns(patterns)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no parameters with requires_grad=True; nothing to differentiate.")
    if pats is None:
        return [n for n, _ in named]
    # A tied parameter (an LM head sharing the input embedding) has one canonical name; its other names
    # select it too, so layers="lm_head" works. Every alias maps to the canonical name.
    canonical = {id(p): n for n, p in named}
    aliases = [(a, canonical[id(p)]) for a, p in model.named_parameters(remove_duplicate=False) if id(p) in canonical]
    chosen: list[str] = []
    for pat in pats:
        hits = list(dict.fromkeys(c for a, c in aliases if _matches(a, pat)))
        if not hits:
            raise ValueError(
                f"layer pattern {pat!r} matches no trainable parameter. Available: {_summarize(n for n, _ in named)}"
            )
        chosen.extend(h for h in hits if h not in chosen)
    order = {n: i for i, (n, _) in enumerate(named)}
    return sorted(chosen, key=order.__getitem__)


def _summarize(names: Iterable[str], limit: int = 30) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_one_device(model: nn.Module, names: Sequence[str], owner: str) -> None:
    """Refuse selected parameters spread over several devices (a model split across GPUs, e.g. loaded with a
    ``device_map``): the factored pass sums each sample's gradient parts on one device, and would fail
    mid-pass with a device mismatch instead."""
    params = dict(model.named_parameters())
    devices = sorted({str(params[n].device) for n in names})
    if len(devices) > 1:
        raise ValueError(
            f"{owner}: the selected parameters are on several devices ({', '.join(devices)}); per-sample gradients "
            "are extracted on one device. Move the model to one device (model.to('cuda')) or select layers that "
            "are all on one (layers=...)."
        )


def warn_uncached_projections(layout: ProjectionLayout, owner: str) -> None:
    """Say when dense projection matrices do not fit the projector's cache: those parameters have no factored
    rule (e.g. a ``(768, 256)`` parameter of a custom module: several hundred MiB of matrix at dim 256) and
    their matrices are made again from their seeds on every batch, which is slow and otherwise silent."""
    names, beyond = layout.uncached_dense()
    if names:
        logger.warning(
            "%s: the dense projection matrices of %s do not all fit the projector's cache: about %.0f MiB of them "
            "are regenerated from their seeds on every batch, which is slow. These parameters have no factored "
            "rule (their whole gradient is projected); leave them out (layers=...) or use a smaller dim.",
            owner, ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else ""), beyond / 2**20,
        )
