"""Parameters a model uses without a module (a ViT's class token and position embedding): the factored engine,
which now swaps them for per-sample copies (``hardmine/factored/parameter.py``), against the route they took
before (the vmap engine), both as ratios to a training step measured in the same run.

Before the parameter rule, ``engine="auto"`` sent such parameters to the vmap engine: a per-sample forward and
backward of the whole model under ``torch.func.vmap``, for a few thousand numbers per sample. ``before``
reproduces that plan on today's code: a vmap extractor of those parameters plus a factored extractor of the
rest, on the same batch (the two passes auto ran), their times added. ``factored`` is today's
``engine="auto"`` (every parameter factored). Both project those parameters with the same dense blocks, so the
vectors agree to float rounding; each route's gradient norms are checked against the per-sample loop.

Models (float32, eval mode, CPU), both with a class token ``(1, 1, d)`` and a position embedding
``(1, 65, d)`` over 8 x 8 patches of a 32 x 32 image plus the class token, batch 32:

* ``hf_vit``: ``transformers``' ``ViTForImageClassification`` (d 128, 4 layers, 4 heads, MLP 256);
* ``torch_vit``: a patch ``Conv2d`` + ``nn.TransformerEncoder`` (d 128, 4 layers, 4 heads, feed-forward 256,
  ``batch_first``) + a head on the class token.

``ratio`` = median over rounds of t(train step) / t(method) within the round (methods run round-robin); the
speed-up is ``before`` / ``factored``. Writes ``scripts/results/bench_parameters.json`` and ``.md``.
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
from hardmine.extract import reference_per_sample_grads

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_callbacks as bc  # noqa: E402  (atomic_write)
import bench_dispatch as bd  # noqa: E402  (run_settings)

METHODS = ("train_step", "factored", "before")
MODELS = ("hf_vit", "torch_vit")


class TorchViT(nn.Module):
    def __init__(self, d: int, layers: int, heads: int, ff: int, image: int, patch: int) -> None:
        super().__init__()
        n = (image // patch) ** 2
        self.patch = nn.Conv2d(3, d, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, n + 1, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2)  # (B, n, d)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1) + self.pos  # (B, n + 1, d)
        return self.head(self.enc(h)[:, 0])  # (B, 10)


class HFLogits(nn.Module):
    def __init__(self, d: int, layers: int, heads: int, ff: int, image: int, patch: int) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTForImageClassification

        cfg = ViTConfig(
            image_size=image, patch_size=patch, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=ff, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        self.vit = ViTForImageClassification(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values=x).logits  # (B, 10)


def build(name: str, quick: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    d, layers, heads, ff, image, patch, b = (16, 1, 2, 32, 8, 4, 4) if quick else (128, 4, 4, 256, 32, 4, 32)
    cls = HFLogits if name == "hf_vit" else TorchViT
    model = cls(d, layers, heads, ff, image, patch).eval()
    return model, torch.randn(b, 3, image, image), torch.randint(0, 10, (b,))


def bare(model: nn.Module) -> list[str]:
    """The parameters used without a module: the class token and the position embedding."""
    return [n for n, p in model.named_parameters() if n.endswith(("cls", "pos", "cls_token", "position_embeddings"))]


def methods(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dim: int) -> dict[str, Callable[[], Any]]:
    params = bare(model)
    rest = [n for n, _ in model.named_parameters() if n not in params]
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    # The optimiser's learning rate is tiny, but the weights still move: every method sees the same model.
    factored = GradientExtractor(model, dim=dim, seed=0, engine="auto", loss_fn="cross_entropy")
    vmap_part = GradientExtractor(model, layers=params, dim=dim, seed=0, engine="vmap", loss_fn="cross_entropy")
    rest_part = GradientExtractor(model, layers=rest, dim=dim, seed=0, engine="factored", loss_fn="cross_entropy")
    return {
        "train_step": train_step,
        "factored": lambda: factored((x, y)),
        "before": lambda: (vmap_part((x, y)), rest_part((x, y))),
        "_plan": lambda: factored.metadata()["plan"],
    }


def exactness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dim: int) -> dict[str, float]:
    """Max relative error of each route's gradient norms against the per-sample loop, on 4 samples."""
    xs, ys = x[:4], y[:4]
    ref = reference_per_sample_grads(model, (xs, ys), loss_fn="cross_entropy").grad_norm
    params = bare(model)
    rest = [n for n, _ in model.named_parameters() if n not in params]
    fac = GradientExtractor(model, dim=dim, seed=0, engine="auto", loss_fn="cross_entropy")((xs, ys)).grad_norm
    vm = GradientExtractor(model, layers=params, dim=dim, seed=0, engine="vmap", loss_fn="cross_entropy")((xs, ys))
    fr = GradientExtractor(model, layers=rest, dim=dim, seed=0, engine="factored", loss_fn="cross_entropy")((xs, ys))
    before = (vm.grad_norm.square() + fr.grad_norm.square()).sqrt()

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
    row: dict[str, Any] = {"model": name, "dim": dim, "batch": b, "tokens": model_tokens(model)}
    for m in METHODS:
        row[f"{m}_samples_per_s"] = b / statistics.median(times[m])
        row[f"{m}_ratio"] = statistics.median(r / t for t, r in zip(times[m], ref))  # throughput ratio
    row["speedup"] = statistics.median(t_b / t_f for t_b, t_f in zip(times["before"], times["factored"]))
    row["all_factored"] = set(plan().values()) == {"factored"}
    row["max_rel_err_grad_norm"] = exactness(model, x, y, dim)
    return row


