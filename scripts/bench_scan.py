"""Streaming-driver benchmark: wall time per phase and memory of ``hardmine.scan`` as N grows.

Each run is a fresh child process (so peak memory is its own), ``--repeats`` (default 3) per scan: the row is
the run with the median (index + score) / extract, so that a one-off stall of the machine moves one run, not
the table (the neighbour rescore below runs in the last only, after the timed scans). The synthetic series streams Gaussian blobs
(generated batch by batch from a seed, never held whole) through a tiny MLP (16 -> 32 -> 8, last layer at
``--dim``: out_dim 272 by default) and ``hardmine.scan`` with the default engine; the demo run is
``make demo``'s scan (the demo MLP, one epoch of training, Fashion-MNIST train 60k, ``dim 64`` on all
layers, batch 256). The child samples ``/proc/self/status`` every 20 ms and reports:

* wall time per phase (extract / index / score) from ``scan.json``, and index and score as ratios to the
  extraction time of the same scan (the pipeline's cost beyond extraction). A default scan leaves the index
  to its first neighbour query (its index phase is then empty): that first query is timed apart, so the
  index's cost is reported where a user pays it. Pass 1 of the scores runs beside the extraction (a worker
  thread sums each shard as it is written) and so counts in the extraction's time, which the ``/ bare
  extractor`` ratio shows; in the score phase the slices' centroids are fitted beside the statistics' read, and
  their last pass (both threads) also gives pass 2 of the scores: the score column shows both times apart;
* peak anonymous RSS (heap) and peak file-backed RSS (memory-mapped shards and IVF lists: page cache the
  kernel can drop), both minus the child's baseline after imports;
* the bare ``GradientExtractor`` on the same batches with no I/O (synthetic series), so ``vs bare`` is the
  driver's overhead during extraction;
* the neighbour scores (off by default, ``ScoreConfig.neighbor_scores``): the scan is then rescored with
  ``neighbor_scores=True``; its neighbour pass (``hardmine.index.knn_all``) is timed and the Recall@10 of the
  neighbours it used is measured against exact search (blocked over the memory-mapped shards) on 500 random
  samples: signed cosine and ``|cos|`` (the ranking ``neighbor_disagreement`` counts). 1.0 for an exact
  (flat) index. ``--no-neighbor-scores`` skips this.

``--device cuda`` (any torch device; default ``cpu``): each child puts its model on that device (the demo
model is also trained there) and the scan moves each host batch to it, as with a DataLoader; the bare
extractor's batches are moved the same way, its timing bracketed by ``torch.cuda.synchronize()``, and each
row adds ``peak_device_mb`` (``torch.cuda.max_memory_allocated``). The index and scores run on the host
whatever the device. The device (with its name) is recorded in the JSON and the Markdown.

Usage: ``python scripts/bench_scan.py [--n 10000 100000 1000000] [--dim 256] [--no-demo] [--threads 1]
[--device cuda]``; writes ``scripts/results/bench_scan.{json,md}`` (the Markdown table is copied into
docs/benchmarks.md by ``scripts/update_readme.py``), or for another device than the CPU
``scripts/results/bench_scan_<device type>.{json,md}`` (e.g. ``bench_scan_cuda``), so that a GPU run never
overwrites the CPU results the docs include. Needs Linux (``/proc``).
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


N_RECALL = 500


def _record_neighbours(n: int) -> dict:
    """Wrap the scoring pass's ``knn_all`` so the neighbours of ``N_RECALL`` seeded rows are kept."""
    import importlib

    import numpy as np

    result = importlib.import_module("hardmine.scan.result")  # hardmine.scan is also the scan function's name
    q_rows = np.sort(np.random.default_rng(0).choice(n, min(N_RECALL, n), replace=False))
    rec: dict = {"q_rows": q_rows, "rows": {}, "abs_rows": {}, "knn_s": 0.0, "slices_fit_s": 0.0,
                 "slices_last_pass_s": 0.0, "slices_annotate_s": 0.0}

    def timed(name: str, key: str) -> None:
        inner = getattr(result, name)

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                rec[key] += time.perf_counter() - t0

        setattr(result, name, wrapper)

    # The slices' centroids are fitted in a thread beside the statistics' read; their last pass (shared by both
    # threads) also gives pass 2 of the scores; the rest of the slicing step (slice column, slices.parquet) after.
    timed("fit_slice_centroids", "slices_fit_s")
    timed("assign_slices", "slices_last_pass_s")
    timed("annotate_manifest", "slices_annotate_s")
    inner = getattr(result, "knn_all", None)
    if inner is None:  # an older hardmine (searching per block): no recall recorded
        return rec

    def knn_all(index, info, k):
        it = iter(inner(index, info, k))
        while True:
            t0 = time.perf_counter()
            try:
                rows, res = next(it)
            except StopIteration:
                return
            finally:
                rec["knn_s"] += time.perf_counter() - t0
            hit = np.flatnonzero(np.isin(rows, q_rows))
            for j in hit.tolist():
                rec["rows"][int(rows[j])] = res.rows[j]
                rec["abs_rows"][int(rows[j])] = res.abs_rows[j]
            yield rows, res

    result.knn_all = knn_all
    return rec


