"""``hardmine._shared_pass.SharedPass``: one pass over a stream that other threads join (the slices'
clustering's last pass, which a scan's scoring thread joins once its own part is done)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from hardmine._shared_pass import SharedPass


def _items(n: int):
    for i in range(n):
        yield (i,)


def test_every_item_once_whoever_takes_it():
    done: dict[int, str] = {}
    lock = threading.Lock()
    helped = threading.Event()  # the owner's items wait until the helper has done one: both take part

    def work(i: int) -> None:
        if threading.current_thread() is threading.main_thread():
            helped.set()
        else:
            helped.wait(timeout=10)
        time.sleep(0.001)
        with lock:
            assert i not in done
            done[i] = threading.current_thread().name

    share = SharedPass()
    with ThreadPoolExecutor(1, thread_name_prefix="owner") as pool:
        owner = pool.submit(share.run, _items(200), work)
        share.help()  # waits for the pass to start, then takes items until none is left
        owner.result(timeout=30)
    assert sorted(done) == list(range(200))
    assert {name.split("_")[0] for name in done.values()} == {"owner", "MainThread"}


def test_help_returns_when_the_pass_never_starts():
    share = SharedPass()
    threading.Timer(0.05, share.close).start()  # e.g. the fit failed before its last pass
    share.help()  # would wait for ever without close
    with pytest.raises(RuntimeError, match="closed"):
        share.run(_items(3), lambda i: None)


def test_a_failing_helper_fails_the_owner_and_stops_the_pass():
    started = threading.Event()
    seen: list[int] = []

    def work(i: int) -> None:
        if threading.current_thread() is threading.main_thread():
            started.wait(timeout=10)
            raise ValueError("helper broke")
        started.set()
        seen.append(i)
        time.sleep(0.002)

    share = SharedPass()
    with ThreadPoolExecutor(1) as pool:
        owner = pool.submit(share.run, _items(10_000), work)
        with pytest.raises(ValueError, match="helper broke"):
            share.help()
        with pytest.raises(RuntimeError, match="incomplete") as info:
            owner.result(timeout=30)
    assert isinstance(info.value.__cause__, ValueError)
    assert len(seen) < 10_000  # the owner stopped taking items


def test_a_failing_owner_raises_its_own_error_and_releases_the_helper():
    def work(i: int) -> None:
        if threading.current_thread() is not threading.main_thread() and i >= 3:
            raise KeyError("owner broke")
        time.sleep(0.001)

    share = SharedPass()
    with ThreadPoolExecutor(1) as pool:
        owner = pool.submit(share.run, _items(10_000), work)
        share.help()  # returns once the pass ends (the owner's failure ends it)
        with pytest.raises(KeyError, match="owner broke"):
            owner.result(timeout=30)


@pytest.mark.parametrize("with_directions", [False, True])
def test_the_slices_last_pass_gives_the_same_assignment_with_a_helper(with_directions):
    from hardmine.slices import assign_slices, fit_scan_slices, fit_slice_centroids

    g = np.random.default_rng(0)
    y = g.integers(0, 3, 6000)
    z = (g.standard_normal((6000, 24)) + y[:, None] * 0.5).astype(np.float32)
    directions = g.standard_normal((3, 24, 4)) if with_directions else None

    takers: list[str] = []

    def blocks():
        for lo in range(0, len(z), 256):
            takers.append(threading.current_thread().name)  # the thread that advanced the stream takes the block
            yield lo, z[lo : lo + 256]

    alone = assign_slices(fit_slice_centroids(blocks, y, None, 3), blocks, directions)
    share = SharedPass()
    seen: dict[str, list[int]] = {}
    helper_took = threading.Event()

    def on_block(rows: int) -> None:
        seen.setdefault(threading.current_thread().name, []).append(rows)
        if threading.current_thread() is threading.main_thread():
            helper_took.set()
        else:  # the owner waits (outside the pass's lock) until the helper has done a block: on a busy machine
            helper_took.wait(timeout=30)  # it could otherwise finish the pass before the helper is scheduled

    with ThreadPoolExecutor(1) as pool:
        fitting = pool.submit(fit_slice_centroids, blocks, y, None, 3)
        assigning = pool.submit(
            lambda: assign_slices(fitting.result(), blocks, directions, share=share, on_block=on_block)
        )
        takers.clear()  # from here: the sample pass (the pool thread), then the last pass (both)
        share.help()
        helped = assigning.result(timeout=60)
    assert "MainThread" in takers  # the helper did assign blocks
    for a in (helped.assignment, alone.assignment):
        np.testing.assert_array_equal(a.within, fit_scan_slices(blocks, y, None, 3).within)
    np.testing.assert_array_equal(helped.assignment.similarity, alone.assignment.similarity)
    assert helped.assignment.counts == alone.assignment.counts
    # Each thread heard of its own blocks, with every thread's rows so far, increasing; all rows in the end.
    assert len(seen) == 2 and "MainThread" in seen
    assert all(rows == sorted(rows) for rows in seen.values())
    assert max(max(rows) for rows in seen.values()) == len(z)
    if with_directions:
        np.testing.assert_array_equal(helped.sq, alone.sq)
        np.testing.assert_array_equal(helped.dots, alone.dots)
    else:
        assert helped.sq is None and helped.dots is None


def test_stop_releases_an_owner_waiting_for_a_helper_that_never_says_it_is_done():
    # A Ctrl-C can land in a helper between taking an item and recording that it is done; the caller then
    # sets ``stop``, and the owner must not wait for that helper for ever.
    stop = threading.Event()
    share = SharedPass(stop)
    share._active = 1  # the interrupted helper's count, never taken back
    threading.Timer(0.05, stop.set).start()
    with pytest.raises(RuntimeError, match="stopped"):
        share.run(_items(3), lambda i: None)
