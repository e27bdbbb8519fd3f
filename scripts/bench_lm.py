"""Causal-LM gradient extraction on a GPT-2-shape model: the factored pass against a training step.

Model: ``transformers.GPT2LMHeadModel`` from a random config, 4 layers, width 256, 4 heads, 128 positions,
vocabulary ``--vocab`` (8192: GPT-2's 50257 would make the tied LM head most of the model and of the time),
dropout off; batch ``--batch`` (16) of ``--seq`` (128) random tokens, every token a target. Loss: the
per-sample mean next-token NLL (``hardmine.losses.causal_lm_per_sample``).

Methods, each producing one batch's result:

* ``train_step`` -- forward + mean of the per-sample losses + backward + plain SGD step (the reference: 1.0);
* ``factored`` -- ``GradientExtractor(engine="factored")`` over every trainable parameter (attention and MLP
  ``Conv1D``, LayerNorms, token and position embeddings, the LM head tied to the token embedding): one
  batched forward + backward, Kronecker projections (``--dim`` per weight matrix) and exact ghost norms.

Each (method, repeat) runs in a fresh subprocess, alternating: throughput = ``batch / median seconds per
batch`` after a warm-up; memory = peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` once the
model and batch exist) minus the resident set before the method was set up. The memory is compared with
``batch x params x 4`` bytes (the per-sample gradients a naive method would hold) and with
``batch x (k + seq x width) x 4`` bytes (the projections plus one activation per sample). Before timing, the
factored vectors are checked against ``reference_per_sample_grads`` on 2 short samples (non-zero exit if not).

Writes ``scripts/results/bench_lm.{json,md}``; ``docs/benchmarks.md`` includes the table
(``scripts/update_readme.py``). Usage: ``python scripts/bench_lm.py [--repeats 3] [--quick]``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_extract import _reset_peak, _status_kb  # noqa: E402  (the same memory probes)

METHODS = ("train_step", "factored")
LAYERS, WIDTH, HEADS = 4, 256, 4


def build(batch: int, seq: int, vocab: int, seed: int = 0) -> tuple[nn.Module, tuple[dict, torch.Tensor]]:
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(
        vocab_size=vocab, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS, n_positions=max(seq, 8),
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return model, ({"input_ids": ids}, ids.clone())


def make_method(name: str, model: nn.Module, batch: Any, dim: int):
    from hardmine.engine import GradientExtractor
    from hardmine.losses import causal_lm_per_sample

    inputs, labels = batch
    if name == "train_step":
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        model.train()

        def step() -> Any:
            loss = causal_lm_per_sample(model(**inputs).logits, labels).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        return step, None
    if name == "factored":
        ext = GradientExtractor(model, dim=dim, seed=0, engine="factored", loss_fn=causal_lm_per_sample)

        def step() -> Any:
            return ext(batch).z

        return step, ext.out_dim
    raise ValueError(f"unknown method {name!r}")


def measure(method: str, args: argparse.Namespace) -> dict[str, Any]:
    model, batch = build(args.batch, args.seq, args.vocab)
    before = _status_kb("VmRSS")
    if not _reset_peak():
        print("warning: cannot reset VmHWM; peak_extra_mb includes setup", file=sys.stderr)
    step, out_dim = make_method(method, model, batch, args.dim)
    for _ in range(args.warmup):
        step()
    times: list[float] = []
    t0 = time.perf_counter()
    while len(times) < args.iters or (time.perf_counter() - t0 < args.min_time and len(times) < 50):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = _status_kb("VmHWM")
    return {
        "method": method,
        "samples_per_s": args.batch / statistics.median(times),
        "peak_extra_mb": max(0.0, (peak - before) / 1024),
        "proj_dim": out_dim,
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "iters": len(times),
    }


def check_agreement(dim: int, vocab: int) -> tuple[float, float]:
    """factored vs the per-sample autograd loop on 2 samples of 16 tokens: max relative error of the
    vectors and of the norms."""
    from hardmine.engine import GradientExtractor
    from hardmine.extract import reference_per_sample_grads
    from hardmine.losses import causal_lm_per_sample

    model, batch = build(2, 16, vocab, seed=1)
    model.eval()
    ext = GradientExtractor(model, dim=dim, seed=0, engine="factored", loss_fn=causal_lm_per_sample)
    res = ext(batch)
    ref = reference_per_sample_grads(model, batch, loss_fn=causal_lm_per_sample)
    layout = ext.layout
    z = layout.assemble({n: layout.project_exact(n, g) for n, g in ref.grads.items()})
    rel_z = float((res.z - z).norm(dim=1).max() / z.norm(dim=1).max())
    rel_n = float(((res.grad_norm - ref.grad_norm).abs() / ref.grad_norm).max())
    return rel_z, rel_n


class _Decoder:
    """A stand-in tokenizer for the token column (decoding is cached per id by ``TokenTable`` anyway)."""

    def decode(self, ids: list[int]) -> str:
        return f" t{ids[0]}"


def token_table_cost(args: argparse.Namespace) -> dict[str, Any]:
    """What ``tokens.parquet`` costs inside a real causal-LM scan of the same model: the seconds spent making its
    rows (``TokenTable.rows``), writing the per-shard parts and streaming them into the one file (with the tier
    thresholds), against the scan's wall time; the per-token statistics themselves are reported apart (they also
    give the manifest's LM columns)."""
    import hardmine
    from hardmine.lm import TokenTable
    from hardmine.scan import extraction, store

    spent = {"rows": 0.0, "parts": 0.0, "merge": 0.0, "token_stats": 0.0}

    def timed(owner: Any, name: str, key: str, static: bool = False) -> None:
        fn = getattr(owner, name)

        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t

        setattr(owner, name, staticmethod(wrapper) if static else wrapper)

    timed(TokenTable, "rows", "rows")
    timed(store.ScanStore, "write_token_part", "parts")
    timed(extraction, "write_token_table", "merge")
    timed(extraction.ExtractionPass, "_token_stats", "token_stats", static=True)
    model, _ = build(args.batch, args.seq, args.vocab)
    model.eval()
    g = torch.Generator().manual_seed(1)
    n = args.scan_samples
    batches = []
    for lo in range(0, n, args.batch):
        ids = torch.randint(0, args.vocab, (min(args.batch, n - lo), args.seq), generator=g)
        batches.append(({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids))
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        hardmine.scan(model, batches, out=Path(d) / "scan", dim=args.dim, task="causal-lm", tokenizer=_Decoder(),
                      shard_rows=max(args.batch, n // 4))
        wall = time.perf_counter() - t0
        size = (Path(d) / "scan" / "tokens.parquet").stat().st_size
    writing = spent["rows"] + spent["parts"] + spent["merge"]
    return {"samples": n, "tokens": n * args.seq, "scan_s": wall, "token_table_s": writing,
            "token_table_share": writing / wall, "token_stats_s": spent["token_stats"],
            "token_stats_share": spent["token_stats"] / wall, "tokens_parquet_bytes": size, **spent}


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def summarise(runs: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for m in METHODS:
        mine = [r for r in runs if r["method"] == m]
        rows.append(
            {
                "method": m,
                "samples_per_s": statistics.median(r["samples_per_s"] for r in mine),
                "peak_extra_mb": max(r["peak_extra_mb"] for r in mine),
                "proj_dim": mine[0]["proj_dim"],
                "params": mine[0]["params"],
            }
        )
    ref = rows[0]["samples_per_s"]
    for r in rows:
        r["ratio_to_train_step"] = r["samples_per_s"] / ref
        r["peak_extra_bytes_per_sample"] = r["peak_extra_mb"] * 2**20 / args.batch
    return rows


def markdown(res: dict[str, Any]) -> str:
    """The Markdown table and notes of one run (``res``: what ``main`` writes to the JSON file)."""
    rows, a, agree, load = res["rows"], res["args"], res["agreement"], res["load_average_1min"]
    b, seq, vocab = a["batch"], a["seq"], a["vocab"]
    head = ["method", "samples/s", "ratio to train_step", "peak extra MB", "peak extra MB per sample", "proj dim"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['samples_per_s']:,.1f} | {r['ratio_to_train_step']:.3f} | "
            f"{r['peak_extra_mb']:,.0f} | {r['peak_extra_mb'] / b:,.2f} | "
            f"{'-' if r['proj_dim'] is None else r['proj_dim']} |"
        )
    t, f = rows
    params = f["params"]
    mb = 2**20
    over = f["peak_extra_mb"] - t["peak_extra_mb"]  # what the factored pass needs beyond a training step
    ok = "met" if f["ratio_to_train_step"] >= 0.8 else "NOT met"
    lines += [
        "",
        f"- factored = {f['ratio_to_train_step']:.2f}x train_step (target >= 0.8: {ok})",
        f"- memory: factored peak extra minus train_step's = {over:,.0f} MB ({over / b:,.2f} MB per sample); for "
        f"scale, per-sample gradients of every parameter (batch x params x 4 bytes) = {b * params * 4 / mb:,.0f} "
        f"MB, one float32 (batch, seq, vocab) logits buffer = {b * seq * vocab * 4 / mb:,.0f} MB, batch x (k + "
        f"seq x width) x 4 bytes = {b * (f['proj_dim'] + seq * WIDTH) * 4 / mb:,.1f} MB",
        "",
        f"Run: {res['created']}, torch {res['torch']}, {res['machine']}, torch threads {res['threads']}, load "
        f"average {load:.2f} at the start{' (--quick)' if a['quick'] else ''}"
        f"{'; a shared machine: rerun on an idle one' if load > 1.5 else ''}. "
        f"GPT2LMHeadModel {LAYERS} layers, width {WIDTH}, {HEADS} heads, vocab {vocab}, {params:,} "
        f"parameters (LM head tied to the token embedding), batch {b} x seq {seq}, every token a "
        f"target; dim {a['dim']} per weight matrix; every trainable parameter selected. Each method run "
        f"{a['repeats']} time(s) in fresh subprocesses, alternating, median throughput (>= {a['iters']} timed "
        f"batches after {a['warmup']} warm-up) and largest peak shown. peak extra MB = peak RSS (VmHWM, reset "
        "via /proc/self/clear_refs) minus RSS before the method was set up.",
        f"Agreement check (2 samples x 16 tokens, factored vs reference_per_sample_grads, max relative error of "
        f"vectors / norms): {agree[0]:.1e} / {agree[1]:.1e}",
    ]
    tt = res.get("token_table")
    if tt:
        ok_t = "met" if tt["token_table_share"] < 0.10 else "NOT met"
        lines += [
            "",
            f"Token table in a full `hardmine.scan` of the same model ({tt['samples']} samples, {tt['tokens']:,} "
            f"tokens, {tt['scan_s']:.1f} s): making the rows, writing the per-shard parts and streaming them into "
            f"`tokens.parquet` ({tt['tokens_parquet_bytes'] / mb:,.1f} MB, tier thresholds in its footer) took "
            f"{tt['token_table_s']:.2f} s = {100 * tt['token_table_share']:.1f}% of the scan (target < 10%: {ok_t}); "
            f"the per-token statistics (which also give the manifest's LM columns) {tt['token_stats_s']:.2f} s = "
            f"{100 * tt['token_stats_share']:.1f}%.",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: batch 2, seq 16, 1 repeat, 1 batch")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iters", type=int, default=3, help="timed batches per run (at least)")
    ap.add_argument("--min-time", type=float, default=5.0, help="seconds of timed batches per run (at least)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--scan-samples", type=int, default=64, help="samples of the scan that times the token table")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bench_lm.json")
    ap.add_argument("--render", action="store_true", help="only rewrite the Markdown from the JSON file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.batch, args.seq, args.repeats, args.iters, args.min_time, args.warmup = 2, 16, 1, 1, 0.0, 0
        args.scan_samples = 8
    if args.worker:
        print(json.dumps(measure(args.worker, args)))
        return 0
    md = args.out.with_suffix(".md")
    if args.render:
        _atomic_write(md, markdown(json.loads(args.out.read_text())))
        return 0
    load = os.getloadavg()[0]
    agree = check_agreement(16, args.vocab)
    if agree[0] > 1e-3 or agree[1] > 1e-3:
        print(f"factored and the reference disagree: {agree}", file=sys.stderr)
        return 1
    runs = []
    for _ in range(args.repeats):
        for m in METHODS:
            cmd = [sys.executable, __file__, "--worker", m]
            for flag in ("batch", "seq", "vocab", "dim", "iters", "min_time", "warmup"):
                cmd += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"{m}: {runs[-1]['samples_per_s']:.1f} samples/s, peak extra {runs[-1]['peak_extra_mb']:.0f} MB")
    token_table = token_table_cost(args)
    print(f"token table: {100 * token_table['token_table_share']:.1f}% of a {token_table['scan_s']:.1f} s scan")
    res = {
        "token_table": token_table,
        "rows": summarise(runs, args),
        "runs": runs,
        "agreement": list(agree),
        "load_average_1min": load,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "threads": torch.get_num_threads(),
        "args": {k: getattr(args, k) for k in ("batch", "seq", "vocab", "dim", "repeats", "iters", "warmup", "quick")},
    }
    _atomic_write(args.out, json.dumps(res, indent=1) + "\n")
    _atomic_write(md, markdown(res))
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
