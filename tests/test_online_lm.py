"""The online miner and the Hugging Face Trainer on causal LMs: per-sample loss = mean next-token NLL over the
target tokens (labels -100 masked, shifted as Hugging Face models do), the miner's weights applied to those
losses, every parameter selected by default (position embeddings broadcast over the batch expanded per sample).

Exactness against ``reference_per_sample_grads`` with the same loss (float64 tiny GPT-2 and Llama, batch 1 and
larger); then a tiny GPT-2 fine-tuned for a few epochs by ``HardmineTrainer`` on a few dozen short sequences
(tokenizer built here with ``tokenizers``) with planted hard completions and planted garbage *prompts*.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

transformers = pytest.importorskip("transformers")

from hardmine import OnlineMiner  # noqa: E402
from hardmine.enums import TaskKind  # noqa: E402
from hardmine.extract import reference_per_sample_grads  # noqa: E402
from hardmine.factored import ProjectionLayout  # noqa: E402
from hardmine.losses import IGNORE_INDEX, causal_lm_per_sample  # noqa: E402
from hardmine.params import select_parameters  # noqa: E402
from hardmine.project import random_matrix  # noqa: E402

VOCAB = 50
PAD = 0

transformers.logging.set_verbosity_error()


def _gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=16, pad_token_id=PAD, bos_token_id=1,
        eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(cfg)


def _llama() -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, max_position_embeddings=16, tie_word_embeddings=True, pad_token_id=PAD,
        bos_token_id=1, eos_token_id=1,
    )
    return transformers.LlamaForCausalLM(cfg)


MODELS = {"gpt2": _gpt2, "llama": _llama}


def _lm_batch(b: int, t: int = 8, prompt: int = 3, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Right-padded ids; labels: the ids with the first ``prompt`` tokens and the padding set to -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, t), generator=g)
    lengths = torch.randint(prompt + 2, t + 1, (b,), generator=g)
    lengths[0] = t
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()  # (B, T)
    ids = ids * mask + PAD * (1 - mask)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, :prompt] = IGNORE_INDEX  # prompt tokens are not targets
    return {"input_ids": ids, "attention_mask": mask}, labels


def _projected(layout: ProjectionLayout, grads: dict[str, torch.Tensor], b: int) -> torch.Tensor:
    """The exact per-sample gradients projected with the explicit matrices, in the layout's column order."""
    parts = []
    for name, blk in layout.blocks.items():
        g = grads[name].double().reshape(b, -1)  # (B, numel)
        if blk.kind == "kron":
            a, c = blk.factors
            rows, cols = blk.matrix_shape
            p_out = random_matrix(rows, a, seed=layout.seed, key=f"{name}:out").double()
            p_in = random_matrix(cols, c, seed=layout.seed, key=f"{name}:in").double()
            parts.append(g @ torch.kron(p_out, p_in))  # (B, a*c)
        else:
            parts.append(g @ layout.dense_matrix(name).double())  # (B, width)
    return torch.cat(parts, dim=1)  # (B, out_dim)


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().double().eval()


# --------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("via_capture", [False, True])
@pytest.mark.parametrize("b", [1, 5])
@pytest.mark.parametrize("name", list(MODELS))
def test_online_causal_lm_is_exact_with_every_parameter(name, b, via_capture):
    """Default layers (all of GPT-2 incl. its position embeddings on (1, T), or Llama), auto loss: the online
    vectors, norms and losses equal the per-sample loop's over the masked, shifted token losses. Through
    ``capture()`` the batch size is read from the model's forward."""
    model = _model(name)
    inputs, labels = _lm_batch(b, seed=b)
    miner = OnlineMiner(model, dim=16, seed=3)
    assert miner.param_names == select_parameters(model, None)
    if via_capture:
        with miner.capture():
            out = model(**inputs)
        stats = miner.observe_output(out, labels, list(range(b)))
    else:
        stats = miner.observe(inputs, labels, list(range(b)))
    assert miner.task is TaskKind.CAUSAL_LM and stats.path == "autograd"
    ref = reference_per_sample_grads(model, (inputs, labels), loss_fn=causal_lm_per_sample)
    assert_close(stats.z.double(), _projected(miner.layout, ref.grads, b), rtol=1e-5, atol=1e-6)
    assert_close(stats.grad_norm, ref.grad_norm, rtol=1e-7, atol=1e-9)
    assert_close(stats.loss.detach(), ref.loss, rtol=1e-7, atol=1e-9)
    assert stats.confidence is None and stats.correct is None  # no class statistics for a causal LM
    assert not model._forward_hooks and not model._forward_pre_hooks  # nothing left on the model
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("via_capture", [False, True])
def test_position_ids_passed_first_do_not_set_the_batch_size(via_capture):
    """A (1, T) input ahead of the batch's own (position_ids before input_ids in the mapping) is broadcast, not
    the batch: observe sizes the batch by its target, capture() by the first input of more than one row."""
    model = _model("gpt2")
    inputs, labels = _lm_batch(3, seed=1)
    first = {"position_ids": torch.arange(labels.shape[1])[None], **inputs}
    miner = OnlineMiner(model, dim=16, seed=3)
    if via_capture:
        with miner.capture():
            out = model(**first)
        stats = miner.observe_output(out, labels, [0, 1, 2])
    else:
        stats = miner.observe(first, labels, [0, 1, 2])
    want = OnlineMiner(model, dim=16, seed=3).observe(inputs, labels, [0, 1, 2])
    assert_close(stats.z, want.z)
    assert_close(stats.grad_norm, want.grad_norm)


