"""Small models shared by the tests (several shapes of network a user might bring)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 12, hidden: int = 16, n_classes: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CNN(nn.Module):
    def __init__(self, channels: int = 3, n_classes: int = 5, size: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, stride=1)
        self.fc = nn.Linear(6 * (size // 4) ** 2, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc(x.flatten(1))


class TinyTransformer(nn.Module):
    """Embedding + LayerNorm + a transformer encoder layer; forward(input_ids, attention_mask)."""

    def __init__(self, vocab: int = 20, d: int = 8, n_classes: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.encoder = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=16, dropout=dropout, batch_first=True)
        self.classifier = nn.Linear(d, n_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(self.embed(input_ids))  # (B, T, d)
        pad = None if attention_mask is None else attention_mask == 0
        h = self.encoder(h, src_key_padding_mask=pad)
        if attention_mask is None:
            pooled = h.mean(dim=1)
        else:
            m = attention_mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, d)
        return self.classifier(pooled)


class BNNet(nn.Module):
    def __init__(self, d_in: int = 6, n_classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, 10)
        self.bn = nn.BatchNorm1d(10)
        self.fc2 = nn.Linear(10, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


class TwoInput(nn.Module):
    """forward(a, b): several positional inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(3, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.a(a) + self.b(b)))


def warm_bn(model: BNNet, d_in: int = 6) -> BNNet:
    """Give BatchNorm non-trivial running statistics, then switch to eval."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, d_in, dtype=next(model.parameters()).dtype) * 2 + 1)
    return model.eval()


def token_batch(b: int, t: int = 7, vocab: int = 20, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, t), generator=g)
    lengths = torch.randint(2, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()  # (B, T) padding at the end
    ids = ids * mask
    return {"input_ids": ids, "attention_mask": mask}


def tiny_dataset():
    """A torch Dataset of (x, y) pairs, for factory loading tests."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 12, generator=g)
    y = torch.randint(0, 4, (6,), generator=g)
    return torch.utils.data.TensorDataset(x, y)


class SlowTail(torch.utils.data.Dataset):
    """Blobs whose later items are slow to load, so a subprocess scan can be killed mid-way."""

    def __init__(self, n: int = 3000, slow_from: int = 1200, delay: float = 0.004) -> None:
        g = torch.Generator().manual_seed(5)
        self.y = torch.randint(0, 4, (n,), generator=g)
        self.x = torch.randn(n, 12, generator=g) + 2.0 * torch.nn.functional.one_hot(self.y, 12).float()
        self.slow_from, self.delay = slow_from, delay

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        if i >= self.slow_from:
            import time

            time.sleep(self.delay)
        return self.x[i], self.y[i]


def slow_tail():
    return SlowTail()


class ArgMaxNet(nn.Module):
    """A model whose output is not differentiable (integer class ids)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).argmax(dim=1)


def as_float64(batch: tuple) -> tuple:
    """``(x, y)`` with a floating ``x`` in float64, for a float64 pass of the same batch; a dict of model
    inputs (token ids) and integer inputs are left as they are."""
    x, y = batch
    if isinstance(x, dict):
        return x, y
    return (x.double() if x.is_floating_point() else x), y


def branch_batches(n: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(taken, skipped, y)``: float64 inputs ``(n, 4)`` whose every sample takes :class:`Branch`'s branch, the
    same inputs with every sample skipping it, and labels ``(n,)`` of 3 classes."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
    taken, skipped = x.clone(), x.clone()
    taken[:, 0], skipped[:, 0] = taken[:, 0].abs() + 0.1, -skipped[:, 0].abs() - 0.1  # the branch's sign
    return taken, skipped, y


class Branch(nn.Module):
    """A module the forward calls on some batches only (a branch the data picks, an expert nothing is routed to)."""

    def __init__(self, functional_else: bool = False) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        self.functional_else = functional_else  # the other branch uses b's weights without calling b

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 4)
        h = torch.tanh(self.a(x))  # (B, 5)
        if bool(x[:, 0].gt(0).all()):  # the branch: every sample of the batch must agree
            h = h + torch.tanh(self.b(h))
        elif self.functional_else:
            h = h - torch.tanh(F.linear(h, self.b.weight))  # the weight only: the bias's gradient stays zero
        return self.head(h)
