"""Overhead of the training-loop API (``hardmine.OnlineMiner``) as a ratio to a plain training step.

Models: the MLP (784-512-256-10) and CNN (2 conv + 2 fc on 3x32x32) of ``scripts/bench_extract.py``
(imported from there), batch 256, SGD, torch threads = CPU cores. Methods, each one full training step:

* ``plain`` -- forward + mean cross-entropy + backward + SGD step (the reference: 1.0);
* ``last_layer`` -- ``OnlineMiner(layers=<final nn.Linear>)``: the analytic path (no extra backward), with
  weighting active (no warm-up), per-sample dynamics recorded under sample ids (new ids each step through an
  epoch of ``EPOCH_BATCHES`` batches, then again), then
  ``(stats.loss * stats.weights).mean()`` + backward + SGD step;
* ``multi_layer`` -- ``OnlineMiner(layers=None)``: every layer (all Linear/Conv2d) through the autograd
  path (one extra backward to the selected layers' outputs + factored projections), otherwise the same;
* ``last_layer_graphs`` / ``multi_layer_graphs`` -- the same two with ``OnlineMiner(cuda_graphs=True)`` (the
  miner's own work after the forward replayed from a CUDA graph; run by default with ``--device cuda`` only,
  elsewhere they run eagerly).

Targets (issue "Training-loop API"): ``last_layer`` <= 1.3x and ``multi_layer`` <= 2x the plain step (the
``*_graphs`` rows: the same targets).

Timing: the methods run round-robin (one timed step of each per round, after warm-up), so load changes on a
shared machine hit every method alike. ``ratio_to_plain`` is the median over rounds of ``t(method) /
t(plain)`` within the round; ``ratio_min_to_plain`` compares the fastest steps (the least disturbed by other
processes). Writes a list of rows ``{"model", "method", "ms_per_step", "ms_min", "ratio_to_plain",
"ratio_min_to_plain", "path", "out_dim"}`` plus the run settings to
``scripts/results/bench_callbacks.json`` and a Markdown table to ``bench_callbacks.md``. ``--quick``: tiny
batch and rounds, a smoke test (numbers meaningless).

``--device cuda``: models and batches on the GPU (sample ids stay on the host, as a DataLoader gives them),
every timed step bracketed by ``torch.cuda.synchronize()``, and each row records ``host_syncs_per_step``
(kernel launches, stream synchronisations, memcpys and syncing aten ops per step, from ``torch.profiler``;
``bench_extract.sync_profile``). ``--models`` also accepts ``transformer`` (the extraction benchmark's).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hardmine.batches import call_model
from hardmine.online import OnlineMiner, WeightingConfig

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_extract import build, parse_device, sync, sync_profile, to_device  # noqa: E402  (its models and batches)

MODELS = ("mlp", "cnn")
OPTIONAL_MODELS = ("transformer",)  # accepted by --models, not run by default
METHODS = ("plain", "last_layer", "multi_layer", "last_layer_graphs", "multi_layer_graphs")
GRAPHED = ("last_layer_graphs", "multi_layer_graphs")  # OnlineMiner(cuda_graphs=True); default on --device cuda
TARGETS = {"last_layer": 1.3, "multi_layer": 2.0, "last_layer_graphs": 1.3, "multi_layer_graphs": 2.0}
DIM = 256
EPOCH_BATCHES = 64  # the steps of one epoch of distinct sample ids


def _last_linear(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1]


def make_step(
    method: str, model: nn.Module, x: Any, y: torch.Tensor
) -> tuple[Callable[[], Any], dict]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    # Sample ids on the host, as a DataLoader yields them: new ones each step through an epoch of EPOCH_BATCHES
    # batches, then the same again (the dynamics are recorded as in training, not one id set over and over)
    id_batches = [torch.arange(len(y)) + k * len(y) for k in range(EPOCH_BATCHES)]
    count = itertools.count()
    if method == "plain":

        def step() -> None:
            loss = F.cross_entropy(call_model(model, x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step, {"path": None, "out_dim": None}
    layers = _last_linear(model) if method.startswith("last_layer") else None
    # cuda_graphs only where asked for: an older hardmine (PYTHONPATH=<checkout>) has no such argument
    graphs = {"cuda_graphs": True} if method in GRAPHED else {}
    miner = OnlineMiner(model, layers=layers, dim=DIM, seed=0, weighting=WeightingConfig(warmup_steps=0), **graphs)
    info: dict[str, Any] = {"path": None, "out_dim": miner.out_dim}
    if method in GRAPHED:
        info["miner"] = miner  # its cuda_graph_state() goes into the row

    def mined() -> None:
        ids = id_batches[next(count) % EPOCH_BATCHES]
        stats = miner.observe(x, y, ids)  # a dict of inputs (the transformer) is passed as keyword arguments
        stats.weighted_loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        info["path"] = stats.path

    return mined, info


def run_model(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    steps, infos = {}, {}
    methods = args.methods
    for method in methods:
        model, (x, y) = build(name, args.batch, seed=0)  # a fresh, identical model per method
        model, x, y = model.to(device), to_device(x, device), y.to(device)
        steps[method], infos[method] = make_step(method, model, x, y)
    for _ in range(args.warmup):
        for method in methods:
            steps[method]()
    syncs = {m: sync_profile(steps[m], device) for m in methods} if device.type == "cuda" else {}
    times: dict[str, list[float]] = {m: [] for m in methods}
    start = time.perf_counter()
    rounds = 0
    while rounds < args.min_rounds or (
        time.perf_counter() - start < args.min_time and rounds < args.max_rounds
    ):
        for method in methods:
            sync(device)
            t = time.perf_counter()
            steps[method]()
            sync(device)  # a GPU step is timed to its end, not to its last kernel launch
            times[method].append(time.perf_counter() - t)
        rounds += 1
    rows = []
    for method in methods:
        # Ratio per round (the method and the plain step ran back to back, under the same load), then the
        # median over rounds; plus the ratio of the fastest steps, the least disturbed by other processes.
        per_round = [t / p for t, p in zip(times[method], times["plain"])]
        rows.append(
            {
                "model": name,
                "method": method,
                "ms_per_step": 1e3 * statistics.median(times[method]),
                "ms_min": 1e3 * min(times[method]),
                "ratio_to_plain": statistics.median(per_round),
                "ratio_min_to_plain": min(times[method]) / min(times["plain"]),
                "rounds": rounds,
                **{k: v for k, v in infos[method].items() if k != "miner"},
                **({"cuda_graphs": infos[method]["miner"].cuda_graph_state()} if "miner" in infos[method] else {}),
                **({"host_syncs_per_step": syncs[method]} if method in syncs else {}),
            }
        )
    return rows


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results are meant to be read
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def table(rows: list[dict[str, Any]]) -> str:
    head = [
        "model",
        "method",
        "ms/step (median)",
        "ms/step (min)",
        "ratio to plain",
        "ratio (min)",
        "target",
        "path",
        "proj. dim",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        tgt = TARGETS.get(r["method"])
        verdict = "-" if tgt is None else f"<= {tgt:g} ({'met' if r['ratio_to_plain'] <= tgt else 'NOT met'})"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['ms_per_step']:.2f} | {r['ms_min']:.2f} | "
            f"{r['ratio_to_plain']:.2f} | {r['ratio_min_to_plain']:.2f} | {verdict} | {r['path'] or '-'} | "
            f"{r['out_dim'] or '-'} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: batch 8, 2 rounds, 1 thread (numbers meaningless)"
    )
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument(
        "--min-time", type=float, default=20.0, help="seconds of timed rounds per model (at least)"
    )
    ap.add_argument("--min-rounds", type=int, default=10)
    ap.add_argument("--max-rounds", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=4, help="untimed rounds (the graphed methods capture in the third)")
    ap.add_argument(
        "--methods",
        help=f"comma-separated, of {', '.join(METHODS)} (default: all; the *_graphs ones only with --device cuda, "
        "where OnlineMiner(cuda_graphs=True) applies); plain is always run (the reference)",
    )
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: the CPU cores available)"
    )
    ap.add_argument("--device", default="cpu", help="torch device of the models and batches, e.g. cuda")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bench_callbacks.json")
    args = ap.parse_args()
    device = parse_device(ap, args.device)
    if args.quick:
        args.batch, args.min_time, args.min_rounds, args.warmup, args.threads = 8, 0.0, 2, 1, 1
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    if args.methods is None:
        args.methods = ",".join(m for m in METHODS if device.type == "cuda" or m not in GRAPHED)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if [m for m in methods if m not in METHODS]:
        ap.error(f"unknown method(s) {[m for m in methods if m not in METHODS]}; choose from {list(METHODS)}")
    args.methods = ["plain", *(m for m in dict.fromkeys(methods) if m != "plain")]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS + OPTIONAL_MODELS]
    if bad:
        ap.error(f"unknown model(s) {bad}; choose from {list(MODELS + OPTIONAL_MODELS)}")
    rows: list[dict[str, Any]] = []
    for name in models:
        rows.extend(run_model(name, args))
    md = table(rows)
    print(md)
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    settings = {
        "batch": args.batch,
        "dim": DIM,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "device": args.device
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "when": when,
        "quick": args.quick,
        # Other processes on a shared machine distort timings (2-thread runs most): recorded, not hidden.
        "load_avg_1_5_15_at_end": list(os.getloadavg()),
    }
    atomic_write(args.out, json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    load = ", ".join(f"{v:.1f}" for v in settings["load_avg_1_5_15_at_end"])
    note = (
        f"\nRun: {when}, torch {torch.__version__}, {settings['machine']}, "
        f"{'' if args.device == 'cpu' else 'device ' + settings['device'] + ' (steps timed to torch.cuda.synchronize()), '}"
        "torch threads "
        f"{settings['threads']}, batch {args.batch}, dim {DIM} per weight matrix"
        f"{' (--quick: numbers meaningless)' if args.quick else ''}; load average at the end {load}. Methods "
        "run round-robin; ratio = median over rounds of t(method) / t(plain) within the round; ratio (min) = "
        "fastest step / fastest plain step. last_layer and multi_layer include the weighting (no warm-up) "
        f"and per-sample dynamics recorded under sample ids (new ids each step, an epoch of {EPOCH_BATCHES} "
        "batches); the *_graphs methods are the same with "
        "OnlineMiner(cuda_graphs=True).\n"
    )
    synced = [r for r in rows if r.get("host_syncs_per_step")]
    if synced:
        note += "\nPer step under torch.profiler (kernel launches, host syncs and copies):\n\n" + "\n".join(
            f"- {r['model']} {r['method']}: "
            + ", ".join(f"{k} {v:g}" for k, v in sorted(r["host_syncs_per_step"].items()))
            for r in synced
        ) + "\n"
    atomic_write(args.out.with_suffix(".md"), md + "\n" + note)


if __name__ == "__main__":
    main()
