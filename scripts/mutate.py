"""Mutation testing of the core modules with mutmut (``make mutate``; not run in CI).

Runs ``mutmut run`` module by module, in the order below (``hardmine/factored/capture.py`` last), each with
mutmut's per-function test selection: a mutant only runs the tests that reached its function when the
selection in ``[tool.mutmut]`` of pyproject.toml ran once unmutated. Before the first module, one clean run of
the whole selection records each test's setup and call times and the modules the code imports lazily
(``tests/_mutate_order.py``): each mutant's tests then run cheapest first, stopping at the first failure, in
processes forked with those modules already imported. After the modules, ``scripts/mutate_order_check.py``
runs every function's tests that way against the unmutated code: each set must pass, or a kill could be the
order's doing rather than the mutant's (the result is in the report). Then writes the kill rate per module to
``scripts/results/mutation.json`` and ``scripts/results/mutation.md``.

Counting: ``killed`` includes mutants whose tests timed out (the mutant hung the code under test). A surviving
mutant listed by name in ``docs/mutation-equivalents.md`` (with the reason it cannot change behaviour) is
``survived-but-equivalent`` (those under its "Message wording" heading, whose message text changed but still
quotes the value and the remedy the tests check, are counted there too and shown as "(N wording)"); every other
survivor (and any mutant no selected test reaches) is ``survived``.
``kill rate = killed / (mutants - equivalent)``. Modules not run (``--modules``, ``--budget-minutes``, or a
failing clean test run) are recorded as such, with the results of their last run if there is one.

    python scripts/mutate.py                         # everything, fresh, one worker per core
    python scripts/mutate.py --modules score,sampler --keep   # some modules, keeping the other results
    python scripts/mutate.py --report-only           # rewrite the JSON/Markdown from mutants/
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "scripts" / "results"
EQUIVALENTS = ROOT / "docs" / "mutation-equivalents.md"

# name -> source file, in run order; capture.py (the hook/dispatch layer) last.
MODULES: dict[str, str] = {
    "score": "hardmine/score.py",
    "manifest": "hardmine/manifest.py",
    "sampler": "hardmine/sampler.py",
    "project": "hardmine/project.py",
    # the layer rules (small, one file per layer type) first, then the layout, the plan and the registry,
    # then the pass itself: apply.py and capture.py (the hook/dispatch layer) last.
    "factored.linear": "hardmine/factored/linear.py",
    "factored.layernorm": "hardmine/factored/layernorm.py",
    "factored.rmsnorm": "hardmine/factored/rmsnorm.py",
    "factored.embedding": "hardmine/factored/embedding.py",
    "factored.conv1d": "hardmine/factored/conv1d.py",
    "factored.conv2d": "hardmine/factored/conv2d.py",
    "factored.attention": "hardmine/factored/attention.py",
    "factored.parameter": "hardmine/factored/parameter.py",
    "factored.layout": "hardmine/factored/layout.py",
    "factored.plan": "hardmine/factored/plan.py",
    "factored.registry": "hardmine/factored/registry.py",
    "factored.apply": "hardmine/factored/apply.py",
    "factored.graphs": "hardmine/factored/graphs.py",
    "factored.capture": "hardmine/factored/capture.py",
}
# Per-module test selection on top of [tool.mutmut], through PYTEST_ADDOPTS (not part of mutmut's cached
# config; a change to [tool.mutmut] would reset every result): the extractor tests only matter to
# hardmine/factored/, so the other modules leave them out, and hardmine/factored/ runs only them (the scan,
# score and manifest tests also reach the factored code through a scan, but only slowly and less sharply).
# Run the non-factored modules before the factored ones: each switch makes mutmut collect the stats of the
# tests it had left out.
FACTORED_TESTS = (
    "tests/test_factored.py",
    "tests/test_factored_apply.py",
    "tests/test_factored_rules_behaviour.py",
    "tests/test_factored_attention.py",
    "tests/test_factored_parameter.py",
    "tests/test_cuda_graphs.py",
    "tests/test_transformers.py",
)
KILLED = {1, 3}
TIMEOUT = {36, -24, 24, 152, 255}
SURVIVED = {0}
NO_TESTS = {5, 33}


def _glob(module: str) -> str:
    return f"hardmine.{module}.*"


def _mutmut() -> str:
    exe = Path(sys.executable).with_name("mutmut")
    return str(exe) if exe.exists() else "mutmut"


def equivalents() -> dict[str, str]:
    """Mutant name -> reason, from the table rows of docs/mutation-equivalents.md: ``| `name`, `name` | reason |``."""
    out: dict[str, str] = {}
    if not EQUIVALENTS.exists():
        return out
    wording = False
    for line in EQUIVALENTS.read_text().splitlines():
        if line.startswith("## "):
            wording = line.strip() == "## Message wording"
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2:
            continue
        for name in re.findall(r"`([^`]+__mutmut_\d+)`", cells[0]):
            out[name] = ("[wording] " if wording else "") + cells[-1]
    return out


def load_results(path: str) -> dict[str, int | None] | None:
    meta = ROOT / "mutants" / (path + ".meta")
    if not meta.exists():
        return None
    return json.loads(meta.read_text())["exit_code_by_key"]


def summarise(name: str, path: str, codes: dict[str, int | None], equiv: dict[str, str]) -> dict:
    killed = [k for k, v in codes.items() if v in KILLED]
    timeout = [k for k, v in codes.items() if v in TIMEOUT]
    survived_all = [k for k, v in codes.items() if v in SURVIVED or v in NO_TESTS]
    not_checked = [k for k, v in codes.items() if v is None]
    other = [k for k, v in codes.items() if k not in set(killed + timeout + survived_all + not_checked)]
    equivalent = sorted(k for k in survived_all if k in equiv)
    survived = sorted(k for k in survived_all if k not in equiv)
    checked = len(codes) - len(not_checked)
    denom = checked - len(equivalent)
    return {
        "module": name,
        "path": path,
        "mutants": len(codes),
        "checked": checked,
        "killed": len(killed) + len(timeout),
        "killed_by_timeout": len(timeout),
        "survived_but_equivalent": len(equivalent),
        "survived": len(survived),
        "no_tests": sum(1 for k in survived_all if codes[k] in NO_TESTS),
        "not_checked": len(not_checked),
        "other": {k: codes[k] for k in other},  # suspicious / segfault: neither killed nor survived
        "kill_rate": round((len(killed) + len(timeout)) / denom, 4) if denom > 0 else None,
        "survivors": survived,
        "equivalents": equivalent,
        # of the equivalents: those listed under "Message wording" (the text of a message changed, what it
        # says intact), counted apart so a reader can see how many are wording rather than strict equivalents
        "equivalent_wording": sum(1 for k in equivalent if equiv[k].startswith("[wording] ")),
    }


def _non_factored_tests() -> list[str]:
    """The test files of [tool.mutmut]'s selection that are not in FACTORED_TESTS."""
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    return [t for t in cfg.get("pytest_add_cli_args_test_selection", []) if t not in FACTORED_TESTS]


