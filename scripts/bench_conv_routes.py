"""Why ``GROUPED_MIN_CHANNELS`` (hardmine/factored/conv2d.py): the two exact CPU routes of the Conv2d rule,
timed on the layer shapes the threshold separates.

For each layer configuration, a one-conv model's factored pass (batch 256, dim 256, 3x3 kernels) runs with the
grouped-convolution route forced (threshold 1) and with the unfold + batched-matmul route forced (threshold
above the layer's channels), alternating, in this process; reported: median ms per pass and the ratio
grouped / unfold (< 1: grouped is faster). Both routes give the same vectors (checked here too).

Usage: ``python scripts/bench_conv_routes.py [--repeats 7]``; writes ``scripts/results/conv_routes.{json,md}``.
Run it on an idle machine.
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


class OneConv(nn.Module):
    def __init__(self, c_in: int, size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, 32, 3, padding=1)
        self.head = nn.Linear(32 * size * size, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


def _time(ext: GradientExtractor, batch: tuple, threshold: int, repeats: int) -> tuple[float, torch.Tensor]:
    conv2d_rule.GROUPED_MIN_CHANNELS = threshold
    z = ext(batch).z  # warm-up (and the vectors)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ext(batch)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times), z


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    default = conv2d_rule.GROUPED_MIN_CHANNELS
    rows = []
    try:
        for c_in, size in CONFIGS:
            torch.manual_seed(0)
            model = OneConv(c_in, size).eval()
            batch = (torch.randn(args.batch, c_in, size, size), torch.randint(0, 10, (args.batch,)))
            ext = GradientExtractor(model, layers="conv", dim=256, engine="factored")
            grouped, z_g = _time(ext, batch, 1, args.repeats)
            unfold, z_u = _time(ext, batch, 10_000, args.repeats)
            torch.testing.assert_close(z_g, z_u, rtol=1e-4, atol=1e-5)
            rows.append({"in_channels": c_in, "size": size, "grouped_ms": grouped, "unfold_ms": unfold,
                         "ratio": grouped / unfold, "default_route": "grouped" if c_in >= default else "unfold"})
    finally:
        conv2d_rule.GROUPED_MIN_CHANNELS = default
    res = {"rows": rows, "threshold": default, "batch": args.batch, "repeats": args.repeats,
           "machine": {"python": platform.python_version(), "torch": torch.__version__,
                       "threads": torch.get_num_threads()},
           "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "conv_routes.json").write_text(json.dumps(res, indent=1) + "\n")
    md = ["| input channels | output size | grouped ms | unfold ms | grouped / unfold | route taken (threshold "
          f"{default}) |", "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['in_channels']} | {r['size']}x{r['size']} | {r['grouped_ms']:.1f} | {r['unfold_ms']:.1f} | "
                  f"{r['ratio']:.2f} | {r['default_route']} |")
    md.append("")
    md.append(f"One Conv2d(C_in, 32, 3x3) layer, batch {args.batch}, dim 256, median of {args.repeats} factored passes "
              f"per route; torch {torch.__version__}, {torch.get_num_threads()} threads; {res['created']}; "
              "`python scripts/bench_conv_routes.py`.")
    (RESULTS / "conv_routes.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
