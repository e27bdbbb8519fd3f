"""The test order `make mutate` gives each mutant (tests/_mutate_order.py): cheapest next, fixture-aware."""

import _mutate_order
from _mutate_order import cheapest_next

PROFILE = {
    "tests": {
        "tests/a.py::slow_call": {"call": 2.0, "setup": 0.0, "wide": []},
        "tests/a.py::quick": {"call": 0.01, "setup": 0.0, "wide": []},
        "tests/b.py::uses_scan_1": {"call": 0.02, "setup": 0.0, "wide": ["module:tests/b.py:scan"]},
        "tests/b.py::uses_scan_2": {"call": 0.02, "setup": 0.0, "wide": ["module:tests/b.py:scan"]},
        "tests/c.py::own_setup": {"call": 0.01, "setup": 0.5, "wide": []},
        "tests/c.py::uses_session": {"call": 0.01, "setup": 0.0, "wide": ["session::data"]},
    },
    "fixtures": {"module:tests/b.py:scan": 1.0, "session::data": 0.3},
}


def test_cheapest_first_and_a_paid_module_fixture_makes_its_siblings_cheap():
    order = cheapest_next(list(PROFILE["tests"]), PROFILE)
    assert order == [
        "tests/a.py::quick",  # 0.01
        "tests/c.py::uses_session",  # 0.31 (the session fixture)
        "tests/c.py::own_setup",  # 0.51
        "tests/b.py::uses_scan_1",  # 1.02 (the module fixture) ...
        "tests/b.py::uses_scan_2",  # ... then 0.02: the fixture is set up while the run stays in b.py
        "tests/a.py::slow_call",  # 2.0
    ]


def test_leaving_a_module_drops_its_fixtures_but_keeps_session_ones():
    scan, data = "module:tests/b.py:scan", "session::data"
    profile = {
        "tests": {
            "tests/b.py::first": {"call": 0.0, "setup": 0.0, "wide": [scan, data]},  # 1.1: sets both up
            "tests/a.py::between": {"call": 1.2, "setup": 0.0, "wide": []},
            "tests/b.py::second": {"call": 1.25, "setup": 0.0, "wide": [scan]},  # 1.25 in b.py, 2.25 elsewhere
            "tests/c.py::session_again": {"call": 1.3, "setup": 0.0, "wide": [data]},  # 1.3 once data is set up
            "tests/d.py::plain": {"call": 1.35, "setup": 0.0, "wide": []},
        },
        "fixtures": {scan: 1.0, data: 0.1},
    }
    # once the run has left b.py for a.py, b.py::second pays for the module fixture again (2.25) and comes last;
    # the session fixture stays set up, so c.py (1.3) comes before d.py (1.35)
    assert cheapest_next(list(profile["tests"]), profile) == [
        "tests/b.py::first",
        "tests/a.py::between",
        "tests/c.py::session_again",
        "tests/d.py::plain",
        "tests/b.py::second",
    ]


def test_tests_the_profile_does_not_know_keep_their_order_at_the_end():
    ids = ["tests/new.py::z", "tests/a.py::slow_call", "tests/new.py::y", "tests/a.py::quick"]
    assert cheapest_next(ids, PROFILE) == ["tests/a.py::quick", "tests/a.py::slow_call", "tests/new.py::z", "tests/new.py::y"]


class _Item:
    def __init__(self, nodeid):
        self.nodeid = nodeid


def test_reorder_acts_only_in_a_mutants_run(monkeypatch):
    ids = ["tests/a.py::slow_call", "tests/a.py::quick"]
    monkeypatch.setattr(_mutate_order, "_profile", PROFILE)
    for under_test in ("", "stats", "fail"):  # mutmut's own runs keep pytest's order
        monkeypatch.setenv("MUTANT_UNDER_TEST", under_test)
        items = [_Item(n) for n in ids]
        _mutate_order.reorder(items)
        assert [i.nodeid for i in items] == ids
    monkeypatch.setenv("MUTANT_UNDER_TEST", "hardmine.score.x_rank_normalize__mutmut_3")
    items = [_Item(n) for n in ids]
    _mutate_order.reorder(items)
    assert [i.nodeid for i in items] == ["tests/a.py::quick", "tests/a.py::slow_call"]
    monkeypatch.setattr(_mutate_order, "_profile", None)  # no profile (any run but make mutate's): inert
    items = [_Item(n) for n in ids]
    _mutate_order.reorder(items)
    assert [i.nodeid for i in items] == ids
