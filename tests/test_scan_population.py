"""Pass 1 beside the extraction (``hardmine.scan.population``): a scan's population statistics are exactly
``score.population_pass`` over its shards, whichever way the scan ran; the worker's failures surface and
no worker thread outlives the scan; the slices fitted beside the scoring passes are the ones fitted alone."""

from __future__ import annotations

import importlib
import threading

import numpy as np
import pandas as pd
import pytest
import torch
from test_scan import _failing, _Interrupted, batches_of, planted_blobs, trained_mlp
from torch import nn

from hardmine.scan import scan
from hardmine.scan.population import MAX_PENDING, PopulationSums
from hardmine.score import PopulationStats, population_pass
from hardmine.slices import fit_slices

result_module = importlib.import_module("hardmine.scan.result")  # hardmine.scan.scan shadows the module name

FIELDS = ("unit_sum", "plain_sum", "class_count", "class_unit_sum", "class_plain_sum")


def _assert_same(a: PopulationStats, b: PopulationStats) -> None:
    assert a.n == b.n
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        if x is not None:
            assert np.array_equal(x, y), f  # bit for bit: the scores must not depend on where pass 1 ran


@pytest.fixture
def given_population(monkeypatch):
    """Records the population statistics each ``Scan.write_scores`` call is handed (None: computed there)."""
    seen: list[PopulationStats | None] = []
    inner = result_module.Scan.write_scores

    def write_scores(self, config, progress=None, population=None):
        seen.append(population)
        return inner(self, config, progress=progress, population=population)

    monkeypatch.setattr(result_module.Scan, "write_scores", write_scores)
    return seen


def _workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(("hardmine-population", "hardmine-slices"))]


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_the_scan_sums_pass_1_while_extracting_exactly_as_after(tmp_path, given_population, task):
    data = planted_blobs(seed=5, n_per=90)
    if task == "classification":
        model, y = trained_mlp(data["x"], data["y"], steps=30), data["y"]
    else:  # one output, a float target
        torch.manual_seed(0)
        model, y = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 1)).eval(), data["x"][:, :1].copy()
    # 7 shards of 50 rows, the last one short; blocks of BLOCK_ROWS never span two shards.
    s = scan(model, batches_of(data["x"], y, 25), out=tmp_path / "s", dim=8, engine="vmap", shard_rows=50)
    (pop,) = given_population
    assert pop is not None  # the scan did not read its gradients back for pass 1
    labels = s.stats()["label"].to_numpy(dtype=np.int64) if task == "classification" else None
    after = population_pass(s.iter_gradients(), s.out_dim, labels, s.num_classes if labels is not None else None)
    _assert_same(pop, after)
    assert (pop.class_count is None) == (task == "regression")
    # Rescoring computes pass 1 from the shards: the same manifest.
    before = s.manifest()
    s.rescore()
    pd.testing.assert_frame_equal(s.manifest(), before, check_exact=True)
    assert _workers() == []


def test_a_resumed_scan_sums_its_earlier_shards_from_disk_in_row_order(tmp_path, given_population):
    data = planted_blobs(seed=6, n_per=60)
    model = trained_mlp(data["x"], data["y"], steps=30)
    batches = batches_of(data["x"], data["y"], 20)  # 12 batches, shards of 3 batches
    out = tmp_path / "resumed"
    with pytest.raises(_Interrupted):
        scan(model, _failing(batches, 7), out=out, dim=8, engine="vmap", shard_rows=60)
    assert _workers() == []  # the interrupted scan stopped its worker
    assert given_population == []  # and never scored
    s = scan(model, batches, out=out, dim=8, engine="vmap", shard_rows=60)
    (pop,) = given_population
    labels = s.stats()["label"].to_numpy(dtype=np.int64)
    _assert_same(pop, population_pass(s.iter_gradients(), s.out_dim, labels, s.num_classes))
    # Rerunning the complete scan with another score configuration: every shard comes from disk.
    from hardmine.score import ScoreConfig

    s2 = scan(model, batches, out=out, dim=8, engine="vmap", shard_rows=60, score_config=ScoreConfig(k=5))
    _assert_same(given_population[1], pop)
    assert len(s2.manifest()) == len(labels)


def test_a_failure_in_the_worker_fails_the_scan_and_leaves_no_thread(tmp_path, monkeypatch):
    data = planted_blobs(seed=7, n_per=40)
    model = trained_mlp(data["x"], data["y"], steps=20)
    calls = {"n": 0}
    inner = PopulationStats.update

    def update(self, z, labels):
        calls["n"] += 1
        if calls["n"] == 2:
            raise MemoryError("simulated failure in pass 1")
        return inner(self, z, labels)

    monkeypatch.setattr(PopulationStats, "update", update)
    out = tmp_path / "s"
    with pytest.raises(MemoryError, match="simulated failure in pass 1"):
        scan(model, batches_of(data["x"], data["y"], 20), out=out, dim=8, engine="vmap", shard_rows=40)
    assert not (out / "manifest.parquet").exists()
    assert _workers() == []


