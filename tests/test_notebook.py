"""Execute ``notebooks/quickstart.ipynb`` end to end (nbclient) on a small slice of Fashion-MNIST, so the
notebook cannot go stale. Skipped only when the ``[report]`` extra or the dataset is not installed."""

from __future__ import annotations

from pathlib import Path

import pytest

from hardmine.datasets import fashion_mnist_dir

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("matplotlib")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
HAS_FMNIST = (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").exists()
LIMIT = 1200


@pytest.mark.slow
@pytest.mark.skipif(not HAS_FMNIST, reason="Fashion-MNIST (Debian dataset-fashion-mnist) is not installed")
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("HARDMINE_NOTEBOOK_LIMIT", str(LIMIT))
    monkeypatch.setenv("HARDMINE_NOTEBOOK_OUT", str(tmp_path))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()  # raises CellExecutionError with the failing cell's traceback

    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    text = "\n".join(
        o.get("text", "")
        if o.get("output_type") == "stream"
        else str(o.get("data", {}).get("text/plain", ""))
        for c in code
        for o in c.get("outputs", [])
    )
    assert f"LIMIT={LIMIT}" in text
    assert "test accuracy: 0." in text
    # Two figures: the hardest-images grid and the neighbour grid.
    pngs = [o for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(pngs) == 2

    # The scan and the exported manifest exist, have one row per image and are valid hardmine manifests.
    import numpy as np
    import pandas as pd

    from hardmine.manifest import read_manifest

    exported = read_manifest(tmp_path / "manifest.parquet")
    scanned = read_manifest(tmp_path / "scan")
    assert len(exported) == len(scanned) == LIMIT
    assert exported.attrs["hardmine"]["export"]["strategy"] == "slices"  # the default export (is_hard and class balance as per-class)
    counts = exported["label"].value_counts()
    assert int(exported["is_hard"].sum()) == sum(-(-c // 10) for c in counts)  # ceil(10%) of each class
    assert np.allclose(exported.groupby("label")["weight"].sum(), LIMIT / len(counts))  # classes balanced
    pd.testing.assert_series_equal(exported["hardness"], scanned["hardness"])
