"""Benchmark tasks built from real data: Fashion-MNIST (Debian ``dataset-fashion-mnist``) and the Landsat
Satellite table of mlbench (Debian ``r-cran-mlbench``, read with the PyPI package ``rdata``).

Every task is a ``Task``: observed (possibly noisy) training labels plus the planted truth the metrics need
(which labels were flipped, which samples belong to a hidden minority sub-class), and the clean test split.
All randomness comes from a ``numpy.random.Generator`` seeded by the caller, so a seed fixes the task.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

import hardmine

__all__ = [
    "Task",
    "DatasetSpec",
    "DATASETS",
    "SATELLITE_CLASSES",
    "load_satellite_split",
    "CONFUSABLE_PAIRS",
    "SUPERCLASS_PAIRS",
    "load_split",
    "make_noise_task",
    "make_hidden_strat_task",
    "make_long_tail_task",
]

# Fashion-MNIST class ids: 0 T-shirt/top, 1 Trouser, 2 Pullover, 3 Dress, 4 Coat, 5 Sandal, 6 Shirt,
# 7 Sneaker, 8 Bag, 9 Ankle boot.
CONFUSABLE_PAIRS = ((0, 6), (2, 4), (7, 9))  # T-shirt<->Shirt, Pullover<->Coat, Sneaker<->Ankle boot
# (majority, minority) per superclass, as in the issue.
SUPERCLASS_PAIRS = ((0, 6), (1, 3), (2, 4), (5, 7), (8, 9))


@dataclass
class Task:
    """One benchmark task. Tensors are float32 ``(N, 784)`` images in [0, 1] and int64 labels."""

    name: str
    x: torch.Tensor  # (N, 784) training images
    y: torch.Tensor  # (N,) observed training labels (what every method trains on)
    y_clean: torch.Tensor  # (N,) labels before injected noise
    is_noisy: np.ndarray  # (N,) bool: label was flipped by us
    group: np.ndarray  # (N,) int: sub-class id (original Fashion-MNIST class)
    is_minority: np.ndarray  # (N,) bool: hidden minority sub-class (hidden stratification) / tail class
    x_test: torch.Tensor  # (M, 784)
    y_test: torch.Tensor  # (M,) clean test labels in the task's label space
    group_test: np.ndarray  # (M,) sub-class id of each test image
    n_classes: int
    # Share of each sub-class in the training distribution (in-distribution accuracy on a balanced test set).
    group_weights: dict[int, float] = field(default_factory=dict)
    info: dict[str, object] = field(default_factory=dict)


def load_split(split: str) -> tuple[torch.Tensor, np.ndarray]:
    """Fashion-MNIST ``split`` as float32 ``(N, 784)`` in [0, 1] and int64 numpy labels."""
    images, labels = hardmine.load_fashion_mnist(split)
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)  # (N, 784)
    return x, labels


def _flip_symmetric(y: np.ndarray, rate: float, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Flip exactly ``round(rate * N)`` labels, each to a uniformly drawn *other* class."""
    y = y.copy()
    n_flip = int(round(rate * len(y)))
    idx = rng.choice(len(y), size=n_flip, replace=False)
    shift = rng.integers(1, n_classes, size=n_flip)  # never 0, so the new label always differs
    y[idx] = (y[idx] + shift) % n_classes
    return y


def make_noise_task(
    kind: str,
    seed: int,
    n_train: int,
    rate: float,
    train: tuple[torch.Tensor, np.ndarray],
    test: tuple[torch.Tensor, np.ndarray],
    pairs: tuple[tuple[int, int], ...] = CONFUSABLE_PAIRS,
    n_classes: int = 10,
) -> Task:
    """Label-noise task: ``n_train`` random training images, labels flipped at ``rate``.

    ``kind="symmetric"``: ``rate * N`` labels go to a uniformly random other class.
    ``kind="pairs"``: in each confusable pair (T-shirt<->Shirt, Pullover<->Coat, Sneaker<->Ankle boot),
    exactly ``rate`` of each class's images are relabelled as the partner class; other classes stay clean,
    so the overall noise rate is ``rate * (share of the six paired classes)`` (about 0.6 * rate).
    """
    rng = np.random.default_rng(seed)
    x_all, y_all = train
    sel = np.sort(rng.choice(len(y_all), size=n_train, replace=False))
    y_clean = y_all[sel]
    if kind == "symmetric":
        y_obs = _flip_symmetric(y_clean, rate, n_classes, rng)
    elif kind == "pairs":
        y_obs = y_clean.copy()
        for a, b in pairs:
            for src, dst in ((a, b), (b, a)):
                members = np.flatnonzero(y_clean == src)
                flip = rng.choice(members, size=int(round(rate * len(members))), replace=False)
                y_obs[flip] = dst
    else:
        raise ValueError(f"noise kind={kind!r} is not valid; use 'symmetric' or 'pairs'.")
    x_test, y_test = test
    return Task(
        name=f"noise-{kind}",
        x=x_all[torch.from_numpy(sel)],
        y=torch.from_numpy(y_obs),
        y_clean=torch.from_numpy(y_clean),
        is_noisy=y_obs != y_clean,
        group=y_clean.copy(),
        is_minority=np.zeros(len(sel), dtype=bool),
        x_test=x_test,
        y_test=torch.from_numpy(y_test),
        group_test=y_test.copy(),
        n_classes=n_classes,
        group_weights={c: float(np.mean(y_clean == c)) for c in range(n_classes)},
        info={"noise_rate": float(np.mean(y_obs != y_clean)), "n_train": n_train, "kind": kind},
    )


