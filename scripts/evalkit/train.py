"""A small, fast, seeded MLP trainer driven by an explicit stream of sample indices.

Every policy (ERM, class-balanced, JTT, hardmine's manifest, ...) is reduced to *which indices it draws*;
the trainer then takes exactly ``len(indices) // batch`` Adam steps. Equal training budget therefore means
equal-length index streams: the same number of gradient steps and of samples seen.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hardmine.zoo import FashionMLP

__all__ = ["TrainConfig", "TabularMLP", "make_mlp", "train_mlp", "predict_proba", "weighted_indices", "focal_loss"]


class TrainConfig:
    """Recipe shared by every training run of one benchmark (so only the sampling policy differs)."""

    def __init__(self, hidden: int = 256, lr: float = 1e-3, batch: int = 128, epochs: float = 6.0) -> None:
        self.hidden = hidden
        self.lr = lr
        self.batch = batch
        self.epochs = epochs

    def steps(self, n: int) -> int:
        """Number of steps for ``epochs`` passes over ``n`` samples (at least 1)."""
        return max(1, int(round(self.epochs * n / self.batch)))

    def as_dict(self) -> dict[str, float]:
        return {"hidden": self.hidden, "lr": self.lr, "batch": self.batch, "epochs": self.epochs}


class TabularMLP(nn.Module):
    """The same architecture as ``FashionMLP`` (``fc1`` -> ReLU -> ``classifier``) for ``in_features`` inputs."""

    def __init__(self, in_features: int, hidden: int = 256, n_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.act = nn.ReLU()
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.act(self.fc1(x.reshape(x.shape[0], -1))))  # (B, in) -> (B, C)


def make_mlp(n_classes: int, hidden: int, seed: int, in_features: int = 784) -> nn.Module:
    """hardmine's demo model (``hardmine.zoo.FashionMLP``: 784-hidden-C, ReLU; ``TabularMLP`` of the same
    shape for other input widths) with initial weights fixed by ``seed`` (drawn from an explicit generator,
    not the global RNG)."""
    g = torch.Generator().manual_seed(seed)
    model = (
        FashionMLP(hidden=hidden, n_classes=n_classes)
        if in_features == 784
        else TabularMLP(in_features, hidden=hidden, n_classes=n_classes)
    )
    with torch.no_grad():
        for layer in (model.fc1, model.classifier):
            # PyTorch's default Linear init (kaiming-uniform, a=sqrt(5): U(+-1/sqrt(fan_in))), drawn from g.
            bound = 1.0 / float(layer.in_features) ** 0.5
            layer.weight.uniform_(-bound, bound, generator=g)
            layer.bias.uniform_(-bound, bound, generator=g)
    return model


def focal_loss(logits: torch.Tensor, y: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Mean focal loss (Lin et al. 2017): ``-(1 - p_y)^gamma log p_y``."""
    logp = torch.log_softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)  # (B,)
    return (-(1.0 - logp.exp()).pow(gamma) * logp).mean()


def train_mlp(
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    indices: torch.Tensor,
    cfg: TrainConfig,
    seed: int,
    loss: str = "ce",
) -> nn.Module:
    """Train a fresh MLP (init from ``seed``) on ``x[indices]`` in order, ``cfg.batch`` at a time."""
    model = make_mlp(n_classes, cfg.hidden, seed, in_features=x.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    n_steps = len(indices) // cfg.batch
    idx = indices[: n_steps * cfg.batch].reshape(n_steps, cfg.batch)  # (steps, B)
    model.train()
    for step in range(n_steps):
        b = idx[step]
        logits = model(x[b])
        lval = focal_loss(logits, y[b]) if loss == "focal" else nn.functional.cross_entropy(logits, y[b])
        opt.zero_grad(set_to_none=True)
        lval.backward()
        opt.step()
    model.eval()
    return model


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    """Softmax probabilities ``(N, C)``."""
    return torch.cat([torch.softmax(model(x[i : i + batch]), dim=1) for i in range(0, len(x), batch)])


def weighted_indices(weights: np.ndarray | torch.Tensor, n_draws: int, seed: int) -> torch.Tensor:
    """``n_draws`` indices drawn with replacement, P(i) proportional to ``weights[i]``, from an explicit
    generator seeded with ``seed``."""
    w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
    if w.ndim != 1 or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"sampling weights must be finite, non-negative and not all zero; got {w[:5]}...")
    g = torch.Generator().manual_seed(seed)
    # torch.multinomial caps a single call at 2**24 categories; N here is far below that.
    return torch.multinomial(w, n_draws, replacement=True, generator=g)
