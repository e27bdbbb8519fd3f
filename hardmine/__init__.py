"""hardmine: find the examples a trained model struggles with from their per-sample gradients."""

from __future__ import annotations

import logging

from ._version import __version__
from .datasets import load_fashion_mnist, read_idx
from .engine import GradientExtractor, ProjectedBatch
from .enums import Engine, IndexKind, LossKind, ProjectionKind, Randomness, ScanPhase, Strategy, TaskKind
from .extract import PerSampleGrads, per_sample_grads, reference_per_sample_grads
from .manifest import export_manifest, read_manifest, write_manifest
from .online import MinerSampler, OnlineMiner, OnlineStats, WeightingConfig
from .params import select_parameters
from .project import Projector, random_matrix
from .sampler import ManifestSampler
from .scan import Scan, ScanProgress, scan
from .score import ScoreConfig

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "__version__",
    "Engine",
    "GradientExtractor",
    "IndexKind",
    "LossKind",
    "ManifestSampler",
    "MinerSampler",
    "OnlineMiner",
    "OnlineStats",
    "PerSampleGrads",
    "ProjectedBatch",
    "ProjectionKind",
    "Projector",
    "Randomness",
    "Scan",
    "ScanPhase",
    "ScanProgress",
    "ScoreConfig",
    "Strategy",
    "TaskKind",
    "WeightingConfig",
    "export_manifest",
    "load_fashion_mnist",
    "per_sample_grads",
    "random_matrix",
    "read_idx",
    "read_manifest",
    "reference_per_sample_grads",
    "scan",
    "select_parameters",
    "write_manifest",
]