def test_population_sums_keep_the_order_and_bound_what_is_queued():
    rng = np.random.default_rng(0)
    shards = [(rng.standard_normal((n, 6)).astype(np.float32), rng.integers(0, 3, n)) for n in (5, 1, 9, 4, 7)]
    queued: list[int] = []
    sums = PopulationSums(6, 3)

    def loader(i: int):
        def load():
            queued.append(sums._worker.pending)  # what was queued when this shard started (this one included)
            return shards[i]
        return load

    try:
        for i in range(len(shards)):
            sums.add(loader(i))
        got = sums.result()
    finally:
        sums.close()
    assert got._work == []  # the worker's (rows, D) work arrays are not handed on with the sums
    ref = PopulationStats.empty(6, 3)
    for z, lab in shards:
        ref.update(z, lab)
    _assert_same(got, ref)
    assert max(queued) <= MAX_PENDING


def test_close_drops_queued_shards_without_reading_them():
    started = threading.Event()
    release = threading.Event()
    read: list[int] = []
    sums = PopulationSums(2, None)

    def slow():
        started.set()
        release.wait()
        read.append(0)
        return np.zeros((1, 2), dtype=np.float32), None

    def never():
        read.append(1)
        return np.zeros((1, 2), dtype=np.float32), None

    sums.add(slow)
    started.wait()
    sums.add(never)
    release.set()
    sums.close()
    assert read == [0]  # the shard being summed finished; the queued one was dropped
    assert not any(t.name.startswith("hardmine-population") for t in threading.enumerate())


def test_slices_fitted_beside_the_scoring_passes_are_the_ones_fitted_alone(tmp_path):
    data = planted_blobs(seed=8, n_per=200)
    model = trained_mlp(data["x"], data["y"], steps=40)
    s = scan(model, batches_of(data["x"], data["y"], 50), out=tmp_path / "s", dim=16, engine="vmap", shard_rows=100)
    labels = s.stats()["label"].to_numpy(dtype=np.int64)
    alone = fit_slices(s.iter_gradients, labels, seed=int(s.config["seed"]))
    assert np.array_equal(s.manifest()["slice"].to_numpy(dtype=object), alone.ids(labels))


@pytest.mark.timeout(120)  # without the stop, the clustering below would never end
@pytest.mark.parametrize("failing", ["population_pass", "score_pass"])
def test_a_failed_scoring_pass_stops_the_clustering_at_its_next_block(tmp_path, monkeypatch, failing):
    # population_pass: a rescore computes pass 1 while the slices are clustered (pass 2 is then the last pass's
    # products); score_pass: with leave_one_out, pass 2 runs on its own.
    from hardmine.score import ScoreConfig

    data = planted_blobs(seed=9, n_per=60)
    model = trained_mlp(data["x"], data["y"], steps=20)
    s = scan(model, batches_of(data["x"], data["y"], 20), out=tmp_path / "s", dim=8, engine="vmap", shard_rows=40)
    started = threading.Event()
    ended: list[BaseException] = []

    def endless_fit(blocks, labels, layout, seed):
        try:
            while True:  # pass after pass over the rows, as a clustering that never converges would
                for _ in blocks():
                    started.set()
        except BaseException as exc:
            ended.append(exc)
            raise

    def failing_pass(*args, **kwargs):
        started.wait()
        raise ValueError("simulated failure in the scores")

    monkeypatch.setattr(result_module, "fit_slice_centroids", endless_fit)
    monkeypatch.setattr(result_module, failing, failing_pass)
    with pytest.raises(ValueError, match="simulated failure in the scores"):
        s.rescore(ScoreConfig(leave_one_out=failing == "score_pass"))
    assert len(ended) == 1 and "stopped" in str(ended[0])
    assert _workers() == []


@pytest.mark.parametrize("failing", ["MainThread", "hardmine-slices"])
def test_a_failure_in_the_shared_last_pass_fails_the_rescore_and_leaves_no_thread(tmp_path, monkeypatch, failing):
    # The scoring thread joins the clustering's last pass; a block failing in either thread must fail the
    # rescore (not hang it), keep the previous manifest and leave no worker behind.
    import hardmine.slices as slices_module

    data = planted_blobs(seed=11, n_per=60)
    model = trained_mlp(data["x"], data["y"], steps=20)
    s = scan(model, batches_of(data["x"], data["y"], 20), out=tmp_path / "s", dim=8, engine="vmap", shard_rows=40)
    before = (s.path / "manifest.parquet").read_bytes()
    original = slices_module._assign_block
    calls = {"n": 0}
    joined = threading.Event()

    def assign(start, z, y, cols, centroids, raw, sim, sums, products=None):
        if sums is None:  # the last pass
            if threading.current_thread() is threading.main_thread():
                joined.set()
            if threading.current_thread().name.startswith(failing):
                calls["n"] += 1
                raise ValueError("simulated failure in the last pass")
            joined.wait(timeout=10)  # the clustering's thread waits until the scoring thread has taken a block
        return original(start, z, y, cols, centroids, raw, sim, sums, products)

    monkeypatch.setattr(slices_module, "_assign_block", assign)
    with pytest.raises((ValueError, RuntimeError), match="simulated failure|incomplete|stopped"):
        s.rescore()
    assert calls["n"] >= 1 and (s.path / "manifest.parquet").read_bytes() == before
    assert _workers() == []


