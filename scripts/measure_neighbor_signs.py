"""Why ``neighbor_disagreement`` ranks neighbours by ``|cos|``: flip detection with signed vs absolute cosine.

On the test suite's own planted blobs (``tests/test_scan.py: planted_blobs``: 4 classes, 5% flipped labels,
4% rare sub-clusters; a small MLP trained on the noisy labels; the vmap engine, dim 32), for each sample the
fraction of its ``k`` nearest gradient neighbours (excluding itself) whose label differs from its own, with
neighbours ranked by signed cosine and by ``|cos|``, and the AUROC of that fraction for the flipped samples.
Several data seeds; writes ``scripts/results/neighbor_signs.{json,md}`` (``make eval`` runs it; the
``hardmine/score.py`` docstring cites the Markdown table instead of quoting numbers).

Usage: ``python scripts/measure_neighbor_signs.py [--seeds 0 1 2 3 4] [--k 10]``
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "scripts" / "results"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from evalkit.metrics import auroc  # noqa: E402
from test_scan import batches_of, planted_blobs, trained_mlp  # noqa: E402

import hardmine  # noqa: E402


def _disagreement(z: np.ndarray, y: np.ndarray, k: int, absolute: bool) -> np.ndarray:
    u = z / np.linalg.norm(z, axis=1, keepdims=True).clip(1e-12)  # (N, D) unit vectors
    sim = u @ u.T  # (N, N) cosine; exact, the blobs are small
    if absolute:
        sim = np.abs(sim)
    np.fill_diagonal(sim, -np.inf)  # never one's own neighbour
    nn_idx = np.argpartition(-sim, k, axis=1)[:, :k]  # (N, k)
    return (y[nn_idx] != y[:, None]).mean(1)


def run(seeds: list[int], k: int) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            data = planted_blobs(seed=seed)
            model = trained_mlp(data["x"], data["y"], seed=seed)
            s = hardmine.scan(model, batches_of(data["x"], data["y"]), out=Path(tmp) / f"s{seed}", dim=32,
                              engine="vmap", score_config=hardmine.ScoreConfig(neighbor_scores=True))
            z, y = s.gradients(), data["y"]
            rows.append({
                "seed": seed,
                "signed": auroc(_disagreement(z, y, k, absolute=False), data["flipped"]),
                "absolute": auroc(_disagreement(z, y, k, absolute=True), data["flipped"]),
                "manifest": auroc(s.manifest()["neighbor_disagreement"].to_numpy(), data["flipped"]),
            })
    return {
        "k": k,
        "rows": rows,
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "hardmine": hardmine.__version__},
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def markdown(res: dict) -> str:
    out = [
        "| data seed | signed cosine | abs cosine | manifest `neighbor_disagreement` |",
        "|---|---|---|---|",
    ]
    for r in res["rows"]:
        out.append(f"| {r['seed']} | {r['signed']:.3f} | {r['absolute']:.3f} | {r['manifest']:.3f} |")
    sg = np.array([r["signed"] for r in res["rows"]])
    ab = np.array([r["absolute"] for r in res["rows"]])
    d = ab - sg
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    out += [
        f"| mean | {sg.mean():.3f} | {ab.mean():.3f} | |",
        "",
        f"Flip-detection AUROC of the fraction of the k={res['k']} nearest gradient neighbours with another label, "
        f"on the test suite's planted blobs (5% flipped labels), by signed cosine vs |cos|. Paired difference "
        f"|cos| - signed: {d.mean():+.3f} (95% interval ±{half:.3f}, {len(d)} seeds). "
        f"Run: {res['created']}, torch {res['machine']['torch']}, `python scripts/measure_neighbor_signs.py`.",
    ]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--out", type=Path, default=RESULTS / "neighbor_signs.json")
    args = ap.parse_args()
    res = run(args.seeds, args.k)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    md = markdown(res)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
