"""Models built on ``nn.MultiheadAttention``: the factored engine with the attention rule against the route
the attention's parameters took before it (vmap), both as ratios to a training step measured in the same run.

Before ``hardmine/factored/attention.py`` existed, ``engine="auto"`` sent the attention's parameters
(``in_proj_weight``, ``in_proj_bias``, ``out_proj.*``) to the vmap engine (a per-sample forward and backward
of the whole model under ``torch.func.vmap``, materialising each sample's ``(3E, E)`` gradient and projecting it
with a dense seeded matrix, which at large ``dim`` no longer fits the projector's cache and is made again from
its seeds every batch) and the rest to the factored pass. ``before`` reproduces that plan on today's code: a vmap extractor
of the attention's parameters plus a factored extractor of the rest, on the same batch (the two passes auto
ran), their times added. ``factored`` is today's ``engine="auto"`` (every parameter factored). The vectors
differ between the two by construction (the attention's matrices are Kronecker blocks now, dense blocks
before); both are exact, and each is checked here against the per-sample loop's gradient norms.

Models (float32, eval mode, CPU):

* ``encoder``: Linear(16 -> d) + ``nn.TransformerEncoder`` (2 layers, d 128, 4 heads, feed-forward 256,
  ``batch_first``) + mean over 64 positions + Linear head; batch 32;
* ``seq2seq``: an ``nn.TransformerEncoderLayer`` over 48 source positions and an ``nn.TransformerDecoderLayer``
  (causal self-attention and cross-attention) over 16 target positions, d 128, 4 heads; batch 32.

``ratio`` = median over rounds of t(method) / t(train step) within the round (methods run round-robin); the
speed-up is ``before`` / ``factored``. Writes ``scripts/results/bench_attention.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hardmine.engine import GradientExtractor
from hardmine.extract import per_sample_grads, reference_per_sample_grads
from hardmine.factored import kron_factors
from hardmine.project import Projector

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_callbacks as bc  # noqa: E402  (atomic_write)
import bench_dispatch as bd  # noqa: E402  (code_version)

METHODS = ("train_step", "factored", "before")


class Encoder(nn.Module):
    def __init__(self, d: int, heads: int, ff: int, layers: int) -> None:
        super().__init__()
        self.inp = nn.Linear(16, d)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.inp(x)).mean(1))  # (B, 10)


class Seq2Seq(nn.Module):
    def __init__(self, d: int, heads: int, ff: int, target: int) -> None:
        super().__init__()
        self.target = target
        self.inp = nn.Linear(16, d)
        self.enc = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.dec = nn.TransformerDecoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mem = self.enc(self.inp(x))  # (B, S, d)
        tgt = self.inp(x[:, : self.target])  # (B, T, d)
        mask = nn.Transformer.generate_square_subsequent_mask(self.target, dtype=tgt.dtype)
        return self.head(self.dec(tgt, mem, tgt_mask=mask, tgt_is_causal=True).mean(1))  # (B, 10)


def build(name: str, quick: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    d, heads, ff, b = (16, 2, 32, 4) if quick else (128, 4, 256, 32)
    if name == "encoder":
        model: nn.Module = Encoder(d, heads, ff, 2)
        t = 8 if quick else 64
    else:
        model = Seq2Seq(d, heads, ff, 4 if quick else 16)
        t = 12 if quick else 48
    x = torch.randn(b, t, 16)
    y = torch.randint(0, 10, (b,))
    return model.eval(), x, y


def methods(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dim: int) -> dict[str, Callable[[], Any]]:
    attn = [n for n, _ in model.named_parameters() if "self_attn." in n or "multihead_attn." in n]
    rest = [n for n, _ in model.named_parameters() if n not in attn]
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    # The optimiser's learning rate is tiny, but the weights still move: every method sees the same model.
    factored = GradientExtractor(model, dim=dim, seed=0, engine="auto", loss_fn="cross_entropy")
    rest_part = GradientExtractor(model, layers=rest, dim=dim, seed=0, engine="factored", loss_fn="cross_entropy")
    old_vmap = old_vmap_part(model, attn, dim)
    return {
        "train_step": train_step,
        "factored": lambda: factored((x, y)),
        "before": lambda: (old_vmap(x, y), rest_part((x, y))),
        "_plan": lambda: factored.metadata()["plan"],
    }


def old_vmap_part(model: nn.Module, attn: list[str], dim: int) -> Callable[..., torch.Tensor]:
    """The vmap part of the plan before the attention rule: exact per-sample gradients of ``attn``, each projected
    with the old layout's dense seeded blocks. Returns ``(B,)`` gradient norms (the projections are computed and
    dropped, as their cost is what is measured)."""
    a, _ = kron_factors(dim)
    projectors = {w: Projector(w, seed=0) for w in {a, dim}}  # one per width, as ProjectionLayout holds them
    shapes = dict(model.named_parameters())

    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g = per_sample_grads(model, (x, y), "cross_entropy", params=attn).grads
        b = x.shape[0]
        sq = torch.zeros(b)
        for name in attn:
            flat = g[name].reshape(b, -1)  # (B, numel)
            projectors[dim if shapes[name].ndim >= 2 else a].project(flat, key=name)  # (B, width)
            sq += flat.square().sum(1)
        return sq.sqrt()

    return run


def exactness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dim: int) -> dict[str, float]:
    """Max relative error of each route's gradient norms against the per-sample loop, on 4 samples."""
    xs, ys = x[:4], y[:4]
    ref = reference_per_sample_grads(model, (xs, ys), loss_fn="cross_entropy").grad_norm
    attn = [n for n, _ in model.named_parameters() if "self_attn." in n or "multihead_attn." in n]
    rest = [n for n, _ in model.named_parameters() if n not in attn]
    fac = GradientExtractor(model, dim=dim, seed=0, engine="auto", loss_fn="cross_entropy")((xs, ys)).grad_norm
    va = old_vmap_part(model, attn, dim)(xs, ys)
    fr = GradientExtractor(model, layers=rest, dim=dim, seed=0, engine="factored", loss_fn="cross_entropy")((xs, ys))
    before = (va.square() + fr.grad_norm.square()).sqrt()

    def rel(a: torch.Tensor) -> float:
        return float(((a - ref).abs() / ref.abs().clamp_min(1e-30)).max())

    return {"factored": rel(fac), "before": rel(before)}