def _summary(s, wall: float, sampler, base_anon: int, base_file: int, out: str) -> dict:
    import hardmine

    return {
        "n": s.n_samples, "out_dim": s.out_dim, "wall_s": round(wall, 2),
        **s.info["timings"],
        "peak_anon_mb": round((sampler.anon - base_anon) / 1024, 1),
        "peak_file_mb": round((sampler.file - base_file) / 1024, 1),
        "peak_anon_mb_by_phase": {k: round((v - base_anon) / 1024, 1) for k, v in sampler.by_phase.items()},
        "baseline_anon_mb": round(base_anon / 1024, 1),
        "gradients_mb": round(s.n_samples * s.out_dim * 4 / 2**20, 1),
        "disk_mb": round(sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file()) / 2**20, 1),
        "hardmine_version": hardmine.__version__,
    }


def _device_peak(device) -> dict:
    """The device's peak allocation during the scan (a GPU run only: the host's RSS does not see it)."""
    import torch

    if device.type != "cuda":
        return {}
    return {"peak_device_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}


def _device_start(device) -> None:
    """Start the device's peak count at the scan (a GPU run only)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _demo_child(out: str, neighbours: bool = True, device: str = "cpu", cuda_graphs: bool = False) -> dict:
    """``make demo``'s scan: the demo MLP (one epoch of training) on Fashion-MNIST train, dim 64, batch 256.
    On another device the model is trained and scanned there; the scan's batches stay on the host (the scan
    moves each to the model's device)."""
    import numpy as np
    import torch

    import hardmine
    from hardmine.scan import scan
    from hardmine.zoo import fashion_mlp

    dev = torch.device(device)
    images, labels = hardmine.load_fashion_mnist("train")
    x = torch.from_numpy(images.reshape(-1, 784).astype(np.float32) / 255.0)  # (N, 784)
    y = torch.from_numpy(labels)
    torch.manual_seed(0)
    model = fashion_mlp().to(dev)  # initialised on the host first: the same weights on every device
    x_dev, y_dev = x.to(dev), y.to(dev)  # the training set, once (the same tensors on the CPU)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for idx in torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).split(128):
        idx = idx.to(dev)
        loss = torch.nn.functional.cross_entropy(model(x_dev[idx]), y_dev[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    del x_dev, y_dev
    n = len(x)
    rec = _record_neighbours(n)
    batches = [(x[i : i + 256].reshape(-1, 1, 28, 28), y[i : i + 256]) for i in range(0, n, 256)]
    _device_start(dev)
    base_anon, base_file = _status_kb("RssAnon"), _status_kb("RssFile")
    sampler = _PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    s = scan(model, batches, out=out, dim=64, seed=0, total=n, cuda_graphs=cuda_graphs,
             progress=lambda p: setattr(sampler, "phase", p.phase.value))
    wall = time.perf_counter() - t0
    sampler.stop()
    res = {"series": "demo", "model": "demo MLP (Fashion-MNIST, 1 epoch), all layers, dim 64", "batch": 256,
           "dim": 64, **_summary(s, wall, sampler, base_anon, base_file, out), **_device_peak(dev)}
    res.update(_neighbour_scores(s, rec, neighbours))
    return res


def _child(n: int, dim: int, batch: int, engine: str, out: str, neighbours: bool = True,
           device: str = "cpu", cuda_graphs: bool = False) -> dict:
    import torch
    from torch import nn

    from hardmine.batches import to_device
    from hardmine.engine import GradientExtractor
    from hardmine.scan import scan

    dev = torch.device(device)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval().to(dev)
    centers = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)) * 3

    def data(limit: int):
        g = torch.Generator().manual_seed(2)
        for lo in range(0, limit, batch):
            b = min(batch, limit - lo)
            y = torch.randint(0, 8, (b,), generator=g)
            yield centers[y] + torch.randn(b, 16, generator=g), y

    # Reference: the bare extractor on the same batches (no hashing, shards, index or scores), after two
    # warm-up batches (the scan's own first batch pays the same warm-up, which matters only at small N). The
    # batches are generated on the host and moved to the model's device as the scan moves them; on a GPU the
    # timing waits for the device at both ends (the results stay there: no copy back, unlike the scan's).
    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    ext = GradientExtractor(model, layers="2", dim=dim, seed=0, engine=engine, cuda_graphs=cuda_graphs)
    ref_n = min(n, 50 * batch)
    for b in data(2 * batch):
        ext(to_device(b, dev))
    sync()
    t0 = time.perf_counter()
    for b in data(ref_n):
        ext(to_device(b, dev))
    sync()
    ref_rate = ref_n / (time.perf_counter() - t0)

    rec = _record_neighbours(n)
    _device_start(dev)
    base_anon, base_file = _status_kb("RssAnon"), _status_kb("RssFile")
    sampler = _PeakSampler()
    sampler.start()
    t0 = time.perf_counter()

    def on_progress(p) -> None:
        sampler.phase = p.phase.value

    s = scan(model, data(n), out=out, layers="2", dim=dim, seed=0, engine=engine, total=n, cuda_graphs=cuda_graphs,
             progress=on_progress)
    wall = time.perf_counter() - t0
    sampler.stop()
    res = {"series": "synthetic", "model": "MLP 16-32-8, layer '2'", "batch": batch, "dim": dim,
           "engine_plan": s.engine_metadata.get("plan"),
           **_summary(s, wall, sampler, base_anon, base_file, out),
           "reference_extractor_samples_per_s": round(ref_rate, 1), **_device_peak(dev)}
    res.update(_neighbour_scores(s, rec, neighbours))
    return res


def _neighbour_scores(s, rec: dict, neighbours: bool) -> dict:
    """The default scan's slicing time; the index built by the first neighbour query (the scan leaves it to
    that query), timed; then (``neighbours``) what ``--neighbor-scores`` adds: the scan rescored with
    ``ScoreConfig(neighbor_scores=True)``, its neighbour pass timed and its Recall@10."""
    from hardmine.score import ScoreConfig

    out = {"score_slices_fit_s": round(rec["slices_fit_s"], 3), "score_slices_last_pass_s": round(rec["slices_last_pass_s"], 3),
           "score_slices_annotate_s": round(rec["slices_annotate_s"], 3), "neighbor_knn_s": None, "neighbor_rescore_s": None,
           "recall_at_10": None, "recall_abs_at_10": None, "index_built_in_scan": s.index_built}
    if s.manifest()["knn_outlier"].notna().any():
        raise RuntimeError("the default scan computed the neighbour scores; this bench expects them off by default")
    t0 = time.perf_counter()
    s.neighbors([s.sample_ids()[0].item()], k=10)  # the first query: builds the index (IVF at scale) and keeps it
    out["index_first_query_s"] = round(time.perf_counter() - t0, 3)
    out["index"] = s.index_info.to_dict()
    if not neighbours:
        return out
    t0 = time.perf_counter()
    s.rescore(ScoreConfig(neighbor_scores=True))
    out["neighbor_rescore_s"] = round(time.perf_counter() - t0, 3)
    out["neighbor_knn_s"] = round(rec["knn_s"], 3)
    out.update(_recall(s, rec, 10))
    return out


def _recall(s, rec: dict, k: int) -> dict:
    """Recall@k of the scoring pass's neighbours (signed and |cos|) vs exact search over the shards."""
    import numpy as np

    from hardmine.score import unit_rows

    q_rows = rec["q_rows"]
    if len(rec["rows"]) != len(q_rows):
        return {"recall_at_10": None, "recall_abs_at_10": None}
    q = np.ascontiguousarray(unit_rows(s._gather(q_rows))[0], dtype=np.float32)
    best = {}
    for absolute in (False, True):
        best_s = np.full((len(q_rows), k), -np.inf)
        best_r = np.full((len(q_rows), k), -1, dtype=np.int64)
        for r0, z in s.iter_gradients():
            u = unit_rows(np.asarray(z))[0].astype(np.float32)  # (shard, D)
            sims = q @ u.T  # (q, shard) one block at a time
            if absolute:
                sims = np.abs(sims)
            rows = np.arange(r0, r0 + len(u))
            sims[np.equal.outer(q_rows, rows)] = -np.inf  # exclude self
            cat_s = np.concatenate([best_s, sims], axis=1)
            cat_r = np.concatenate([best_r, np.broadcast_to(rows, sims.shape)], axis=1)
            top = np.argpartition(-cat_s, k, axis=1)[:, :k]
            best_s, best_r = np.take_along_axis(cat_s, top, 1), np.take_along_axis(cat_r, top, 1)
        best[absolute] = best_r
    out = {}
    for key, absolute in (("recall_at_10", False), ("recall_abs_at_10", True)):
        got = [rec["abs_rows" if absolute else "rows"][int(r)] for r in q_rows]
        out[key] = round(float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, best[absolute])])), 4)
    return out


