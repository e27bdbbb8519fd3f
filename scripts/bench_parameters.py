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
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hardmine.engine import GradientExtractor

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_dispatch as bd  # noqa: E402  (the shared measuring and writing)

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
    vmap_part = GradientExtractor(model, layers=params, dim=dim, seed=0, engine="vmap", loss_fn="cross_entropy")
    return bd.versus_methods(model, x, y, dim, params, lambda: vmap_part((x, y)))


def exactness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dim: int) -> dict[str, float]:
    """Max relative error of each route's gradient norms against the per-sample loop, on 4 samples."""
    params = bare(model)

    def vmap_norm(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        ext = GradientExtractor(model, layers=params, dim=dim, seed=0, engine="vmap", loss_fn="cross_entropy")
        return ext((xs, ys)).grad_norm

    return bd.versus_exactness(model, x, y, dim, params, vmap_norm)


def run(name: str, dim: int, args: argparse.Namespace) -> dict[str, Any]:
    model, x, y = build(name, args.quick)
    fns = methods(model, x, y, dim)
    return bd.versus_row(name, dim, args, x, fns, lambda: exactness(model, x, y, dim), tokens=model_tokens(model))


def model_tokens(model: nn.Module) -> int:
    return int(next(p for n, p in model.named_parameters() if n.endswith(("pos", "position_embeddings"))).shape[1])


def table(rows: list[dict[str, Any]]) -> str:
    return bd.versus_table(rows, ("tokens", "tokens"), "factored (parameter rule)", "before (class token, position embedding by vmap)")


def main() -> None:
    bd.versus_main(
        __doc__,
        MODELS,
        "256",
        7,
        HERE / "results" / "bench_parameters.json",
        run,
        table,
        "the vmap pass of the class token and position embedding plus the factored pass of the rest (the plan "
        "engine='auto' made before the parameter rule)",
    )


if __name__ == "__main__":
    main()
