"""One worker thread running a scan's background jobs in the order they were handed over, with a bound on how
many may wait: the shard writer (``shards.ShardWriter``) and pass 1 of the scores (``population.PopulationSums``)
each own one.

The bound is what keeps their memory constant: each waiting job holds a shard's arrays, and ``submit`` waits
for the oldest jobs beyond ``max_pending``. A job's failure surfaces in the caller's thread at the next
``submit`` (or at ``wait``), not in the worker.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["OrderedWorker"]

logger = logging.getLogger(__name__)


class OrderedWorker:
    """``submit(fn, *args)`` queues a job (waiting first for the oldest beyond ``max_pending``, and collecting
    the finished ones, whose failures it raises); ``wait()`` waits for every job, raising the first failure;
    ``close(finish=...)`` always stops the thread: ``finish=True`` lets the queued jobs run (a failure is logged,
    not raised: the caller is failing already, or saw it in ``wait``), ``finish=False`` drops those not started."""

    def __init__(self, name: str, max_pending: int, failure: str = "a background job of the scan failed") -> None:
        self.max_pending = max_pending
        self.failure = failure  # what close(finish=True) logs before a job's error
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: deque[Future[Any]] = deque()

    @property
    def pending(self) -> int:
        """Jobs handed over and not yet collected (the one running included)."""
        return len(self._pending)

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        while self._pending and (len(self._pending) >= self.max_pending or self._pending[0].done()):
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(fn, *args))

    def wait(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def close(self, *, finish: bool) -> None:
        try:
            for f in self._pending:
                if not finish:
                    f.cancel()
                    continue
                try:
                    f.result()
                except Exception as e:
                    logger.warning("%s: %s", self.failure, e)
        finally:  # a second Ctrl-C while waiting still stops the thread
            self._pending.clear()
            self._pool.shutdown(wait=True, cancel_futures=True)
