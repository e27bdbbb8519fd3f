"""``ManifestSampler``: a ``torch.utils.data.Sampler`` that draws dataset indices by manifest weight.

>>> sampler = hardmine.ManifestSampler("scan_out/manifest.parquet", seed=0)
>>> loader = DataLoader(train_set, batch_size=256, sampler=sampler)
>>> for epoch in range(epochs):
...     sampler.set_epoch(epoch)            # a new, reproducible draw each epoch
...     for batch in loader: ...

Each epoch draws ``num_samples`` indices (default: one per manifest row) with probability proportional to
``weight``, from a NumPy generator seeded with ``(seed, epoch)``, so the same seed and epoch give the same
indices on every machine. Dataset index = ``sample_id`` when the scan used the default ids (the 0-based
position); pass ``dataset_ids`` (the id of every dataset item, in dataset order) when the ids were your own — a
scan's manifest records which (``sample_id_kind``), and custom ids without ``dataset_ids`` are refused.
Dataset items absent from the manifest are never drawn (a ``UserWarning`` says how many, when that is known).

``MinerSampler`` draws by the latest online manifest (``hardmine.OnlineMiner.manifest``) and uniformly before
the first one, for the training-loop API.

Sharding (``DistributedSampler``-style): every replica computes the same global draw of
``ceil(num_samples / num_replicas) · num_replicas`` indices and takes every ``num_replicas``-th one starting
at ``rank``, so replicas see disjoint slices of one weighted draw and all have the same length.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Sampler

from .checks import as_bool, non_negative_int, positive_int
from .manifest import read_manifest

__all__ = ["ManifestSampler", "MinerSampler"]


def _positive_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1


def _warn_absent(n_rows: int, n_items: Any) -> None:
    """Dataset items without a manifest row are never drawn: say so (a filtered manifest, or another dataset)."""
    if isinstance(n_items, (int, np.integer)) and n_items > n_rows:
        warnings.warn(
            f"{n_items - n_rows} of the {n_items} dataset items are not in the manifest and will never be drawn "
            "(a filtered manifest?); export the full scan to sample from every item.",
            UserWarning,
            stacklevel=3,
        )


class ManifestSampler(Sampler[int]):
    """Weighted sampler over dataset indices from a hardmine manifest.

    Args:
        manifest: a manifest path, a scan directory, a ``Scan``, or a DataFrame with ``sample_id`` and the
            weight column.
        num_samples: draws per epoch over all replicas (default: the number of manifest rows).
        replacement: draw with replacement (default). Without it, ``num_samples`` may not exceed the number
            of rows with a positive weight.
        seed: base seed; the draw for epoch ``e`` uses the generator seeded with ``[seed, e]``.
        num_replicas, rank: shard the draw across processes (see the module docstring).
        dataset_ids: the sample id of each dataset item, in dataset order; ``None`` = ids are indices.
        weight_column: the column holding the weights.
    """

    def __init__(
        self,
        manifest: Any,
        num_samples: int | None = None,
        replacement: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        dataset_ids: Sequence[Any] | np.ndarray | None = None,
        weight_column: str = "weight",
    ) -> None:
        df = self._frame(manifest)
        for col in ("sample_id", weight_column):
            if col not in df:
                raise ValueError(f"the manifest has no {col!r} column; pass a hardmine manifest.")
        if not isinstance(replacement, bool):
            raise ValueError(f"replacement={replacement!r} must be True or False.")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed={seed!r} must be a non-negative integer.")
        if not _positive_int(num_replicas):
            raise ValueError(f"num_replicas={num_replicas!r} must be a positive integer.")
        if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or not (0 <= rank < num_replicas):
            raise ValueError(f"rank={rank!r} must be an integer in [0, {num_replicas - 1}] (num_replicas={num_replicas}).")
        w = pd.to_numeric(df[weight_column], errors="coerce").to_numpy(dtype=np.float64)
        if not np.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"column {weight_column!r} must hold finite weights >= 0.")
        if w.sum() <= 0:
            raise ValueError(f"all weights in {weight_column!r} are 0; nothing can be drawn.")
        meta = df.attrs.get("hardmine") if isinstance(df.attrs.get("hardmine"), dict) else {}
        if dataset_ids is None and meta.get("sample_id_kind") == "custom":
            raise ValueError(
                "the manifest's sample ids are the data's own ids (e.g. from --id-column), not positions in the "
                "dataset; pass dataset_ids= the sample id of every dataset item, in dataset order (e.g. the id "
                "column of the file you scanned), so each id maps to its dataset index."
            )
        self.indices = self._dataset_indices(df["sample_id"].to_numpy(), dataset_ids)
        _warn_absent(len(df), len(dataset_ids) if dataset_ids is not None else meta.get("n_samples"))
        self.probabilities = w / w.sum()
        n_rows = len(df)
        total = n_rows if num_samples is None else num_samples
        if not _positive_int(total):
            raise ValueError(f"num_samples={num_samples!r} must be a positive integer or None.")
        positive = int((w > 0).sum())
        if not replacement and total > positive:
            raise ValueError(
                f"num_samples={total} without replacement exceeds the {positive} samples with a positive weight; "
                "lower num_samples or use replacement=True."
            )
        self.num_samples_total = int(total)
        self.replacement = replacement
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        self.num_samples = math.ceil(self.num_samples_total / self.num_replicas)  # per replica
        if not replacement and self.num_samples * self.num_replicas > positive:
            raise ValueError(
                f"num_samples={total} does not split evenly over {num_replicas} replicas without replacement "
                f"({self.num_samples * self.num_replicas} > {positive} samples with weight > 0)."
            )

    @staticmethod
    def _frame(manifest: Any) -> pd.DataFrame:
        if isinstance(manifest, pd.DataFrame):
            return manifest
        if hasattr(manifest, "manifest") and hasattr(manifest, "manifest_path"):  # a Scan
            return manifest.manifest()
        if isinstance(manifest, (str, os.PathLike)):
            return read_manifest(manifest)
        raise ValueError(
            f"manifest of type {type(manifest).__name__} is not understood; pass a path, a Scan or a DataFrame."
        )

    @staticmethod
    def _dataset_indices(sample_ids: np.ndarray, dataset_ids: Sequence[Any] | np.ndarray | None) -> np.ndarray:
        if dataset_ids is None:
            if sample_ids.dtype.kind not in "iu":
                raise ValueError(
                    "the manifest's sample ids are not integers, so they are not dataset indices; pass "
                    "dataset_ids (the sample id of every dataset item, in order)."
                )
            if (sample_ids < 0).any():
                raise ValueError(
                    f"sample_id {int(sample_ids.min())} is negative, so ids are not dataset indices; pass dataset_ids."
                )
            return sample_ids.astype(np.int64)
        ds = pd.Index(np.asarray(dataset_ids).tolist() if not isinstance(dataset_ids, pd.Index) else dataset_ids)
        if ds.has_duplicates:
            raise ValueError(f"dataset_ids has duplicates (e.g. {ds[ds.duplicated()][0]!r}); ids must be unique.")
        pos = ds.get_indexer(pd.Index(sample_ids.tolist()))
        if (pos < 0).any():
            missing = sample_ids[pos < 0][:3].tolist()
            raise ValueError(
                f"{int((pos < 0).sum())} manifest sample ids are not in dataset_ids (e.g. {missing}); the manifest "
                "does not belong to this dataset."
            )
        return pos.astype(np.int64)

    def set_epoch(self, epoch: int) -> None:
        """Use the draw of ``epoch`` next (call it before each epoch, like ``DistributedSampler``)."""
        if not isinstance(epoch, (int, np.integer)) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch={epoch!r} must be a non-negative integer.")
        self.epoch = int(epoch)

    def global_draw(self) -> np.ndarray:
        """The epoch's draw over all replicas: ``(num_samples · num_replicas,)`` dataset indices."""
        rng = np.random.default_rng([self.seed, self.epoch])
        size = self.num_samples * self.num_replicas
        rows = rng.choice(len(self.indices), size=size, replace=self.replacement, p=self.probabilities)
        return self.indices[rows]

    def __iter__(self) -> Iterator[int]:
        return iter(self.global_draw()[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


class MinerSampler(Sampler[int]):
    """Dataset indices ``0..num_samples-1`` drawn by the latest manifest's ``weight``; uniform before that.

    >>> sampler = MinerSampler(len(train_set), seed=0)
    >>> loader = DataLoader(train_set, batch_size=256, sampler=sampler)
    >>> for epoch in range(epochs):
    ...     sampler.set_epoch(epoch)
    ...     for x, y, ids in loader: ...
    ...     sampler.refresh(miner.manifest())     # next epoch oversamples what was hard

    Before the first ``refresh`` each epoch is a seeded permutation (every index once). After it, indices are
    drawn with ``hardmine.ManifestSampler`` (``num_samples`` draws, probability proportional to ``weight``,
    seeded by ``(seed, epoch)``); ids absent from the manifest (not observed yet) get weight 1, the
    manifest's mean weight. Sample ids must be the dataset indices.
    """

    def __init__(self, num_samples: int, *, seed: int = 0, replacement: bool = True) -> None:
        self.num_samples = positive_int(num_samples, "num_samples", hint="the dataset length")
        self.seed = non_negative_int(seed, "seed")
        self.replacement = as_bool(replacement, "replacement")
        self.epoch = 0
        self.refreshes = 0
        self._weights: np.ndarray | None = None  # (num_samples,) after the first refresh
        self._inner: ManifestSampler | None = None

    def refresh(self, manifest: pd.DataFrame) -> None:
        """Draw from now on by ``manifest``'s ``weight`` (its ``sample_id`` = dataset index)."""
        if not isinstance(manifest, pd.DataFrame) or not {"sample_id", "weight"} <= set(manifest.columns):
            raise ValueError("refresh() needs a manifest DataFrame with 'sample_id' and 'weight' columns.")
        ids = manifest["sample_id"].to_numpy()
        if ids.dtype.kind not in "iu" or (len(ids) and (ids.min() < 0 or ids.max() >= self.num_samples)):
            raise ValueError(
                f"manifest sample ids must be dataset indices in [0, {self.num_samples - 1}] for a "
                "MinerSampler; pass the dataset index as the id to observe()."
            )
        w = np.ones(self.num_samples)
        w[ids.astype(np.int64)] = manifest["weight"].to_numpy(dtype=np.float64)
        self._set_weights(w)
        self.refreshes += 1

    def _set_weights(self, w: np.ndarray) -> None:
        frame = pd.DataFrame({"sample_id": np.arange(self.num_samples), "weight": w})
        self._inner = ManifestSampler(frame, seed=self.seed, replacement=self.replacement)
        self._weights = w

    def state_dict(self) -> dict[str, Any]:
        """The current weights (``None`` before the first refresh), epoch and refresh count."""
        return {
            "num_samples": self.num_samples,
            "seed": self.seed,
            "epoch": self.epoch,
            "refreshes": self.refreshes,
            "weights": None if self._weights is None else torch.from_numpy(self._weights.copy()),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["num_samples"]) != self.num_samples or int(state["seed"]) != self.seed:
            raise ValueError(
                f"the sampler state is for num_samples={state['num_samples']}, seed={state['seed']}; this "
                f"sampler has num_samples={self.num_samples}, seed={self.seed}."
            )
        self.epoch = int(state["epoch"])
        self.refreshes = int(state["refreshes"])
        if state["weights"] is None:
            self._weights, self._inner = None, None
        else:
            self._set_weights(state["weights"].numpy().astype(np.float64))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = non_negative_int(epoch, "epoch")

    def __iter__(self) -> Iterator[int]:
        if self._inner is None:
            rng = np.random.default_rng([self.seed, self.epoch])
            return iter(rng.permutation(self.num_samples).tolist())
        self._inner.set_epoch(self.epoch)
        return iter(self._inner)

    def __len__(self) -> int:
        return self.num_samples
