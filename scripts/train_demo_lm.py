"""Train the language-model demo: a tiny GPT-2 on Debian's fortune quotations (about a minute on 2 cores).

Reads every quote of ``/usr/share/games/fortunes/*`` (or ``$HARDMINE_FORTUNES``; files of quotes separated by
lines holding only ``%``, installed by ``scripts/install_lm_data.sh``), keeps those of at most ``--max-chars``
characters, trains a byte-level BPE tokenizer (``tokenizers``) and a small ``GPT2LMHeadModel`` on them, and
writes, atomically:

* ``OUT/model/``: the model and its tokenizer (``save_pretrained``), what ``hardmine scan OUT/model`` loads;
* ``OUT/fortunes.jsonl``: one sample per line, ``{"id": "computers/17", "source": "computers", "text": ...}``.

Every sample is trained on with the loss over every token (the ``--text-column`` task of the scan); the
tokenizer adds no special tokens, so training and scan see the same ids.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import torch

from hardmine._io import atomic_path
from hardmine.losses import IGNORE_INDEX, causal_lm_per_sample

FORTUNES = Path(os.environ.get("HARDMINE_FORTUNES", "/usr/share/games/fortunes"))
SKIP = {"ascii-art"}  # pictures, not text


def read_quotes(root: Path, max_chars: int, min_chars: int = 0) -> list[dict[str, str]]:
    """``[{"id", "source", "text"}]`` of every quote of ``min_chars`` to ``max_chars`` characters in the corpus
    files (not the ``.dat`` indexes); ``id`` = ``file/index`` of the quote in its file."""
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.suffix and p.name not in SKIP)
    if not files:
        raise SystemExit(f"no fortune files in {root}; run scripts/install_lm_data.sh")
    rows = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        quotes = [q.strip("\n") for q in re.split(r"^%$", text, flags=re.M)]  # a line holding only "%" ends one
        for i, q in enumerate(quotes):
            q = q.replace("\t", "    ").rstrip()
            if q.strip() and min_chars <= len(q) <= max_chars:
                rows.append({"id": f"{path.name}/{i}", "source": path.name, "text": q})
    return rows


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("demo_out/lm"))
    ap.add_argument("--max-chars", type=int, default=150, help="keep quotes of at most this many characters")
    ap.add_argument(
        "--min-chars", type=int, default=40,
        help="drop shorter quotes (a few tokens: their mean loss is mostly the unpredictable first tokens)",
    )
    ap.add_argument("--max-length", type=int, default=64, help="tokens per training sample (longer: truncated)")
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    rows = read_quotes(FORTUNES, args.max_chars, args.min_chars)
    texts = [r["text"] for r in rows]
    t0 = time.perf_counter()
    tok = train_tokenizer(texts, args.vocab)
    eos = tok.token_to_id("<|endoftext|>")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    ids = [enc.ids[: args.max_length] for enc in tok.encode_batch(texts)]

    cfg = transformers.GPT2Config(
        vocab_size=tok.get_vocab_size(), n_positions=args.max_length, n_embd=args.width, n_layer=args.layers,
        n_head=4, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
    )
    model = transformers.GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(args.seed)
    steps = args.epochs * math.ceil(len(ids) / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    model.train()
    losses: list[float] = []
    for _ in range(args.epochs):
        for idx in torch.randperm(len(ids), generator=g).split(args.batch_size):
            batch = [ids[i] for i in idx.tolist()]
            t = max(len(b) for b in batch)
            x = torch.full((len(batch), t), eos, dtype=torch.long)  # (B, T) right-padded
            labels = torch.full((len(batch), t), IGNORE_INDEX, dtype=torch.long)  # padding is not a target
            mask = torch.zeros((len(batch), t), dtype=torch.long)
            for j, b in enumerate(batch):
                x[j, : len(b)] = torch.tensor(b)
                labels[j, : len(b)] = torch.tensor(b)
                mask[j, : len(b)] = 1
            loss = causal_lm_per_sample(model(input_ids=x, attention_mask=mask).logits, labels).mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    model.eval()

    args.out.mkdir(parents=True, exist_ok=True)
    final = args.out / "model"
    tmp = args.out / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    fast.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.replace(final)  # the directory appears whole or not at all
    with atomic_path(args.out / "fortunes.jsonl") as path, open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    tail = sum(losses[-20:]) / len(losses[-20:])
    print(
        f"trained a {args.layers}-layer GPT-2 (width {args.width}, vocab {cfg.vocab_size}) on {len(rows)} fortunes "
        f"for {steps} steps in {time.perf_counter() - t0:.0f}s; last-steps loss {tail:.2f} nats/token "
        f"(first {losses[0]:.2f}); saved {final} and {args.out / 'fortunes.jsonl'}"
    )


if __name__ == "__main__":
    main()
