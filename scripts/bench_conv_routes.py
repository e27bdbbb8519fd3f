"""Why ``GROUPED_MIN_CHANNELS`` (hardmine/factored/conv2d.py): the two exact CPU routes of the Conv2d rule,
timed on the layer shapes the threshold separates.

For each layer configuration, a one-conv model's factored pass (batch 256, dim 256, 3x3 kernels) runs with the
grouped-convolution route forced (threshold 1) and with the unfold + batched-matmul route forced (threshold
above the layer's channels), alternating, in this process; reported: median ms per pass and the ratio
grouped / unfold (< 1: grouped is faster). Both routes give the same vectors (checked here too).

Usage: ``python scripts/bench_conv_routes.py [--repeats 7]``; writes ``scripts/results/conv_routes.{json,md}``.
Run it on an idle machine.

On a GPU (``--device cuda``; ``--out`` then defaults to ``conv_routes_cuda.json``), where the rule takes the unfold
route only (``GROUPED_DEVICES``), both routes are forced the same way, with ResNet-like layers too (64 to 512
channels), batch 512 unless ``--batch`` says otherwise, every pass timed to ``torch.cuda.synchronize()``: the
measurement that decides whether a GPU should take the grouped route (float32 cuDNN convolutions, fewer
multiply-adds at large projections, no unfolded patches in memory).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

import hardmine.factored.conv2d as conv2d_rule
from hardmine.engine import GradientExtractor

RESULTS = Path(__file__).resolve().parent / "results"
# (input channels, spatial size): many channels on a small map vs few channels on a large one.
CONFIGS = ((32, 16), (16, 16), (8, 32), (3, 32))
# On a GPU also the shapes of ResNet-18's stages on 32x32 images (the issue's measurement).
CUDA_CONFIGS = ((64, 32), (128, 16), (256, 8), (512, 4), *CONFIGS)


class OneConv(nn.Module):
    def __init__(self, c_in: int, size: int) -> None:
        super().__init__()
        self.c_out = c_out = min(c_in, 512) if c_in >= 64 else 32  # ResNet's stages keep their width
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.head = nn.Linear(c_out * size * size, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(
    ext: GradientExtractor, batch: tuple, threshold: int, repeats: int, device: torch.device
) -> tuple[float, torch.Tensor]:
    conv2d_rule.GROUPED_MIN_CHANNELS = threshold
    z = ext(batch).z  # warm-up (and the vectors)
    ext(batch)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ext(batch)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times), z


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, help="default: 256 on the CPU, 512 on a GPU")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, help="JSON path (Markdown beside it); default scripts/results/conv_routes*.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.batch = args.batch or (512 if gpu else 256)
    out = args.out or RESULTS / ("conv_routes.json" if not gpu else f"conv_routes_{device.type}.json")
    default, devices = conv2d_rule.GROUPED_MIN_CHANNELS, conv2d_rule.GROUPED_DEVICES
    conv2d_rule.GROUPED_DEVICES = frozenset({device.type})  # both routes allowed here; forced by the threshold
    rows = []
    try:
        for c_in, size in CUDA_CONFIGS if gpu else CONFIGS:
            torch.manual_seed(0)
            model = OneConv(c_in, size).eval().to(device)
            batch = (torch.randn(args.batch, c_in, size, size, device=device),
                     torch.randint(0, 10, (args.batch,), device=device))
            ext = GradientExtractor(model, layers="conv", dim=256, engine="factored")
            grouped, z_g = _time(ext, batch, 1, args.repeats, device)
            unfold, z_u = _time(ext, batch, 10_000, args.repeats, device)
            torch.testing.assert_close(z_g, z_u, rtol=1e-4, atol=1e-5)
            taken = "grouped" if c_in >= default and device.type in devices else "unfold"
            rows.append({"in_channels": c_in, "out_channels": model.c_out, "size": size, "grouped_ms": grouped,
                         "unfold_ms": unfold, "ratio": grouped / unfold, "default_route": taken})
            del model, ext, batch
    finally:
        conv2d_rule.GROUPED_MIN_CHANNELS, conv2d_rule.GROUPED_DEVICES = default, devices
    name = torch.cuda.get_device_name(device) if gpu else "cpu"
    res = {"rows": rows, "threshold": default, "batch": args.batch, "repeats": args.repeats, "device": name,
           "machine": {"python": platform.python_version(), "torch": torch.__version__,
                       "threads": torch.get_num_threads()},
           "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    md = ["| input channels | output size | grouped ms | unfold ms | grouped / unfold | route taken (threshold "
          f"{default}) |", "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['in_channels']} | {r['size']}x{r['size']} | {r['grouped_ms']:.1f} | {r['unfold_ms']:.1f} | "
                  f"{r['ratio']:.2f} | {r['default_route']} |")
    md.append("")
    layer = "Conv2d(C_in, 32, 3x3)" if not gpu else "Conv2d(C_in, C_out, 3x3) (C_out = C_in from 64 channels, else 32)"
    md.append(f"One {layer} layer, batch {args.batch}, dim 256, median of {args.repeats} factored passes "
              f"per route on {name}; torch {torch.__version__}, {torch.get_num_threads()} threads; {res['created']}; "
              f"`python scripts/bench_conv_routes.py{' --device ' + args.device if gpu else ''}`.")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
