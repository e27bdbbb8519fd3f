"""Make the docs' picture of `hardmine report` (docs/report.png) and time the report against its scan.

    python scripts/report_screenshot.py                     # a small synthetic scan, then its report and picture
    python scripts/report_screenshot.py --scan demo_out/scan   # the report of an existing scan (e.g. `make demo`'s)

    python scripts/report_screenshot.py --per-class 10000 --time --out /tmp/big.png   # time it on 40,000 samples

The synthetic scan: four Gaussian blobs in 10 dimensions (500 samples each, 4% of every class a rare
sub-cluster towards the next class, 5% of labels flipped), a small MLP trained on them, scanned with dim 32.
The report is rendered by headless chromium (`make install` installs it; $HARDMINE_CHROMIUM names another
binary). `--time` also writes the scan and report wall times to scripts/results/report_time.json (the report
reads the manifest and queries neighbours for the shown examples only, so it should be small against the scan).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hardmine import _version  # noqa: E402
from hardmine.report import report  # noqa: E402
from hardmine.scan import Scan, scan  # noqa: E402


def blobs(seed: int = 0, n_classes: int = 4, d: int = 10, n_per: int = 500) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    centers = g.normal(0, 3.0, (n_classes, d))
    xs, ys = [], []
    n_rare = int(0.04 * n_per)
    for c in range(n_classes):
        rare = 0.4 * centers[c] + 0.6 * centers[(c + 1) % n_classes] + g.normal(0, 0.5, d)
        xs += [centers[c] + g.normal(0, 1, (n_per - n_rare, d)), rare + g.normal(0, 0.5, (n_rare, d))]
        ys += [c] * n_per
    x = np.concatenate(xs).astype(np.float32)
    y = np.array(ys)
    flip = g.choice(len(y), int(0.05 * len(y)), replace=False)
    y[flip] = (y[flip] + g.integers(1, n_classes, len(flip))) % n_classes
    return x, y


def synthetic_scan(out: Path, n_per: int = 500) -> tuple[Scan, float]:
    x, y = blobs(n_per=n_per)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(x.shape[1], 32), nn.ReLU(), nn.Linear(32, int(y.max()) + 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(300):
        loss = nn.functional.cross_entropy(model(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    batches = [(xt[i : i + 256], yt[i : i + 256]) for i in range(0, len(y), 256)]
    t0 = time.perf_counter()
    s = scan(model.eval(), batches, out=out, dim=32, overwrite=True)
    return s, time.perf_counter() - t0


def chromium() -> str:
    for name in (os.environ.get("HARDMINE_CHROMIUM"), "chromium", "chromium-browser"):
        if name and shutil.which(name):
            return str(shutil.which(name))
    sys.exit("report_screenshot: no chromium on the PATH; run `make install` (scripts/install_browser.sh).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scan", type=Path, help="an existing scan directory (default: a synthetic one)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "report.png", help="the picture to write")
    ap.add_argument("--html", type=Path, help="also keep the report here (default: a temporary file)")
    ap.add_argument("--size", default="1280,2300", help="browser window WIDTH,HEIGHT (the picture's size)")
    ap.add_argument("--per-class", type=int, default=500, help="synthetic samples per class (4 classes)")
    ap.add_argument("--time", action="store_true", help="write scan and report times to scripts/results/report_time.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        scan_s = None
        if args.scan is not None:
            sc = Scan.open(args.scan)
        else:
            sc, scan_s = synthetic_scan(tmp_path / "scan", args.per_class)
        html = args.html or tmp_path / "report.html"
        t0 = time.perf_counter()
        report(sc, html, overwrite=True)
        report_s = time.perf_counter() - t0
        args.out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={args.size}", f"--screenshot={args.out.resolve()}",
               html.resolve().as_uri()]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if res.returncode != 0 or not args.out.is_file():
            sys.exit(f"report_screenshot: chromium failed ({res.returncode}): {res.stderr[-1000:]}")
        print(f"report of {sc.n_samples} samples in {report_s:.2f}s; picture: {args.out}")
        if args.time:
            record = {"samples": sc.n_samples, "synthetic": args.scan is None, "out_dim": sc.out_dim, "report_s": report_s, "scan_s": scan_s,
                      "hardmine_version": _version.__version__, "torch_threads": torch.get_num_threads()}
            path = ROOT / "scripts" / "results" / "report_time.json"
            path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
            print(json.dumps(record, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
