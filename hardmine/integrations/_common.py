"""What the framework callbacks share (kept free of framework imports)."""

from __future__ import annotations

from typing import Any

from ..online import MinerSampler, OnlineMiner

__all__ = ["check_callback_args"]


def check_callback_args(miner: Any, sampler: Any, every_n_epochs: Any) -> None:
    if not isinstance(miner, OnlineMiner):
        raise ValueError(f"miner must be a hardmine.OnlineMiner, got {type(miner).__name__}.")
    if sampler is not None and not isinstance(sampler, MinerSampler):
        raise ValueError(f"sampler must be a hardmine.MinerSampler or None, got {type(sampler).__name__}.")
    if not isinstance(every_n_epochs, int) or isinstance(every_n_epochs, bool) or every_n_epochs < 1:
        raise ValueError(f"every_n_epochs={every_n_epochs!r} must be a positive integer.")
