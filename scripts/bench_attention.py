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
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hardmine.extract import per_sample_grads
from hardmine.factored import kron_factors
from hardmine.project import Projector

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_dispatch as bd  # noqa: E402  (the shared measuring and writing)


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
    old_vmap = old_vmap_part(model, attn, dim)
    return bd.versus_methods(model, x, y, dim, attn, lambda: old_vmap(x, y))


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
    attn = [n for n, _ in model.named_parameters() if "self_attn." in n or "multihead_attn." in n]
    return bd.versus_exactness(model, x, y, dim, attn, old_vmap_part(model, attn, dim))


def run(name: str, dim: int, args: argparse.Namespace) -> dict[str, Any]:
    model, x, y = build(name, args.quick)
    fns = methods(model, x, y, dim)
    return bd.versus_row(name, dim, args, x, fns, lambda: exactness(model, x, y, dim), positions=x.shape[1])


def table(rows: list[dict[str, Any]]) -> str:
    return bd.versus_table(rows, ("positions", "positions"), "factored (attention rule)", "before (attention by vmap)")


def main() -> None:
    bd.versus_main(
        __doc__,
        ("encoder", "seq2seq"),
        "256,4096",
        5,
        HERE / "results" / "bench_attention.json",
        run,
        table,
        "the vmap pass of the attention's parameters plus the factored pass of the rest (the plan engine='auto' "
        "made before the attention rule)",
        dims_help="projection dims per weight matrix (the default, and one whose dense matrices for the attention "
        "no longer fit the projector's cache)",
    )


if __name__ == "__main__":
    main()