def make_hidden_strat_task(
    seed: int,
    n_major: int,
    minority_share: float,
    noise: float,
    train: tuple[torch.Tensor, np.ndarray],
    test: tuple[torch.Tensor, np.ndarray],
    superclass_pairs: tuple[tuple[int, int], ...] = SUPERCLASS_PAIRS,
) -> Task:
    """Five superclasses, each a majority class (``n_major`` images) plus a minority class kept at
    ``minority_share`` of the superclass. Labels are the superclass (0..4); the sub-class is hidden.
    ``noise`` > 0 flips that share of all training labels to a random other superclass.
    The test set is the whole clean Fashion-MNIST test split (1000 images per sub-class).
    """
    rng = np.random.default_rng(seed)
    x_all, y_all = train
    n_minor = int(round(n_major * minority_share / (1.0 - minority_share)))
    parts, labels, groups = [], [], []
    n_super = len(superclass_pairs)
    for s, (major, minor) in enumerate(superclass_pairs):
        for cls, n in ((major, n_major), (minor, n_minor)):
            idx = rng.choice(np.flatnonzero(y_all == cls), size=n, replace=False)
            parts.append(idx)
            labels.append(np.full(n, s))
            groups.append(np.full(n, cls))
    sel, y_clean, group = np.concatenate(parts), np.concatenate(labels), np.concatenate(groups)
    order = rng.permutation(len(sel))  # mixed order, so no method can exploit row position
    sel, y_clean, group = sel[order], y_clean[order], group[order]
    y_obs = _flip_symmetric(y_clean, noise, n_super, rng) if noise > 0 else y_clean.copy()
    minor_classes = {m for _, m in superclass_pairs}
    to_super = {c: s for s, pair in enumerate(superclass_pairs) for c in pair}
    x_test, y_test = test
    keep = np.isin(y_test, list(to_super))  # test images of the sub-classes in the task
    x_test, y_test = x_test[torch.from_numpy(keep)], y_test[keep]
    share = {c: n_major / (n_major + n_minor) for c, _ in superclass_pairs}
    share.update({m: n_minor / (n_major + n_minor) for _, m in superclass_pairs})
    return Task(
        name="hidden-strat" + (f"+noise{int(round(noise * 100))}" if noise > 0 else ""),
        x=x_all[torch.from_numpy(sel)],
        y=torch.from_numpy(y_obs),
        y_clean=torch.from_numpy(y_clean),
        is_noisy=y_obs != y_clean,
        group=group,
        is_minority=np.isin(group, list(minor_classes)),
        x_test=x_test,
        y_test=torch.from_numpy(np.array([to_super[c] for c in y_test], dtype=np.int64)),
        group_test=y_test.copy(),
        n_classes=n_super,
        # Weight of each sub-class within its superclass; superclasses are equally frequent.
        group_weights={c: w / n_super for c, w in share.items()},
        info={"n_major": n_major, "n_minor": n_minor, "noise_rate": float(np.mean(y_obs != y_clean))},
    )


def make_long_tail_task(
    seed: int,
    n_max: int,
    ratio: float,
    train: tuple[torch.Tensor, np.ndarray],
    test: tuple[torch.Tensor, np.ndarray],
    n_tail: int = 3,
    n_classes: int = 10,
) -> Task:
    """Exponentially imbalanced 10-class set: class ``c`` keeps ``n_max * ratio ** (-c / 9)`` images
    (class 0 the head, class 9 the tail, ``n_max / n_min = ratio``). The ``n_tail`` rarest classes are
    the tail. The test set is the balanced Fashion-MNIST test split.
    """
    rng = np.random.default_rng(seed)
    x_all, y_all = train
    counts = [int(round(n_max * ratio ** (-c / (n_classes - 1)))) for c in range(n_classes)]
    sel = np.concatenate(
        [rng.choice(np.flatnonzero(y_all == c), size=n, replace=False) for c, n in enumerate(counts)]
    )
    sel = sel[rng.permutation(len(sel))]
    y = y_all[sel]
    tail = list(range(n_classes - n_tail, n_classes))
    x_test, y_test = test
    return Task(
        name="long-tail",
        x=x_all[torch.from_numpy(sel)],
        y=torch.from_numpy(y),
        y_clean=torch.from_numpy(y),
        is_noisy=np.zeros(len(sel), dtype=bool),
        group=y.copy(),
        is_minority=np.isin(y, tail),
        x_test=x_test,
        y_test=torch.from_numpy(y_test),
        group_test=y_test.copy(),
        n_classes=n_classes,
        group_weights={c: 1.0 / n_classes for c in range(n_classes)},  # balanced accuracy: every class counts the same
        info={"counts": counts, "tail_classes": tail, "ratio": ratio},
    )


