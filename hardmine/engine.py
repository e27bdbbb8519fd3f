"""Batch -> projected per-sample gradients, whichever engine computes them.

``GradientExtractor`` is what the streaming driver and the training-loop API call: one batch in, one
``ProjectedBatch`` out (projected gradients, per-sample loss, model output, exact gradient norm).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .enums import Engine, ProjectionKind, Randomness, parse_choice
from .extract import per_sample_grads
from .losses import LossFn
from .params import select_parameters
from .project import Projector

__all__ = ["ProjectedBatch", "GradientExtractor"]

logger = logging.getLogger(__name__)


@dataclass
class ProjectedBatch:
    z: torch.Tensor  # (B, out_dim) float32 projected per-sample gradients
    loss: torch.Tensor  # (B,)
    output: torch.Tensor  # (B, ...) model output (logits)
    grad_norm: torch.Tensor  # (B,) exact L2 norm of the full (unprojected) selected gradient


class GradientExtractor:
    """Projected per-sample gradients of the selected layers of ``model``.

    ``dim`` is the projection dimension per selected parameter tensor; ``out_dim`` is the total.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: str | Sequence[str] | None = None,
        dim: int = 256,
        seed: int = 0,
        engine: Engine | str = Engine.AUTO,
        loss_fn: str | LossFn | None = None,
        kind: ProjectionKind | str = ProjectionKind.RADEMACHER,
        chunk_size: int | None = None,
        randomness: Randomness | str = Randomness.EVAL,
    ) -> None:
        self.model = model
        self.engine = parse_choice(Engine, engine, "engine")
        self.param_names = select_parameters(model, layers)
        self.layers = layers
        self.projector = Projector(dim, seed=seed, kind=kind)
        self.loss_fn = loss_fn
        self.chunk_size = chunk_size
        self.randomness = parse_choice(Randomness, randomness, "randomness")
        # Until the factored engine exists every parameter goes through vmap.
        self.plan = {n: Engine.VMAP.value for n in self.param_names}
        logger.info("engine plan: %s", self.plan)

    @property
    def out_dim(self) -> int:
        return self.projector.dim * len(self.param_names)

    def metadata(self) -> dict[str, Any]:
        return {
            "engine": self.engine.value,
            "plan": dict(self.plan),
            "params": list(self.param_names),
            "dim": self.projector.dim,
            "out_dim": self.out_dim,
            "seed": self.projector.seed,
            "projection": self.projector.kind.value,
        }

    def __call__(self, batch: Any) -> ProjectedBatch:
        psg = per_sample_grads(
            self.model, batch, self.loss_fn, params=self.param_names, chunk_size=self.chunk_size,
            randomness=self.randomness,
        )
        z = self.projector.project_grads(psg.grads)  # (B, dim * n_params)
        return ProjectedBatch(z=z, loss=psg.loss, output=psg.output, grad_norm=psg.grad_norm)
