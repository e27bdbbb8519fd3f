"""hardmine: find the examples a trained model struggles with from its per-sample gradients."""

from __future__ import annotations

import logging

from ._version import __version__
from .datasets import load_fashion_mnist, read_idx
from .enums import Engine, LossKind, ProjectionKind, Randomness
from .extract import PerSampleGrads, per_sample_grads, reference_per_sample_grads
from .params import select_parameters
from .project import Projector, random_matrix

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "__version__",
    "Engine",
    "LossKind",
    "PerSampleGrads",
    "ProjectionKind",
    "Projector",
    "Randomness",
    "load_fashion_mnist",
    "per_sample_grads",
    "random_matrix",
    "read_idx",
    "reference_per_sample_grads",
    "select_parameters",
]