NEIGHBOUR_KEYS = ("neighbor_knn_s", "neighbor_rescore_s", "recall_at_10", "recall_abs_at_10")


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


def _markdown(rows: list[dict], threads: int | None, load: float | None = None, repeats: int = 1,
              device: str = "cpu", json_shown: str = "scripts/results/bench_scan.json") -> str:
    lines = [
        "| scan | N | out_dim | extract s (/ bare extractor) | index s | score s (slices: centroids beside, last pass with pass 2, annotate) "
        "| index / extract | score / extract | (index + score) / extract | wall s per 100k | index built by the first "
        "query: kind, s (/ extract) | `--neighbor-scores`: kNN s (/ extract) | Recall@10 (signed / abs) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("neighbor_knn_s") is None:
            knn, rec = "not run", "–"
        else:
            knn = f"{r['neighbor_knn_s']:.2f} ({r['neighbor_knn_s'] / r['extract_s']:.1f}x)"
            rec = "exact" if r["index"]["kind"] == "flat" else f"{r['recall_at_10']} / {r['recall_abs_at_10']}"
        name = "Fashion-MNIST demo" if r["series"] == "demo" else "synthetic MLP"
        # The scan's extraction (hashing, statistics, shards, pass 1 of the scores beside it) against the bare
        # extractor on the same batches: what the driver adds while extracting.
        ref = r.get("reference_extractor_samples_per_s")
        bare = f" ({ref / r['extract_samples_per_s']:.1f}x)" if ref and r.get("extract_samples_per_s") else ""
        first = (f"{r['index']['kind']}, {r['index_first_query_s']:.2f} "
                 f"({r['index_first_query_s'] / r['extract_s']:.1f}x)") if r.get("index_first_query_s") is not None \
            else f"{r['index']['kind']}, built in the scan"
        lines.append(
            f"| {name} | {r['n']:,} | {r['out_dim']} | {r['extract_s']:.2f}{bare} | "
            f"{r['index_s']:.2f} | {r['score_s']:.2f} ({r['score_slices_fit_s']:.2f}, {r.get('score_slices_last_pass_s', float('nan')):.2f}, "
            f"{r['score_slices_annotate_s']:.2f}) | "
            f"{r['index_over_extract']:.2f} | "
            f"{r['score_over_extract']:.2f} | **{r['pipeline_over_extract']:.2f}** | "
            f"{r['wall_s'] / r['n'] * 1e5:.1f} | {first} | {knn} | {rec} |"
        )
    syn = sorted((r for r in rows if r["series"] == "synthetic"), key=lambda r: r["n"])
    notes = []
    for lo, hi in zip(syn, syn[1:]):
        growth = (hi["wall_s"] / lo["wall_s"]) / (hi["n"] / lo["n"])
        notes.append(f"wall time from {lo['n']:,} to {hi['n']:,} samples: {growth:.2f}x linear")
    t = f"{threads} thread(s)" if threads else "default threads"
    return ("\n".join(lines) + "\n\n" + "; ".join(notes) + (". " if notes else "")
            + (f"Each row is the median of {repeats} runs (fresh processes) by (index + score) / extract; the "
               "neighbour columns come from the last (its neighbour rescore runs after its timed scan). " if repeats > 1 else "")
            + (f"Models on device {device}; the index and scores on the host. " if device != "cpu" else "")
            + f"Run with {t}" + (f"; load average at the end {load:.1f} (other jobs shared the machine)" if load else "")
            + f"; the machine: see `{json_shown}`.\n")


def _shown(path: Path) -> str:
    """``path`` as the Markdown names it: from the repository root when it is inside it."""
    try:
        return str(path.resolve().relative_to(RESULTS.parent.parent))
    except ValueError:
        return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="*", default=[10_000, 100_000, 1_000_000], help="synthetic series sizes")
    ap.add_argument("--dim", type=int, default=256, help="projection dim of the last layer's weight")
    ap.add_argument("--n-wide", type=int, nargs="*", default=[],
                    help="a second series at --dim-wide, to show the memory slope does not grow with dim")
    ap.add_argument("--dim-wide", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--no-demo", action="store_true", help="skip the Fashion-MNIST demo scan (60k)")
    ap.add_argument("--no-neighbor-scores", action="store_true",
                    help="skip the rescore with neighbour scores (their kNN time and Recall@10)")
    ap.add_argument("--threads", type=int, help="torch / BLAS / OpenMP threads of each child (default: theirs)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="fresh processes per scan; the row is the run with the median (index + score) / extract")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--demo-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu",
                    help="torch device of the models (e.g. cuda); the index and scores run on the host")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="scan with cuda_graphs=True (the factored pass replayed as a CUDA graph; on a CUDA device)")
    ap.add_argument("--json-out", type=Path,
                    help="default: scripts/results/bench_scan.json on the CPU, bench_scan_<device type>.json else")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.demo_child:
        print(json.dumps(_demo_child(args.out, not args.no_neighbor_scores, args.device, args.cuda_graphs)))
        return
    if args.child is not None:
        print(json.dumps(_child(args.child, args.dim, args.batch, args.engine, args.out, not args.no_neighbor_scores,
                                args.device, args.cuda_graphs)))
        return
    # The parent only: a usage error now rather than in every child (the children are given a checked device).
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_extract import parse_device

    device = parse_device(ap, args.device)
    device_label = args.device + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    if args.json_out is None:
        # A run on another device gets its own files: the CPU results are the ones the docs include.
        args.json_out = RESULTS / ("bench_scan.json" if device.type == "cpu" else f"bench_scan_{device.type}.json")

    env = dict(os.environ)
    if args.threads:  # before the child imports numpy / faiss: their thread pools read these once
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(args.threads)
    extra = ["--threads", str(args.threads)] if args.threads else []
    extra += ["--device", args.device]
    if args.cuda_graphs:
        extra.append("--cuda-graphs")
    if args.no_neighbor_scores:
        extra.append("--no-neighbor-scores")
    rows = []
    plan: list[tuple[int, int | None]] = [(n, args.dim) for n in args.n] + [(n, args.dim_wide) for n in args.n_wide]
    if not args.no_demo:
        plan.append((60_000, None))
    for n, dim in plan:
        runs = []
        for rep in range(args.repeats):
            # the neighbour rescore (minutes at 1M) only in the last run: it is timed once, and it comes after the
            # timed scans (its gigabytes of index memory, reclaimed by the kernel afterwards, slowed the next runs)
            last = rep == args.repeats - 1
            more = extra if last or args.no_neighbor_scores else [*extra, "--no-neighbor-scores"]
            with tempfile.TemporaryDirectory(prefix="bench_scan_") as tmp:
                out = ["--out", os.path.join(tmp, "scan")]
                if dim is None:
                    cmd = [sys.executable, __file__, "--demo-child", *out, *more]
                else:
                    cmd = [sys.executable, __file__, "--child", str(n), "--dim", str(dim), "--batch",
                           str(args.batch), "--engine", args.engine, *out, *more]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
                if proc.returncode != 0:
                    sys.exit(f"child for N={n} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                r["index_over_extract"] = _ratio(r["index_s"], r["extract_s"])
                r["score_over_extract"] = _ratio(r["score_s"], r["extract_s"])
                r["pipeline_over_extract"] = _ratio(r["index_s"] + r["score_s"], r["extract_s"])
                runs.append(r)
        # The run with the median pipeline ratio stands for the scan (a one-off stall of a shared machine moves
        # one run, not the row); the neighbour columns come from the last run, the only one that has them.
        r = dict(sorted(runs, key=lambda x: x["pipeline_over_extract"])[len(runs) // 2])
        r.update({k: runs[-1][k] for k in NEIGHBOUR_KEYS})
        r["repeat_pipeline_over_extract"] = [x["pipeline_over_extract"] for x in runs]
        rows.append(r)
        print(f"{r['series']} N={n:>9,} out_dim={r['out_dim']}: {r['wall_s']:.1f}s (index+score "
              f"{r['pipeline_over_extract']:.2f}x extract; runs {r['repeat_pipeline_over_extract']}), peak anon "
              f"+{r['peak_anon_mb']} MB, index {r['index']['kind']}", file=sys.stderr)

    print(f"\n{'scan':>9} {'N':>9} {'D':>4} {'index':>5} {'wall s':>7} {'extr s':>7} {'index s':>7} {'score s':>7} "
          f"{'idx/ext':>7} {'scr/ext':>7} {'anon MB':>8} {'file MB':>8} {'recall':>6} {'rec|c|':>6}")
    for r in rows:
        print(f"{r['series']:>9} {r['n']:>9,} {r['out_dim']:>4} {r['index']['kind']:>5} {r['wall_s']:>7.1f} "
              f"{r['extract_s']:>7.2f} {r['index_s']:>7.2f} {r['score_s']:>7.2f} {r['index_over_extract']:>7.2f} "
              f"{r['score_over_extract']:>7.2f} {r['peak_anon_mb']:>8.1f} {r['peak_file_mb']:>8.1f} "
              f"{r.get('recall_at_10') or float('nan'):>6.3f} {r.get('recall_abs_at_10') or float('nan'):>6.3f}")
    slopes = {}
    for dim in sorted({r["dim"] for r in rows if r["series"] == "synthetic"}):
        series = sorted((r for r in rows if r["dim"] == dim and r["series"] == "synthetic"), key=lambda r: r["n"])
        if len(series) >= 2:
            lo, hi = series[0], series[-1]
            slope = (hi["peak_anon_mb"] - lo["peak_anon_mb"]) * 2**20 / (hi["n"] - lo["n"])
            slopes[hi["out_dim"]] = {"anon_bytes_per_sample": round(slope, 1),
                                     "gradient_bytes_per_sample": 4 * hi["out_dim"], "from_n": lo["n"], "to_n": hi["n"]}
            print(f"out_dim {hi['out_dim']:>4}: peak anon grows {slope:6.0f} B/sample from N={lo['n']:,} to "
                  f"{hi['n']:,}; holding the gradients would add {4 * hi['out_dim']} B/sample")
    print("\nidx/ext, scr/ext = index and score time as a multiple of the same scan's extraction time; recall ="
          "\nRecall@10 of the neighbour scores' neighbours (signed, |cos|; a rescore with neighbor_scores=True); anon = heap (RssAnon) above the post-import"
          "\nbaseline; file = memory-mapped shard / IVF list pages (page cache the kernel can drop).")
    result = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg()},
        "settings": {"dim": args.dim, "dim_wide": args.dim_wide, "batch": args.batch, "engine": args.engine,
                     "threads": args.threads, "model": "MLP 16-32-8, layer '2'", "demo": not args.no_demo,
                     "device": device_label, "torch": torch.__version__, "cuda_graphs": args.cuda_graphs},
        "runs": rows,
        "anon_slope_by_out_dim": slopes,
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json_out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, args.json_out)
    md = args.json_out.with_suffix(".md")
    md.with_suffix(".tmp").write_text(_markdown(rows, args.threads, os.getloadavg()[0], args.repeats, device_label,
                                                _shown(args.json_out)))
    os.replace(md.with_suffix(".tmp"), md)
    print(f"wrote {args.json_out} and {md}")


if __name__ == "__main__":
    main()