def _source_hashes() -> dict[str, str]:
    return {
        str(src.relative_to(ROOT)): hashlib.sha256(src.read_bytes()).hexdigest()
        for src in (ROOT / "hardmine").rglob("*.py")
    }


def changed_since_copied() -> set[str]:
    """Sources (paths relative to the repository) that changed since mutmut copied them."""
    try:
        copied = json.loads((ROOT / "mutants" / "source-hashes.json").read_text())
    except (OSError, ValueError):
        return set()
    return {rel for rel, h in _source_hashes().items() if copied.get(rel) != h}


def _refresh_copies() -> None:
    """Drop mutmut's copies of the sources that changed since they were copied (keeping results): mutmut only
    copies files it does not have yet, so a changed source would otherwise be tested as its stale copy.
    Unchanged copies stay, so mutmut does not mutate every file again for each module."""
    record = ROOT / "mutants" / "source-hashes.json"
    try:
        copied = json.loads(record.read_text())
    except (OSError, ValueError):
        copied = {}
    now = _source_hashes()
    for rel, h in now.items():
        copy = ROOT / "mutants" / rel
        if copied.get(rel) != h and copy.exists():
            copy.unlink()
    for copy in (ROOT / "mutants" / "hardmine").rglob("*.py"):  # sources deleted since
        if str(copy.relative_to(ROOT / "mutants")) not in now:
            copy.unlink()
    record.parent.mkdir(exist_ok=True)
    record.write_text(json.dumps(now, indent=1) + "\n")


