"""The HTML report, rendered in a real headless browser (Debian's chromium, installed by `make install`):
the screenshot is not blank, the DOM holds every section and the shown examples with their neighbours, the file
needs no network, and files that are not reports are never replaced."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_scan import batches_of, planted_scan
from torch import nn
from typer.testing import CliRunner

from hardmine.cli import app
from hardmine.report import GENERATOR, render_report, report
from hardmine.scan import Scan, scan

runner = CliRunner()


def chromium() -> str:
    for name in (os.environ.get("HARDMINE_CHROMIUM"), "chromium", "chromium-browser"):
        if name and shutil.which(name):
            return shutil.which(name)  # type: ignore[return-value]
    pytest.skip("no headless chromium: `make install` installs Debian's chromium (scripts/install_browser.sh)")


def browse(html: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp / 'profile'}", *args, html.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_scan(tmp_path_factory.mktemp("report"))


def test_report_renders_in_a_headless_browser(planted, tmp_path):
    sc, _ = planted
    out = report(sc, tmp_path / "report.html")
    page = out.read_text()
    # Self-contained: no script, stylesheet, image or font is fetched (the SVG namespace is not a fetch).
    assert not re.search(r"<script|<link|<img|<iframe|url\(|@import", page, re.I)
    assert not re.search(r"(src|href)=", page, re.I)
    assert set(re.findall(r"https?://[^\"' )]+", page)) <= {"http://www.w3.org/2000/svg"}
    dom = browse(out, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    for section in ("summary", "classes", "slices", "calibration", "distributions", "worst", "confident-errors",
                    "label-issues"):
        assert f'id="{section}"' in dom.stdout, section
    assert dom.stdout.count("<svg") >= 5  # class bars, slice bars, reliability, two histograms
    m = sc.manifest()
    top_ce = m[m["confident_error"].fillna(False).astype(bool)].nsmallest(1, "rank")["sample_id"].item()
    assert f'data-sample-id="{top_ce}"' in dom.stdout and "nearest gradient neighbours" in dom.stdout
    assert "accuracy" in dom.stdout and "ECE" in dom.stdout and "rademacher" in dom.stdout

    png = tmp_path / "shot.png"
    shot = browse(out, tmp_path, f"--screenshot={png}", "--window-size=1280,4000", "--hide-scrollbars")
    assert shot.returncode == 0 and png.is_file(), shot.stderr[-2000:]
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.float64)  # (H, W) grey levels
    assert pixels.shape == (4000, 1280)
    inked = (pixels < 200).mean()  # text, bars and table rules
    assert 0.01 < inked < 0.6 and pixels.std() > 20, (inked, pixels.std())
    blue = np.asarray(Image.open(png).convert("RGB"), dtype=np.int64)  # (H, W, 3)
    bars = ((blue[..., 2] - blue[..., 0]) > 80).mean()  # the histogram / reliability bars are blue
    red = ((blue[..., 0] - blue[..., 2]) > 80).mean()  # the failure-rate bars are red
    assert bars > 0.002 and red > 0.0005, (bars, red)


def test_texts_and_regression_scans(planted, tmp_path):
    sc, _ = planted
    m = sc.manifest()
    sid = m.nsmallest(1, "rank")["sample_id"].item()
    page = render_report(sc, texts={sid: "a <b>bold</b> claim & more"})
    assert "a &lt;b&gt;bold&lt;/b&gt; claim &amp; more" in page  # shown, escaped
    # A scan of a text column (as `hardmine scan --text-column` records it): the shown texts are read back.
    ids = m["sample_id"].tolist()
    pd.DataFrame({"sid": ids, "review": [f"text of sample {i}" for i in ids]}).to_parquet(tmp_path / "d.parquet")
    source = {"data": str(tmp_path / "d.parquet"), "data_format": "parquet", "text_column": "review", "id_column": "sid"}
    page = render_report(Scan(sc.path, {**sc.info, "source": source}))
    assert f"text of sample {sid}</div>" in page
    # A regression scan: summary, distributions and its hardest samples (no classes, no calibration).
    g = np.random.default_rng(0)
    x = g.normal(size=(200, 5)).astype(np.float32)
    y = (x @ g.normal(size=5)).astype(np.float32)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1)).eval()
    reg = scan(net, [(b[0], b[1].reshape(-1, 1)) for b in batches_of(x, y, bs=64)], out=tmp_path / "reg", dim=8,
               engine="vmap")
    page = render_report(reg)
    assert 'id="summary"' in page and 'id="distributions"' in page and 'id="hardest"' in page
    assert 'id="calibration"' not in page and 'id="classes"' not in page


def test_report_never_clobbers_and_the_cli(planted, tmp_path):
    sc, _ = planted
    mine = tmp_path / "notes.html"
    mine.write_text("<html>mine</html>")
    res = runner.invoke(app, ["report", str(sc.path), "--out", str(mine)])
    assert res.exit_code == 2 and "is not a hardmine report" in " ".join(res.output.split())
    assert mine.read_text() == "<html>mine</html>"
    res = runner.invoke(app, ["report", str(sc.path), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "is a directory" in res.output
    out = tmp_path / "r.html"
    res = runner.invoke(app, ["report", str(sc.path), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["out"] == str(out) and info["bytes"] == out.stat().st_size
    assert f'<meta name="generator" content="{GENERATOR}' in out.read_text()
    assert runner.invoke(app, ["report", str(sc.path), "--out", str(out)]).exit_code == 0  # its own: replaced
    assert runner.invoke(app, ["report", str(sc.path), "--out", str(mine), "--overwrite"]).exit_code == 0
    res = runner.invoke(app, ["report", str(tmp_path / "nope"), "--out", str(tmp_path / "x.html")])
    assert res.exit_code == 2 and not (tmp_path / "x.html").exists()


def test_scan_report_method_and_class_names(tmp_path):
    # Scan.report is the Python door; a scan that recorded class names shows them in the report.
    import torch
    from models import MLP
    from test_cli import _blobs

    import hardmine

    x, y = _blobs()
    names = ["ant", "bee", "cow", "dog"]
    batches = [(torch.from_numpy(x[i : i + 40]), torch.from_numpy(y[i : i + 40])) for i in range(0, len(y), 40)]
    s = hardmine.scan(MLP().eval(), batches, out=tmp_path / "s", dim=8, provenance={"class_names": names})
    assert s.manifest().attrs["hardmine"]["class_names"] == names
    page = s.report(tmp_path / "r.html").read_text()
    assert "<svg" in page and sum(f">{n}<" in page for n in names) >= 2  # class names as bar labels and cards
    # names with HTML's own characters are escaped once, in the bars as in the cards (a browser shows R&B, <unk>)
    s = hardmine.scan(MLP().eval(), batches, out=tmp_path / "t", dim=8,
                      provenance={"class_names": ["R&B", "<unk>", "cow", "dog"]})
    page = s.report(tmp_path / "t.html").read_text()
    assert "R&amp;B (n=" in page and "&lt;unk&gt; (n=" in page
    assert "&amp;amp;" not in page and "&amp;lt;" not in page



def test_a_label_without_a_name_is_escaped_once():
    from hardmine.report import _class

    assert _class(pd.NA, None) == "&lt;NA&gt;"  # a missing label as pandas prints it, once escaped
    assert _class("R&B", None) == "R&amp;B" and _class(3, ["a", "b"]) == "3" and _class(1, ["a", "<b>"]) == "&lt;b&gt;"
    assert _class(0.25, None) == "0.250" and _class(float("nan"), None) == "–"
