"""The optional framework integrations really train a tiny model (skipped only when the extra is missing).

* Lightning: the callback writes a manifest every epoch, refreshes the sampler from it (hard samples are
  then drawn more often), and a fit resumed from an epoch-1 checkpoint ends with the same manifest.
* Hugging Face: ``HardmineTrainer`` trains a tiny randomly initialised BERT classifier with per-sample
  weights, the callback writes the manifest, checkpoints carry the miner, and resuming reproduces the run.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hardmine.manifest import REQUIRED_COLUMNS, read_manifest
from hardmine.online import MinerSampler, OnlineMiner

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the models are built from configs


class IndexedBlobs(Dataset):
    """(x, y, index): the index is the sample id the miner records."""

    def __init__(self, n: int = 96, flip: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.x = torch.randn(n, 6, generator=g) + 2.5 * nn.functional.one_hot(self.y, 6).float()
        self.y[:flip] = (self.y[:flip] + 1) % 3  # planted label noise in the first `flip` samples

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


# ------------------------------------------------------------------------------------------- Lightning
def _lightning_run(tmp, epochs, ckpt_path=None, ckpt_every=False):
    L = pytest.importorskip("lightning")
    from hardmine.integrations.lightning import HardmineCallback

    ds = IndexedBlobs()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    miner = OnlineMiner(net, layers="2", num_classes=3, dim=16, seed=0, weighting={"warmup_steps": 2})
    sampler = MinerSampler(len(ds), seed=0)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            x, y, ids = batch
            return miner.observe(x, y, ids).weighted_loss()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2)

        def train_dataloader(self):
            return DataLoader(ds, batch_size=16, sampler=sampler)

    cb = HardmineCallback(miner, manifest_path=tmp / "manifest_{epoch}.parquet", sampler=sampler)
    callbacks = [cb]
    if ckpt_every:
        callbacks.append(
            L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp / "ckpt", every_n_epochs=1, save_top_k=-1)
        )
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=ckpt_every,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp,
        callbacks=callbacks,
    )
    trainer.fit(Module(), ckpt_path=ckpt_path)
    return miner, sampler, cb


def test_lightning_callback_trains_writes_refreshes_and_resumes(tmp_path):
    pytest.importorskip("lightning")
    full = tmp_path / "full"
    miner, sampler, cb = _lightning_run(full, epochs=3, ckpt_every=True)
    assert miner.step == 3 * 6 and sampler.refreshes == 3
    first, last = read_manifest(full / "manifest_0.parquet"), read_manifest(full / "manifest_2.parquet")
    assert set(REQUIRED_COLUMNS) <= set(last.columns) and len(last) == 96
    assert (last["times_seen"].sum(), last.attrs["hardmine"]["steps"]) == (3 * 96, 18)
    # Epoch 1 drew by the epoch-0 weights: the hard 10% (boost 5 -> 5/1.4 = 3.6 draws each on average).
    second = read_manifest(full / "manifest_1.parquet").set_index("sample_id")
    drawn = second["times_seen"] - first.set_index("sample_id")["times_seen"]
    hard = first.loc[first["is_hard"].to_numpy(dtype=bool), "sample_id"].to_numpy()
    assert drawn.loc[hard].mean() > 2.0 and drawn.sum() == 96
    # The planted flips rank near the top after 18 steps.
    assert np.isin(np.arange(8), last.nsmallest(16, "rank")["sample_id"]).mean() >= 0.5  # chance: 1/6

    # Resume from the epoch-0 checkpoint with a fresh model, miner and sampler: same final manifest.
    ckpt = sorted((full / "ckpt").glob("epoch=0*.ckpt"))[0]
    resumed = tmp_path / "resumed"
    miner2, sampler2, _ = _lightning_run(resumed, epochs=3, ckpt_path=str(ckpt))
    assert miner2.step == 18 and sampler2.refreshes == 3
    pd.testing.assert_frame_equal(read_manifest(resumed / "manifest_2.parquet"), last, check_like=False)


# ------------------------------------------------------------------------------------------ Hugging Face
def _hf_setup(out_dir, epochs, save, **more_args):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    datasets = pytest.importorskip("datasets")
    from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

    from hardmine.integrations.hf import HardmineCallback, HardmineTrainer

    n = 48
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (n,), generator=g)
    tokens = torch.randint(4, 40, (n, 8), generator=g)
    tokens[:, 1] = labels + 1  # the label is readable from token 1
    ds = datasets.Dataset.from_dict(
        {
            "input_ids": tokens.tolist(),
            "attention_mask": [[1] * 8] * n,
            "labels": labels.tolist(),
            "sample_id": list(range(n)),
        }
    )
    cfg = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg)
    miner = OnlineMiner(
        model, layers="classifier", num_classes=3, dim=16, seed=0, weighting={"warmup_steps": 1}
    )
    sampler = MinerSampler(n, seed=0)
    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=8,
        num_train_epochs=epochs,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="epoch" if save else "no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **more_args,
    )
    cb = HardmineCallback(miner, sampler=sampler)
    trainer = HardmineTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        eval_dataset=ds,
        miner=miner,
        callbacks=[cb],
        train_sampler=sampler,
    )
    return trainer, miner, sampler, cb


def test_hf_trainer_refuses_label_smoothing_it_would_not_apply(tmp_path):
    # The Trainer smooths labels in its own loss, which the miner's weighted per-sample loss replaces
    with pytest.raises(ValueError, match=r"label_smoothing_factor=0\.1: .* set it to 0"):
        _hf_setup(tmp_path, epochs=1, save=False, label_smoothing_factor=0.1)


def test_hf_trainer_trains_with_weights_and_resumes(tmp_path):
    trainer, miner, sampler, cb = _hf_setup(tmp_path / "full", epochs=2, save=True)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    out = trainer.train()
    assert out.global_step == miner.step == 12 and sampler.refreshes == 2
    assert any(not torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    df = read_manifest(cb.last_manifest_path)
    assert set(REQUIRED_COLUMNS) <= set(df.columns) and len(df) == 48 and df["times_seen"].sum() == 96
    assert df.attrs["hardmine"]["layers"] == ["classifier.weight", "classifier.bias"]
    assert np.isclose(df["weight"].mean(), 1.0) and df["last_weight"].std() > 0  # weighting was active
    metrics = trainer.evaluate()  # evaluation: the usual loss, no weighting, nothing recorded
    assert np.isfinite(metrics["eval_loss"]) and miner.step == 12
    ckpt = tmp_path / "full" / "checkpoint-6"
    assert (ckpt / "hardmine_miner.pt").is_file()

    # Resume from the epoch-1 checkpoint with a fresh model and miner: the same final manifest.
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(ckpt, resumed_dir / "checkpoint-6")
    trainer2, miner2, sampler2, cb2 = _hf_setup(resumed_dir, epochs=2, save=False)
    trainer2.train(resume_from_checkpoint=str(resumed_dir / "checkpoint-6"))
    assert miner2.step == 12 and sampler2.refreshes == 2
    pd.testing.assert_frame_equal(read_manifest(cb2.last_manifest_path), df)