# ------------------------------------------------------------------------------------------ Satellite
# mlbench's Satellite (Landsat multi-spectral values of 3x3 pixel neighbourhoods, 36 features, 6 classes;
# the UCI Statlog set, train and test files together). Class ids follow the R factor's levels.
SATELLITE_CLASSES = (
    "red soil", "cotton crop", "grey soil", "damp grey soil", "vegetation stubble", "very damp grey soil",
)
SATELLITE_RDA = "/usr/lib/R/site-library/mlbench/data/Satellite.rda"
_SATELLITE_SPLIT_SEED = 20261129  # the fixed train/test split (2/3 - 1/3, stratified by class)


def _satellite_frame() -> tuple[np.ndarray, np.ndarray]:
    import warnings

    try:
        import rdata
    except ImportError:
        raise SystemExit("the eval's second dataset needs the PyPI package rdata: pip install -e '.[bench]'") from None
    path = os.environ.get("HARDMINE_SATELLITE_RDA", SATELLITE_RDA)
    if not os.path.isfile(path):
        raise SystemExit(f"{path} is missing: run scripts/install_eval_data.sh (Debian package r-cran-mlbench).")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unknown encoding. Assumed ASCII." for this file
        df = rdata.read_rda(path)["Satellite"]
    levels = list(df["classes"].cat.categories)
    if tuple(levels) != SATELLITE_CLASSES:
        raise SystemExit(f"{path}: unexpected Satellite classes {levels}.")
    x = df.drop(columns="classes").to_numpy(dtype=np.float64)  # (6435, 36)
    y = df["classes"].cat.codes.to_numpy().astype(np.int64)
    return x, y


def load_satellite_split(split: str) -> tuple[torch.Tensor, np.ndarray]:
    """Satellite ``split`` ("train": 2/3 of every class, "test": the rest; fixed seed) as float32 ``(N, 36)``
    features standardised with the training split's mean and std, and int64 labels."""
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} is not valid; use 'train' or 'test'.")
    x, y = _satellite_frame()
    rng = np.random.default_rng(_SATELLITE_SPLIT_SEED)
    is_test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        is_test[members[: len(members) // 3]] = True
    mu, sd = x[~is_test].mean(axis=0), x[~is_test].std(axis=0)
    sel = is_test if split == "test" else ~is_test
    xs = ((x[sel] - mu) / np.where(sd > 0, sd, 1.0)).astype(np.float32)  # (n, 36)
    return torch.from_numpy(xs), y[sel]


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of the benchmark: how to load it and the constants of its three tasks."""

    name: str
    title: str
    load: Callable[[str], tuple[torch.Tensor, np.ndarray]]
    n_classes: int
    confusable_pairs: tuple[tuple[int, int], ...]
    superclass_pairs: tuple[tuple[int, int], ...]
    noise_n: int
    hs_major: int
    hs_minority: float
    lt_max: int
    lt_ratio: float
    lt_tail: int
    epochs: float
    describe: str


DATASETS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        title="Fashion-MNIST, MLP",
        load=load_split,
        n_classes=10,
        confusable_pairs=CONFUSABLE_PAIRS,
        superclass_pairs=SUPERCLASS_PAIRS,
        noise_n=20000,
        hs_major=3800,
        hs_minority=0.05,
        lt_max=5000,
        lt_ratio=100.0,
        lt_tail=3,
        epochs=6.0,
        describe=(
            "noise pairs T-shirt/Shirt, Pullover/Coat, Sneaker/Ankle boot; superclasses T-shirt+Shirt, "
            "Trouser+Dress, Pullover+Coat, Sandal+Sneaker, Bag+Ankle boot (majority+minority)"
        ),
    ),
    "satellite": DatasetSpec(
        name="satellite",
        title="Satellite (mlbench / UCI Statlog Landsat), MLP",
        load=load_satellite_split,
        n_classes=6,
        # damp grey <-> very damp grey, grey soil <-> red soil, cotton crop <-> vegetation stubble
        confusable_pairs=((3, 5), (2, 0), (1, 4)),
        # (majority, minority): very damp grey + damp grey soil, grey soil + vegetation stubble, red soil +
        # cotton crop. Each minority resembles another superclass more than its own majority in places, as
        # Shirt (inside T-shirt) resembles Pullover/Coat in Fashion-MNIST: ERM's worst sub-class is near one half.
        superclass_pairs=((5, 3), (2, 4), (0, 1)),
        noise_n=4290,  # the whole training split
        hs_major=440,
        hs_minority=0.07,
        lt_max=400,
        lt_ratio=20.0,
        lt_tail=2,
        epochs=30.0,
        describe=(
            "noise pairs damp grey/very damp grey soil, grey/red soil, cotton crop/vegetation stubble; "
            "superclasses very damp grey+damp grey soil, grey soil+vegetation stubble, red soil+cotton crop "
            "(majority+minority)"
        ),
    ),
}
