"""The projection layout: which seeded matrix projects each selected parameter, whichever engine runs.

The layout depends only on the model's structure, the selected parameters, ``dim``, ``seed`` and ``kind``
-- never on the engine or the batch -- so ``engine="vmap"``, ``"factored"`` and ``"auto"`` return the same
vectors (up to float rounding) and the same seed gives the same matrices for any batch size.

With ``(a, b) = kron_factors(dim)`` (``a * b == dim``, ``a <= b``, as square as ``dim`` allows):

* **Kronecker blocks** -- the *matrix* parameter of a module that has a registered layer rule (the weight of
  ``Linear``, ``Conv2d``, ``Embedding``, ``transformers``' ``Conv1D``; ``nn.MultiheadAttention``'s
  ``in_proj_weight`` and its ``out_proj.weight``), viewed as ``G`` of shape
  ``(rows, cols) = (shape[0], prod(shape[1:]))``, is projected to ``dim`` coordinates as ``vec(P_out^T G P_in)`` (row-major ``(a, b)``),
  i.e. ``vec(G) @ kron(P_out, P_in)``, with ``P_out = random_matrix(rows, a, key=f"{param}:out")`` and
  ``P_in = random_matrix(cols, b, key=f"{param}:in")``. Each factor is scaled by ``1/sqrt(its k)``, so
  ``E[kron(P_out, P_in) kron(P_out, P_in)^T] = I`` and inner products are preserved in expectation.
* **Dense blocks** -- every other selected parameter (biases, LayerNorm affine parameters, and any parameter
  of a module without a rule) is projected with the blockwise seeded :class:`~hardmine.project.Projector`
  keyed by its parameter name: to ``a`` coordinates when it is a vector (``ndim <= 1``; a vector carries
  about one factor's worth of information, and ``dim`` coordinates for a 10-entry bias would waste the
  index), to ``dim`` coordinates otherwise.

A tied parameter (one tensor held by several modules, e.g. an LM head sharing the input embedding) is one
block under its canonical name (the first one ``named_parameters`` gives), projecting the sum of its uses.

Blocks are concatenated in model parameter order; :meth:`ProjectionLayout.describe` records offsets and
widths in the scan metadata.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..checks import non_negative_int, positive_int
from ..enums import ProjectionKind, parse_choice
from ..project import BLOCK_ROWS, Projector, random_matrix
from .registry import rule_for

__all__ = ["MAX_FACTOR_RATIO", "Block", "ProjectionLayout", "kron_factors", "split_param_name"]

# A Kronecker factor pair more lopsided than this wastes most of the budget on one side (dim=17 would be
# 1 x 17): refuse such a dim instead of silently projecting badly.
MAX_FACTOR_RATIO = 4


def kron_factors(dim: int) -> tuple[int, int]:
    """``(a, b)``: ``a * b == dim``, ``a <= b``, ``a`` the largest divisor of ``dim`` up to its root."""
    dim = positive_int(dim, "dim", hint="e.g. 256 = 16 x 16")
    a = math.isqrt(dim)
    while dim % a:
        a -= 1
    b = dim // a
    if b > MAX_FACTOR_RATIO * a:
        r = math.isqrt(dim)
        raise ValueError(
            f"dim={dim} only splits into Kronecker factors {a} x {b}, too unbalanced for a good projection; "
            f"use a square or a power of two, e.g. dim={r * r} or dim={(r + 1) * (r + 1)}."
        )
    return a, b


def split_param_name(name: str) -> tuple[str, str]:
    """``"enc.fc.weight"`` -> ``("enc.fc", "weight")``; a root-module parameter has module name ``""``."""
    module, _, local = name.rpartition(".")
    return module, local


@dataclass(frozen=True)
class Block:
    """Where one selected parameter lands in the projected vector."""

    param: str
    kind: Literal["kron", "dense"]
    shape: tuple[int, ...]
    offset: int
    width: int
    factors: tuple[int, int] | None = None  # (a, b) for kron blocks

    @property
    def matrix_shape(self) -> tuple[int, int]:
        rows = self.shape[0]
        return rows, math.prod(self.shape) // rows


class ProjectionLayout:
    """The seeded projection of the selected parameters of one model (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        *,
        dim: int,
        seed: int,
        kind: ProjectionKind | str = ProjectionKind.RADEMACHER,
    ) -> None:
        self.a, self.b = kron_factors(dim)
        seed = non_negative_int(seed, "seed")
        self.dim = self.a * self.b  # == dim, as a Python int
        self.seed = seed
        self.kind = parse_choice(ProjectionKind, kind, "kind")
        params = dict(model.named_parameters())
        blocks: list[Block] = []
        offset = 0
        for name in names:
            p = params[name]
            module_name, local = split_param_name(name)
            rule = rule_for(model.get_submodule(module_name))
            shape = tuple(int(s) for s in p.shape)
            if rule is not None and local == rule.matrix_param and p.ndim >= 2:
                blk = Block(name, "kron", shape, offset, self.a * self.b, (self.a, self.b))
            else:
                blk = Block(name, "dense", shape, offset, self.a if p.ndim <= 1 else dim)
            blocks.append(blk)
            offset += blk.width
        self.blocks = {blk.param: blk for blk in blocks}
        self.out_dim = offset
        self._dense = {w: Projector(w, seed=seed, kind=self.kind) for w in {self.a, dim}}
        self._kron: dict[tuple[str, torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def names(self) -> list[str]:
        return list(self.blocks)

    # ------------------------------------------------------------------------------------- matrices
    def kron_matrices(
        self, name: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P_out (rows, a), P_in (cols, b))`` of Kronecker block ``name``, cached per dtype and device."""
        blk = self.blocks[name]
        if blk.kind != "kron":
            raise ValueError(f"parameter {name!r} has a dense block, not a Kronecker one.")
        device = torch.device(device)
        key = (name, dtype, device)
        mats = self._kron.get(key)
        if mats is None:
            rows, cols = blk.matrix_shape
            # Generated in float32 (entries +-1/sqrt(k) or Gaussian) and then cast, so every dtype and
            # device sees the same matrix.
            p_out = random_matrix(
                rows, self.a, seed=self.seed, key=f"{name}:out", kind=self.kind
            )  # (rows, a)
            p_in = random_matrix(cols, self.b, seed=self.seed, key=f"{name}:in", kind=self.kind)  # (cols, b)
            mats = (p_out.to(device=device, dtype=dtype), p_in.to(device=device, dtype=dtype))
            self._kron[key] = mats
        return mats

    def dense_block_matrix(
        self, name: str, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> torch.Tensor | None:
        """The ``(numel, width)`` matrix ``project_dense`` multiplies dense block ``name`` by, when it is one
        projector block and ``dtype`` is float32 (so multiplying by it gives ``project_dense``'s result);
        None otherwise. Cached by the block's projector."""
        blk = self.blocks[name]
        rows = math.prod(blk.shape)
        if blk.kind != "dense" or dtype != torch.float32 or rows > BLOCK_ROWS:
            return None
        return self._dense[blk.width]._block(name, 0, rows, torch.device(device))

    def uncached_dense(self) -> tuple[list[str], int]:
        """``(parameters, bytes)``: the dense blocks whose projection matrices reach past their projector's cache
        (``Projector.max_cache_bytes``, shared by every dense block of one width; counted in layout order), and
        about how many bytes of matrix do not fit (the total beyond each cache). Those are regenerated from their
        seeds on every projection."""
        used: dict[int, int] = {}
        names = []
        for name, blk in self.blocks.items():
            if blk.kind != "dense":
                continue
            used[blk.width] = used.get(blk.width, 0) + math.prod(blk.shape) * blk.width * 4  # float32 (numel, width)
            if used[blk.width] > self._dense[blk.width].max_cache_bytes:
                names.append(name)
        beyond = sum(max(0, n - self._dense[w].max_cache_bytes) for w, n in used.items())
        return names, beyond

    def dense_matrix(self, name: str) -> torch.Tensor:
        """The full ``(numel, width)`` matrix of dense block ``name`` (for tests and small parameters)."""
        blk = self.blocks[name]
        if blk.kind != "dense":
            raise ValueError(f"parameter {name!r} has a Kronecker block, not a dense one.")
        return self._dense[blk.width].matrix(math.prod(blk.shape), key=name)

    # ------------------------------------------------------------------------------------ projecting
    def project_exact(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """Project materialised per-sample gradients ``(B, *shape)`` of ``name`` -> ``(B, width)`` float32."""
        blk = self.blocks[name]
        b = grad.shape[0]
        if blk.kind == "kron":
            rows, cols = blk.matrix_shape
            p_out, p_in = self.kron_matrices(name, grad.dtype, grad.device)
            g = grad.reshape(b, rows, cols)  # (B, rows, cols)
            return self.kron_flat(p_out.t() @ g @ p_in)  # (B, a*b)
        return self.project_dense(name, grad.reshape(b, -1))  # (B, width)

    def project_dense(self, name: str, flat: torch.Tensor) -> torch.Tensor:
        """Dense block: ``(B, numel)`` exact per-sample gradients -> ``(B, width)`` float32."""
        blk = self.blocks[name]
        return self._dense[blk.width].project(flat, key=name)

    @staticmethod
    def kron_flat(proj: torch.Tensor) -> torch.Tensor:
        """``(B, a, b)`` Kronecker projection -> ``(B, a*b)`` float32, row-major like ``torch.kron``."""
        return proj.reshape(proj.shape[0], -1).to(torch.float32)  # (B, a*b)

    def new_output(self, batch_size: int, device: torch.device | str) -> torch.Tensor:
        """An uninitialised ``(B, out_dim)`` float32 output on ``device`` (no default: an output on the host
        while the pass runs on a GPU made every block's write a copy back and a wait)."""
        return torch.empty(batch_size, self.out_dim, dtype=torch.float32, device=device)  # (B, out_dim)

    def block_view(self, z: torch.Tensor, name: str) -> torch.Tensor:
        """Block ``name``'s columns of ``z (B, out_dim)``: ``(B, width)``, or ``(B, a, b)`` if Kronecker."""
        blk = self.blocks[name]
        cols = z[:, blk.offset : blk.offset + blk.width]  # (B, width)
        return cols.view(z.shape[0], *blk.factors) if blk.factors is not None else cols

    def write(self, z: torch.Tensor, name: str, part: torch.Tensor) -> None:
        """Copy one block's projection (``(B, width)`` or ``(B, a, b)``, any float dtype) into ``z``."""
        blk = self.blocks[name]
        z[:, blk.offset : blk.offset + blk.width] = part.reshape(z.shape[0], blk.width)  # cast on copy

    def assemble(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Write per-parameter projections ``name -> (B, width)`` (any float dtype, or ``(B, a, b)`` for a
        Kronecker block) into one ``(B, out_dim)`` float32 tensor, in layout order."""
        missing = [n for n in self.blocks if n not in parts]
        if missing:
            raise ValueError(f"no projection for parameter(s) {missing}.")
        first = parts[next(iter(self.blocks))]
        z = self.new_output(first.shape[0], first.device)  # (B, out_dim)
        for name in self.blocks:
            self.write(z, name, parts[name])
        return z

    def describe(self) -> list[dict[str, Any]]:
        """JSON-ready description of every block (goes into the scan metadata)."""
        out = []
        for blk in self.blocks.values():
            d: dict[str, Any] = {
                "param": blk.param,
                "kind": blk.kind,
                "shape": list(blk.shape),
                "offset": blk.offset,
                "width": blk.width,
            }
            if blk.factors is not None:
                d["factors"] = list(blk.factors)
                d["keys"] = [f"{blk.param}:out", f"{blk.param}:in"]
            else:
                d["key"] = blk.param
            out.append(d)
        return out
