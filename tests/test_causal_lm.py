"""The causal-LM task end to end: the next-token loss and its per-sample gradient (exact against the per-sample
autograd loop on tiny random GPT-2 and Llama models), prompt tokens kept out of the loss, the text loaders
(text, prompt + completion, chat messages), the LM manifest, ``tokens.parquet`` and the CLI.

Models and the tokenizer are made here: a word-level tokenizer trained on a few sentences, with a small chat
template, saved with a tiny random GPT-2 into a model directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from hardmine.cli import app  # noqa: E402
from hardmine.engine import GradientExtractor  # noqa: E402
from hardmine.extract import reference_per_sample_grads  # noqa: E402
from hardmine.lm import TOKEN_COLUMNS  # noqa: E402
from hardmine.loaders import open_text  # noqa: E402
from hardmine.manifest import REQUIRED_COLUMNS_LM  # noqa: E402
from hardmine.scan import scan  # noqa: E402
from hardmine.scan.task import resolve_task  # noqa: E402

SENTENCES = [
    "the cat sat on the mat", "a dog ran in the park", "hello how are you", "i am fine thanks",
    "what is two plus two", "four is the answer", "the sun is warm today", "birds sing in the morning",
]
TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' </s> ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)
LM_COLUMNS = [
    "sample_id", "loss", "perplexity", "n_target_tokens", "token_entropy_mean", "top1_miss_rate", "max_token_loss",
    "grad_norm", "global_divergence", "global_divergence_plain", "knn_outlier", "hardness", "rank", "is_hard",
    "weight",
]


def _tokenizer(chat_template: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[UNK]", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    tk.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=specials))
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>"
    )
    if chat_template:
        tok.chat_template = TEMPLATE
    return tok


def _gpt2(vocab: int) -> nn.Module:
    cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=16, n_layer=2, n_head=2, n_positions=48, pad_token_id=0,
                                  bos_token_id=2, eos_token_id=3)
    return transformers.GPT2LMHeadModel(cfg)


def _llama(vocab: int) -> nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, max_position_embeddings=48, tie_word_embeddings=False, pad_token_id=0, bos_token_id=2,
        eos_token_id=3,
    )
    return transformers.LlamaForCausalLM(cfg)


MODELS = {"gpt2": _gpt2, "llama": _llama}


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    """A tiny GPT-2 with its tokenizer (and chat template) saved as a Hugging Face model directory."""
    d = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    _gpt2(len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """JSONL with ids, a text, a prompt/completion pair and a two-turn conversation per row."""
    d = tmp_path_factory.mktemp("data")
    rows = []
    for i, s in enumerate(SENTENCES):
        nxt = SENTENCES[(i + 1) % len(SENTENCES)]
        rows.append({"id": f"s{i}", "text": s, "prompt": s, "completion": nxt, "messages": [
            {"role": "system", "content": "hello"}, {"role": "user", "content": s},
            {"role": "assistant", "content": nxt}]})
    path = d / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _build(name: str, vocab: int, dtype=torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name](vocab).to(dtype).eval()


def _batch(tok, b: int, path: Path, **columns) -> dict[str, torch.Tensor]:
    inputs, labels, _ = next(iter(open_text(str(path), tok, batch_size=b, **columns)))
    return {**inputs, "labels": labels}


def _expected_z(ext: GradientExtractor, ref) -> torch.Tensor:
    """The reference loop's gradients projected with the extractor's layout (its exact projection)."""
    z = ext.layout.new_output(ref.batch_size, "cpu")  # (B, out_dim)
    for name in ext.param_names:
        ext.layout.write(z, name, ext.layout.project_exact(name, ref.grads[name]))
    return z


# ---------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("reduction", ["causal_lm", "causal_lm_sum"])
def test_lm_gradients_match_the_per_sample_loop(tok, data_file, name, b, reduction):
    # prompt + completion batches: right padding (sentences differ in length) and masked prompt tokens.
    model = _build(name, len(tok), seed=b)
    batch = _batch(tok, b, data_file, prompt_column="prompt", completion_column="completion")
    if b > 1:
        assert (batch["attention_mask"] == 0).any() and (batch["labels"][:, 1:] == -100).any()
    ext = GradientExtractor(model, dim=16, seed=3, loss_fn=reduction)
    got = ext(batch)
    assert set(ext.plan.values()) == {"factored"}, ext.metadata()["plan_reasons"]
    ref = reference_per_sample_grads(model, batch, loss_fn=reduction)
    assert_close(got.z, _expected_z(ext, ref), rtol=1e-5, atol=1e-6)
    assert_close(got.loss, ref.loss, rtol=1e-7, atol=1e-9)
    assert_close(got.grad_norm, ref.grad_norm, rtol=1e-7, atol=1e-9)


def test_prompt_tokens_never_enter_the_loss_or_the_gradient(tok, data_file):
    model = _build("gpt2", len(tok))
    batch = _batch(tok, 4, data_file, prompt_column="prompt", completion_column="completion")
    prompt_lengths = [len(tok(s)["input_ids"]) for s in SENTENCES[:4]]
    ids, mask = batch["input_ids"], batch["attention_mask"]

    def completion_only(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Independent of the labels' -100: the completion positions come from the prompts' own lengths.
        row = int(target[0, -1])  # which sample of the batch the reference loop is on (smuggled in the target)
        t = torch.arange(prompt_lengths[row], int(mask[row].sum()))  # completion positions (+ end token)
        logp = F.log_softmax(logits[0, t - 1], dim=-1)  # (n, V): the logits at t-1 predict token t
        return -logp.gather(1, ids[row, t].unsqueeze(1)).mean().reshape(1)

    want = reference_per_sample_grads(model, ({k: v for k, v in batch.items() if k != "labels"},
                                              torch.arange(4)[:, None].expand(4, 2)), loss_fn=completion_only)
    got = reference_per_sample_grads(model, batch, loss_fn="causal_lm")
    for name in want.grads:
        assert_close(got.grads[name], want.grads[name], rtol=1e-7, atol=1e-9)
    # The prompt tokens would change it: the same rows with every token a target give another gradient.
    full = {**batch, "labels": ids.masked_fill(mask == 0, -100)}
    other = reference_per_sample_grads(model, full, loss_fn="causal_lm")
    assert not torch.allclose(other.grad_norm, want.grad_norm)


def test_sum_reduction_scales_each_gradient_by_its_target_count(tok, data_file):
    model = _build("llama", len(tok))
    batch = _batch(tok, 3, data_file, text_column="text")
    n = (batch["labels"][:, 1:] != -100).sum(dim=1).double()  # (B,)
    mean = GradientExtractor(model, dim=16, loss_fn="causal_lm")(batch)
    total = GradientExtractor(model, dim=16, loss_fn="causal_lm_sum")(batch)
    assert_close(total.z, mean.z * n[:, None].float(), rtol=1e-5, atol=1e-6)
    assert_close(total.loss, mean.loss * n)


# ---------------------------------------------------------------------------------------------- loaders
def test_text_loader_marks_the_targets_of_each_mode(tok, data_file):
    text = _batch(tok, 2, data_file, text_column="text")
    assert torch.equal(text["labels"], text["input_ids"].masked_fill(text["attention_mask"] == 0, -100))
    pc = _batch(tok, 2, data_file, prompt_column="prompt", completion_column="completion")
    n_prompt = len(tok(SENTENCES[0])["input_ids"])
    assert (pc["labels"][0, :n_prompt] == -100).all()
    want = tok(SENTENCES[1], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert pc["labels"][0, n_prompt:].tolist()[: len(want)] == want
    chat = _batch(tok, 1, data_file, messages_column="messages")
    words = tok.convert_ids_to_tokens(chat["input_ids"][0].tolist())
    targets = [w for w, lab in zip(words, chat["labels"][0].tolist()) if lab != -100]
    assert targets == SENTENCES[1].split() + ["</s>"]  # the assistant's reply and its end of turn, nothing else


def test_truncation_is_counted(tok, data_file):
    src = open_text(str(data_file), tok, text_column="text", max_length=5, batch_size=4)
    batches = list(src)
    assert max(b[0]["input_ids"].shape[1] for b in batches) == 5
    long = sum(len(s.split()) > 5 for s in SENTENCES)
    assert src.report()["truncated"] == long > 0


@pytest.mark.parametrize(
    ("columns", "max_length", "match"),
    [
        ({"prompt_column": "prompt", "completion_column": "completion"}, 4, "empty after truncation"),
        ({"messages_column": "messages"}, 6, "no assistant token"),
        ({"text_column": "nope"}, 64, "not a column"),
        ({"prompt_column": "prompt"}, 64, "go together"),
    ],
)
def test_bad_text_input_is_refused_clearly(tok, data_file, columns, max_length, match):
    with pytest.raises(ValueError, match=match):
        list(open_text(str(data_file), tok, max_length=max_length, **columns))


def test_conversation_without_assistant_and_tokenizer_without_template_are_refused(tok, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hello"}]}) + "\n")
    with pytest.raises(ValueError, match="no assistant turn"):
        list(open_text(str(path), tok, messages_column="messages"))
    with pytest.raises(ValueError, match="chat template"):
        open_text(str(path), _tokenizer(chat_template=False), messages_column="messages")
    with pytest.raises(ValueError, match="tokenizer"):
        open_text(str(path), None, messages_column="messages")


# ------------------------------------------------------------------------------------- scan and tables
def _scan(tmp_path, tok, data_file, name="gpt2", shard_rows=8192, **kw):
    model = _build(name, len(tok), torch.float32)
    src = open_text(str(data_file), tok, batch_size=3, id_column="id", **kw)
    return scan(model, src, out=tmp_path / name, dim=16, shard_rows=shard_rows), src


@pytest.mark.parametrize("name", list(MODELS))
def test_lm_scan_writes_the_lm_manifest_and_the_token_table(tmp_path, tok, data_file, name):
    result, src = _scan(tmp_path, tok, data_file, name, shard_rows=3, prompt_column="prompt",
                        completion_column="completion")
    assert result.task.value == "causal-lm"
    m = result.manifest()
    assert list(m.columns) == LM_COLUMNS and set(REQUIRED_COLUMNS_LM) <= set(m.columns)
    assert m.attrs["hardmine"]["loss"] == "causal_lm"
    assert m.attrs["hardmine"]["hardness_weights_used"] == {"perplexity": 1.0, "grad_norm": 1.0}
    assert m.attrs["hardmine"]["export"]["strategy"] == "proportional"  # no classes to balance
    again = result.rescore()
    assert set(again.columns) == set(LM_COLUMNS) and again["rank"].tolist() == m["rank"].tolist()
    assert list(result.manifest().columns) == LM_COLUMNS
    pf = pq.ParquetFile(result.path / "tokens.parquet")
    schema = pf.schema_arrow
    assert schema.names == list(TOKEN_COLUMNS)
    assert [str(schema.field(c).type) for c in TOKEN_COLUMNS] == [
        "string", "int32", "int64", "string", "bool", "float", "float", "bool"]
    assert pf.num_row_groups == 3  # one per shard of 3 samples: streamed, part by part
    assert not list((result.path / "shards").glob("tokens-*"))  # the parts are gone once merged
    t = pf.read().to_pandas()
    assert t["sample_id"].drop_duplicates().tolist() == m["sample_id"].tolist()  # scan order
    assert all((g["position"].to_numpy() == np.arange(len(g))).all() for _, g in t.groupby("sample_id", sort=False))
    # One row per real token; the first has no prediction.
    assert len(t) == sum(len(tok(p)["input_ids"]) + len(tok(c, add_special_tokens=False)["input_ids"]) + 1
                         for p, c in zip(SENTENCES, SENTENCES[1:] + SENTENCES[:1]))
    first = t["position"] == 0
    assert t.loc[first, ["loss", "entropy", "top1"]].isna().all().all()
    assert t.loc[~first, ["loss", "entropy", "top1"]].notna().all().all()
    assert t.loc[first, "token"].tolist() == [s.split()[0] for s in SENTENCES]
    # The per-sample loss is the mean of its target tokens' losses; the LM columns agree with the table.
    tg = t[t["is_target"]].groupby("sample_id", sort=False)
    by = m.set_index("sample_id")
    assert_close(tg["loss"].mean().to_numpy(np.float64), by.loc[tg["loss"].mean().index, "loss"].to_numpy(), rtol=1e-5, atol=1e-6)
    assert (tg.size() == by.loc[tg.size().index, "n_target_tokens"]).all()
    assert_close(np.exp(m["loss"].to_numpy()), m["perplexity"].to_numpy(), rtol=1e-6, atol=0)
    assert_close(tg["loss"].max().to_numpy(np.float64), by.loc[tg.size().index, "max_token_loss"].to_numpy(), rtol=1e-5, atol=1e-6)
    assert_close((1 - tg["top1"].mean()).to_numpy(np.float64), by.loc[tg.size().index, "top1_miss_rate"].to_numpy())
    # Prompt tokens are in the table (for reading) but never targets.
    n_prompt = {f"s{i}": len(tok(s)["input_ids"]) for i, s in enumerate(SENTENCES)}
    assert not t[t["position"] < t["sample_id"].map(n_prompt)]["is_target"].any()


def test_sum_reduction_scan_and_auto_task_from_the_output_shape(tmp_path, tok, data_file, caplog):
    class Wrapped(nn.Module):  # no Hugging Face class name or config: only the output shape tells
        def __init__(self) -> None:
            super().__init__()
            self.inner = _build("gpt2", len(tok), torch.float32)

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

    model = Wrapped()
    batches = [{**b[0], "labels": b[1]} for b in open_text(str(data_file), tok, text_column="text", batch_size=4)]
    with caplog.at_level("WARNING", logger="hardmine.scan.task"):
        kind, loss, _ = resolve_task(model, batches, "auto", None, "mean", labelled=True)
    assert (kind.value, loss) == ("causal-lm", "causal_lm")
    assert "a per-token tagger is not a causal LM" in caplog.text  # only the shape said so: a warning
    mean = scan(model, batches, out=tmp_path / "mean", dim=16).manifest()
    total = scan(model, iter(batches), out=tmp_path / "sum", dim=16, token_reduction="sum").manifest()
    assert_close(total["loss"].to_numpy(), (mean["loss"] * mean["n_target_tokens"]).to_numpy(), rtol=1e-5, atol=1e-5)
    assert_close(total["perplexity"].to_numpy(), mean["perplexity"].to_numpy(), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="causal-LM scans only"):
        scan(model, batches, out=tmp_path / "bad", dim=16, task="classification", token_reduction="sum")


def test_classifier_batches_are_not_taken_for_a_causal_lm():
    model = nn.Sequential(nn.Linear(4, 3))
    data = [(torch.randn(5, 4), torch.randint(0, 3, (5,)))]
    assert resolve_task(model, data, "auto", None, "mean", labelled=True)[0] is None  # as before: per batch
    gpt2_cls = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(n_embd=8, n_layer=1, n_head=2))
    assert resolve_task(gpt2_cls, data, "auto", None, "mean", labelled=True)[0] is None


def test_resumed_lm_scan_keeps_every_token_part(tmp_path, tok, data_file):
    # A scan killed after its first shard: the shard's token part is on disk with it, and the rerun completes.
    model = _build("gpt2", len(tok), torch.float32)
    batches = [{**b[0], "labels": b[1]} for b in open_text(str(data_file), tok, text_column="text", batch_size=2)]

    def failing():
        yield from batches[:2]
        raise RuntimeError("killed")

    class Flaky:
        calls = 0

        def __iter__(self):
            Flaky.calls += 1
            return failing() if Flaky.calls == 1 else iter(batches)

    with pytest.raises(RuntimeError, match="killed"):
        scan(model, Flaky(), out=tmp_path / "s", dim=16, shard_rows=2)
    assert (tmp_path / "s" / "shards" / "tokens-00000.parquet").is_file()
    resumed = scan(model, Flaky(), out=tmp_path / "s", dim=16, shard_rows=2)
    fresh = scan(model, batches, out=tmp_path / "fresh", dim=16, shard_rows=2)
    pd.testing.assert_frame_equal(pd.read_parquet(resumed.path / "tokens.parquet"),
                                  pd.read_parquet(fresh.path / "tokens.parquet"))


# ---------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize(
    "columns",
    [["--text-column", "text"], ["--prompt-column", "prompt", "--completion-column", "completion"],
     ["--messages-column", "messages", "--max-length", "14"]],
)
def test_cli_scans_a_causal_lm(tmp_path, model_dir, data_file, columns):
    out = tmp_path / "scan"
    res = CliRunner().invoke(app, ["scan", str(model_dir), str(data_file), "--out", str(out), "--id-column", "id",
                                   "--dim", "16", "--batch-size", "4", "--json", *columns])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{"):])
    assert summary["task"] == "causal-lm" and summary["samples"] == len(SENTENCES)
    assert "vmap" not in summary["engine_plan"].values()
    m = pd.read_parquet(out / "manifest.parquet")
    assert list(m.columns) == LM_COLUMNS
    data = json.loads((out / "scan.json").read_text())["data"]
    if "--max-length" in columns:  # the longer conversations are cut, each keeping assistant tokens
        assert data["truncated"] == summary["truncated"] > 0
    else:
        assert data["truncated"] == 0
    assert data["target_tokens"] == int(m["n_target_tokens"].sum())
    assert pq.read_schema(out / "tokens.parquet").names == list(TOKEN_COLUMNS)
    if columns[0] == "--text-column":  # the commands that read any scan read an LM scan; review needs labels
        runner = CliRunner()
        assert runner.invoke(app, ["report", str(out), "--out", str(tmp_path / "r.html")]).exit_code == 0
        assert runner.invoke(app, ["neighbors", str(out), "--ids", "s1", "-k", "2", "--json"]).exit_code == 0
        review = runner.invoke(app, ["review", str(out), "--out", str(tmp_path / "q.csv")])
        assert review.exit_code == 2 and "classification scan" in review.output
        # Token-level hardness on the scan's own table: the thresholds were stored by the scan (no reader pass),
        # and the command shows the sample's rows with their tiers.
        from hardmine.scan import Scan
        from hardmine.tokens import TIERS_METADATA_KEY, TierAccumulator, tier_thresholds

        table = pq.read_table(out / "tokens.parquet")
        assert TIERS_METADATA_KEY.encode() in pq.read_metadata(out / "tokens.parquet").metadata
        acc = TierAccumulator()
        acc.update(table.column("is_target"), table.column("loss"))
        assert tier_thresholds(out) == acc.thresholds()  # the stored thresholds are the table's own
        rows = Scan.open(out).tokens("s1")
        assert rows["sample_id"].eq("s1").all() and rows["position"].tolist() == list(range(len(rows)))
        res = runner.invoke(app, ["tokens", str(out), "--id", "s1", "--json"])
        assert res.exit_code == 0, res.output
        shown = json.loads(res.output[res.output.index("{"):])
        assert [r["token_id"] for r in shown["tokens"]] == rows["token_id"].tolist()
        html = tmp_path / "s1.html"
        assert runner.invoke(app, ["tokens", str(out), "--id", "s1", "--html", str(html)]).exit_code == 0
        assert html.is_file()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--messages-column", "messages", "--max-length", "8"], "no assistant token"),
        (["--prompt-column", "prompt", "--completion-column", "completion", "--max-length", "3"], "empty after truncation"),
        (["--text-column", "missing"], "not a column"),
        (["--text-column", "text", "--loss", "mse"], "does not apply to a causal LM"),
    ],
)
def test_cli_refuses_bad_lm_input_with_exit_2(tmp_path, model_dir, data_file, args, match):
    res = CliRunner().invoke(app, ["scan", str(model_dir), str(data_file), "--out", str(tmp_path / "s"), "--dim", "16",
                                   *args])
    assert res.exit_code == 2, res.output
    assert match in " ".join(res.output.split())


def test_cli_refuses_a_model_directory_without_tokenizer(tmp_path, data_file, tok):
    d = tmp_path / "bare"
    _gpt2(len(tok)).save_pretrained(d)
    res = CliRunner().invoke(app, ["scan", str(d), str(data_file), "--out", str(tmp_path / "s"), "--text-column", "text"])
    assert res.exit_code == 2, res.output
    assert "tokenizer" in res.output


def test_parquet_and_csv_give_the_same_batches_as_jsonl(tok, data_file, tmp_path):
    rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")  # messages: a list<struct> column
    pd.DataFrame([{**r, "messages": json.dumps(r["messages"])} for r in rows]).to_csv(tmp_path / "d.csv", index=False)
    for columns in ({"text_column": "text"}, {"messages_column": "messages"}):
        want = list(open_text(str(data_file), tok, id_column="id", batch_size=3, **columns))
        for other in ("d.parquet", "d.csv"):
            got = list(open_text(str(tmp_path / other), tok, id_column="id", batch_size=3, **columns))
            assert len(got) == len(want) == 3
            for (gi, gl, gids), (wi, wl, wids) in zip(got, want):
                assert gids == wids
                assert torch.equal(gl, wl) and all(torch.equal(gi[k], wi[k]) for k in wi)


def test_token_parts_stream_into_one_row_group_each_with_a_footer(tmp_path):
    from hardmine.lm import token_schema
    from hardmine.scan.store import ScanStore

    store = ScanStore(tmp_path)
    schema = token_schema("int")
    for i in range(2):
        n = 3 + i
        table = pa.Table.from_pydict({
            "sample_id": [i] * n, "position": list(range(n)), "token_id": list(range(n)), "token": ["a"] * n,
            "is_target": [False] + [True] * (n - 1), "loss": [None] + [1.0] * (n - 1),
            "entropy": [None] + [2.0] * (n - 1), "top1": [None] + [True] * (n - 1)}, schema=schema)
        store.write_token_part(i, table)
    seen: list[int] = []
    store.write_tokens(2, schema, on_part=lambda t: seen.append(t.num_rows), footer=lambda: {"k": "v"})
    pf = pq.ParquetFile(store.tokens_path)
    assert seen == [3, 4] and pf.num_row_groups == 2 and pf.metadata.metadata[b"k"] == b"v"
    assert pf.schema_arrow == schema and not list((tmp_path / "shards").glob("tokens-*"))


def test_cli_scans_a_lora_adapter_of_a_causal_lm(tmp_path, model_dir, data_file, tok):
    peft = pytest.importorskip("peft")
    base = transformers.GPT2LMHeadModel.from_pretrained(model_dir)
    lora = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, target_modules=["c_attn"],
                                                     fan_in_fan_out=True))
    with torch.no_grad():  # a trained adapter: B is not zero, so its gradients are not trivial
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    lora.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(model_dir)
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "scan"
    res = CliRunner().invoke(app, ["scan", str(tmp_path / "adapter"), str(data_file), "--out", str(out),
                                   "--prompt-column", "prompt", "--completion-column", "completion", "--dim", "16",
                                   "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output[res.output.index("{"):])["engine_plan"]
    assert plan and all("lora_" in n for n in plan) and set(plan.values()) == {"factored"}
    assert list(pd.read_parquet(out / "manifest.parquet").columns) == LM_COLUMNS


def test_token_stats_read_the_logits_one_position_back_in_any_chunking(monkeypatch):
    import hardmine.lm as lm

    g = torch.Generator().manual_seed(1)
    b, t, v = 5, 7, 11
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64)
    ids = torch.randint(0, v, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt
    ts = lm.token_stats(logits, {"input_ids": ids}, labels)
    p = torch.softmax(logits[1, 3], dim=0)  # the distribution that predicts token 4 of sample 1
    assert ts.token_loss[1, 4] == pytest.approx(-float(torch.log(p[ids[1, 4]])))
    assert ts.entropy[1, 4] == pytest.approx(-float((p * p.log()).sum()))
    assert bool(ts.top1[1, 4]) == (int(p.argmax()) == int(ids[1, 4]))
    assert np.isnan(ts.token_loss[:, 0]).all() and not ts.target[:, :3].any() and ts.target[:, 3:].all()
    monkeypatch.setattr(lm, "CHUNK_ELEMENTS", 2 * t * v)  # two samples per chunk
    small = lm.token_stats(logits, {"input_ids": ids}, labels)
    for name in ("token_loss", "label_loss", "entropy", "top1", "target"):
        np.testing.assert_array_equal(getattr(small, name), getattr(ts, name))


def test_a_tokenizer_without_pad_token_pads_with_its_end_of_sequence_token(data_file):
    tok = _tokenizer()
    tok.pad_token = None
    assert tok.pad_token_id is None
    inputs, labels, _ = next(iter(open_text(str(data_file), tok, text_column="text", batch_size=3)))
    pad = inputs["attention_mask"] == 0
    assert pad.any() and (inputs["input_ids"][pad] == tok.eos_token_id).all() and (labels[pad] == -100).all()
    assert tok.pad_token is None  # the user's tokenizer is left as it was


def test_classifier_options_read_a_causal_lm_directory_as_a_classifier(tmp_path, model_dir, tok):
    path = tmp_path / "labelled.csv"
    pd.DataFrame({"text": SENTENCES, "label": [i % 2 for i in range(len(SENTENCES))]}).to_csv(path, index=False)
    res = CliRunner().invoke(app, ["scan", str(model_dir), str(path), "--out", str(tmp_path / "s"), "--text-column",
                                   "text", "--allow-new-head", "--num-classes", "2", "--dim", "16", "--json"])
    assert res.exit_code == 0, res.output
    m = pd.read_parquet(tmp_path / "s" / "manifest.parquet")
    assert "label" in m and "perplexity" not in m
    assert not (tmp_path / "s" / "tokens.parquet").exists()


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_a_distributed_part_of_text_data_is_exactly_its_rows_with_global_ids(tok, data_file, tmp_path, fmt):
    rows = [json.loads(line) for line in data_file.read_text().splitlines()] * 3  # 24 rows
    for i, r in enumerate(rows):
        r["id"] = f"r{i}"
    path = tmp_path / f"d.{fmt}"
    frame = pd.DataFrame([{"id": r["id"], "text": r["text"]} for r in rows])
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" + ("\n" if i % 5 == 0 else "") for i, r in enumerate(rows)))
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pandas(frame), path, row_group_size=5)
    else:
        frame.to_csv(path, index=False)
    for id_column in ("id", None):
        src = open_text(str(path), tok, text_column="text", id_column=id_column, batch_size=4)
        whole = [(sid, ids.tolist()) for inputs, _, b_ids in src
                 for sid, ids, m in zip(b_ids, inputs["input_ids"], inputs["attention_mask"])
                 for ids in [ids[m.bool()]]]
        assert len(whole) == 24
        parts = []
        for start, stop in ((0, 7), (7, 8), (8, 19), (19, 24)):
            part = src.rows(start, stop)
            assert part.tokenizer is tok and part.total == stop - start
            parts += [(sid, ids[m.bool()].tolist()) for inputs, _, b_ids in part
                      for sid, ids, m in zip(b_ids, inputs["input_ids"], inputs["attention_mask"])]
        assert parts == whole  # the same rows, tokens and (global) ids, in order


def test_torchrun_causal_lm_scan_matches_one_process_with_one_token_table(tmp_path, model_dir, data_file):
    import os
    import subprocess
    import sys

    args = [str(model_dir), str(data_file), "--task", "causal-lm", "--text-column", "text", "--id-column", "id",
            "--dim", "16", "--shard-rows", "2", "--batch-size", "2", "--max-length", "5", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "hardmine",
           "scan", *args, "--out", str(tmp_path / "two")]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    one = CliRunner().invoke(app, ["scan", *args, "--batch-size", "3", "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    # One summary (rank 0's), whose data report covers every rank's rows, as the single process's does.
    two_summary = json.loads(run.stdout)
    one_summary = json.loads(one.output[one.output.index("{"):])
    assert two_summary["truncated"] == one_summary["truncated"] > 0
    data = [json.loads((tmp_path / d / "scan.json").read_text())["data"] for d in ("two", "one")]
    assert {k: data[0][k] for k in ("samples", "truncated", "target_tokens")} == {
        k: data[1][k] for k in ("samples", "truncated", "target_tokens")}
    a = pd.read_parquet(tmp_path / "two" / "manifest.parquet")
    b = pd.read_parquet(tmp_path / "one" / "manifest.parquet")
    assert a["sample_id"].tolist() == b["sample_id"].tolist() and a["rank"].tolist() == b["rank"].tolist()
    for c in ("loss", "perplexity", "token_entropy_mean", "max_token_loss", "grad_norm", "global_divergence"):
        assert_close(a[c].to_numpy(), b[c].to_numpy(), rtol=1e-4, atol=1e-5)
    ta, tb = (pq.ParquetFile(tmp_path / d / "tokens.parquet") for d in ("two", "one"))
    assert ta.num_row_groups == 4  # each rank's 2 shards of 2 samples, streamed part by part in rank order
    assert not list((tmp_path / "two" / "ranks").glob("*/shards/tokens-*"))  # the parts are gone once merged
    x, y = ta.read().to_pandas(), tb.read().to_pandas()
    assert x[["sample_id", "position", "token_id", "is_target"]].equals(y[["sample_id", "position", "token_id", "is_target"]])
    assert_close(x["loss"].to_numpy(), y["loss"].to_numpy(), rtol=1e-4, atol=1e-5, equal_nan=True)
    assert b"hardmine_token_tiers" in ta.metadata.metadata


def test_lm_signals_rank_planted_hard_sequences_as_harder(tmp_path, tok):
    # Planted truth on a random model: "easy" sequences are its own greedy continuations (every target is its
    # top-1 token), "hard" ones are uniformly random tokens. Each LM signal with a direction must rank the hard
    # ones higher. (token_entropy_mean is a property of the contexts, not of the targets: not planted here.)
    from hardmine.score import SCORE_TABLE

    model = _build("gpt2", len(tok), torch.float32, seed=3)
    g = torch.Generator().manual_seed(0)
    n, t = 24, 10
    easy = torch.randint(7, len(tok), (n, 1), generator=g)
    with torch.no_grad():
        for _ in range(t - 1):
            easy = torch.cat([easy, model(input_ids=easy).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    hard = torch.randint(7, len(tok), (n, t), generator=g)
    ids = torch.cat([easy, hard])  # (2n, t)
    batches = [({"input_ids": ids[i:i + 8], "attention_mask": torch.ones_like(ids[i:i + 8])}, ids[i:i + 8])
               for i in range(0, 2 * n, 8)]
    m = scan(model, batches, out=tmp_path / "planted", dim=16, task="causal-lm").manifest().sort_values("sample_id")
    is_hard = m["sample_id"].to_numpy() >= n
    assert (m.loc[~is_hard, "top1_miss_rate"] == 0).all()  # the planting worked: every easy target is top-1

    def auroc(score: np.ndarray) -> float:
        r = pd.Series(score).rank(method="average").to_numpy()
        return float((r[is_hard].sum() - n * (n + 1) / 2) / (n * n))

    for name in ("loss", "perplexity", "top1_miss_rate", "max_token_loss"):
        harder_when = SCORE_TABLE[name].harder_when
        assert harder_when == "higher", name
        assert auroc(m[name].to_numpy(np.float64)) > 0.9, name


def test_left_padded_targets_are_refused_and_the_first_real_token_has_no_prediction(tmp_path, tok):
    from hardmine.lm import TokenTable, token_stats

    torch.manual_seed(0)
    logits = torch.randn(2, 5, len(tok))
    ids = torch.randint(7, len(tok), (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    labels = ids.masked_fill(mask == 0, -100)
    with pytest.raises(ValueError, match="follows padding"):  # its logits would be a pad position's
        token_stats(logits, {"input_ids": ids, "attention_mask": mask}, labels)
    labels[0, 2] = -100  # the user masked it: fine, and the table gives that token no prediction
    ts = token_stats(logits, {"input_ids": ids, "attention_mask": mask}, labels)
    rows = TokenTable().rows(np.array([0, 1]), ts).to_pandas()
    first = rows[rows["position"] == 0]
    assert len(first) == 2 and first[["loss", "entropy", "top1"]].isna().all().all()
    assert not first["is_target"].any() and rows[rows["position"] > 0]["loss"].notna().all()


def test_lm_scan_copies_no_logits_to_the_host(tmp_path, tok, data_file, monkeypatch):
    # The token statistics are computed where the logits are; what goes to the host is (B,) and (B, T) arrays,
    # never the (B, T, V) logits (on a GPU that copy would be the whole vocabulary per token).
    from hardmine.engine import ProjectedBatch

    copied = []
    real = ProjectedBatch.to_host

    def spy(self):
        copied.append(tuple(self.output.shape))
        return real(self)

    monkeypatch.setattr(ProjectedBatch, "to_host", spy)
    _scan(tmp_path, tok, data_file, text_column="text")
    assert copied and all(s[1:] == (0,) for s in copied), copied


def test_a_generation_prompt_unlike_the_rendered_history_is_refused(data_file):
    # The generation prompt names the assistant differently from the history: cutting the turn's body at the
    # prompt's length would scan tokens the template never produces, so the conversation is refused.
    bad = _tokenizer()
    bad.chat_template = TEMPLATE.replace("{{ '<|assistant|> ' }}", "{{ '<|system|> ' }}")
    with pytest.raises(ValueError, match="renders the first"):
        list(open_text(str(data_file), bad, messages_column="messages"))


def test_a_later_batch_with_a_label_outside_the_vocabulary_is_refused(tok, data_file):
    """Later batches check token labels on the device and recheck on the host only when the flag is set; the
    recheck sees the logits' shape (not the logits themselves, which a pending batch no longer keeps alive)
    and still names the bad label and the vocabulary."""
    model = _build("gpt2", len(tok))
    batch = _batch(tok, 3, data_file, prompt_column="prompt", completion_column="completion")
    ext = GradientExtractor(model, dim=4, loss_fn="causal_lm")
    ext(batch)  # the first batch: checked on the host
    bad = dict(batch, labels=batch["labels"].clone())
    bad["labels"][1, -1] = len(tok) + 5
    with pytest.raises(ValueError, match=rf"label {len(tok) + 5} is not a token id of a model with a vocabulary"):
        ext(bad)
        ext.flush_checks()
    assert torch.isfinite(ext(batch).z).all()  # and the extractor keeps working


def test_an_lm_scan_refuses_a_later_batch_with_a_label_outside_the_vocabulary(tmp_path, tok, data_file):
    """The token statistics no longer wait for the label check before they run (their gathers clamp the
    labels): a bad label in a later batch is still refused before that batch is written, and no manifest."""
    model = _build("gpt2", len(tok), torch.float32)
    batches = [{**b[0], "labels": b[1]} for b in open_text(str(data_file), tok, text_column="text", batch_size=2)]
    assert len(batches) >= 3
    bad = batches[2]["labels"].clone()
    bad[0, -1] = len(tok) + 3
    batches[2] = {**batches[2], "labels": bad}
    with pytest.raises(ValueError, match=rf"label {len(tok) + 3} is not a token id"):
        scan(model, batches, out=tmp_path / "s", dim=8, shard_rows=2)
    assert not (tmp_path / "s" / "manifest.parquet").exists()
    done = json.loads((tmp_path / "s" / "progress.json").read_text())["shards"]
    assert [s["rows"] for s in done] == [[0, 2], [2, 4]]  # the batches before it, and not the bad one


def test_token_statistics_take_ids_past_the_vocabulary_without_faulting():
    """The gathers clamp token ids: a label (or input id) past the output vocabulary gives a meaningless value
    at its own position, which the scan's label check refuses after the copy, and must not fault the device
    first (on the CPU: an index error). Every other position is what it is with a valid id there."""
    from hardmine.lm import token_stats

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    labels = ids.clone()
    labels[0, 1] = -100
    bad = labels.clone()
    bad[1, 3] = 7 + 2
    ids_bad = ids.clone()
    ids_bad[0, 4] = 7 + 1
    got = token_stats(logits, {"input_ids": ids_bad}, bad)
    ref = token_stats(logits, {"input_ids": ids}, labels)
    keep = np.ones((2, 5), dtype=bool)
    keep[1, 3] = keep[0, 4] = False
    for name in ("label_loss", "token_loss", "entropy"):
        np.testing.assert_array_equal(getattr(got, name)[keep], getattr(ref, name)[keep], err_msg=name)
    np.testing.assert_array_equal(got.target, ref.target)
