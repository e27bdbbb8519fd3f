"""Streaming-driver benchmark: wall time and memory of ``hardmine.scan`` as N grows.

Each N runs in a fresh child process (so peak memory is its own) that streams a synthetic dataset (Gaussian
blobs, generated batch by batch from a seed, never held whole) through a tiny MLP (16 -> 32 -> 8) and
``hardmine.scan`` with the default engine. The child samples ``/proc/self/status`` every 20 ms and reports:

* peak anonymous RSS (heap: what the scan really holds) and peak file-backed RSS (memory-mapped gradient
  shards and IVF lists: page cache the kernel can drop), both minus the child's baseline after imports;
* wall time per phase (extract / index / score) from ``scan.json``;
* the reference measured in the same child: the bare ``GradientExtractor`` on the same batches with no I/O,
  index or scoring, so ``scan / extractor`` is the driver's overhead;
* for IVF scans, recall@10 of the index's neighbours against exact brute force (blocked over the memory-
  mapped shards) on 500 random query samples.

Usage: ``python scripts/bench_scan.py [--n 10000 100000 300000 1000000] [--dim 16]``; writes
``scripts/results/bench_scan.json`` and prints a table. Needs Linux (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class _PeakSampler(threading.Thread):
    """Peak RssAnon / RssFile, overall and per scan phase (the phase is set from the progress callback)."""

    def __init__(self, every: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.every = every
        self.anon = self.file = 0
        self.phase = "extract"
        self.by_phase: dict[str, int] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            a = _status_kb("RssAnon")
            self.anon = max(self.anon, a)
            self.file = max(self.file, _status_kb("RssFile"))
            self.by_phase[self.phase] = max(self.by_phase.get(self.phase, 0), a)
            time.sleep(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _child(n: int, dim: int, batch: int, engine: str, out: str) -> dict:
    import torch
    from torch import nn

    import hardmine
    from hardmine.engine import GradientExtractor
    from hardmine.scan import scan

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    centers = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)) * 3

    def data(limit: int):
        g = torch.Generator().manual_seed(2)
        for lo in range(0, limit, batch):
            b = min(batch, limit - lo)
            y = torch.randint(0, 8, (b,), generator=g)
            yield centers[y] + torch.randn(b, 16, generator=g), y

    # Reference: the bare extractor on the same batches (no hashing, shards, index or scores), after two
    # warm-up batches (the scan's own first batch pays the same warm-up, which matters only at small N).
    ext = GradientExtractor(model, layers="2", dim=dim, seed=0, engine=engine)
    ref_n = min(n, 50 * batch)
    for b in data(2 * batch):
        ext(b)
    t0 = time.perf_counter()
    for b in data(ref_n):
        ext(b)
    ref_rate = ref_n / (time.perf_counter() - t0)

    base_anon, base_file = _status_kb("RssAnon"), _status_kb("RssFile")
    sampler = _PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    def on_progress(p) -> None:
        sampler.phase = p.phase.value

    s = scan(model, data(n), out=out, layers="2", dim=dim, seed=0, engine=engine, total=n,
             progress=on_progress)
    wall = time.perf_counter() - t0
    sampler.stop()
    timings = s.info["timings"]
    res = {
        "n": n, "out_dim": s.out_dim, "batch": batch, "engine_plan": s.engine_metadata.get("plan"),
        "index": s.index_info.to_dict(), "wall_s": round(wall, 2), **timings,
        "reference_extractor_samples_per_s": round(ref_rate, 1),
        "peak_anon_mb": round((sampler.anon - base_anon) / 1024, 1),
        "peak_file_mb": round((sampler.file - base_file) / 1024, 1),
        "peak_anon_mb_by_phase": {k: round((v - base_anon) / 1024, 1) for k, v in sampler.by_phase.items()},
        "dim": dim,
        "baseline_anon_mb": round(base_anon / 1024, 1),
        "gradients_mb": round(n * s.out_dim * 4 / 2**20, 1),
        "disk_mb": round(sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file()) / 2**20, 1),
        "hardmine_version": hardmine.__version__,
    }
    if s.index_info.kind != "flat":
        res["recall_at_10"] = _recall(s, 500, 10)
    return res


def _recall(s, n_queries: int, k: int) -> float:
    """Recall@k of the index's neighbours vs exact search (blocked over the memory-mapped shards)."""
    import numpy as np

    from hardmine.index import knn_block
    from hardmine.score import unit_rows

    g = np.random.default_rng(0)
    q_rows = np.sort(g.choice(s.n_samples, n_queries, replace=False))
    q = np.ascontiguousarray(unit_rows(s._gather(q_rows))[0], dtype=np.float32)
    best_s = np.full((n_queries, k), -np.inf)
    best_r = np.full((n_queries, k), -1, dtype=np.int64)
    for r0, z in s.iter_gradients():
        u = unit_rows(np.asarray(z))[0].astype(np.float32)  # (shard, D)
        sims = q @ u.T  # (q, shard) one block at a time
        rows = np.arange(r0, r0 + len(u))
        sims[np.equal.outer(q_rows, rows)] = -np.inf  # exclude self
        cat_s = np.concatenate([best_s, sims], axis=1)
        cat_r = np.concatenate([best_r, np.broadcast_to(rows, sims.shape)], axis=1)
        top = np.argpartition(-cat_s, k, axis=1)[:, :k]
        best_s, best_r = np.take_along_axis(cat_s, top, 1), np.take_along_axis(cat_r, top, 1)
    got = knn_block(s.index(), s.index_info, q, q_rows, k).rows
    return round(float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, best_r)])), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000, 300_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=16, help="projection dim of the last layer's weight")
    ap.add_argument("--n-wide", type=int, nargs="*", default=[50_000, 200_000],
                    help="a second series at --dim-wide, to show the memory slope does not grow with dim")
    ap.add_argument("--dim-wide", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--json-out", type=Path, default=RESULTS / "bench_scan.json")
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(_child(args.child, args.dim, args.batch, args.engine, args.out)))
        return

    rows = []
    plan = [(n, args.dim) for n in args.n] + [(n, args.dim_wide) for n in args.n_wide]
    for n, dim in plan:
        with tempfile.TemporaryDirectory(prefix="bench_scan_") as tmp:
            cmd = [sys.executable, __file__, "--child", str(n), "--dim", str(dim), "--batch", str(args.batch),
                   "--engine", args.engine, "--out", os.path.join(tmp, "scan")]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                sys.exit(f"child for N={n} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"N={n:>9,} out_dim={r['out_dim']}: {r['wall_s']:.1f}s, peak anon +{r['peak_anon_mb']} MB, "
                  f"index {r['index']['kind']}", file=sys.stderr)

    print(f"\n{'N':>9} {'D':>4} {'index':>5} {'wall s':>7} {'extr/s':>8} {'vs bare':>7} {'index s':>7} "
          f"{'score s':>7} {'anon MB':>8} {'file MB':>8} {'grads MB':>8} {'recall':>6}")
    for r in rows:
        rate = r["n"] / r["extract_s"] if r["extract_s"] else float("nan")
        print(f"{r['n']:>9,} {r['out_dim']:>4} {r['index']['kind']:>5} {r['wall_s']:>7.1f} {rate:>8.0f} "
              f"{rate / r['reference_extractor_samples_per_s']:>7.2f} {r['index_s']:>7.1f} "
              f"{r['score_s']:>7.1f} {r['peak_anon_mb']:>8.1f} {r['peak_file_mb']:>8.1f} {r['gradients_mb']:>8.1f} "
              f"{r.get('recall_at_10', float('nan')):>6.3f}")
    slopes = {}
    for dim in sorted({r["dim"] for r in rows}):
        series = sorted((r for r in rows if r["dim"] == dim), key=lambda r: r["n"])
        if len(series) >= 2:
            lo, hi = series[0], series[-1]
            slope = (hi["peak_anon_mb"] - lo["peak_anon_mb"]) * 2**20 / (hi["n"] - lo["n"])
            slopes[hi["out_dim"]] = {"anon_bytes_per_sample": round(slope, 1),
                                     "gradient_bytes_per_sample": 4 * hi["out_dim"], "from_n": lo["n"], "to_n": hi["n"]}
            print(f"out_dim {hi['out_dim']:>4}: peak anon grows {slope:6.0f} B/sample from N={lo['n']:,} to "
                  f"{hi['n']:,}; holding the gradients would add {4 * hi['out_dim']} B/sample")
    print("\nvs bare = scan extraction throughput / bare GradientExtractor throughput (same child, same batches);"
          "\ngrads MB = what holding all gradients would cost; anon = heap (RssAnon) above the post-import"
          "\nbaseline; file = memory-mapped shard / IVF list pages (page cache the kernel can drop).")
    result = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "settings": {"dim": args.dim, "dim_wide": args.dim_wide, "batch": args.batch, "engine": args.engine,
                     "model": "MLP 16-32-8, layer '2'"},
        "runs": rows,
        "anon_slope_by_out_dim": slopes,
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json_out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, args.json_out)
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