def test_causal_lm_loss_is_the_mean_over_target_tokens_only():
    """The per-sample loss averages the NLL of the target tokens (shifted; prompt and padding masked), and
    the masking reaches the gradients: the vectors differ from those of the loss over every token."""
    model = _model("gpt2")
    inputs, labels = _lm_batch(4, seed=7)
    with torch.no_grad():
        logits = model(**inputs).logits  # (B, T, V)
    logp = torch.log_softmax(logits, dim=-1)
    want = []
    for i in range(4):
        pos = [t for t in range(1, labels.shape[1]) if labels[i, t] != IGNORE_INDEX]
        want.append(-torch.stack([logp[i, t - 1, labels[i, t]] for t in pos]).mean())
    stats = OnlineMiner(model, dim=16, seed=3).observe(inputs, labels)
    assert_close(stats.loss.detach(), torch.stack(want))
    assert_close(causal_lm_per_sample(logits, labels, "sum"), torch.stack(want) * (labels[:, 1:] != -100).sum(1))

    every = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, IGNORE_INDEX)  # prompt tokens too
    other = OnlineMiner(model, dim=16, seed=3).observe(inputs, every)
    assert (other.z - stats.z).abs().max() > 1e-3
    # half-precision logits are upcast before the log-softmax (as Hugging Face's own loss)
    half = causal_lm_per_sample(logits.bfloat16(), labels)
    assert half.dtype == torch.float32
    assert_close(half, causal_lm_per_sample(logits.bfloat16().float(), labels).float())


def test_the_offline_extractor_takes_the_causal_lm_loss_by_name():
    from hardmine.engine import GradientExtractor

    model = _model("gpt2")
    batch = _lm_batch(3, seed=2)
    by_name = GradientExtractor(model, dim=16, seed=3, loss_fn="causal_lm")(batch)
    by_fn = GradientExtractor(model, dim=16, seed=3, loss_fn=causal_lm_per_sample)(batch)
    assert_close(by_name.z, by_fn.z)
    assert_close(by_name.loss, by_fn.loss)
    with pytest.raises(ValueError, match="label 50 is not a token id"):
        GradientExtractor(model, dim=16, loss_fn="causal_lm")((batch[0], batch[1].masked_fill(batch[1] > 0, VOCAB)))


def test_lm_labels_out_of_range_and_mismatched_shapes_are_refused():
    model = _model("gpt2")
    inputs, labels = _lm_batch(3)
    miner = OnlineMiner(model, dim=16)
    with pytest.raises(ValueError, match="token label 50 is out of range for a vocabulary of 50"):
        miner.observe(inputs, labels.masked_fill(labels == labels[0, 5], VOCAB))
    with pytest.raises(ValueError, match=r"causal LM needs \(B, T, vocab\) logits"):
        OnlineMiner(model, dim=16, loss_fn="causal_lm").observe(inputs, labels[:, :4])
    # with the default loss, logits of T - 1 positions are not taken for a classifier's
    auto = OnlineMiner(model, dim=16)
    with auto.capture():
        out = model(**inputs)
    with pytest.raises(ValueError, match=r"causal LM needs \(B, T, vocab\) logits .* got output shape \(3, 7, 50\)"):
        auto.observe_output(out.logits[:, :-1], labels)