def run(name: str, dim: int, args: argparse.Namespace) -> dict[str, Any]:
    model, x, y = build(name, args.quick)
    fns = methods(model, x, y, dim)
    plan = fns.pop("_plan")
    for _ in range(args.warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {m: [] for m in fns}
    for _ in range(args.rounds):
        for m, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[m].append(time.perf_counter() - t)
    ref = times["train_step"]
    b = x.shape[0]
    row: dict[str, Any] = {"model": name, "dim": dim, "batch": b, "positions": x.shape[1]}
    for m in METHODS:
        row[f"{m}_samples_per_s"] = b / statistics.median(times[m])
        row[f"{m}_ratio"] = statistics.median(r / t for t, r in zip(times[m], ref))  # throughput ratio
    row["speedup"] = statistics.median(t_b / t_f for t_b, t_f in zip(times["before"], times["factored"]))
    row["all_factored"] = set(plan().values()) == {"factored"}
    row["max_rel_err_grad_norm"] = exactness(model, x, y, dim)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = [
        "model",
        "dim",
        "batch x positions",
        "train step samples/s",
        "factored (attention rule): samples/s (x train step)",
        "before (attention by vmap): samples/s (x train step)",
        "speed-up",
        "max rel. error of the gradient norms (factored / before)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        err = r["max_rel_err_grad_norm"]
        lines.append(
            f"| {r['model']} | {r['dim']} | {r['batch']} x {r['positions']} | {r['train_step_samples_per_s']:.0f} | "
            f"{r['factored_samples_per_s']:.0f} ({r['factored_ratio']:.2f}) | "
            f"{r['before_samples_per_s']:.1f} ({r['before_ratio']:.3f}) | {r['speedup']:.1f}x | "
            f"{err['factored']:.1e} / {err['before']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="encoder,seq2seq")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--dims",
        default="256,4096",
        help="projection dims per weight matrix (the default, and one whose dense matrices for the attention "
        "no longer fit the projector's cache)",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny models, 2 rounds (numbers meaningless)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bench_attention.json")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.warmup, args.dims = 2, 1, "16"
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in ("encoder", "seq2seq")]
    if bad:
        ap.error(f"unknown model(s) {bad}; choose from encoder, seq2seq")
    dims = [int(d) for d in args.dims.split(",") if d.strip()]
    rows = [run(name, dim, args) for dim in dims for name in models]
    md = table(rows)
    print(md)
    settings = bd.run_settings(torch.get_num_threads(), args.quick, rounds=args.rounds, dims=dims)
    when = settings["when"]
    bc.atomic_write(args.out, json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    load = ", ".join(f"{v:.1f}" for v in settings["load_avg_1_5_15_at_end"])
    note = (
        f"\nRun: {when}, hardmine at {settings['hardmine']}, torch {torch.__version__}, {settings['machine']}, "
        f"{settings['threads']} torch threads, float32"
        f"{' (--quick: numbers meaningless)' if args.quick else ''}; load average at the end {load}. "
        "Throughput ratio = median over "
        f"{args.rounds} rounds of t(train step) / t(method) within the round; before = the vmap pass of the "
        "attention's parameters plus the factored pass of the rest (the plan engine='auto' made before the "
        "attention rule), times added.\n"
    )
    bc.atomic_write(args.out.with_suffix(".md"), md + "\n" + note)


if __name__ == "__main__":
    main()
