"""Distributed scans (hardmine.scan.distributed): row ranges, each format's part reading, the ledger merge, and
two real 2-process gloo jobs — a user's own process group calling the Python API, and ``torchrun -m hardmine
scan`` killed mid-scan and rerun — each compared with the single-process manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dist_worker
import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

import hardmine
from hardmine.cli import app
from hardmine.loaders import open_data
from hardmine.loaders.data import row_groups_for
from hardmine.scan import Ledger, ShardRecord
from hardmine.scan.distributed import merge_ledgers, row_range, shard_data
from hardmine.scan.store import DirectoryLock
from hardmine.score import population_pass

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _sorted(manifest: pd.DataFrame) -> pd.DataFrame:
    return manifest.sort_values("sample_id").reset_index(drop=True)


def _assert_same_manifest(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert len(got) == len(want)
    pd.testing.assert_frame_equal(_sorted(got), _sorted(want), check_exact=False, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ row ranges
@pytest.mark.parametrize(("n", "world"), [(10, 2), (11, 3), (7, 7), (1000, 8)])
def test_row_ranges_are_contiguous_blocks_covering_every_row_once(n, world):
    ranges = [row_range(n, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, in rank order
    sizes = [stop - start for start, stop in ranges]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert ranges == [row_range(n, r, world) for r in range(world)]  # deterministic


# ---------------------------------------------------------------------------------- reading a part
def _rows_of(batches) -> tuple[np.ndarray, list]:
    xs = torch.cat([b[0].reshape(len(b[2]), -1) for b in batches]).numpy()
    return xs, sum((list(b[2]) for b in batches), [])


@pytest.mark.parametrize("fmt", ["parquet", "csv", "npz"])
def test_a_part_of_a_file_is_exactly_its_rows_with_global_ids(tmp_path, fmt):
    import pyarrow as pa
    import pyarrow.parquet as pq

    g = np.random.default_rng(0)
    x, y = g.normal(size=(23, 4)).astype(np.float32), g.integers(0, 3, 23)
    if fmt == "parquet":
        path = tmp_path / "d.parquet"
        pq.write_table(pa.table({"feat": list(x), "label": y}), path, row_group_size=5)
        kwargs = {"feature_column": "feat"}
    elif fmt == "csv":
        path = tmp_path / "d.csv"
        df = pd.DataFrame(x, columns=[f"f{i}" for i in range(4)])
        df["label"] = y
        df.to_csv(path, index=False)
        kwargs = {"feature_columns": "f*"}
    else:
        path = tmp_path / "d.npz"
        np.savez(path, X=x, y=y)
        kwargs = {}
    src = open_data(str(path), batch_size=4, **kwargs)
    for start, stop in [(0, 23), (7, 16), (16, 23), (3, 4)]:
        part = list(src.rows(start, stop))
        xs, ids = _rows_of(part)
        assert ids == list(range(start, stop))
        np.testing.assert_allclose(xs, x[start:stop], rtol=1e-6)
        assert torch.cat([b[1] for b in part]).tolist() == y[start:stop].tolist()
        assert all(len(b[2]) <= 4 for b in part)
    with pytest.raises(ValueError, match=r"row range \[5, 30\)"):
        src.rows(5, 30)


def test_parquet_part_reads_only_the_row_groups_that_hold_it(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"a": np.arange(23)}), tmp_path / "d.parquet", row_group_size=5)  # groups of 5,5,5,5,3
    meta = pq.ParquetFile(tmp_path / "d.parquet").metadata
    assert row_groups_for(meta, 0, 23) == ([0, 1, 2, 3, 4], 0)
    assert row_groups_for(meta, 7, 16) == ([1, 2, 3], 5)
    assert row_groups_for(meta, 10, 15) == ([2], 10)
    assert row_groups_for(meta, 20, 23) == ([4], 20)


def _labels_and_ids(part) -> tuple[list, list]:
    labels, ids = [], []
    for batch in part:
        _, y, i = batch
        labels += y.tolist()
        ids += [int(v) for v in i]
    return labels, ids


def test_dataloader_and_list_parts_put_together_are_the_data_in_order():
    x, y = torch.randn(50, 3), torch.arange(50) % 4
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 50, 8)]  # 7 batches, by batch index
    for data, expect_rows in ((loader, [16, 17, 17]), (batches, [16, 16, 18])):
        parts = [shard_data(data, r, 3, labelled=True) for r in range(3)]
        got = [_labels_and_ids(p) for p in parts]
        assert [len(ids) for _, ids in got] == expect_rows
        assert sum((ids for _, ids in got), []) == list(range(50))  # positions in the whole data
        assert sum((lab for lab, _ in got), []) == y.tolist()
    bare = [x[i : i + 8] for i in range(0, 50, 8)]  # unlabelled batches: bare inputs get (x, None, ids)
    unlabelled = [shard_data(bare, r, 3, labelled=False) for r in range(3)]
    parts = [list(p) for p in unlabelled]
    assert all(b[1] is None for p in parts for b in p)
    assert torch.cat([b[2] for p in parts for b in p]).tolist() == list(range(50))
    torch.testing.assert_close(torch.cat([b[0] for p in parts for b in p]), x)
    loader_part = shard_data(loader, 1, 3, labelled=True)
    assert loader_part.total == 17 and len(loader_part.data.dataset) == 17  # only the part's rows are loaded


def test_data_a_distributed_scan_cannot_split_is_refused_clearly():
    x, y = torch.randn(20, 3), torch.arange(20) % 2
    with pytest.raises(ValueError, match="shuffle=False"):
        shard_data(DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True), 0, 2, labelled=True)
    with pytest.raises(ValueError, match="has no len"):
        shard_data(((x[i : i + 4], y[i : i + 4]) for i in range(0, 20, 4)), 0, 2, labelled=True)
    with pytest.raises(ValueError, match="fewer than the 3 processes"):
        shard_data([(x, y), (x, y)], 0, 3, labelled=True)
    with pytest.raises(ValueError, match="no process group is initialised"):
        hardmine.scan(torch.nn.Linear(3, 2), [(x, y)], out="unused", distributed=True)


def test_merged_ledger_counts_rows_and_batches_in_the_whole_data():
    def part(rank: int, shard_rows: list[int]) -> Ledger:
        led, r0, b0 = Ledger(id_kind="int", task="classification", num_classes=3), 0, 0
        for i, n in enumerate(shard_rows):
            led.shards.append(ShardRecord(i, (b0, b0 + 2), (r0, r0 + n), f"d{rank}{i}", f"shards/grads-{i:05d}.npy",
                                          f"shards/stats-{i:05d}.parquet"))
            r0, b0 = r0 + n, b0 + 2
        led.finish(n_samples=r0, n_batches=b0, dataset_fingerprint=f"fp{rank}", out_dim=8)
        return led

    merged = merge_ledgers([part(0, [4, 2]), part(1, [4, 1])])
    assert merged.complete and merged.n_samples == 11 and merged.n_batches == 8
    assert [s.rows for s in merged.shards] == [(0, 4), (4, 6), (6, 10), (10, 11)]
    assert [s.batches for s in merged.shards] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [s.index for s in merged.shards] == [0, 1, 2, 3]
    assert merged.shards[2].grads == "ranks/00001/shards/grads-00000.npy"
    other = part(1, [4, 1])
    other.num_classes = 5
    with pytest.raises(ValueError, match="disagree on num_classes"):
        merge_ledgers([part(0, [4, 2]), other])


# ------------------------------------------------------------------------------------- real processes
def _reference(tmp_path: Path) -> pd.DataFrame:
    loader = DataLoader(dist_worker.Rows(), batch_size=32)
    return hardmine.scan(dist_worker.make_model(), loader, out=tmp_path / "single", dim=8, shard_rows=48).manifest()


def test_api_under_a_users_process_group_sums_the_population_and_matches_the_single_process_scan(tmp_path):
    held = tmp_path / "held"
    held.mkdir()
    lock = DirectoryLock(held)  # another job's scan, still running, holds this directory
    lock.acquire()
    (tmp_path / "results").mkdir()
    try:
        mp.spawn(dist_worker.api_worker, nprocs=2, args=(
            2, str(tmp_path / "init"), str(tmp_path / "out"), str(held), str(tmp_path / "results"),
        ))
    finally:
        lock.release()
    results = [json.loads((tmp_path / "results" / f"{r}.json").read_text()) for r in range(2)]
    for res in results:
        assert "being written by another scan" in res["held_error"]  # every rank of the second job is told
        assert res["n_samples"] == dist_worker.N_ROWS
        assert res["still_initialised"]  # the user's group is left as it was
    z, labels = dist_worker.population_data()
    whole = population_pass([(0, z)], z.shape[1], labels, dist_worker.N_CLASSES)
    for r in range(2):  # the ranks' sums over their own rows == one pass over all rows, on every rank
        pop = np.load(tmp_path / "results" / f"pop-{r}.npz")
        assert int(pop["n"]) == whole.n and pop["class_count"].tolist() == whole.class_count.tolist()
        for name in ("unit_sum", "plain_sum", "class_unit_sum", "class_plain_sum"):
            np.testing.assert_allclose(pop[name], getattr(whole, name), rtol=1e-12, atol=1e-9)
    got = hardmine.Scan.open(tmp_path / "out")
    _assert_same_manifest(got.manifest(), _reference(tmp_path))
    assert sorted(p.name for p in (tmp_path / "out" / "ranks").iterdir()) == ["00000", "00001"]
    assert got.config["world_size"] == 2
    with pytest.raises(ValueError, match="world_size: 2 -> None"):  # other ranks' rows: no resume, start again
        hardmine.scan(dist_worker.make_model(), DataLoader(dist_worker.Rows(), batch_size=32), out=tmp_path / "out",
                      dim=8, shard_rows=48)


def _torchrun(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "hardmine",
           "scan", *args]
    return subprocess.run(cmd, cwd=TESTS, env=env, capture_output=True, text=True, timeout=240)


def _shard_mtimes(out: Path) -> dict[str, int]:
    found = {}
    for led in sorted((out / "ranks").glob("*/progress.json")):
        for s in json.loads(led.read_text())["shards"]:
            for name in (s["grads"], s["stats"]):
                found[f"{led.parent.name}/{name}"] = (led.parent / name).stat().st_mtime_ns
    return found


def test_torchrun_scan_killed_mid_scan_resumes_every_rank_and_matches_one_process(tmp_path):
    torch.save(dist_worker.make_model().state_dict(), tmp_path / "ckpt.pt")
    out, marker = tmp_path / "out", tmp_path / "kill-marker"
    marker.touch()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]), "OMP_NUM_THREADS": "1",
           # rank 1 holds rows 120-239; at 16 rows a batch and 48 a shard it has written 2 shards at row 220
           "HARDMINE_TEST_KILL_AT": "220", "HARDMINE_TEST_KILL_MARKER": str(marker),
           "HARDMINE_TEST_KILL_LEDGER": str(out / "ranks" / "00001" / "progress.json"), "HARDMINE_TEST_KILL_AFTER": "2"}
    args = [str(tmp_path / "ckpt.pt"), "dist_worker:rows", "--model", "dist_worker:make_model", "--out", str(out),
            "--dim", "8", "--shard-rows", "48", "--batch-size", "16", "--json"]
    killed = _torchrun(args, env)
    assert killed.returncode != 0 and not marker.exists(), killed.stderr[-2000:]
    assert not (out / "manifest.parquet").exists()
    before = _shard_mtimes(out)
    rank1 = [k for k in before if k.startswith("00001/")]
    assert len(rank1) == 4  # 2 complete shards (gradients + statistics) of the killed rank

    rerun = _torchrun(args, env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(rerun.stdout)["samples"] == dist_worker.N_ROWS  # one summary, from rank 0
    after = _shard_mtimes(out)
    assert {k: after[k] for k in before} == before  # complete shards were kept, not extracted again
    assert len(after) > len(before)

    runner = CliRunner()
    single = [a if a != str(out) else str(tmp_path / "single") for a in args]
    cwd = os.getcwd()
    os.chdir(TESTS)  # the factories resolve like `python -m`, from the working directory
    try:
        res = runner.invoke(app, ["scan", *single], catch_exceptions=False)
    finally:
        os.chdir(cwd)
    assert res.exit_code == 0, res.output
    _assert_same_manifest(hardmine.Scan.open(out).manifest(), hardmine.Scan.open(tmp_path / "single").manifest())
