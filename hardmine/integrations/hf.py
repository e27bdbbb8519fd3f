"""Hugging Face ``transformers`` integration (``pip install hardmine[hf]``).

:class:`HardmineTrainer` is a ``transformers.Trainer`` whose ``compute_loss`` runs the model once inside
``miner.capture()`` and returns ``(per-sample loss * weights).mean()``; :class:`HardmineCallback` writes the
online manifest at the end of every epoch. The dataset carries a sample id column (``"sample_id"`` by
default) that the Trainer keeps (``remove_unused_columns`` would drop it) and that never reaches the model::

    ds = ds.add_column("sample_id", list(range(len(ds))))
    miner = hardmine.OnlineMiner(model, layers="classifier", num_classes=2, dim=256, seed=0)
    trainer = HardmineTrainer(
        model=model, args=TrainingArguments(output_dir="out", num_train_epochs=3), train_dataset=ds,
        miner=miner, callbacks=[HardmineCallback(miner)],
        train_sampler=hardmine.MinerSampler(len(ds), seed=0),          # optional: oversample what was hard
    )
    trainer.train()                     # out/hardmine_online_manifest.parquet after every epoch

Evaluation and prediction run the model as usual (no weighting, nothing recorded). Checkpoints get the
miner's (and the sampler's) state as ``hardmine_miner.pt`` (``torch.save``; loaded with
``weights_only=True``), restored by ``trainer.train(resume_from_checkpoint=...)``. The loss is a per-batch
mean, so gradient accumulation divides it by the number of accumulation steps
(``loss_is_scaled_for_ga = False``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from .._io import atomic_path
from ..online import OnlineMiner
from ..sampler import MinerSampler
from ._common import EpochManifestWriter

__all__ = ["HardmineTrainer", "HardmineCallback", "MANIFEST_NAME", "STATE_NAME"]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "hardmine_online_manifest.parquet"
STATE_NAME = "hardmine_miner.pt"


class HardmineTrainer(Trainer):
    """``Trainer`` with a per-sample weighted loss from an :class:`~hardmine.OnlineMiner`, one forward a step.

    Args (on top of ``Trainer``'s):
        miner: the miner over the trained model (``layers`` name modules of ``model``).
        id_column: the batch key holding sample ids; ``None`` = no ids (weights only, no manifest rows).
        train_sampler: an optional :class:`~hardmine.MinerSampler` for the training dataloader (refreshed
            by :class:`HardmineCallback`).
    """

    # compute_loss returns a per-batch mean: the Trainer divides it by the gradient-accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args: Any,
        miner: OnlineMiner,
        id_column: str | None = "sample_id",
        train_sampler: MinerSampler | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(miner, OnlineMiner):
            raise ValueError(f"miner must be a hardmine.OnlineMiner, got {type(miner).__name__}.")
        if train_sampler is not None and not isinstance(train_sampler, MinerSampler):
            raise ValueError(
                f"train_sampler must be a hardmine.MinerSampler, got {type(train_sampler).__name__}."
            )
        self.miner = miner
        self.id_column = id_column
        self.hardmine_sampler = train_sampler
        super().__init__(*args, **kwargs)
        smoothing = getattr(self.args, "label_smoothing_factor", 0.0)
        if smoothing:  # the Trainer applies it in its own loss, which the miner's weighted loss replaces
            raise ValueError(
                f"label_smoothing_factor={smoothing}: HardmineTrainer trains on the miner's per-sample loss "
                "(plain cross-entropy), which has no label smoothing; set it to 0."
            )

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.id_column is not None and self._signature_columns is not None:
            if self.id_column not in self._signature_columns:
                self._signature_columns.append(self.id_column)  # keep the ids through remove_unused_columns

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        if self.hardmine_sampler is not None:
            return self.hardmine_sampler
        return super()._get_train_sampler(train_dataset)

    def _strip_ids(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        if self.id_column is None or self.id_column not in inputs:
            return inputs, None
        rest = {k: v for k, v in inputs.items() if k != self.id_column}
        return rest, inputs[self.id_column]

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        inputs, ids = self._strip_ids(dict(inputs))
        if not model.training or "labels" not in inputs:  # evaluation: the usual loss, nothing recorded
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.id_column is not None and ids is None:
            raise ValueError(
                f"the training batch has no {self.id_column!r} column; add one "
                f"(ds.add_column('{self.id_column}', list(range(len(ds))))) or pass id_column=None for "
                "weights without a manifest."
            )
        labels = inputs.pop("labels")
        # the batch size lets modules called on (1, T) (position embeddings) keep per-sample gradients
        with self.miner.capture(batch_size=int(labels.shape[0])):
            outputs = model(**inputs)  # labels removed: the model computes no loss of its own
        stats = self.miner.observe_output(outputs, labels, ids)
        loss = stats.weighted_loss()
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        inputs, _ = self._strip_ids(dict(inputs))
        return super().prediction_step(model, inputs, *args, **kwargs)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save and folder.is_dir():
            sampler = None if self.hardmine_sampler is None else self.hardmine_sampler.state_dict()
            with atomic_path(folder / STATE_NAME) as tmp:
                torch.save({"miner": self.miner.state_dict(), "sampler": sampler}, tmp)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / STATE_NAME
        if path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.miner.load_state_dict(state["miner"])
            if self.hardmine_sampler is not None and state.get("sampler") is not None:
                self.hardmine_sampler.load_state_dict(state["sampler"])
        else:
            logger.warning(
                "hardmine: %s has no %s; the miner starts fresh.", resume_from_checkpoint, STATE_NAME
            )


class HardmineCallback(EpochManifestWriter, TrainerCallback):
    """Writes the miner's manifest at the end of every ``every_n_epochs``-th epoch and refreshes the
    trainer's :class:`~hardmine.MinerSampler` (if it has one) from it.

    Args:
        miner: the same miner the :class:`HardmineTrainer` uses.
        manifest_path: where to write (``{epoch}`` is replaced by the epoch number); ``None`` =
            ``<output_dir>/hardmine_online_manifest.parquet``.
        sampler: the trainer's ``train_sampler``, refreshed after each write.
        every_n_epochs: write after every n-th epoch.
        manifest_kwargs: passed to ``miner.manifest`` (``strategy``, ``top``, ``boost``, ``weights``, ...).
    """

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        epoch = round(state.epoch or 0)
        if epoch % self.every_n_epochs:
            return
        self._write_epoch(epoch, Path(args.output_dir) / MANIFEST_NAME, state.is_world_process_zero)