def record_profile(log_dir: Path) -> Path | None:
    """One clean run of the whole selection that records each test's costs and the lazily imported modules
    (tests/_mutate_order.py), so that each mutant's tests run cheapest first with those modules preloaded.
    None (and mutmut's own order) when that run fails: mutmut's clean run then says why."""
    profile = log_dir / "test-profile.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HARDMINE_MUTATE_RECORD=str(profile))
    env.pop("HARDMINE_MUTATE_PROFILE", None)
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    cmd = [sys.executable, "-m", "pytest", *cfg["pytest_add_cli_args"], *cfg["pytest_add_cli_args_test_selection"]]
    with open(log_dir / "test-profile.log", "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not profile.exists():
        print(f"mutate: the clean run that orders the tests failed (rc={rc}, see {log_dir / 'test-profile.log'}); "
              "running in mutmut's order", flush=True)
        return None
    return profile


def check_order(profile: Path, max_children: int) -> dict:
    """scripts/mutate_order_check.py: every function's tests, run as a mutant runs them, pass unmutated."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "scripts" / "mutate_order_check.py"), str(profile),
           "--max-children", str(max_children)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    try:
        return {**json.loads(proc.stdout.strip().splitlines()[-1]), "date": date}
    except (IndexError, ValueError):
        return {"functions": None, "failed": [["(the check itself failed)", proc.returncode]], "date": date,
                "error": proc.stderr[-2000:]}


def run_module(
    name: str, max_children: int, log_dir: Path, names: list[str] | None = None, profile: Path | None = None
) -> dict:
    _refresh_copies()
    cmd = [_mutmut(), "run", "--max-children", str(max_children), *(names or [_glob(name)])]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if profile is not None:  # tests/_mutate_order.py: cheapest-first order, lazy imports done in the fork server
        env["HARDMINE_MUTATE_PROFILE"] = str(profile)
    left_out = _non_factored_tests() if name.startswith("factored.") else list(FACTORED_TESTS)
    ignore = " ".join(f"--deselect={t}" for t in left_out)
    env["PYTEST_ADDOPTS"] = (env.get("PYTEST_ADDOPTS", "") + " " + ignore).strip()
    t0 = time.monotonic()
    log = log_dir / f"mutmut-{name}.log"
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    return {"rc": rc, "seconds": round(time.monotonic() - t0, 1), "log": str(log)}


def write_report(
    entries: list[dict], command: str, note: str | None = None, last_run: dict | None = None,
    order_check: dict | None = None,
) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    doc = {
        "tool": "mutmut " + _version(),
        "command": command,
        "config": "pyproject.toml [tool.mutmut]",
        "equivalents_file": "docs/mutation-equivalents.md",
        "counting": "killed includes timeouts; kill_rate = killed / (checked - survived_but_equivalent); "
        "survived includes mutants no selected test reaches",
        "modules": entries,
    }
    if note:
        doc["note"] = note
    if last_run:
        doc["last_run"] = last_run
    if order_check:
        doc["order_check"] = order_check
    (RESULTS / "mutation.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "| module | mutants | killed | survived-but-equivalent | survived | kill rate | date | command |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for e in entries:
        if e.get("status") == "not run":
            lines.append(f"| `{e['path']}` | {e.get('mutants', '–')} | – | – | – | not run ({e['reason']}) | – | – |")
            continue
        rate = "–" if e["kill_rate"] is None else f"{100 * e['kill_rate']:.1f}%"
        partial = f" ({e['not_checked']} not checked)" if e["not_checked"] else ""
        lines.append(
            f"| `{e['path']}` | {e['mutants']} | {e['killed']} | {equiv_cell(e)} | {e['survived']} "
            f"| {rate}{partial} | {e.get('date', '–')} | `{e.get('command', '–')}` |"
        )
    if last_run and last_run.get("seconds") is not None:
        lines += ["", f"Last run ({last_run['started']} to {last_run['finished']}): modules {', '.join(last_run['modules'])}, "
                  f"--max-children {last_run['max_children']}, {last_run['seconds'] / 60:.1f} min of wall time on "
                  f"{last_run['cpus']} CPU cores (load average at its end {last_run['load_avg_end']})."]
    if order_check:
        failed = order_check.get("failed") or []
        lines += ["", f"Order check ({order_check.get('date', '?')}, `scripts/mutate_order_check.py`): the tests of "
                  f"{order_check.get('functions', '?')} functions, each set run as its mutants run it (cheapest first, "
                  f"forked, `-x`) against the unmutated code: "
                  + (f"**{len(failed)} failed** ({', '.join(f[0] for f in failed[:5])}), so those functions' kills "
                     "are not trustworthy." if failed else "all passed, so a kill is the mutant's doing.")]
    if note:
        lines += ["", note]
    (RESULTS / "mutation.md").write_text("\n".join(lines) + "\n")


def equiv_cell(e: dict) -> str:
    """``16``, or ``16 (8 wording)`` when some are listed under "Message wording"."""
    n, w = e["survived_but_equivalent"], e.get("equivalent_wording", 0)
    return f"{n} ({w} wording)" if w else str(n)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("mutmut")
    except Exception:  # pragma: no cover - reporting only
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modules", default=",".join(MODULES), help="comma-separated, from: " + ", ".join(MODULES))
    ap.add_argument("--max-children", type=int, default=os.cpu_count() or 1,
                    help="parallel mutant workers (default: one per CPU core)")
    ap.add_argument("--budget-minutes", type=float, default=None, help="start no module after this long")
    ap.add_argument("--keep", action="store_true",
                    help="keep mutants/ and earlier results and resume: run only mutants not checked yet, and "
                    "every mutant of a module whose source changed since its results")
    ap.add_argument("--rerun-survivors", action="store_true",
                    help="rerun only the survivors of the kept results that docs/mutation-equivalents.md does not "
                    "list (after adding tests); implies --keep")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the report from mutants/")
    ap.add_argument("--note", default=None, help="a remark stored in mutation.json (e.g. what was not run and why)")
    args = ap.parse_args(argv)
    chosen = [m.strip() for m in args.modules.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in MODULES]
    if unknown:
        ap.error(f"unknown module(s) {unknown}; choose from {list(MODULES)}")
    previous = {}
    last_run = None
    previous_order_check = None
    if (RESULTS / "mutation.json").exists():
        doc = json.loads((RESULTS / "mutation.json").read_text())
        previous = {e["module"]: e for e in doc["modules"]}
        last_run = doc.get("last_run")
        previous_order_check = doc.get("order_check")
        if args.note is None and (args.keep or args.rerun_survivors or args.report_only):
            args.note = doc.get("note")  # the remarks on kept results stay with them
    if not args.report_only and not (args.keep or args.rerun_survivors) and (ROOT / "mutants").exists():
        shutil.rmtree(ROOT / "mutants")
        previous = {}
    log_dir = ROOT / "mutants"
    log_dir.mkdir(exist_ok=True)
    runs: dict[str, dict] = {}
    start = time.monotonic()
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    profile = None
    if not args.report_only:
        profile = record_profile(log_dir)
        for name in chosen:
            if args.budget_minutes is not None and time.monotonic() - start > 60 * args.budget_minutes:
                runs[name] = {"reason": f"time budget of {args.budget_minutes:g} min spent"}
                continue
            names = None
            codes = load_results(MODULES[name]) or {}
            if args.rerun_survivors:  # listed equivalents cannot be killed: not rerun
                listed = equivalents()
                names = sorted(k for k, v in codes.items() if (v in SURVIVED or v in NO_TESTS) and k not in listed)
                if not names:
                    continue
            elif args.keep and MODULES[name] in changed_since_copied():
                names = None  # its source changed since its results: the whole module again
            elif args.keep and any(v is not None for v in codes.values()):
                names = sorted(k for k, v in codes.items() if v is None)  # resume: only the unchecked ones
                if not names:
                    continue
            what = f"mutmut run --max-children {args.max_children} {_glob(name)}"
            if args.rerun_survivors:
                what = f"mutmut run --max-children {args.max_children} <its {len(names)} survivors>"
            elif names is not None:
                what += " (resumed)"
            earlier = previous.get(name, {}).get("command") if args.rerun_survivors else None
            today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
            runs[name] = {"command": f"{earlier}; then {what}" if earlier else what, "date": today, "rc": None}
            report(runs, previous, argv, args.note, last_run)  # a run stopped halfway still says what ran
            print(f"mutate: {name} ...", flush=True)
            r = run_module(name, args.max_children, log_dir, names, profile)
            runs[name].update(rc=r["rc"], seconds=r["seconds"], log=r["log"])
            print(f"mutate: {name}: rc={r['rc']} in {r['seconds']} s (log {r['log']})", flush=True)
    order_check = previous_order_check
    if not args.report_only and runs and profile is not None:
        order_check = check_order(profile, args.max_children)
        if order_check.get("failed"):
            print(f"mutate: WARNING: tests of {len(order_check['failed'])} function(s) fail against the unmutated code "
                  f"in the order a mutant runs them, so their mutants' kills are not trustworthy: "
                  f"{order_check['failed'][:5]}", flush=True)
    if not args.report_only and not (args.keep or args.rerun_survivors):  # the last fresh run: its wall time
        last_run = {
            "modules": chosen, "max_children": args.max_children, "started": started,
            "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "seconds": round(time.monotonic() - start, 1), "cpus": os.cpu_count(),
            "load_avg_end": [round(v, 2) for v in os.getloadavg()],
            "argv": argv if argv is not None else sys.argv[1:],
        }
    entries = report(runs, previous, argv, args.note, last_run, order_check)
    for e in entries:
        rate = e.get("kill_rate")
        print(f"{e['path']:34s} " + (f"{e.get('status')}: {e['killed']}/{e['mutants']} killed, "
                                     f"{e['survived']} survived, {e['survived_but_equivalent']} equivalent, "
                                     f"rate {rate}" if "killed" in e else f"not run ({e['reason']})"))
    return 0


def report(
    runs: dict[str, dict], previous: dict[str, dict], argv: list[str] | None, note: str | None = None,
    last_run: dict | None = None, order_check: dict | None = None,
) -> list[dict]:
    """Summarise mutants/ per module (run information from this run, else from the previous report)."""
    equiv = equivalents()
    entries = []
    for name, path in MODULES.items():
        codes = load_results(path)
        run = runs.get(name) or {k: v for k, v in previous.get(name, {}).items()
                                 if k in ("command", "date", "rc", "seconds")}
        if codes is None or not any(v is not None for v in codes.values()):
            earlier = previous.get(name, {})
            if name not in runs and "killed" in earlier:
                # not run here and no results in this mutants/ (e.g. a fresh checkout that ran other modules):
                # the results of its last run stand, as the module docstring says
                entries.append(earlier)
                continue
            if run.get("rc") not in (None, 0):
                reason = f"mutmut stopped with exit code {run['rc']} (see {run.get('log', 'its log')})"
            else:
                reason = run.get("reason") or "no results yet"
            entries.append({"module": name, "path": path, "status": "not run", "reason": reason,
                            **({"mutants": len(codes)} if codes else {}),
                            # a run started and stopped before its first result still says what was started
                            **{k: run[k] for k in ("date", "command") if k in run}})
            continue
        e = summarise(name, path, codes, equiv)
        e["status"] = "partial" if e["not_checked"] else "run"
        e.update({k: run[k] for k in ("date", "command", "seconds", "rc") if k in run})
        entries.append(e)
    stale = sorted(set(equiv) - {k for e in entries for k in e.get("equivalents", [])})
    if stale:
        print(f"mutate: {len(stale)} listed equivalent(s) did not survive this run or no longer exist: {stale[:5]}")
    write_report(entries, "python scripts/mutate.py " + " ".join(argv if argv is not None else sys.argv[1:]), note,
                 last_run, order_check)
    return entries


if __name__ == "__main__":
    raise SystemExit(main())
