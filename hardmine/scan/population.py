"""Pass 1 of the scores beside the extraction: the population statistics summed shard by shard in a worker
thread while the next batches are extracted.

The divergence scores need the population's sums (``score.population_pass``) before any sample can be
scored. Summed after the extraction they cost a whole read of the gradients; here each shard is summed as
soon as it is cut (while the shard writer writes it), from the array in memory, by one worker thread (numpy's casts,
reductions and einsum release the GIL, so the sums run on a core the extraction leaves idle). Shards a resumed scan finds on
disk are read back by the worker as the extraction checks their batches, so the shards are always summed in
row order.

The sums are exactly ``score.population_pass`` over the scan's blocks: the same ``PopulationStats.update``
calls on the same ``BLOCK_ROWS`` blocks of each shard, in the same order, so a scan scores the same whether
pass 1 ran here or after the extraction (``tests/test_scan_population.py`` compares them bit for bit).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from ..score import PopulationStats
from .shards import BLOCK_ROWS
from .worker import OrderedWorker

__all__ = ["PopulationSums"]

logger = logging.getLogger(__name__)

# Shards handed to the worker and not yet summed: the extraction waits beyond this, so a worker that falls
# behind holds at most this many shards' arrays in memory.
MAX_PENDING = 2

Loader = Callable[[], tuple[np.ndarray, np.ndarray | None]]  # -> ((rows, out_dim) float32, (rows,) labels or None)


class PopulationSums:
    """Sums ``PopulationStats`` over shards in the order they are added, in one worker thread.

    ``add(loader)`` queues one shard (``loader`` returns its gradients and, for classification, its labels);
    ``result()`` waits for every queued shard and returns the statistics; ``close()`` drops what is queued
    and stops the worker (call it whether or not ``result`` was called)."""

    def __init__(self, out_dim: int, num_classes: int | None) -> None:
        self._pop = PopulationStats.empty(out_dim, num_classes)
        self._worker = OrderedWorker("hardmine-population", MAX_PENDING)

    def add(self, loader: Loader) -> None:
        self._worker.submit(self._sum, loader)  # a failure in the worker surfaces here, at a later shard

    def _sum(self, loader: Loader) -> None:
        z, labels = loader()
        for lo in range(0, len(z), BLOCK_ROWS):  # the blocks ShardSet.blocks reads back, in that order
            self._pop.update(z[lo : lo + BLOCK_ROWS], None if labels is None else labels[lo : lo + BLOCK_ROWS])

    def result(self) -> PopulationStats:
        self._worker.wait()
        self._pop.release_work()
        return self._pop

    def close(self) -> None:
        self._worker.close(finish=False)
