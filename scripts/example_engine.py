"""A short real run of hardmine's foundation on Fashion-MNIST (the packaged demo data).

Trains a small MLP for a few seconds, then takes exact per-sample gradients of its classifier layer with the
vmap engine, projects them to 256 dims with the seeded projector, and prints the samples whose gradients are
largest and least aligned with their class. Writes the projections to demo_out/.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import hardmine
from hardmine.datasets import FASHION_MNIST_CLASSES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--train", type=int, default=20000, help="training images used to fit the demo MLP")
    ap.add_argument("--scan", type=int, default=4096, help="images whose gradients are extracted")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    images, labels = hardmine.load_fashion_mnist("train")
    x = torch.from_numpy(images[: args.train].reshape(-1, 784).copy()).float().div_(255)  # (N, 784)
    y = torch.from_numpy(labels[: args.train])
    model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    t0 = time.perf_counter()
    for _epoch in range(2):
        for idx in torch.randperm(len(x)).split(256):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    print(f"trained MLP on {len(x)} images in {time.perf_counter() - t0:.1f}s (last batch loss {loss.item():.3f})")

    # Scan the held-out tail of the training set.
    xs = torch.from_numpy(images[-args.scan :].reshape(-1, 784).copy()).float().div_(255)
    ys = torch.from_numpy(labels[-args.scan :])
    proj = hardmine.Projector(dim=args.dim, seed=args.seed)
    zs, norms, losses, preds = [], [], [], []
    t0 = time.perf_counter()
    for lo in range(0, len(xs), 512):
        psg = hardmine.per_sample_grads(model, (xs[lo : lo + 512], ys[lo : lo + 512]), params="2")  # classifier
        zs.append(proj.project_grads(psg.grads))  # (B, dim * 2): weight and bias blocks
        norms.append(psg.grad_norm)
        losses.append(psg.loss)
        preds.append(psg.output.argmax(1))
    z, norm, loss, pred = torch.cat(zs), torch.cat(norms), torch.cat(losses), torch.cat(preds)
    dt = time.perf_counter() - t0
    print(f"per-sample gradients of layer '2' for {len(xs)} images + projection to {z.shape[1]} dims: {dt:.1f}s")

    # How far each projected gradient points from its class's mean unit direction (higher = harder).
    unit = nn.functional.normalize(z, dim=1)
    div = torch.empty(len(z))
    for c in range(10):
        m = ys == c
        mean_dir = nn.functional.normalize(unit[m].mean(0), dim=0)
        div[m] = 1 - unit[m] @ mean_dir
    exact_sq = norm.pow(2)
    rel = ((z.pow(2).sum(1) - exact_sq).abs() / exact_sq.clamp_min(1e-12)).median().item()
    print(f"median relative error of projected squared norm vs exact: {rel:.3f} (JL, dim {z.shape[1]})")
    acc = (pred == ys).float().mean().item()
    print(f"accuracy on scanned images: {acc:.3f}\n")
    print("hardest 10 by per-class gradient divergence:")
    print(f"{'row':>6} {'label':>12} {'pred':>12} {'loss':>7} {'grad_norm':>9} {'diverg.':>7}")
    n_train = len(images) - args.scan
    for i in torch.argsort(div, descending=True)[:10].tolist():
        print(
            f"{n_train + i:>6} {FASHION_MNIST_CLASSES[ys[i]]:>12} {FASHION_MNIST_CLASSES[pred[i]]:>12} "
            f"{loss[i].item():7.3f} {norm[i].item():9.3f} {div[i].item():7.3f}"
        )
    r = np.corrcoef(div.numpy(), loss.numpy())[0, 1]
    print(f"\ncorrelation(divergence, loss) = {r:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "projected_grads.npy", z.numpy())
    print(f"wrote {args.out / 'projected_grads.npy'} {tuple(z.shape)}")


if __name__ == "__main__":
    main()
