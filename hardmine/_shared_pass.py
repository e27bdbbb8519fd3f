"""``SharedPass``: one pass over a stream of items that other threads may join.

A scan's slices clustering ends with a pass over every gradient block (``hardmine.slices``); the scan's other
thread, once its own scores are done, joins that pass instead of waiting for it (``hardmine.scan.result``).
Each item is handled by exactly one thread, by the same function whichever thread takes it, so the result does
not depend on who took what (the work must write disjoint outputs per item).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["SharedPass"]


class SharedPass:
    """The owner calls ``run(items, work)``: it takes items one at a time and calls ``work(*item)`` on each,
    and returns when every item taken by anyone is done. Any other thread may call ``help()`` meanwhile: it
    waits for ``run`` to start, then takes items the same way until none is left. ``close()`` (the owner, in a
    ``finally``) releases helpers still waiting for a pass that will not start.

    A failure in any thread ends the pass for all: the failing thread raises it, and ``run`` raises too when a
    helper failed (the pass is then incomplete). ``stop``: an event the caller sets when it gives up (e.g. on
    Ctrl-C); the owner then stops waiting for helpers, whatever state an interrupted helper left behind, and
    ``run`` raises."""

    def __init__(self, stop: threading.Event | None = None) -> None:
        self._stop = stop
        self._cond = threading.Condition()
        self._items: Iterator[Any] | None = None
        self._work: Callable[..., None] | None = None
        self._done = False  # no item is left to take (or the pass failed or was closed)
        self._active = 0  # threads inside _take_part
        self._error: BaseException | None = None

    def run(self, items: Iterable[Any], work: Callable[..., None]) -> None:
        with self._cond:
            if self._done:
                raise RuntimeError("this SharedPass was closed before its pass started")
            self._items, self._work = iter(items), work
            self._cond.notify_all()
        try:
            self._take_part()
        finally:
            self.close()
        if self._stopped():
            raise RuntimeError("the pass was stopped")
        if self._error is not None:
            raise RuntimeError("a thread that joined the pass failed; the pass is incomplete") from self._error

    def help(self) -> None:
        """Join the pass (waiting for it to start); returns at once if it was closed, or when none is left."""
        with self._cond:
            while self._items is None and not self._done:
                self._cond.wait()
            if self._done:
                return
        self._take_part()

    def close(self) -> None:
        """No item is taken any more; wait for the threads still working on one (not after ``stop`` is set: a
        helper interrupted at the wrong moment may never say it is done)."""
        with self._cond:
            self._done = True
            self._cond.notify_all()
            while self._active and not self._stopped():
                self._cond.wait(timeout=0.1)

    def _stopped(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    def _take_part(self) -> None:
        assert self._items is not None and self._work is not None
        with self._cond:
            self._active += 1
        try:
            while True:
                with self._cond:  # one thread at a time advances the stream (a generator is not thread-safe)
                    if self._done:
                        return
                    try:
                        item = next(self._items)
                    except StopIteration:
                        self._done = True
                        return
                self._work(*item)  # outside the lock: numpy and BLAS release the GIL, the threads overlap
        except BaseException as exc:
            with self._cond:
                self._done = True
                if self._error is None:
                    self._error = exc
            raise
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()
