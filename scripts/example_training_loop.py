"""Inside your training loop: per-sample weights and an online hard-example manifest on Fashion-MNIST.

A plain PyTorch loop trains ``hardmine.zoo.FashionMLP`` with ``hardmine.OnlineMiner``: each step runs the
model once, returns per-sample losses and GradTail-style weights (samples whose gradient disagrees with
their class's mean direction count more), and records training dynamics per sample id (confidence and
variability, forgetting events, area under the margin). After every epoch the manifest re-weights the
sampler, so the next epoch draws the hard samples more often. To show what the miner finds, ``--noise``
of the training labels are flipped on purpose (planted); at the end the script reports how many of them
the manifest's ``is_hard`` set holds.

    python scripts/example_training_loop.py                  # 60k images, 3 epochs, ~2 CPU-minutes
    python scripts/example_training_loop.py --quick          # 2k images, 2 epochs: a smoke run

Writes ``--out`` (default ``demo_out/online_manifest.parquet``), a hardmine manifest that
``hardmine.read_manifest`` / ``hardmine.ManifestSampler`` / ``hardmine show`` read like an offline scan's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

import hardmine
from hardmine.manifest import read_manifest
from hardmine.online import MinerSampler, OnlineMiner
from hardmine.zoo import FashionMLP


def load(split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = hardmine.load_fashion_mnist(split)  # uint8 (N, 28, 28), int64 (N,)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)  # (N, 784)
    return (x - 0.2860) / 0.3530, torch.from_numpy(labels.astype(np.int64))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None, help="use the first N training images")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--noise", type=float, default=0.03, help="fraction of training labels flipped (planted)")
    ap.add_argument("--out", type=Path, default=Path("demo_out/online_manifest.parquet"))
    ap.add_argument("--quick", action="store_true", help="2000 images, 2 epochs (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.limit, args.epochs = 2000, 2
    torch.manual_seed(0)

    x, y_true = load("train", args.limit)
    x_test, y_test = load("test", 1000 if args.quick else None)
    rng = np.random.default_rng(0)
    flipped = rng.random(len(y_true)) < args.noise
    y = y_true.clone()
    y[flipped] = torch.from_numpy((y_true.numpy()[flipped] + rng.integers(1, 10, flipped.sum())) % 10)
    ids = torch.arange(len(y))  # the sample id of each training image: its index
    train_set = TensorDataset(x, y, ids)

    model = FashionMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # Last-layer weighting: the analytic path, no extra backward (see hardmine.online for the cost).
    miner = OnlineMiner(model, layers="classifier", num_classes=10, dim=256, seed=0)
    sampler = MinerSampler(len(train_set), seed=0)  # uniform until the first manifest
    loader = DataLoader(train_set, batch_size=256, sampler=sampler)

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        model.train()
        for xb, yb, idb in loader:
            stats = miner.observe(xb, yb, idb)  # the step's only forward
            loss = (stats.loss * stats.weights).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        manifest = miner.manifest()  # one row per sample id seen so far
        sampler.refresh(manifest)  # the next epoch oversamples what is hard now
        model.eval()
        with torch.no_grad():
            acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        w = manifest.set_index("sample_id")["last_weight"]
        print(
            f"epoch {epoch}: test accuracy {acc:.3f}, mean last weight flipped {w[flipped].mean():.2f} vs "
            f"clean {w[~flipped].mean():.2f}, steps {miner.step}"
        )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    miner.write_manifest(args.out)
    df = read_manifest(args.out)
    hard = df["is_hard"].to_numpy(dtype=bool)
    is_flipped = flipped[df["sample_id"].to_numpy()]
    print(f"\nwrote {args.out}: {len(df)} samples, {hard.sum()} marked is_hard")
    print(
        f"planted flips: {is_flipped.sum()}; {is_flipped[hard].sum()} of them are in is_hard (recall "
        f"{is_flipped[hard].sum() / max(1, is_flipped.sum()):.2f}, precision {is_flipped[hard].mean():.2f})"
    )
    cols = [
        "sample_id",
        "label",
        "pred",
        "loss",
        "aum",
        "forgetting_events",
        "class_divergence",
        "hardness",
        "rank",
    ]
    print("\nhardest 10:")
    print(df.nsmallest(10, "rank")[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    miner.close()


if __name__ == "__main__":
    main()