def test_a_failed_slice_table_leaves_the_previous_manifest_and_slice_table(tmp_path, monkeypatch):
    data = planted_blobs(seed=10, n_per=60)
    model = trained_mlp(data["x"], data["y"], steps=20)
    s = scan(model, batches_of(data["x"], data["y"], 20), out=tmp_path / "s", dim=8, engine="vmap", shard_rows=40)
    before = {name: (s.path / name).read_bytes() for name in ("manifest.parquet", "slices.parquet")}
    import hardmine.slices as slices_module
    from hardmine.score import ScoreConfig

    def failing(*args, **kwargs):
        raise OSError("simulated full disk")

    monkeypatch.setattr(slices_module, "write_slice_table", failing)
    with pytest.raises(OSError, match="simulated full disk"):
        s.rescore(ScoreConfig(k=3))
    assert {name: (s.path / name).read_bytes() for name in before} == before
    assert _workers() == []


def test_shards_whose_statistics_disagree_are_refused_not_converted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    torch.manual_seed(0)
    data = planted_blobs(seed=11, n_per=30)
    model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 1)).eval()
    y = data["x"][:, :1].copy()
    s = scan(model, batches_of(data["x"], y, 20), out=tmp_path / "s", dim=8, engine="vmap", shard_rows=40)
    second = s.path / s.shards.shards[1].stats
    t = pq.read_table(second)
    i = t.schema.get_field_index("label")
    pq.write_table(t.set_column(i, "label", t.column("label").cast(pa.float32())), second)
    with pytest.raises(pa.ArrowInvalid):
        s.shards.stats_table()


def test_a_classification_scan_takes_pass_2_from_the_slices_last_pass(tmp_path):
    # Pass 2's products come out of the slices' last pass (one read of the vectors): the scores are those of
    # pass 2 on its own, up to the rounding of the products; leave_one_out takes the separate route and slices
    # the same way.
    from hardmine.score import ScoreConfig, score_pass

    data = planted_blobs(seed=12, n_per=80)
    model = trained_mlp(data["x"], data["y"], steps=30)
    s = scan(model, batches_of(data["x"], data["y"], 25), out=tmp_path / "s", dim=16, engine="vmap", shard_rows=70)
    m = s.manifest().set_index("sample_id").loc[s.sample_ids()]
    labels = s.stats()["label"].to_numpy(dtype=np.int64)
    pop = population_pass(s.iter_gradients(), s.out_dim, labels, s.num_classes)
    want = score_pass(s.iter_gradients(), s.n_samples, labels, pop, ScoreConfig(), None)
    for k in ("class_divergence", "global_divergence", "class_divergence_plain", "global_divergence_plain",
              "class_distance"):
        np.testing.assert_allclose(m[k].to_numpy(), want[k], rtol=1e-9, atol=1e-12, err_msg=k)
    # The default hardness weights no divergence: it is ranked before pass 2 ends; with a divergence weighted
    # (here at 0, so the hardness is the same) after it. The same manifest either way.
    late = s.rescore(ScoreConfig(weights={"margin": 1.0, "grad_norm": 1.0, "class_divergence": 0.0}))
    late = late.set_index("sample_id").loc[s.sample_ids()]
    pd.testing.assert_frame_equal(late[m.columns], m, check_exact=True)
    loo = s.rescore(ScoreConfig(leave_one_out=True)).set_index("sample_id").loc[s.sample_ids()]
    assert loo["slice"].tolist() == m["slice"].tolist()
    assert not np.allclose(loo["class_divergence"].to_numpy(), m["class_divergence"].to_numpy())


@pytest.mark.timeout(120)
def test_progress_never_goes_back_when_the_scoring_thread_joins_a_last_pass_that_is_not_pass_2(tmp_path, monkeypatch):
    # With leave_one_out, pass 2 runs on its own (and reports progress up to n) before this thread joins the
    # slices' last pass: the blocks it assigns there must not report fewer rows again.
    import hardmine.slices as slices_module
    from hardmine.score import ScoreConfig

    data = planted_blobs(seed=13, n_per=60)
    model = trained_mlp(data["x"], data["y"], steps=20)
    s = scan(model, batches_of(data["x"], data["y"], 20), out=tmp_path / "s", dim=8, engine="vmap", shard_rows=40)
    original = slices_module._assign_block
    joined = threading.Event()

    def assign(start, z, y, cols, centroids, raw, sim, sums, products=None):
        if sums is None:  # the last pass: the worker waits until the scoring thread has taken a block
            if threading.current_thread() is threading.main_thread():
                joined.set()
            else:
                joined.wait(timeout=10)
        return original(start, z, y, cols, centroids, raw, sim, sums, products)

    monkeypatch.setattr(slices_module, "_assign_block", assign)
    done: list[int] = []
    s.write_scores(ScoreConfig(leave_one_out=True), progress=done.append)
    assert joined.is_set() and done == sorted(done) and done[-1] == s.n_samples
