"""Where one factored batch spends its time, beside one training step of the same model: ``torch.profiler``
tables of the ops by self CPU time and (on a GPU) by device time, for the bench models of
``bench_extract.py``. A diagnostic to read, not a benchmark: it asserts nothing and times nothing itself.

    python scripts/profile_extract.py --device cuda --out-dir prof   # mlp b2048, cnn/transformer b256, resnet18 b512
    python scripts/profile_extract.py --quick --out-dir /tmp/prof    # tiny sizes on the CPU: checks the command

Writes ``<out-dir>/prof_<model>_b<batch>_<method>.txt`` (two tables each) and ``<out-dir>/profile.json``
(per batch: CPU time, device time, kernel launches, host syncs, and the twelve ops with the most self CPU
time). ``scripts/gpu_measure.sh`` runs it on a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_extract as be  # noqa: E402

FULL = (("mlp", 2048), ("cnn", 256), ("transformer", 256), ("resnet18", 512))
QUICK = (("mlp", 16), ("transformer", 8))


def profile_step(step: Any, device: torch.device, batches: int) -> tuple[Any, dict[str, Any]]:
    """``step()`` ``batches`` times under the profiler (the caller warmed it up): the key averages and a
    per-batch summary."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(batches):
            step()
        be.sync(device)
    ka = prof.key_averages()
    counts = {e.key: e.count for e in ka}
    summary = {
        "self_cpu_ms": sum(e.self_cpu_time_total for e in ka) / batches / 1000,
        "device_ms": sum(getattr(e, "self_device_time_total", 0) for e in ka) / batches / 1000,
        "kernel_launches": sum(counts.get(k, 0) for k in be.LAUNCH_EVENTS) / batches,
        "syncs": {k: counts[k] / batches for k in be.SYNC_EVENTS if k in counts},
        "top_cpu": [
            [e.key, round(e.self_cpu_time_total / batches / 1000, 3), e.count / batches]
            for e in sorted(ka, key=lambda e: -e.self_cpu_time_total)[:12]
        ],
    }
    return ka, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--target-dim", type=int, default=4096)
    ap.add_argument("--batches", type=int, default=3, help="profiled batches per row (after --warmup)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a check of the command")
    args = ap.parse_args()
    device = be.parse_device(ap, args.device)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, batch in QUICK if args.quick else FULL:
        for method in ("train_step", "factored"):
            model, data = be.build(name, batch)
            dim, _ = be.choose_dim(model, 64 if args.quick else args.target_dim)
            model, data = model.to(device), be.to_device(data, device)
            step, _ = be.make_method(method, model, data, dim, args.target_dim)
            for _ in range(args.warmup):
                step()
            be.sync(device)
            ka, summary = profile_step(step, device, args.batches)
            tables = ka.table(sort_by="self_cpu_time_total", row_limit=30)
            if device.type == "cuda":
                tables += "\n\n" + ka.table(sort_by="self_device_time_total", row_limit=20)
            (args.out_dir / f"prof_{name}_b{batch}_{method}.txt").write_text(tables)
            rows.append({"model": name, "batch": batch, "method": method, **summary})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "top_cpu"}), flush=True)
            del model, data, step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    (args.out_dir / "profile.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
