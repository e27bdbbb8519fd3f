"""The figures behind hardmine/index.py's choices: IVF recall@10 against exact search by nprobe, and the cost
of exact all-sample kNN as N grows (why ``auto`` stops exact search at ``FLAT_MAX_ROWS``).

Data: projected gradients of a real scan — the demo MLP trained on Fashion-MNIST (``scripts/train_demo_model.py``)
scanned on the 60k training images, output layer only (``--layers fc2``-style selection of the last Linear),
at two projection sizes. Recall: 1,000 random query samples, their 10 nearest neighbours (self excluded) from
an IVF index built with hardmine's own parameters (``ivf_nlist``) vs exact ``IndexFlatIP``, at nprobe
4/8/16/32. Exact cost: wall time of every sample's 10 nearest neighbours through an exact index (what the
scoring pass asks), at growing N. Writes ``scripts/results/index_choice.{json,md}``; run on an idle machine.

Usage: ``python scripts/measure_index.py [--sizes 5000 10000 20000 40000]``
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np
import torch

import hardmine
from hardmine.index import ivf_nlist
from hardmine.zoo import fashion_mlp

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "scripts" / "results"


def _gradients(dim: int, tmp: Path) -> np.ndarray:
    images, labels = hardmine.load_fashion_mnist("train")
    x = torch.tensor(images / 255.0, dtype=torch.float32).unsqueeze(1)  # (N, 1, 28, 28)
    y = torch.from_numpy(labels)
    torch.manual_seed(0)
    model = fashion_mlp()
    ckpt = tmp / "m.pt"
    if not ckpt.exists():  # a short training run so the gradients are a trained model's
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for i in range(0, 60000, 256):
            loss = torch.nn.functional.cross_entropy(model(x[i : i + 256]), y[i : i + 256])
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.save(model.state_dict(), ckpt)
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    last = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    batches = [(x[i : i + 1024], y[i : i + 1024]) for i in range(0, 60000, 1024)]
    s = hardmine.scan(model.eval(), batches, out=tmp / f"s{dim}", dim=dim, layers=last, index="flat",
                      score_config=hardmine.ScoreConfig(k=1))
    z = s.gradients()
    return np.ascontiguousarray(z / np.linalg.norm(z, axis=1, keepdims=True).clip(1e-12), dtype=np.float32)


def _recall(u: np.ndarray, nprobes: list[int], n_queries: int = 1000) -> dict[str, float]:
    rng = np.random.default_rng(0)
    q = rng.choice(len(u), n_queries, replace=False)
    exact = faiss.IndexFlatIP(u.shape[1])
    exact.add(u)
    _, truth = exact.search(u[q], 11)
    nlist = ivf_nlist(len(u))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(u.shape[1]), u.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    train = u[rng.choice(len(u), min(len(u), 40 * nlist), replace=False)]
    ivf.train(train)
    ivf.add(u)
    out = {}
    for p in nprobes:
        ivf.nprobe = p
        _, got = ivf.search(u[q], 11)
        hits = [len((set(t) - {i}) & (set(g) - {i})) / 10 for t, g, i in zip(truth, got, q)]
        out[str(p)] = float(np.mean(hits))
    return {"nlist": nlist, "recall_at_10": out}


def _exact_all_knn_seconds(u: np.ndarray, n: int) -> float:
    sub = u[:n]
    index = faiss.IndexFlatIP(sub.shape[1])
    index.add(sub)
    t0 = time.perf_counter()
    for lo in range(0, n, 4096):  # queries in blocks, as the scoring pass does
        index.search(sub[lo : lo + 4096], 11)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--nprobe", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 10000, 20000, 40000])
    args = ap.parse_args()
    res: dict = {"recall": {}, "exact_seconds": {}, "faiss_threads": faiss.omp_get_max_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        for dim in args.dims:
            u = _gradients(dim, Path(tmp))
            res["recall"][str(u.shape[1])] = _recall(u, args.nprobe)
        for n in args.sizes:
            res["exact_seconds"][str(n)] = round(_exact_all_knn_seconds(u, n), 2)
    res["machine"] = {"python": platform.python_version(), "torch": torch.__version__, "faiss": faiss.__version__}
    res["created"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "index_choice.json").write_text(json.dumps(res, indent=1) + "\n")
    md = ["| vector dims | IVF lists | " + " | ".join(f"recall@10, nprobe {p}" for p in args.nprobe) + " |",
          "|---|---|" + "---|" * len(args.nprobe)]
    for d, r in res["recall"].items():
        md.append(f"| {d} | {r['nlist']} | " + " | ".join(f"{r['recall_at_10'][str(p)]:.3f}" for p in args.nprobe) + " |")
    md += ["", "| N | exact kNN of every sample (s) |", "|---|---|"]
    md += [f"| {n} | {s} |" for n, s in res["exact_seconds"].items()]
    md += ["", f"Fashion-MNIST train (60k), demo MLP's output layer projected to the dims shown; 1,000 queries, self "
           f"excluded; exact cost with the widest vectors, {res['faiss_threads']} FAISS threads; {res['created']}; "
           "`python scripts/measure_index.py`."]
    (RESULTS / "index_choice.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
