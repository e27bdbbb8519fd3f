"""Seeded, reproducible random projections of per-sample gradients: ``(B, P) -> (B, k)``.

The projection matrix ``R`` (``P x k``) is defined block by block: rows ``[j*BLOCK_ROWS, (j+1)*BLOCK_ROWS)``
come from a ``torch.Generator`` seeded with a hash of ``(seed, key, j)``. So the same seed gives the same
matrix on any machine, device, batch size or chunking, and the whole matrix is never held at once unless it
is small enough to cache. Entries are Rademacher (±1) or Gaussian, scaled by ``1/sqrt(k)`` so that
``E[<Rx, Ry>] = <x, y>`` (Johnson-Lindenstrauss).

``key`` names an independent matrix (one per parameter group): per-layer projections concatenate to a vector
whose inner products are still unbiased estimates of the full-gradient inner products.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch

from .checks import non_negative_int
from .enums import ProjectionKind, parse_choice

__all__ = ["BLOCK_ROWS", "Projector", "random_matrix", "random_block", "block_seed"]

# Part of the matrix's definition: changing it changes every projection, so it is a constant, not an option.
BLOCK_ROWS = 4096


def block_seed(seed: int, key: str, block: int) -> int:
    """A 63-bit generator seed for block ``block`` of matrix ``key``; stable across machines and Pythons."""
    digest = hashlib.sha256(f"hardmine-projection/v1/{seed}/{key}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_block(
    rows: int, k: int, *, seed: int, key: str, block: int, kind: ProjectionKind | str = ProjectionKind.RADEMACHER
) -> torch.Tensor:
    """Block ``block`` of the projection matrix: ``(rows, k)`` float32 on the CPU, scaled by ``1/sqrt(k)``."""
    kind = parse_choice(ProjectionKind, kind, "kind")
    g = torch.Generator(device="cpu").manual_seed(block_seed(seed, key, block))
    if kind is ProjectionKind.RADEMACHER:
        m = torch.randint(0, 2, (rows, k), generator=g, dtype=torch.int8).to(torch.float32).mul_(2).sub_(1)
    else:
        m = torch.randn((rows, k), generator=g, dtype=torch.float32)
    return m.mul_(1.0 / math.sqrt(k))  # (rows, k)


def random_matrix(
    rows: int, k: int, *, seed: int, key: str = "", kind: ProjectionKind | str = ProjectionKind.RADEMACHER
) -> torch.Tensor:
    """The whole ``(rows, k)`` matrix, built from the same blocks the blockwise path uses (one-shot form)."""
    _check_dims(rows, k)
    blocks = [
        random_block(min(BLOCK_ROWS, rows - j * BLOCK_ROWS), k, seed=seed, key=key, block=j, kind=kind)
        for j in range(math.ceil(rows / BLOCK_ROWS))
    ]
    return torch.cat(blocks, dim=0)  # (rows, k)


def _check_dims(rows: int, k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"projection dim k={k!r} must be a positive integer.")
    if not isinstance(rows, int) or rows < 1:
        raise ValueError(f"input dimension {rows!r} must be a positive integer.")


class Projector:
    """Blockwise seeded projector. Holds at most ``max_cache_bytes`` of matrix blocks between calls.

    >>> proj = Projector(dim=128, seed=0)
    >>> z = proj.project(flat_grads)                  # (B, P) -> (B, 128)
    >>> z = proj.project_grads(psg.grads)             # per-layer: (B, 128 * n_layers)
    """

    def __init__(
        self,
        dim: int,
        seed: int = 0,
        kind: ProjectionKind | str = ProjectionKind.RADEMACHER,
        max_cache_bytes: int = 256 * 2**20,
    ) -> None:
        _check_dims(1, dim)
        seed = non_negative_int(seed, "seed")
        self.dim = dim
        self.seed = seed
        self.kind = parse_choice(ProjectionKind, kind, "kind")
        self.max_cache_bytes = int(max_cache_bytes)
        self._cache: dict[tuple[str, int, int, torch.device], torch.Tensor] = {}
        self._cache_bytes = 0

    def _block(self, key: str, j: int, rows: int, device: torch.device) -> torch.Tensor:
        # Cached per device: a block cached on another device would be copied on every call, and a copy from
        # the host to a GPU makes the host wait for the device.
        ck = (key, j, rows, torch.device(device))
        blk = self._cache.get(ck)
        if blk is None:
            blk = random_block(rows, self.dim, seed=self.seed, key=key, block=j, kind=self.kind).to(device)
            nbytes = blk.numel() * blk.element_size()
            if self._cache_bytes + nbytes <= self.max_cache_bytes:
                self._cache[ck] = blk
                self._cache_bytes += nbytes
        return blk

    def project(self, x: torch.Tensor, key: str = "") -> torch.Tensor:
        """Project ``(B, P)`` rows to ``(B, dim)`` with matrix ``key``, one block of rows at a time."""
        if not isinstance(x, torch.Tensor) or x.ndim != 2:
            raise ValueError(f"project() needs a 2-D (B, P) tensor, got {getattr(x, 'shape', type(x).__name__)}.")
        b, p = x.shape
        _check_dims(int(p), self.dim)
        return self._compute_project(x, key)

    def _compute_project(self, x: torch.Tensor, key: str) -> torch.Tensor:
        b, p = x.shape
        x = x.to(torch.float32)
        out = torch.zeros((b, self.dim), dtype=torch.float32, device=x.device)  # (B, k)
        for j in range(math.ceil(p / BLOCK_ROWS)):
            lo, hi = j * BLOCK_ROWS, min(p, (j + 1) * BLOCK_ROWS)
            out.addmm_(x[:, lo:hi], self._block(key, j, hi - lo, x.device))
        return out

    def matrix(self, rows: int, key: str = "") -> torch.Tensor:
        """The full ``(rows, dim)`` matrix for ``key`` (for tests and small layers)."""
        return random_matrix(rows, self.dim, seed=self.seed, key=key, kind=self.kind)

    def project_grads(self, grads: Mapping[str, torch.Tensor], per_layer: bool = True) -> torch.Tensor:
        """Project a dict of per-sample gradients ``name -> (B, *shape)``.

        ``per_layer=True``: each parameter gets its own matrix (keyed by its name) and the results are
        concatenated in dict order: ``(B, dim * len(grads))``. ``per_layer=False``: the flattened
        concatenation is projected with one matrix: ``(B, dim)``.
        """
        if not grads:
            raise ValueError("no gradients to project (empty mapping).")
        b = next(iter(grads.values())).shape[0]
        flats = {n: g.reshape(b, -1) for n, g in grads.items()}  # name -> (B, P_n)
        if per_layer:
            return torch.cat([self._compute_project(f, n) for n, f in flats.items()], dim=1)  # (B, dim*L)
        return self._compute_project(torch.cat(list(flats.values()), dim=1), "")  # (B, dim)
