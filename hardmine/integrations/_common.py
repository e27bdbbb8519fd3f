"""What the framework callbacks share (kept free of framework imports)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd

from ..checks import positive_int
from ..manifest import write_manifest
from ..online import OnlineMiner
from ..sampler import MinerSampler

__all__ = ["check_callback_args", "EpochManifestWriter"]

logger = logging.getLogger(__name__)


def check_callback_args(miner: Any, sampler: Any, every_n_epochs: Any) -> None:
    if not isinstance(miner, OnlineMiner):
        raise ValueError(f"miner must be a hardmine.OnlineMiner, got {type(miner).__name__}.")
    if sampler is not None and not isinstance(sampler, MinerSampler):
        raise ValueError(f"sampler must be a hardmine.MinerSampler or None, got {type(sampler).__name__}.")
    positive_int(every_n_epochs, "every_n_epochs")


class EpochManifestWriter:
    """The state and the epoch-end step of a framework callback: build the miner's manifest, write it on the
    main process, refresh the sampler. Framework callbacks subclass it beside their framework's base class."""

    def __init__(
        self,
        miner: OnlineMiner,
        *,
        manifest_path: str | os.PathLike[str] | None = None,
        sampler: MinerSampler | None = None,
        every_n_epochs: int = 1,
        manifest_kwargs: dict[str, Any] | None = None,
    ) -> None:
        check_callback_args(miner, sampler, every_n_epochs)
        self.miner = miner
        self.manifest_path = manifest_path
        self.sampler = sampler
        self.every_n_epochs = every_n_epochs
        self.manifest_kwargs = dict(manifest_kwargs or {})
        self.last_manifest: pd.DataFrame | None = None
        self.last_manifest_path: Path | None = None

    def _write_epoch(self, epoch: int, default_path: Path, is_main: bool) -> pd.DataFrame | None:
        """Manifest for ``epoch`` (None when nothing was observed yet): written to ``manifest_path`` (or
        ``default_path``) by the main process, then fed to the sampler on every process."""
        if self.miner.n_samples == 0:
            return None
        df = self.miner.manifest(**self.manifest_kwargs)
        self.last_manifest = df
        if is_main:
            path = (
                default_path
                if self.manifest_path is None
                else Path(str(self.manifest_path).replace("{epoch}", str(epoch)))
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            write_manifest(df, path, df.attrs["hardmine"])
            self.last_manifest_path = path
            logger.info("hardmine: epoch %d manifest (%d samples) written to %s", epoch, len(df), path)
        if self.sampler is not None:
            self.sampler.refresh(df)
        return df
