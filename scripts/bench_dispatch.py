"""The host's share of a GPU step, measured without a GPU: kernel ops per step and CPU time at a tiny batch.

On a GPU, a small model's training step and hardmine's passes are bound by the host (Python, the dispatcher
and one launch per kernel), not by the device: the H200 profiles in the issue show the factored pass making
about twice the training step's kernel launches while doing less GPU work. Each of those costs the host the
same on any machine, so the CPU can measure it: for each bench model (``scripts/bench_extract.py``'s), this
script counts the aten ops per step that would each launch a kernel on a GPU (``bench_extract.kernel_ops``)
and times the step on one CPU thread at batch 4, where the arithmetic is small beside the per-op cost (the
MLP's; the CNN's convolutions and the transformer's attention still compute a visible share).

Methods, each against the reference measured in the same rounds:

* extraction: ``train_step`` (the reference: forward + mean cross-entropy + backward + SGD step) and
  ``factored`` (``GradientExtractor(engine="factored")``, all parameters, projection dim ~4096);
* training loop: ``plain`` (the reference) and ``OnlineMiner``'s ``last_layer`` / ``multi_layer`` steps of
  ``scripts/bench_callbacks.py`` -- **on the miner's GPU path** (statistics, weights and directions as tensor
  ops where the batch is, dynamics copied to the host), which the CPU itself does not take
  (``hardmine.online.dynamics.HOST_STATS_DEVICES``); it is forced here because that path is what a GPU runs;
  ``last_layer_graphs`` / ``multi_layer_graphs``: the same with ``OnlineMiner(cuda_graphs=True)``, where a CPU
  stand-in takes the CUDA graph's place (:class:`ReplayStandIn`: a replay runs the captured function again,
  counted as one launch, ``bench_extract.GRAPH_REPLAY``): their kernel ops are what a GPU step would launch
  from the host, the graph's one included; they are timed once the graph is captured and checked with
  replays that do nothing (the results keep their last values): the host's share of a replayed step, whose
  graph a GPU runs while the host goes on (the replay's own launch is not in it).

``ratio`` = median over rounds of t(method) / t(reference) within the round (the methods run round-robin).
This is a proxy, not a GPU measurement: a CUDA kernel costs more host time than a CPU op of the same size
and some CPU ops are several CUDA kernels (a ``cat`` of mixed inputs), so read the kernel counts and the
ratios as "what the host pays", to compare versions of the code, and the GPU tables for the targets.
Writes ``scripts/results/bench_dispatch.json`` (rows with per-op counts) and ``bench_dispatch.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import hardmine
from hardmine.online import dynamics as online_dynamics

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_callbacks as bc  # noqa: E402  (the training-loop steps)
import bench_extract as be  # noqa: E402  (the models, the extraction steps, the kernel count)

MODELS = be.MODELS
# The *_graphs rows where the hardmine measured has OnlineMiner(cuda_graphs=) (an older checkout on PYTHONPATH
# has not)
_GRAPHS = bc.GRAPHED if "cuda_graphs" in inspect.signature(hardmine.OnlineMiner).parameters else ()
GROUPS = {
    "extraction": ("train_step", "factored"),
    "training loop": ("plain", "last_layer", "multi_layer", *_GRAPHS),
}
REFERENCE = {"extraction": "train_step", "training loop": "plain"}


def steps(name: str, group: str, batch: int) -> dict[str, Callable[[], Any]]:
    """The group's steps for model ``name``, each on a fresh, identical model."""
    out: dict[str, Callable[[], Any]] = {}
    for method in GROUPS[group]:
        model, inputs = be.build(name, batch, seed=0)
        if group == "extraction":
            dim, _ = be.choose_dim(model, 4096)
            out[method], _ = be.make_method(method, model, inputs, dim, 4096)
        else:
            x, y = inputs
            out[method], info = bc.make_step(method, model, x, y)
            if method in bc.GRAPHED:
                standin = ReplayStandIn()
                info["miner"]._device_step.graphs.backend = standin
                out[method].miner = info["miner"]  # type: ignore[attr-defined]  (its cuda_graph_state() is checked)
                out[method].standin = standin  # type: ignore[attr-defined]  (host-only replays when timed)
    return out


