"""Check that `make mutate`'s kills are the mutants' doing, not the test order's (run by scripts/mutate.py).

A mutant counts as killed when one of its function's tests fails. ``tests/_mutate_order.py`` runs those tests
cheapest first, a subset of the suite in an order no ordinary run uses; a test that fails only in that subset or
order (it relies on an earlier test, a shared file, a timing) would "kill" every mutant of the function. So every
function's test set is run here the way a mutant's is (forked from one warmed-up process in ``mutants/``, in the
mutant order, with ``-x``), but with a mutant name that matches no function, i.e. against the unmutated code:
each must pass. Prints one JSON line: ``{"functions", "failed": [[function, exit code], ...], "seconds"}``.

    python scripts/mutate_order_check.py PROFILE [--max-children N]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
NO_MUTANT = "hardmine.no_such_module.x_no_such_function__mutmut_1"  # "__mutmut_" makes the order apply


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profile", type=Path, help="the test profile scripts/mutate.py recorded")
    ap.add_argument("--max-children", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    os.environ["HARDMINE_MUTATE_PROFILE"] = str(args.profile.resolve())
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.chdir(ROOT / "mutants")  # the trampolined sources, as mutmut runs them
    sys.path.insert(0, str(ROOT / "mutants"))
    import pytest

    stats = json.loads(Path("mutmut-stats.json").read_text())
    base = ["--rootdir=.", "--tb=line", *cfg["pytest_add_cli_args"]]
    # warm up as mutmut's fork server does: collect once (imports conftest, which preloads the lazy imports)
    with open(os.devnull, "w") as null:
        out, err = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = null
        try:
            pytest.main(["--collect-only", "-qqq", *base, *cfg["pytest_add_cli_args_test_selection"]])
        finally:
            sys.stdout, sys.stderr = out, err
    gc.freeze()
    t0 = time.monotonic()
    functions = sorted((f, sorted(t)) for f, t in stats["tests_by_mangled_function_name"].items() if t)
    failed: list[tuple[str, int]] = []
    running: dict[int, str] = {}

    def reap() -> None:
        pid, status = os.wait()
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            failed.append((running.pop(pid), code))
        else:
            running.pop(pid)

    for function, tests in functions:
        while len(running) >= args.max_children:
            reap()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            sys.stdout = sys.stderr = open(os.devnull, "w")
            os.environ["MUTANT_UNDER_TEST"] = NO_MUTANT
            os._exit(int(pytest.main([*base, *tests])))
        running[pid] = function
    while running:
        reap()
    print(json.dumps({"functions": len(functions), "failed": sorted(failed),
                      "seconds": round(time.monotonic() - t0, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