def test_a_broadcast_output_mixed_across_samples_is_refused():
    """A module called on (1, ...) whose expanded output the model does not use row by row (here: every
    sample reads row 0) cannot be attributed per sample: a ValueError, not silently wrong vectors."""

    class RowZero(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(VOCAB, 4)
            self.pos = nn.Embedding(8, 4)
            self.head = nn.Linear(4, VOCAB)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            p = self.pos(torch.arange(input_ids.shape[1])[None])  # (1, T, 4) broadcast over the batch
            return self.head(self.tok(input_ids) + p[:1].expand(input_ids.shape[0], -1, -1)[0])  # (B, T, V)

    torch.manual_seed(0)
    model = RowZero()
    inputs, labels = _lm_batch(3)
    with pytest.raises(ValueError, match="pos.*depends on other samples' rows"):
        OnlineMiner(model, dim=16).observe(inputs["input_ids"], labels)


# ------------------------------------------------------------------------------------------ HF Trainer
WORDS = [f"w{i}" for i in range(16)]
SEQ = 12  # every sample padded to this many tokens


def _corpus(n_normal: int, n_hard: int, n_junk_prompt: int, seed: int = 0):
    """Samples "<bos> prompt(4) <a> completion(5)": the prompt and completion count up through WORDS (the
    completion from a random start). Planted: ``n_hard`` with a completion counting down (hard), ``n_junk_prompt``
    with a random prompt and a normal completion (prompt tokens are masked: not hard)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_normal + n_hard + n_junk_prompt):
        s, c = rng.integers(0, len(WORDS), 2)
        prompt = [WORDS[(s + k) % len(WORDS)] for k in range(4)]
        completion = [WORDS[(c + k) % len(WORDS)] for k in range(5)]
        if n_normal <= i < n_normal + n_hard:
            completion = completion[::-1]  # counts down: against what every other sample teaches
        elif i >= n_normal + n_hard:
            prompt = list(rng.choice(WORDS, 4))
        rows.append((prompt, completion))
    return rows


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<a>", *WORDS])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return tok, vocab


def test_hf_trainer_fine_tunes_a_causal_lm_with_miner_weights(tmp_path):
    """HardmineTrainer on a tiny GPT-2 (every parameter mined): weights come from the miner over the
    completion-only token losses. Planted random completions end up hardest with larger weights; planted
    random prompts (masked) do not, although their loss over every token is high."""
    pytest.importorskip("accelerate")
    datasets = pytest.importorskip("datasets")
    from transformers import TrainingArguments

    from hardmine.integrations.hf import HardmineCallback, HardmineTrainer
    from hardmine.manifest import read_manifest

    tok, vocab = _tokenizer()
    n_normal, n_hard, n_junk = 36, 4, 4
    rows = _corpus(n_normal, n_hard, n_junk)
    ids, masks, labels = [], [], []
    for prompt, completion in rows:
        enc = tok.encode(" ".join(["<bos>", *prompt, "<a>", *completion])).ids
        pad = SEQ - len(enc)
        ids.append(enc + [0] * pad)
        masks.append([1] * len(enc) + [0] * pad)
        labels.append([IGNORE_INDEX] * 6 + enc[6:] + [IGNORE_INDEX] * pad)  # "<bos> prompt <a>" masked
    n = len(rows)
    ds = datasets.Dataset.from_dict(
        {"input_ids": ids, "attention_mask": masks, "labels": labels, "sample_id": list(range(n))}
    )
    cfg = transformers.GPT2Config(
        vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=2, n_positions=SEQ, bos_token_id=1, eos_token_id=1,
        pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    miner = OnlineMiner(model, dim=16, seed=0, weighting={"warmup_steps": 5})
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=11, num_train_epochs=6, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )
    cb = HardmineCallback(miner)
    trainer = HardmineTrainer(model=model, args=args, train_dataset=ds, miner=miner, callbacks=[cb])
    trainer.train()
    assert miner.task is TaskKind.CAUSAL_LM and miner.step == 24
    df = read_manifest(cb.last_manifest_path).set_index("sample_id").sort_index()
    meta = df.attrs["hardmine"]
    assert meta["task"] == "causal-lm" and meta["loss"] == "causal_lm"
    # the offline manifest's LM columns: perplexity from the mean NLL; token statistics need the offline pass
    np.testing.assert_allclose(df["perplexity"], np.exp(df["loss"]), rtol=1e-6)
    assert df[["n_target_tokens", "token_entropy_mean", "top1_miss_rate", "max_token_loss"]].isna().all().all()
    assert meta["layers"] == select_parameters(model, None)  # every parameter, position embeddings included
    hard = np.arange(n_normal, n_normal + n_hard)
    junk = np.arange(n_normal + n_hard, n)
    normal = np.arange(n_normal)
    assert set(hard) <= set(df.sort_values("rank").index[: 2 * n_hard])  # the planted hard rank near the top
    assert df.loc[hard, "last_weight"].mean() > df.loc[normal, "last_weight"].mean()  # and get more weight
    assert df.loc[junk, "loss"].mean() < df.loc[hard, "loss"].min()  # masked junk prompts are not hard

    # The junk prompts are hard over every token: only the mask kept them out of the loss.
    model.eval()
    with torch.no_grad():
        x = torch.tensor(ids)
        every = x.masked_fill(torch.tensor(masks) == 0, IGNORE_INDEX)
        full = causal_lm_per_sample(model(input_ids=x, attention_mask=torch.tensor(masks)).logits, every)
    assert full[junk].min() > full[normal].max()


@pytest.mark.parametrize("loss_fn", [None, "causal_lm", causal_lm_per_sample])
def test_every_way_of_asking_for_the_causal_lm_loss_gives_the_same_manifest(loss_fn):
    model = _model("gpt2")
    inputs, labels = _lm_batch(4, seed=5)
    miner = OnlineMiner(model, dim=16, seed=3, loss_fn=loss_fn)
    miner.observe(inputs, labels, list(range(4)))
    m = miner.manifest()
    assert m.attrs["hardmine"]["loss"] == "causal_lm"
    np.testing.assert_allclose(m["perplexity"], np.exp(m["loss"]), rtol=1e-6)  # the mean NLL's perplexity
