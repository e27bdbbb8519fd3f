"""The language-model demo's pieces (``make demo-lm``): the corpus installer fails loudly, and the training
script turns a directory of %-separated quotes into a reloadable model + tokenizer directory and a JSONL file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_lm_data_install_fails_loudly_when_the_corpus_cannot_be_had(tmp_path):
    script = ROOT / "scripts" / "install_lm_data.sh"
    env = {**os.environ, "HARDMINE_FORTUNES": str(tmp_path / "missing")}
    res = subprocess.run(["sh", str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 1 and "HARDMINE_FORTUNES" in res.stderr and "'fortunes'" in res.stderr
    (tmp_path / "missing").mkdir()
    assert subprocess.run(["sh", str(script)], env=env, timeout=60).returncode == 0  # present: nothing to do


def test_demo_lm_training_writes_a_reloadable_model_and_the_samples(tmp_path):
    transformers = pytest.importorskip("transformers")
    corpus = tmp_path / "fortunes"
    corpus.mkdir()
    quotes = [f"Quote number {i}: the cat sat on the mat {i % 3} times.\n\t-- Someone" for i in range(40)]
    (corpus / "cats").write_text("\n%\n".join(quotes) + "\n%\n" + "x" * 500 + "\n")  # the last one is too long
    (corpus / "cats.dat").write_bytes(b"\x00\x01")  # an index file: not read
    out = tmp_path / "out"
    env = {**os.environ, "HARDMINE_FORTUNES": str(corpus), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "scripts" / "train_demo_lm.py"), "--out", str(out), "--epochs", "1",
           "--vocab", "300", "--min-chars", "0", "--width", "16", "--layers", "1", "--batch-size", "8"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in (out / "fortunes.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"cats/{i}" for i in range(40)]
    assert rows[0]["text"] == quotes[0].replace("\t", "    ") and {r["source"] for r in rows} == {"cats"}

    model = transformers.AutoModelForCausalLM.from_pretrained(out / "model")
    tok = transformers.AutoTokenizer.from_pretrained(out / "model")
    enc = tok([rows[0]["text"]], return_tensors="pt")
    assert tok.decode(enc["input_ids"][0]) == rows[0]["text"]  # no special tokens added, lossless
    with torch.no_grad():
        assert model(**enc).logits.shape == (1, enc["input_ids"].shape[1], model.config.vocab_size)
