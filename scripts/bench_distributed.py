"""A scan on 1 vs 2 processes on CPU (torchrun, gloo): samples/s end to end and by phase.

The same scan (an MLP on synthetic ``.npz`` data, ``--n`` samples) runs under ``torchrun --nproc-per-node P``
for each ``P`` in ``--procs``, each process with one thread (``OMP_NUM_THREADS=1``), so the comparison is one core
against two; ``P=1`` is the ordinary single-process scan. Phases come from the scan's ``scan.json`` (extraction
is the wall time until every rank has finished its rows; index and scores run on rank 0 alone). Writes
``scripts/results/bench_distributed.{json,md}``; the Markdown says the load average, since a busy machine
skews the ratio. Run on an idle machine with at least two free cores.

Usage: ``python scripts/bench_distributed.py [--n 40000] [--procs 1 2] [--repeats 1]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
D_IN, HIDDEN, CLASSES = 32, 256, 10


def _model():  # the same weights in every process
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, CLASSES)).eval()


def worker(data: str, out: str, dim: int, batch_size: int, result: str) -> None:
    """One rank (run by torchrun): scan ``data`` and, on rank 0, write the wall time and phases to ``result``."""
    import hardmine
    from hardmine.loaders import open_data
    from hardmine.scan.distributed import rank_and_world

    rank, world = rank_and_world()
    src = open_data(data, batch_size=batch_size)
    t0 = time.perf_counter()
    scan = hardmine.scan(_model(), src, out=out, dim=dim, overwrite=True)
    wall = time.perf_counter() - t0
    if rank == 0:
        timings = scan.info["timings"]
        Path(result).write_text(json.dumps({"processes": world, "wall_s": wall, "n": scan.n_samples,
                                            **{k: timings[k] for k in ("extract_s", "index_s", "score_s")}}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=40000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--worker", nargs=5, metavar=("DATA", "OUT", "DIM", "BATCH", "RESULT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        data, out, dim, batch, result = args.worker
        worker(data, out, int(dim), int(batch), result)
        return 0

    import numpy as np

    runs: dict[int, list[dict]] = {p: [] for p in args.procs}
    with tempfile.TemporaryDirectory() as tmp:
        g = np.random.default_rng(0)
        np.savez(Path(tmp, "data.npz"), X=g.normal(size=(args.n, D_IN)).astype(np.float32),
                 y=g.integers(0, CLASSES, args.n))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        for _ in range(args.repeats):
            for p in args.procs:  # alternating, so a change in the machine's load hits both
                result = Path(tmp, f"result-{p}.json")
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(p),
                       str(Path(__file__).resolve()), "--worker", str(Path(tmp, "data.npz")), str(Path(tmp, f"scan-{p}")),
                       str(args.dim), str(args.batch_size), str(result)]
                subprocess.run(cmd, check=True, env=env, cwd=tmp, stdout=subprocess.DEVNULL)
                runs[p].append(json.loads(result.read_text()))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    med = {p: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "extract_s", "index_s", "score_s")}
           for p, rs in runs.items()}
    base = min(args.procs)
    res = {"n": args.n, "dim": args.dim, "batch_size": args.batch_size, "repeats": args.repeats,
           "model": f"MLP {D_IN}-{HIDDEN}-{HIDDEN}-{CLASSES}", "median": {str(p): m for p, m in med.items()},
           "load_average_1min": load, "cpu_count": os.cpu_count(),
           "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_distributed.json").write_text(json.dumps(res, indent=1) + "\n")
    md = ["| processes | scan samples/s | extraction samples/s | extract s | index s | score s | speed-up (scan / extraction) |",
          "|---|---|---|---|---|---|---|"]
    for p, m in med.items():
        speed = f"{med[base]['wall_s'] / m['wall_s']:.2f}x / {med[base]['extract_s'] / m['extract_s']:.2f}x"
        md.append(f"| {p} | {args.n / m['wall_s']:,.0f} | {args.n / m['extract_s']:,.0f} | {m['extract_s']:.2f} | "
                  f"{m['index_s']:.2f} | {m['score_s']:.2f} | {speed} |")
    md += ["", f"{res['model']}, {args.n:,} samples, dim {args.dim} per tensor, batch {args.batch_size}, one thread per "
           f"process (torchrun, gloo), median of {args.repeats}; index and scores run on rank 0 only. Load average at "
           f"the end {load:.2f} on {os.cpu_count()} cores; {res['created']}; `python scripts/bench_distributed.py`."]
    if load > 1.0:
        md.append(f"Measured on a shared, busy machine (load {load:.1f}): the speed-up is not representative; rerun on an "
                  "idle one.")
    (RESULTS / "bench_distributed.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