class ReplayStandIn:
    """A CPU stand-in for a CUDA graph (``hardmine.factored.graphs.GraphBackend``): a replay runs the captured
    function again on the static inputs and writes the results in place, under ``bench_extract.GRAPH_REPLAY``,
    which ``kernel_ops`` counts as the one launch a replay is on a GPU. With ``recompute`` off, a replay does
    nothing (the results keep their last values): what a replayed step costs the host besides the graph's
    launch, whose kernels a GPU runs while the host goes on."""

    def __init__(self) -> None:
        self.recompute = True

    def capture(self, fn: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[Callable[[], None], tuple[torch.Tensor, ...]]:
        outputs = fn()

        def replay() -> None:
            if not self.recompute:
                return
            with torch.profiler.record_function(be.GRAPH_REPLAY):
                for o, new in zip(outputs, fn()):
                    o.copy_(new)

        return replay, outputs


def run_group(name: str, group: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    fns = steps(name, group, args.batch)
    for _ in range(args.warmup):
        for fn in fns.values():
            fn()
    for m, fn in fns.items():
        miner = getattr(fn, "miner", None)
        if miner is not None:  # captured in the warm-up, replays compared: what the kernel count must see
            state = miner.cuda_graph_state()
            if state["captured"] != 1 or state["off"] is not None:
                raise SystemExit(f"{name} {m}: the stand-in graph was not captured and kept: {state}")
    kernels = {m: be.kernel_ops(fn) for m, fn in fns.items()}
    host = {m: be.host_ops(fn) for m, fn in fns.items()}
    for fn in fns.values():
        standin = getattr(fn, "standin", None)
        if standin is not None:  # timed: the host's share of a replayed step (the graph's work is the GPU's)
            standin.recompute = False
    times: dict[str, list[float]] = {m: [] for m in fns}
    for _ in range(args.rounds):
        for m, fn in fns.items():
            t = time.perf_counter()
            for _ in range(args.repeat):
                fn()
            times[m].append((time.perf_counter() - t) / args.repeat)
    for m, fn in fns.items():
        miner = getattr(fn, "miner", None)
        if miner is not None:  # the timed steps were replays of that one graph, not an eager fallback
            state = miner.cuda_graph_state()
            if state["captured"] != 1 or state["off"] is not None:
                raise SystemExit(f"{name} {m}: the stand-in graph did not stay captured while timed: {state}")
    ref = REFERENCE[group]
    rows = []
    for m in fns:
        n = sum(kernels[m].values())
        rows.append(
            {
                "model": name,
                "group": group,
                "method": m,
                "kernels_per_step": n,
                "extra_kernels": n - sum(kernels[ref].values()),
                "host_ops_per_step": host[m],
                "ms_per_step": 1e3 * statistics.median(times[m]),
                "ratio": statistics.median(t / r for t, r in zip(times[m], times[ref])),
                "kernel_ops": kernels[m],
            }
        )
    return rows


def code_version() -> str:
    """The git commit of the hardmine package measured (``+changes`` when its files differ from it), so a run
    on an older checkout (``PYTHONPATH=<checkout>``) says which code it measured."""
    where = Path(hardmine.__file__).resolve().parent

    def git(*cmd: str) -> str:
        out = subprocess.run(["git", "-C", str(where), *cmd], capture_output=True, text=True, check=False)
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown"
    return commit + ("+changes" if git("status", "--porcelain", "--", ".") else "")


def run_settings(threads: int, quick: bool, **fields: Any) -> dict[str, Any]:
    """A run's settings (the script's own ``fields`` first), with what every run records: torch, threads, the
    machine, when, the hardmine commit measured, --quick and the load average at the end."""
    return {
        **fields,
        "torch": torch.__version__,
        "threads": threads,
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "when": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "hardmine": code_version(),
        "quick": quick,
        "load_avg_1_5_15_at_end": list(os.getloadavg()),
    }


def round_robin(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each function over ``rounds`` rounds (after ``warmup`` unrecorded ones), the functions
    taking turns within each round: a slow moment of the machine then weighs on every method of that round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {m: [] for m in fns}
    for _ in range(rounds):
        for m, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[m].append(time.perf_counter() - t)
    return times


def versus_train_step(times: dict[str, list[float]], methods: tuple[str, ...], batch: int) -> dict[str, float]:
    """``{method}_samples_per_s`` and ``{method}_ratio`` (median over rounds of t(train step) / t(method) within
    the round) of each method, and ``speedup``: the median of t(before) / t(factored)."""
    ref = times["train_step"]
    row: dict[str, float] = {}
    for m in methods:
        row[f"{m}_samples_per_s"] = batch / statistics.median(times[m])
        row[f"{m}_ratio"] = statistics.median(r / t for t, r in zip(times[m], ref))  # throughput ratio
    row["speedup"] = statistics.median(t_b / t_f for t_b, t_f in zip(times["before"], times["factored"]))
    return row


def versus_methods(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, dim: int, moved: list[str], moved_pass: Callable[[], Any]
) -> dict[str, Callable[[], Any]]:
    """The three methods of a rule against the route before it: a training step, today's ``engine="auto"``
    ("factored") and "before": ``moved_pass()`` (the old route of the parameters ``moved``) plus the factored pass
    of the rest. ``_plan`` reads auto's plan."""
    from hardmine.engine import GradientExtractor

    rest = [n for n, _ in model.named_parameters() if n not in moved]
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    # The optimiser's learning rate is tiny, but the weights still move: every method sees the same model.
    factored = GradientExtractor(model, dim=dim, seed=0, engine="auto", loss_fn="cross_entropy")
    rest_part = GradientExtractor(model, layers=rest, dim=dim, seed=0, engine="factored", loss_fn="cross_entropy")
    return {
        "train_step": train_step,
        "factored": lambda: factored((x, y)),
        "before": lambda: (moved_pass(), rest_part((x, y))),
        "_plan": lambda: factored.metadata()["plan"],
    }


def versus_row(
    name: str, dim: int, args: argparse.Namespace, x: torch.Tensor, fns: dict[str, Callable[[], Any]],
    errors: Callable[[], dict[str, float]], **fields: Any,
) -> dict[str, Any]:
    """One table row: the methods of ``fns`` (``versus_methods``) timed round-robin, their ratios to the training
    step, whether auto factored every parameter, and ``errors()`` (``versus_exactness``)."""
    plan = fns.pop("_plan")
    times = round_robin(fns, args.rounds, args.warmup)
    b = x.shape[0]
    row: dict[str, Any] = {"model": name, "dim": dim, "batch": b, **fields}
    row.update(versus_train_step(times, ("train_step", "factored", "before"), b))
    row["all_factored"] = set(plan().values()) == {"factored"}
    row["max_rel_err_grad_norm"] = errors()
    return row


def versus_exactness(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    dim: int,
    moved: list[str],
    moved_norm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> dict[str, float]:
    """Max relative error, on 4 samples, of each route's gradient norms against the per-sample loop: today's
    ``engine="auto"`` ("factored"), and "before": ``moved_norm(x, y)``, the norms the old route computed for the
    parameters ``moved``, with the factored pass of the rest."""
    from hardmine.engine import GradientExtractor
    from hardmine.extract import reference_per_sample_grads

    xs, ys = x[:4], y[:4]
    ref = reference_per_sample_grads(model, (xs, ys), loss_fn="cross_entropy").grad_norm
    rest = [n for n, _ in model.named_parameters() if n not in moved]
    fac = GradientExtractor(model, dim=dim, seed=0, engine="auto", loss_fn="cross_entropy")((xs, ys)).grad_norm
    fr = GradientExtractor(model, layers=rest, dim=dim, seed=0, engine="factored", loss_fn="cross_entropy")((xs, ys))
    before = (moved_norm(xs, ys).square() + fr.grad_norm.square()).sqrt()

    def rel(a: torch.Tensor) -> float:
        return float(((a - ref).abs() / ref.abs().clamp_min(1e-30)).max())

    return {"factored": rel(fac), "before": rel(before)}


def versus_table(rows: list[dict[str, Any]], size: tuple[str, str], factored: str, before: str) -> str:
    """The Markdown table of a rule against the route before it; ``size`` is the header and row key of the second
    dimension of the batch (positions, tokens); ``factored`` and ``before`` name the two routes."""
    head = [
        "model",
        "dim",
        f"batch x {size[0]}",
        "train step samples/s",
        f"{factored}: samples/s (x train step)",
        f"{before}: samples/s (x train step)",
        "speed-up",
        "every parameter factored",
        "max rel. error of the gradient norms (factored / before)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        err = r["max_rel_err_grad_norm"]
        lines.append(
            f"| {r['model']} | {r['dim']} | {r['batch']} x {r[size[1]]} | {r['train_step_samples_per_s']:.0f} | "
            f"{r['factored_samples_per_s']:.0f} ({r['factored_ratio']:.2f}) | "
            f"{r['before_samples_per_s']:.3g} ({r['before_ratio']:.3g}) | {r['speedup']:.1f}x | "
            f"{'yes' if r['all_factored'] else 'no'} | {err['factored']:.1e} / {err['before']:.1e} |"
        )
    return "\n".join(lines)


def versus_main(
    doc: str, models: tuple[str, ...], dims: str, rounds: int, out: Path, run: Callable[..., dict[str, Any]],
    table: Callable[[list[dict[str, Any]]], str], before: str, dims_help: str = "projection dims per weight matrix",
) -> None:
    """The command line of a script that measures a rule against the route before it (bench_attention,
    bench_parameters): parses the arguments, runs ``run(model, dim, args)`` for every dim and model, prints the
    table and writes the JSON and Markdown (``before`` says what the "before" route is, for the note)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(models))
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dims", default=dims, help=dims_help)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny models, 2 rounds (numbers meaningless)")
    ap.add_argument("--out", type=Path, default=out)
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.warmup, args.dims = 2, 1, "16"
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in chosen if m not in models]
    if bad:
        ap.error(f"unknown model(s) {bad}; choose from {', '.join(models)}")
    dim_list = [int(d) for d in args.dims.split(",") if d.strip()]
    rows = [run(name, dim, args) for dim in dim_list for name in chosen]
    md = table(rows)
    print(md)
    settings = run_settings(torch.get_num_threads(), args.quick, rounds=args.rounds, dims=dim_list)
    bc.atomic_write(args.out, json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    load = ", ".join(f"{v:.1f}" for v in settings["load_avg_1_5_15_at_end"])
    note = (
        f"\nRun: {settings['when']}, hardmine at {settings['hardmine']}, torch {torch.__version__}, "
        f"{settings['machine']}, {settings['threads']} torch threads, float32"
        f"{' (--quick: numbers meaningless)' if args.quick else ''}; load average at the end {load}. "
        f"Throughput ratio = median over {args.rounds} rounds of t(train step) / t(method) within the round; "
        f"before = {before}, times added.\n"
    )
    bc.atomic_write(args.out.with_suffix(".md"), md + "\n" + note)


def table(rows: list[dict[str, Any]]) -> str:
    head = ["model", "group", "method", "kernel ops/step", "beyond the reference", "host ops/step", "CPU ms/step",
            "ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ref = r["method"] == REFERENCE[r["group"]]
        lines.append(
            f"| {r['model']} | {r['group']} | {r['method']} | {r['kernels_per_step']:g} | "
            f"{'-' if ref else format(r['extra_kernels'], '+g')} | {r['host_ops_per_step']:g} | "
            + ("- | - |" if r["ms_per_step"] is None else f"{r['ms_per_step']:.3f} | {r['ratio']:.2f} |")
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument(
        "--repeat",
        type=int,
        default=online_dynamics.RECORD_EVERY,
        help="steps per timed sample (default: the dynamics' RECORD_EVERY, so each sample holds one recording "
        "of the GPU path's dynamics)",
    )
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 1 step (numbers meaningless)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bench_dispatch.json")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.repeat, args.warmup = 2, 1, 4  # 4: the graphed steps capture and check a replay
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad:
        ap.error(f"unknown model(s) {bad}; choose from {list(MODELS)}")
    torch.set_num_threads(1)  # the host's own cost; threads would add hand-offs a GPU step does not pay
    online_dynamics.HOST_STATS_DEVICES = ()  # the miner's GPU path (see the docstring)
    rows = [r for name in models for group in GROUPS for r in run_group(name, group, args)]
    md = table(rows)
    print(md)
    settings = run_settings(1, args.quick, batch=args.batch, rounds=args.rounds, repeat=args.repeat)
    when = settings["when"]
    bc.atomic_write(args.out, json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    load = ", ".join(f"{v:.1f}" for v in settings["load_avg_1_5_15_at_end"])
    note = (
        f"\nRun: {when}, hardmine at {settings['hardmine']}, torch {torch.__version__}, {settings['machine']}, "
        f"1 torch thread, batch {args.batch}"
        f"{' (--quick: numbers meaningless)' if args.quick else ''}; load average at the end {load}. Kernel ops: "
        "aten ops per step that launch a kernel on a GPU (views, metadata and allocation left out); host ops: "
        "every aten op the host dispatches per step, views and detach included (bench_extract.host_ops); the "
        "training-loop rows run the online miner's GPU path on the CPU; the *_graphs rows count a CPU stand-in "
        "for the CUDA graph's replay as one launch (cudaGraphLaunch) and are timed with replays that do nothing "
        "(the host's share of a replayed step; the graph's own launch is not in it). ratio = median over "
        f"{args.rounds} rounds of t(method) / t(reference) within the round, each sample {args.repeat} steps.\n"
    )
    bc.atomic_write(args.out.with_suffix(".md"), md + "\n" + note)


if __name__ == "__main__":
    main()
