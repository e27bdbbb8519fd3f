"""One manifest tail for both doors: the offline scan and the online miner record task, source (with its
door), loss and the export the same way, through ``hardmine.manifest.finish_manifest``."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from models import MLP
from test_scan import batches_of, planted_blobs, trained_mlp

from hardmine.manifest import FORMAT_VERSION, finish_manifest, read_manifest
from hardmine.online import OnlineMiner
from hardmine.scan import scan


def test_scan_and_online_metadata_share_their_common_part(tmp_path):
    data = planted_blobs(seed=3, n_per=40)
    model = trained_mlp(data["x"], data["y"], steps=20)
    offline = scan(model, batches_of(data["x"], data["y"], 40), out=tmp_path / "s", dim=8, engine="vmap").manifest()
    miner = OnlineMiner(model, layers="2", dim=8)
    for i in range(0, len(data["y"]), 40):
        miner.observe(torch.from_numpy(data["x"][i : i + 40]), torch.from_numpy(data["y"][i : i + 40]),
                      torch.arange(i, min(i + 40, len(data["y"]))))
    online = read_manifest(miner.write_manifest(tmp_path / "o.parquet"))
    a, b = offline.attrs["hardmine"], online.attrs["hardmine"]
    common = ("format", "format_version", "hardmine_version", "task", "n_samples", "loss", "export", "source")
    assert all(k in a and k in b for k in common)
    assert a["format_version"] == b["format_version"] == FORMAT_VERSION == 2
    assert a["source"]["door"] == "scan" and b["source"]["door"] == "online" and b["source"]["steps"] == miner.step
    assert a["loss"] == b["loss"] == "cross_entropy"  # resolved the same way, not None vs "auto"
    assert a["task"] == b["task"] == "classification" and a["n_samples"] == b["n_samples"] == len(data["y"])
    assert set(a["export"]) == set(b["export"]) == {"strategy", "top", "boost", "temperature", "cap"}
    assert a["sample_id_kind"] == "positions"


def test_finish_manifest_is_the_one_tail():
    df = pd.DataFrame({"sample_id": np.arange(6), "label": [0, 0, 0, 1, 1, 1],
                       "hardness": [0.1, 0.9, 0.5, 0.3, 0.8, 0.2]})
    out = finish_manifest(df, {"task": "classification", "source": {"door": "test"}, "loss": "cross_entropy"},
                          strategy="top-k", top=0.3, boost=3, cap=None)
    assert out["rank"].tolist() == [6, 1, 3, 4, 2, 5]
    assert out["is_hard"].tolist() == [False, True, False, False, True, False]
    assert np.allclose(out["weight"][out["is_hard"].to_numpy(dtype=bool)] / out["weight"].min(), 3.0)
    assert out.attrs["hardmine"]["export"]["strategy"] == "top-k" and out.attrs["hardmine"]["n_samples"] == 6
    with pytest.raises(ValueError, match="needs 'loss'"):
        finish_manifest(df, {"task": "classification", "source": {"door": "x"}})
    with pytest.raises(ValueError, match="'source' must be a dict with 'door'"):
        finish_manifest(df, {"task": "classification", "source": "online", "loss": None})


def test_version_1_manifests_are_still_read(tmp_path):
    torch.manual_seed(0)
    data = planted_blobs(seed=1, n_per=20)
    s = scan(MLP(d_in=10, hidden=8, n_classes=4).eval(), batches_of(data["x"], data["y"], 40), out=tmp_path / "s",
             dim=4, engine="vmap")
    import json

    import pyarrow.parquet as pq

    table = pq.read_table(s.manifest_path)
    meta = json.loads(table.schema.metadata[b"hardmine"])
    meta.update(format_version=1, source="online", loss="auto")  # what an older release wrote
    pq.write_table(table.replace_schema_metadata({b"hardmine": json.dumps(meta).encode()}), tmp_path / "v1.parquet")
    old = read_manifest(tmp_path / "v1.parquet")
    assert old.attrs["hardmine"]["format_version"] == 1 and len(old) == 80