def model_tokens(model: nn.Module) -> int:
    return int(next(p for n, p in model.named_parameters() if n.endswith(("pos", "position_embeddings"))).shape[1])


def table(rows: list[dict[str, Any]]) -> str:
    head = [
        "model",
        "dim",
        "batch x tokens",
        "train step samples/s",
        "factored (parameter rule): samples/s (x train step)",
        "before (class token, position embedding by vmap): samples/s (x train step)",
        "speed-up",
        "every parameter factored",
        "max rel. error of the gradient norms (factored / before)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        err = r["max_rel_err_grad_norm"]
        lines.append(
            f"| {r['model']} | {r['dim']} | {r['batch']} x {r['tokens']} | {r['train_step_samples_per_s']:.0f} | "
            f"{r['factored_samples_per_s']:.0f} ({r['factored_ratio']:.2f}) | "
            f"{r['before_samples_per_s']:.0f} ({r['before_ratio']:.2f}) | {r['speedup']:.1f}x | "
            f"{'yes' if r['all_factored'] else 'no'} | {err['factored']:.1e} / {err['before']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dims", default="256", help="projection dims per weight matrix")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny models, 2 rounds (numbers meaningless)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bench_parameters.json")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.warmup, args.dims = 2, 1, "16"
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad:
        ap.error(f"unknown model(s) {bad}; choose from {', '.join(MODELS)}")
    dims = [int(d) for d in args.dims.split(",") if d.strip()]
    rows = [run(name, dim, args) for dim in dims for name in models]
    md = table(rows)
    print(md)
    settings = bd.run_settings(torch.get_num_threads(), args.quick, rounds=args.rounds, dims=dims)
    bc.atomic_write(args.out, json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    load = ", ".join(f"{v:.1f}" for v in settings["load_avg_1_5_15_at_end"])
    note = (
        f"\nRun: {settings['when']}, hardmine at {settings['hardmine']}, torch {torch.__version__}, "
        f"{settings['machine']}, {settings['threads']} torch threads, float32"
        f"{' (--quick: numbers meaningless)' if args.quick else ''}; load average at the end {load}. "
        f"Throughput ratio = median over {args.rounds} rounds of t(train step) / t(method) within the round; "
        "before = the vmap pass of the class token and position embedding plus the factored pass of the rest "
        "(the plan engine='auto' made before the parameter rule), times added.\n"
    )
    bc.atomic_write(args.out.with_suffix(".md"), md + "\n" + note)


if __name__ == "__main__":
    main()
