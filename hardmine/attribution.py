"""Queries across two scans of the same model and projection: "which training examples look like *this*
failure?" (TracIn/TRAK-style attribution by gradient similarity).

Two scans are comparable when their projected vectors live in the same space: the same model weights
(``model_fingerprint``), the same selected parameters, projection size, seed and kind (so the same per-layer
matrices and layout). The data may differ — that is the point: a test-set scan queried against the training
scan's index.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from .scan import Neighbors, Scan

__all__ = ["check_comparable", "neighbors_from"]

logger = logging.getLogger(__name__)


def _projection_space(scan: Scan) -> dict[str, Any]:
    cfg = scan.config
    ext = cfg.get("extractor", {})
    return {
        "model_fingerprint": cfg.get("model_fingerprint"),
        "layers": cfg.get("layers"),
        "dim": cfg.get("dim"),
        "seed": cfg.get("seed"),
        "projection": ext.get("projection"),
        "out_dim": ext.get("out_dim"),
        "layout": ext.get("layout"),
    }


def check_comparable(reference: Scan, other: Scan) -> None:
    """Raise ``ValueError`` naming every difference when the two scans' vectors are not in one space."""
    a, b = _projection_space(reference), _projection_space(other)
    diff = [k for k in a if a[k] != b[k]]
    if diff:
        shown = "; ".join(
            f"{k}: {_short(a[k])} vs {_short(b[k])}" for k in diff if k != "layout"
        ) or "the projection layout differs"
        raise ValueError(
            f"the scans {str(reference.path)!r} and {str(other.path)!r} are not comparable ({shown}); scan both "
            "with the same checkpoint and the same --layers, --dim, --seed and projection."
        )


def neighbors_from(
    reference: Scan, other: Scan, ids: Sequence[Any], k: int = 10, *, absolute: bool = True
) -> Neighbors:
    """For samples ``ids`` of ``other``, their ``k`` nearest samples of ``reference`` by gradient cosine
    (``|cos|`` by default, as ``neighbor_disagreement`` counts; ``absolute=False``: aligned only)."""
    check_comparable(reference, other)
    rows = other.rows_of(ids)
    vectors = other.shards.gather(rows, other.out_dim)  # (q, out_dim)
    return reference.neighbors(np.asarray(vectors, dtype=np.float32), k=k, absolute=absolute)


def _short(v: Any, limit: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."
