"""Small reference architectures used by the demo and examples (``--model hardmine.zoo:fashion_mlp``)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FashionMLP", "fashion_mlp"]


class FashionMLP(nn.Module):
    """MLP for 28x28 grey images: accepts (B, 784), (B, 28, 28) or (B, 1, 28, 28)."""

    def __init__(self, hidden: int = 256, n_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, hidden)
        self.act = nn.ReLU()
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x.reshape(x.shape[0], -1)))  # (B, 784) -> (B, hidden)
        return self.classifier(h)


def fashion_mlp() -> FashionMLP:
    """Factory for the CLI: ``--model hardmine.zoo:fashion_mlp``."""
    return FashionMLP()
