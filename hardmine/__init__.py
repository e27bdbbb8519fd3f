"""hardmine: find the examples a trained model struggles with from their per-sample gradients.

The public names below load on first use (PEP 562), so ``import hardmine`` and the command line start without
importing torch, pandas or FAISS until something needs them.
"""

from __future__ import annotations

import importlib as _importlib
import logging
import sys as _sys
import types as _types
from typing import Any as _Any

from ._version import __version__

logging.getLogger(__name__).addHandler(logging.NullHandler())

# name -> the submodule that defines it
_LAZY: dict[str, str] = {
    "load_fashion_mnist": "datasets",
    "read_idx": "datasets",
    "GradientExtractor": "engine",
    "ProjectedBatch": "engine",
    "Engine": "enums",
    "IndexKind": "enums",
    "LossKind": "enums",
    "ProjectionKind": "enums",
    "Randomness": "enums",
    "ScanPhase": "enums",
    "Strategy": "enums",
    "TaskKind": "enums",
    "PerSampleGrads": "extract",
    "per_sample_grads": "extract",
    "reference_per_sample_grads": "extract",
    "export_manifest": "manifest",
    "read_manifest": "manifest",
    "write_manifest": "manifest",
    "OnlineMiner": "online",
    "OnlineStats": "online",
    "WeightingConfig": "online",
    "select_parameters": "params",
    "Projector": "project",
    "random_matrix": "project",
    "ManifestSampler": "sampler",
    "MinerSampler": "sampler",
    "Scan": "scan",
    "ScanProgress": "scan",
    "scan": "scan",
    "ScoreConfig": "score",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> _Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hardmine' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(_types.ModuleType):
    """``hardmine.scan`` is the ``scan`` function, as it always was, although ``hardmine/scan/`` is a package:
    importing a submodule makes Python set the parent's attribute to the submodule, so that one assignment is
    turned into the function here (``import hardmine.scan`` / ``from hardmine.scan import X`` still reach the
    package through ``sys.modules``)."""

    def __setattr__(self, name: str, value: _Any) -> None:
        if name == "scan" and isinstance(value, _types.ModuleType):
            value = value.scan
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
