import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/models.py

import _mutate_order  # noqa: E402
from hypothesis import settings  # noqa: E402

# No Hypothesis deadline: a per-example time limit is a timing assertion, and it fails on a loaded machine or
# when an example is the first to import something (a false failure in CI, a false kill in `make mutate`).
# Under `make mutate` the examples are also derandomised, so that a mutant's verdict does not depend on the draw.
settings.register_profile("hardmine", deadline=None)
settings.register_profile("hardmine-mutate", deadline=None, derandomize=True, database=None)
settings.load_profile("hardmine-mutate" if _mutate_order.PROFILE or _mutate_order.RECORD else "hardmine")

# Under CI (CI=true, as CI sets it) a skipped test is a failure: every test needs only what `make install`
# provides (the dev extra and the Fashion-MNIST data), so a skip there means the install is broken and the
# suite would pass without testing what it says. Tests that need hardware CI never has are marked
# `@pytest.mark.needs_hardware` and may still skip.
STRICT = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_hardware: may skip under CI (e.g. needs a GPU)")
    _mutate_order.register(config)  # `make mutate` only (scripts/mutate.py); inert otherwise


def pytest_collection_modifyitems(items):
    _mutate_order.reorder(items)  # `make mutate` only: a mutant's tests cheapest first


def _strict_failure(report, where: str) -> None:
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (
        f"{where} was skipped under CI=true ({reason}); CI must run it. `make install` provides every test "
        "dependency (the dev extra and the Fashion-MNIST data): fix the install instead of skipping."
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker("needs_hardware") is None:
        _strict_failure(report, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped:  # a module-level importorskip
        _strict_failure(report, str(collector.nodeid))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def gram_caches(monkeypatch):
    """Every ``hardmine.factored.registry.GramCache`` a test's factored passes create, in order (the shared input
    Gram matrices of a weight's readers), so a test can check what the cache still holds after the pass."""
    from hardmine.factored import registry

    caches: list = []
    real_init = registry.GramCache.__init__

    def recording_init(self, readers):
        real_init(self, readers)
        caches.append(self)

    monkeypatch.setattr(registry.GramCache, "__init__", recording_init)
    return caches


@pytest.fixture
def gram_computations(monkeypatch):
    """The shape key of every Gram matrix a ``GramCache`` actually computes (cache hits are not counted)."""
    from hardmine.factored import registry

    computed: list = []
    real_get = registry.GramCache.get

    def counting_get(self, key, compute):
        def counted():
            computed.append(key[1])
            return compute()

        return real_get(self, key, counted)

    monkeypatch.setattr(registry.GramCache, "get", counting_get)
    return computed
