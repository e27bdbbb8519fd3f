"""PyTorch Lightning integration (``pip install hardmine[lightning]``): a ``Callback`` over ``OnlineMiner``.

The LightningModule calls the miner inside ``training_step``, so the step keeps its single forward and the
per-sample weights can enter the loss (a callback alone cannot change the loss, and after
``on_train_batch_end`` the graph the multi-layer path needs is gone)::

    miner = hardmine.OnlineMiner(net, layers="fc2", num_classes=10, dim=256, seed=0)
    sampler = hardmine.MinerSampler(len(train_set), seed=0)          # optional: oversample what was hard

    class Module(L.LightningModule):
        def __init__(self, net, miner):
            super().__init__()
            self.net, self.miner = net, miner
        def training_step(self, batch, batch_idx):
            x, y, ids = batch                                          # the dataset returns its index too
            stats = self.miner.observe(x, y, ids)                      # runs self.net once
            self.log("train_loss", stats.loss.mean())
            return stats.weighted_loss()                               # (loss * weights).mean()
        def train_dataloader(self):
            return DataLoader(train_set, batch_size=64, sampler=sampler)

    trainer = L.Trainer(max_epochs=5, callbacks=[HardmineCallback(miner, sampler=sampler)])

:class:`HardmineCallback` then, at the end of every ``every_n_epochs``-th training epoch, writes the manifest
(atomically; ``manifest_path``, default ``<trainer.default_root_dir>/hardmine/online_manifest.parquet``) and
refreshes the ``MinerSampler`` from it, so the next epoch draws hard samples more often (Lightning calls
the sampler's ``set_epoch``). The miner's and the sampler's states travel in Lightning checkpoints
(``state_dict`` / ``load_state_dict`` of the callback), so ``trainer.fit(ckpt_path=...)`` resumes both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from ._common import EpochManifestWriter

__all__ = ["HardmineCallback", "MANIFEST_NAME"]


MANIFEST_NAME = "online_manifest.parquet"


class HardmineCallback(EpochManifestWriter, pl.Callback):
    """Writes the online manifest at epoch end, refreshes a sampler from it, checkpoints the miner.

    Args:
        miner: the :class:`~hardmine.OnlineMiner` the LightningModule calls in ``training_step``.
        manifest_path: where to write the manifest; ``{epoch}`` in it is replaced by the epoch number.
            ``None``: ``<trainer.default_root_dir>/hardmine/online_manifest.parquet``.
        sampler: a :class:`~hardmine.MinerSampler` used by the train dataloader, refreshed after each write.
        every_n_epochs: write (and refresh) after every n-th training epoch.
        manifest_kwargs: passed to ``miner.manifest`` (``strategy``, ``top``, ``boost``, ``weights``, ...).
    """

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if (epoch + 1) % self.every_n_epochs:
            return
        default = Path(trainer.default_root_dir) / "hardmine" / MANIFEST_NAME
        df = self._write_epoch(epoch, default, trainer.is_global_zero)
        if df is None:
            return
        hard = df["is_hard"].to_numpy(dtype=bool, na_value=False)
        pl_module.log_dict(
            {
                "hardmine/mean_last_weight": float(df["last_weight"].mean()),
                "hardmine/hard_fraction": float(hard.mean()),
            },
            on_epoch=True,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "miner": self.miner.state_dict(),
            "sampler": None if self.sampler is None else self.sampler.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.miner.load_state_dict(state_dict["miner"])
        if self.sampler is not None and state_dict.get("sampler") is not None:
            self.sampler.load_state_dict(state_dict["sampler"])
