"""Benchmark tasks built from real Fashion-MNIST (Debian ``dataset-fashion-mnist``).

Every task is a ``Task``: observed (possibly noisy) training labels plus the planted truth the metrics need
(which labels were flipped, which samples belong to a hidden minority sub-class), and the clean test split.
All randomness comes from a ``numpy.random.Generator`` seeded by the caller, so a seed fixes the task.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

import hardmine

__all__ = [
    "Task",
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
        y_obs = _flip_symmetric(y_clean, rate, 10, rng)
    elif kind == "pairs":
        y_obs = y_clean.copy()
        for a, b in CONFUSABLE_PAIRS:
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
        n_classes=10,
        group_weights={c: float(np.mean(y_clean == c)) for c in range(10)},
        info={"noise_rate": float(np.mean(y_obs != y_clean)), "n_train": n_train, "kind": kind},
    )


def make_hidden_strat_task(
    seed: int,
    n_major: int,
    minority_share: float,
    noise: float,
    train: tuple[torch.Tensor, np.ndarray],
    test: tuple[torch.Tensor, np.ndarray],
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
    for s, (major, minor) in enumerate(SUPERCLASS_PAIRS):
        for cls, n in ((major, n_major), (minor, n_minor)):
            idx = rng.choice(np.flatnonzero(y_all == cls), size=n, replace=False)
            parts.append(idx)
            labels.append(np.full(n, s))
            groups.append(np.full(n, cls))
    sel, y_clean, group = np.concatenate(parts), np.concatenate(labels), np.concatenate(groups)
    order = rng.permutation(len(sel))  # mixed order, so no method can exploit row position
    sel, y_clean, group = sel[order], y_clean[order], group[order]
    y_obs = _flip_symmetric(y_clean, noise, 5, rng) if noise > 0 else y_clean.copy()
    minor_classes = {m for _, m in SUPERCLASS_PAIRS}
    to_super = {c: s for s, pair in enumerate(SUPERCLASS_PAIRS) for c in pair}
    x_test, y_test = test
    share = {c: n_major / (n_major + n_minor) for c, _ in SUPERCLASS_PAIRS}
    share.update({m: n_minor / (n_major + n_minor) for _, m in SUPERCLASS_PAIRS})
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
        n_classes=5,
        # Weight of each sub-class within its superclass; superclasses are equally frequent.
        group_weights={c: w / 5.0 for c, w in share.items()},
        info={"n_major": n_major, "n_minor": n_minor, "noise_rate": float(np.mean(y_obs != y_clean))},
    )


def make_long_tail_task(
    seed: int,
    n_max: int,
    ratio: float,
    train: tuple[torch.Tensor, np.ndarray],
    test: tuple[torch.Tensor, np.ndarray],
    n_tail: int = 3,
) -> Task:
    """Exponentially imbalanced 10-class set: class ``c`` keeps ``n_max * ratio ** (-c / 9)`` images
    (class 0 the head, class 9 the tail, ``n_max / n_min = ratio``). The ``n_tail`` rarest classes are
    the tail. The test set is the balanced Fashion-MNIST test split.
    """
    rng = np.random.default_rng(seed)
    x_all, y_all = train
    counts = [int(round(n_max * ratio ** (-c / 9))) for c in range(10)]
    sel = np.concatenate(
        [rng.choice(np.flatnonzero(y_all == c), size=n, replace=False) for c, n in enumerate(counts)]
    )
    sel = sel[rng.permutation(len(sel))]
    y = y_all[sel]
    tail = list(range(10 - n_tail, 10))
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
        n_classes=10,
        group_weights={c: 0.1 for c in range(10)},  # balanced accuracy: every class counts the same
        info={"counts": counts, "tail_classes": tail, "ratio": ratio},
    )
