"""Every set of choices hardmine accepts, as one ``str`` Enum each.

The API, the CLI and error messages all read the allowed values from here, so the lists never drift.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

__all__ = [
    "DataFormat",
    "Engine",
    "HardSet",
    "IndexKind",
    "LabelIssueMethod",
    "LossKind",
    "ProjectionKind",
    "Randomness",
    "ReviewReason",
    "ScanPhase",
    "SliceEmbedding",
    "Strategy",
    "TaskKind",
    "TokenReduction",
    "parse_choice",
]


class Engine(str, Enum):
    """How per-sample gradients are obtained."""

    AUTO = "auto"  # factored where a layer rule exists, vmap for the rest
    FACTORED = "factored"  # hooks + Kronecker-factored projection; never materialises per-sample grads
    VMAP = "vmap"  # torch.func vmap(grad(functional_call)); exact and general


class HardSet(str, Enum):
    """Which samples an export marks ``is_hard`` (and ``top-k`` boosts)."""

    TOP = "top"  # the hardest ``top`` fraction by rank (within each class for per-class)
    THRESHOLD = "threshold"  # every sample with ``hardness >= threshold``
    NOISE_RATE = "noise-rate"  # the hardest fraction equal to the estimated label-noise rate (confident errors)


class LossKind(str, Enum):
    """Built-in per-sample losses."""

    AUTO = "auto"  # cross_entropy for integer targets, mse for floating targets (never bce: ask for it)
    CROSS_ENTROPY = "cross_entropy"
    MSE = "mse"
    BCE = "bce"  # multi-label: mean over the C outputs of BCE-with-logits against a (B, C) 0/1 target
    # next-token NLL of (B, T, V) logits against (B, T) labels (HF-style shift, -100 ignored), per sample
    CAUSAL_LM = "causal_lm"


class ProjectionKind(str, Enum):
    """Distribution of the random projection matrix entries."""

    RADEMACHER = "rademacher"
    GAUSSIAN = "gaussian"


class Randomness(str, Enum):
    """What to do with stochastic layers (dropout) while computing per-sample gradients."""

    EVAL = "eval"  # run the model in eval mode for the pass (dropout off); restored afterwards
    DIFFERENT = "different"  # keep the model's mode; each sample draws its own dropout mask
    SAME = "same"  # keep the model's mode; all samples in a vmap call share one mask


class DataFormat(str, Enum):
    """On-disk data formats the CLI reads (see ``hardmine.loaders.data``)."""

    AUTO = "auto"  # detected from the path
    PARQUET = "parquet"
    CSV = "csv"
    NPZ = "npz"
    IDX = "idx"
    HF = "hf"  # a datasets.save_to_disk directory
    FACTORY = "factory"  # pkg.module:callable returning a torch Dataset


class IndexKind(str, Enum):
    """Which FAISS index holds the projected gradients (see ``hardmine.index``)."""

    AUTO = "auto"  # flat up to a documented size, IVF (on-disk lists) above it
    FLAT = "flat"  # exact IndexFlatIP on unit vectors
    IVF = "ivf"  # IndexIVFFlat, inverted lists on disk (memory-mapped), approximate
    HNSW = "hnsw"  # IndexHNSWFlat, in RAM, approximate


class Strategy(str, Enum):
    """How ``export_manifest`` turns hardness into sampling weights (see ``hardmine.manifest``)."""

    TOP_K = "top-k"  # JTT-like: weight `boost` for the hardest fraction `top`, 1 for the rest
    PROPORTIONAL = "proportional"  # weight proportional to hardness ** temperature
    PER_CLASS = "per-class"  # hardness ** temperature within each class, every class gets equal mass
    SLICES = "slices"  # within each class, slices weighted by their error rate; label issues never boosted


class SliceEmbedding(str, Enum):
    """Which vectors the per-class k-means of ``hardmine.slices`` clusters (unit-normalised first)."""

    GRADIENTS = "gradients"  # the scan's projected gradients of all selected layers
    OUTPUT_LAYER = "output-layer"  # only the columns of the last layer in the projection layout


class LabelIssueMethod(str, Enum):
    """Formula of the manifest's ``label_issue`` score (see ``hardmine.label_issues``)."""

    LOSS = "loss"  # per-sample loss, -log p[y]
    MARGIN = "margin"  # max_{j != y} p[j] - p[y]
    LOG_MARGIN = "log-margin"  # log max_{j != y} p[j] - log p[y]
    NORMALIZED_CONFIDENCE = "normalized-confidence"  # -log(p[y] / t_y), t_y the class's mean p[y]
    LOSS_NEIGHBORS = "loss+neighbors"  # rank mean of loss and |cos|-neighbour label disagreement


class ReviewReason(str, Enum):
    """Why ``hardmine.review`` queues a sample for an expert, in priority order (see ``hardmine.review``)."""

    CONFIDENT_ERROR = "confident-error"  # the model is confidently wrong: a label error or a real failure
    LABEL_ISSUE = "label-issue"  # is_label_issue (or, without it, most |cos| neighbours carry another label)
    NEAR_MISS = "near-miss"  # right, but barely: the boundary cases an expert can confirm


class ScanPhase(str, Enum):
    """Phases a scan reports progress for."""

    EXTRACT = "extract"  # per-sample gradients, projected, streamed to shards
    INDEX = "index"  # FAISS index built from the shards
    SCORE = "score"  # population statistics, kNN and per-sample scores


class TaskKind(str, Enum):
    """What the targets are; decides which scores exist."""

    CLASSIFICATION = "classification"
    REGRESSION = "regression"
    MULTILABEL = "multilabel"  # (B, C) logits, (B, C) 0/1 targets: any number of labels per sample
    CAUSAL_LM = "causal-lm"  # (B, T, V) next-token logits, (B, T) token labels (-100: not a target)


class TokenReduction(str, Enum):
    """How a causal LM's per-token losses make one sample's loss (``hardmine.losses.causal_lm_per_sample``)."""

    MEAN = "mean"  # mean NLL over the sample's target tokens (every sample on the same scale)
    SUM = "sum"  # total NLL over the target tokens (longer completions weigh more)


E = TypeVar("E", bound=Enum)


def parse_choice(enum_cls: type[E], value: object, what: str) -> E:
    """Turn a user value into a member of ``enum_cls`` or raise a ValueError listing the choices."""
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in enum_cls)
        raise ValueError(f"{what}={value!r} is not a valid choice; use one of {choices}.") from None
