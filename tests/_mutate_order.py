"""Test order for ``make mutate`` (scripts/mutate.py); inert in every other run.

mutmut stops a mutant's tests at the first failure (``-x``), so what a killed mutant costs is the time until
its first failing test, and most of that is fixture setup and lazy imports rather than the tests' calls. Its
fork server passes the tests in no particular order. Two environment variables, set only by
scripts/mutate.py, change that:

- ``HARDMINE_MUTATE_RECORD=<file>``: a clean run of the selection writes, per test, its call time, the setup
  time of its own (function-scoped) fixtures and the wider-scoped fixtures it uses, the setup time of each of
  those, and the modules imported during the run (imported lazily by the code under test).
- ``HARDMINE_MUTATE_PROFILE=<file>``: in a mutant's run (``MUTANT_UNDER_TEST`` names a mutant) the tests are
  put in a cheapest-next order: each step takes the test whose call + own setup + wider fixtures not yet set
  up is smallest (a module's fixtures count as set up only while the run stays in that module). When the
  file is loaded (once, in mutmut's fork server, when it collects the tests) the recorded lazy imports are
  done there, so each forked mutant starts with them in memory.

The order changes only which test fails first, never whether one does: every test still runs against the
mutant until one fails.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from typing import Any

import pytest

RECORD = os.environ.get("HARDMINE_MUTATE_RECORD")
PROFILE = os.environ.get("HARDMINE_MUTATE_PROFILE")
_PERSISTENT = ("session", "package")  # scopes whose fixtures outlive a switch to another test module


def _fixture_key(fixturedef: Any) -> str:
    return f"{fixturedef.scope}:{fixturedef.baseid}:{fixturedef.argname}"


class Recorder:
    """Collects the costs of one clean run; writes them to ``path`` at the end of the session."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.modules_before = set(sys.modules)
        self.tests: dict[str, dict] = {}
        self.fixtures: dict[str, float] = {}
        self.current: str | None = None

    def pytest_runtest_setup(self, item: Any) -> None:
        self.current = item.nodeid
        wide = set()
        for defs in item._fixtureinfo.name2fixturedefs.values():
            if defs and defs[-1].scope != "function":
                wide.add(_fixture_key(defs[-1]))
        self.tests[item.nodeid] = {"call": 0.0, "setup": 0.0, "wide": sorted(wide)}

    def pytest_runtest_makereport(self, item: Any, call: Any) -> None:
        entry = self.tests.get(item.nodeid)
        if entry is None:
            return
        if call.when == "call":
            entry["call"] = call.duration
        elif call.when == "setup":
            entry["setup"] = call.duration

    def pytest_sessionfinish(self, session: Any) -> None:
        # a test's own setup: its whole setup less the wider fixtures first set up during it
        for entry in self.tests.values():
            paid = sum(self.fixtures.get(k, 0.0) for k in entry.pop("first_wide", []))
            entry["setup"] = max(0.0, entry["setup"] - paid)
        imported = sorted(
            m for m in set(sys.modules) - self.modules_before if not m.startswith(("hardmine", "tests", "test_", "_pytest"))
        )
        doc = {"tests": self.tests, "fixtures": self.fixtures, "lazy_imports": imported}
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, self.path)


class FixtureTimer:
    """Times each wider-scoped fixture's setup, and notes the test during whose setup it happened."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    @pytest.hookimpl(hookwrapper=True)
    def pytest_fixture_setup(self, fixturedef: Any, request: Any) -> Any:
        t0 = time.perf_counter()
        yield
        if fixturedef.scope != "function":
            key = _fixture_key(fixturedef)
            self.recorder.fixtures[key] = time.perf_counter() - t0
            if self.recorder.current in self.recorder.tests:
                self.recorder.tests[self.recorder.current].setdefault("first_wide", []).append(key)


def cheapest_next(nodeids: list[str], profile: dict) -> list[str]:
    """``nodeids`` in the cheapest-next order described above; tests the profile does not know keep their
    order, after the known ones."""
    tests, fixtures = profile["tests"], profile["fixtures"]

    def cost(n: str, paid: set[str], module: str | None) -> float:
        same_module = n.split("::")[0] == module
        extra = 0.0
        for k in tests[n]["wide"]:
            persistent = k.split(":", 1)[0] in _PERSISTENT
            if k not in paid or not (persistent or same_module):
                extra += fixtures.get(k, 0.0)
        return tests[n]["call"] + tests[n]["setup"] + extra

    left = [n for n in nodeids if n in tests]
    unknown = [n for n in nodeids if n not in tests]
    paid: set[str] = set()
    module: str | None = None
    order: list[str] = []
    while left:
        best = min(left, key=lambda n: cost(n, paid, module))
        left.remove(best)
        new_module = best.split("::")[0]
        if new_module != module:  # pytest tears the old module's fixtures down
            paid = {k for k in paid if k.split(":", 1)[0] in _PERSISTENT}
            module = new_module
        paid.update(tests[best]["wide"])
        order.append(best)
    return order + unknown


def _load_profile(path: str) -> dict | None:
    try:
        with open(path) as f:
            profile = json.load(f)
    except (OSError, ValueError):
        return None
    for name in profile.get("lazy_imports", []):
        try:
            importlib.import_module(name)
        except Exception:  # best effort: a module that cannot be imported by name is imported when used
            pass
    return profile


_profile = _load_profile(PROFILE) if PROFILE else None


def register(config: Any) -> None:
    """Called from conftest's ``pytest_configure``."""
    if RECORD:
        recorder = Recorder(RECORD)
        config.pluginmanager.register(recorder, "hardmine-mutate-record")
        config.pluginmanager.register(FixtureTimer(recorder), "hardmine-mutate-fixture-timer")


def reorder(items: list) -> None:
    """Called from conftest's ``pytest_collection_modifyitems``: reorders in place during a mutant's run."""
    if _profile is None or "__mutmut_" not in os.environ.get("MUTANT_UNDER_TEST", ""):
        return
    by_id = {item.nodeid: item for item in items}
    items[:] = [by_id[n] for n in cheapest_next(list(by_id), _profile)]
