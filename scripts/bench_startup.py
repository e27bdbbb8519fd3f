"""How long the command line takes to start: ``hardmine --help`` and ``hardmine version`` (target < 0.5 s), with
``python -c pass`` measured in the same run as the floor no command can go below.

Each command runs ``--repeats`` times in a fresh process, alternating; the median wall time is reported.
Writes ``scripts/results/bench_startup.{json,md}``. Run on an idle machine.

Usage: ``python scripts/bench_startup.py [--repeats 15]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    exe = shutil.which("hardmine", path=str(Path(sys.executable).parent)) or "hardmine"
    commands = {"python -c pass": [sys.executable, "-c", "pass"], "hardmine --help": [exe, "--help"],
                "hardmine version": [exe, "version"]}
    times: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(args.repeats):
        for name, cmd in commands.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - t0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    res = {"median_s": {k: round(statistics.median(v), 3) for k, v in times.items()},
           "min_s": {k: round(min(v), 3) for k, v in times.items()}, "repeats": args.repeats,
           "load_average_1min": load, "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_startup.json").write_text(json.dumps(res, indent=1) + "\n")
    md = ["| command | median s | fastest s | target |", "|---|---|---|---|"]
    for k in commands:
        target = "-" if k.startswith("python") else ("< 0.5 (met)" if res["median_s"][k] < 0.5 else "< 0.5 (**missed**)")
        md.append(f"| `{k}` | {res['median_s'][k]:.3f} | {res['min_s'][k]:.3f} | {target} |")
    md += ["", f"{args.repeats} fresh processes each, alternating; load average at the end {load:.2f}; "
           f"{res['created']}; `python scripts/bench_startup.py`."]
    (RESULTS / "bench_startup.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
