"""Train the demo MLP on Fashion-MNIST (a few seconds on 2 cores) and save its state dict."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import hardmine
from hardmine.zoo import fashion_mlp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("demo_out/fashion_mlp.pt"))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    images, labels = hardmine.load_fashion_mnist("train")
    x = torch.from_numpy(images.reshape(-1, 784).astype(np.float32) / 255.0)  # (N, 784)
    y = torch.from_numpy(labels)
    model = fashion_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        for idx in torch.randperm(len(x), generator=g).split(128):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    tx, ty = hardmine.load_fashion_mnist("test")
    with torch.no_grad():
        acc = (model(torch.from_numpy(tx.reshape(-1, 784).astype(np.float32) / 255.0)).argmax(1).numpy() == ty).mean()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(args.out)
    print(f"trained demo MLP in {time.perf_counter() - t0:.1f}s, test accuracy {acc:.3f}; saved {args.out}")


if __name__ == "__main__":
    main()
