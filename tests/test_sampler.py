"""ManifestSampler: draws at the configured rate (binomial tolerance), determinism, sharding, id mapping."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_scan import planted_scan
from torch.utils.data import DataLoader, TensorDataset

from hardmine.manifest import export_manifest
from hardmine.sampler import ManifestSampler


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """The planted-blobs scan of test_scan.py, built once per session for every module that reads it (none
    changes it), instead of once per module."""
    return planted_scan(tmp_path_factory.getbasetemp() / "planted-shared")


def test_draws_hard_samples_at_the_configured_rate(tmp_path, planted):  # noqa: F811
    sc, data = planted
    n = sc.n_samples
    top, boost = 0.1, 5.0
    path = tmp_path / "topk.parquet"
    m = export_manifest(sc, strategy="top-k", top=top, boost=boost, out=path)
    n_hard = math.ceil(top * n)
    assert int(m["is_hard"].sum()) == n_hard
    # Flagged label issues are never boosted (weight 1 like an easy sample); the other hard samples get boost.
    issue = m["is_label_issue"].fillna(False).to_numpy(dtype=bool) if "is_label_issue" in m else np.zeros(n, bool)
    boosted = m["is_hard"].to_numpy(dtype=bool) & ~issue
    n_boosted = int(boosted.sum())
    assert n_boosted > 0
    # Each draw is independent (with replacement), so the number of boosted draws is Binomial(M, pi) with
    # pi = boost·n_b / (boost·n_b + n - n_b) (the cap of 20x the mean is not reached).
    pi = boost * n_boosted / (boost * n_boosted + n - n_boosted)
    draws = 20_000
    sampler = ManifestSampler(path, num_samples=draws, seed=0)
    idx = np.fromiter(iter(sampler), dtype=np.int64)
    assert len(idx) == len(sampler) == draws
    boosted_ids = m.loc[boosted, "sample_id"].to_numpy()
    rate = np.isin(idx, boosted_ids).mean()
    tol = 4 * math.sqrt(pi * (1 - pi) / draws)  # 4 sigma: a false alarm has probability 6e-5
    assert abs(rate - pi) <= tol, (rate, pi, tol)
    assert abs(n_boosted / n - pi) > 10 * tol  # uniform sampling would fail this test
    # The planted rare sub-cluster (hard, correctly labelled) is drawn more often than under uniform sampling:
    # its rate sits more than 4 sigma above the uniform one (a ratio like 1.5x was too thin a margin: the scan's
    # ranking of the rare samples moves with the CPU's float rounding, 1.45x on an AVX-512 machine).
    rare = data["rare"].mean()
    assert data["rare"][idx].mean() > rare + 4 * math.sqrt(rare * (1 - rare) / draws)


def test_deterministic_per_seed_and_epoch(planted):  # noqa: F811
    sc, _ = planted
    a = ManifestSampler(sc, seed=3)
    b = ManifestSampler(sc.manifest_path, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    assert first != second
    a.set_epoch(0)
    assert list(a) == first
    assert list(ManifestSampler(sc, seed=4)) != first
    assert len(a) == sc.n_samples


def test_sharding_splits_one_global_draw():
    df = pd.DataFrame({"sample_id": np.arange(30), "weight": np.linspace(0.5, 2.0, 30)})
    parts = [ManifestSampler(df, num_samples=100, num_replicas=3, rank=r, seed=7) for r in range(3)]
    lengths = {len(p) for p in parts}
    assert lengths == {34}  # ceil(100 / 3): every replica the same length
    draws = [list(p) for p in parts]
    glob = parts[0].global_draw()
    assert len(glob) == 102
    for r in range(3):
        assert draws[r] == glob[r::3].tolist()
    assert sorted(sum(draws, [])) == sorted(glob.tolist())


def test_without_replacement_and_dataset_ids():
    df = pd.DataFrame({"sample_id": ["c", "a", "b", "d"], "weight": [1.0, 0.0, 2.0, 1.0]})
    dataset_ids = ["a", "b", "c", "d", "e"]  # dataset order differs from the manifest; "e" is not scanned
    assert len(ManifestSampler(df, dataset_ids=dataset_ids)) == 4  # one draw per manifest row by default
    with pytest.raises(ValueError, match="exceeds the 3 samples with a positive weight"):
        ManifestSampler(df, replacement=False, dataset_ids=dataset_ids)
    s3 = ManifestSampler(df, num_samples=3, replacement=False, dataset_ids=dataset_ids, seed=0)
    drawn = list(s3)
    assert sorted(drawn) == [1, 2, 3]  # "b", "c", "d": never "a" (weight 0) or "e" (not in the manifest)
    with pytest.raises(ValueError, match="not in dataset_ids"):
        ManifestSampler(df, dataset_ids=["a", "b"])
    with pytest.raises(ValueError, match="not integers"):
        ManifestSampler(df)


def test_works_with_dataloader(planted):  # noqa: F811
    sc, data = planted
    x = torch.from_numpy(data["x"])
    y = torch.from_numpy(data["y"])
    loader = DataLoader(TensorDataset(x, y), batch_size=100, sampler=ManifestSampler(sc, num_samples=300, seed=1))
    batches = list(loader)
    assert [len(b[0]) for b in batches] == [100, 100, 100]
    idx = np.array(list(ManifestSampler(sc, num_samples=300, seed=1)))
    torch.testing.assert_close(batches[0][0], x[idx[:100]])


def test_bad_inputs():
    df = pd.DataFrame({"sample_id": [0, 1, 2], "weight": [1.0, 1.0, 1.0]})
    with pytest.raises(ValueError, match="rank=3"):
        ManifestSampler(df, num_replicas=3, rank=3)
    with pytest.raises(ValueError, match="num_replicas=0"):
        ManifestSampler(df, num_replicas=0)
    with pytest.raises(ValueError, match="num_samples=0"):
        ManifestSampler(df, num_samples=0)
    with pytest.raises(ValueError, match="seed=-1"):
        ManifestSampler(df, seed=-1)
    with pytest.raises(ValueError, match="all weights"):
        ManifestSampler(df.assign(weight=0.0))
    with pytest.raises(ValueError, match="finite weights"):
        ManifestSampler(df.assign(weight=[1.0, np.nan, 1.0]))
    with pytest.raises(ValueError, match="negative"):
        ManifestSampler(df.assign(sample_id=[-1, 0, 1]))
    with pytest.raises(ValueError, match="no 'weight' column"):
        ManifestSampler(df.drop(columns=["weight"]))
    with pytest.raises(ValueError, match="not understood"):
        ManifestSampler(42)
    with pytest.raises(ValueError, match="epoch"):
        ManifestSampler(df).set_epoch(-1)


# --------------------------------------------------------------------------- seed and epoch are a pair
def _uniform(n: int = 200) -> pd.DataFrame:
    return pd.DataFrame({"sample_id": np.arange(n), "weight": np.ones(n)})


def _draw(seed: int, epoch: int, df: pd.DataFrame | None = None, **kw) -> list[int]:
    s = ManifestSampler(_uniform() if df is None else df, seed=seed, **kw)
    s.set_epoch(epoch)
    return list(s)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**20), epoch=st.integers(1, 50), shift=st.integers(1, 50))
def test_seed_and_epoch_with_equal_sums_give_different_draws(seed, epoch, shift):
    # A generator seeded with seed + epoch would repeat (seed 3, epoch 1) as (seed 4, epoch 0): the next run
    # with the next seed would replay this run's epochs one step late.
    other_seed, other_epoch = seed + min(shift, epoch), epoch - min(shift, epoch)
    assert _draw(seed, epoch) != _draw(other_seed, other_epoch)
    if seed != epoch:
        assert _draw(seed, epoch) != _draw(epoch, seed)  # nor may the two be interchangeable


def test_seed_three_epoch_one_is_not_seed_four_epoch_zero():
    assert _draw(3, 1) != _draw(4, 0)
    assert _draw(0, 5) != _draw(5, 0)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31), epoch=st.integers(0, 1000), replacement=st.booleans())
def test_draw_is_reproducible_from_seed_and_epoch(seed, epoch, replacement):
    df = pd.DataFrame({"sample_id": np.arange(50), "weight": np.linspace(0.1, 3.0, 50)})
    first = _draw(seed, epoch, df, replacement=replacement, num_samples=30)
    s = ManifestSampler(df, seed=seed, replacement=replacement, num_samples=30)
    s.set_epoch(epoch + 1)
    list(s)  # another epoch in between changes nothing
    s.set_epoch(epoch)
    assert list(s) == first
    assert len(first) == 30 and all(0 <= i < 50 for i in first)
    if not replacement:
        assert len(set(first)) == 30  # without replacement no index repeats


def test_draw_follows_the_weights():
    # 3 rows with weights 1:2:7; 20 000 draws land on each at its share within 4 binomial sigmas.
    df = pd.DataFrame({"sample_id": [5, 6, 7], "weight": [1.0, 2.0, 7.0]})
    s = ManifestSampler(df, num_samples=20_000, seed=11)
    idx = np.array(list(s))
    assert set(idx) <= {5, 6, 7}
    for i, p in zip([5, 6, 7], [0.1, 0.2, 0.7]):
        tol = 4 * np.sqrt(p * (1 - p) / len(idx))
        assert abs((idx == i).mean() - p) <= tol
    np.testing.assert_allclose(s.probabilities, [0.1, 0.2, 0.7])


# ------------------------------------------------------------------------------------------ MinerSampler
def test_miner_sampler_is_a_seeded_permutation_until_the_first_refresh():
    from hardmine.sampler import MinerSampler

    s = MinerSampler(50, seed=2)
    first = list(s)
    assert sorted(first) == list(range(50)) and len(s) == 50  # every index once
    assert list(MinerSampler(50, seed=2)) == first  # reproducible
    s.set_epoch(1)
    assert sorted(list(s)) == list(range(50)) and list(s) != first  # a new order each epoch
    s.set_epoch(0)
    assert list(s) == first
    assert list(MinerSampler(50, seed=3)) != first
    a, b = MinerSampler(50, seed=3), MinerSampler(50, seed=4)
    a.set_epoch(1)
    assert list(a) != list(b)  # (3, 1) is not (4, 0)


def test_miner_sampler_draws_by_the_refreshed_weights():
    from hardmine.sampler import MinerSampler

    n = 40
    s = MinerSampler(n, seed=0)
    hard = np.arange(5)  # the manifest covers ids 0..19; 0..4 are hard
    manifest = pd.DataFrame({"sample_id": np.arange(20), "weight": np.where(np.arange(20) < 5, 10.0, 0.5)})
    s.refresh(manifest)
    assert s.refreshes == 1 and len(s) == n
    idx = np.concatenate([_epoch(s, e) for e in range(25)])
    # expected share of the hard ids: 5*10 / (5*10 + 15*0.5 + 20*1): unobserved ids get weight 1
    p = 50 / (50 + 7.5 + 20)
    tol = 4 * np.sqrt(p * (1 - p) / len(idx))
    assert abs(np.isin(idx, hard).mean() - p) <= tol
    unobserved = np.isin(idx, np.arange(20, 40)).mean()
    assert abs(unobserved - 20 / 77.5) <= 4 * np.sqrt(0.26 * 0.74 / len(idx))
    # without replacement: every index still drawn exactly once
    w = MinerSampler(n, seed=0, replacement=False)
    w.refresh(manifest)
    assert sorted(list(w)) == list(range(n))


def _epoch(s, e: int) -> list[int]:
    s.set_epoch(e)
    return list(s)


def test_miner_sampler_state_round_trip():
    from hardmine.sampler import MinerSampler

    s = MinerSampler(30, seed=5)
    st0 = s.state_dict()
    assert st0["weights"] is None and st0["refreshes"] == 0 and st0["num_samples"] == 30 and st0["seed"] == 5
    s.refresh(pd.DataFrame({"sample_id": [0, 1, 2], "weight": [9.0, 1.0, 1.0]}))
    s.set_epoch(4)
    state = s.state_dict()
    assert state["epoch"] == 4 and state["refreshes"] == 1
    torch.testing.assert_close(state["weights"], torch.tensor([9.0, 1.0, 1.0] + [1.0] * 27, dtype=torch.float64))
    t = MinerSampler(30, seed=5)
    t.load_state_dict(state)
    assert t.epoch == 4 and t.refreshes == 1 and list(t) == list(s)
    state["weights"][0] = 100.0  # the state is a copy: changing it does not change the sampler
    assert list(s) == list(t)
    u = MinerSampler(30, seed=5)
    u.refresh(pd.DataFrame({"sample_id": [0], "weight": [3.0]}))
    u.load_state_dict(st0)  # back to before the first refresh: a permutation again
    assert u.refreshes == 0 and sorted(list(u)) == list(range(30)) and list(u) == list(MinerSampler(30, seed=5))
    with pytest.raises(ValueError, match="num_samples=30, seed=5"):
        MinerSampler(31, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="num_samples=30, seed=5"):
        MinerSampler(30, seed=6).load_state_dict(state)


def test_miner_sampler_bad_inputs():
    from hardmine.sampler import MinerSampler

    s = MinerSampler(10)
    with pytest.raises(ValueError, match="sample_id"):
        s.refresh(pd.DataFrame({"sample_id": [0]}))
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        s.refresh(pd.DataFrame({"sample_id": [10], "weight": [1.0]}))
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        s.refresh(pd.DataFrame({"sample_id": [-1], "weight": [1.0]}))
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        s.refresh(pd.DataFrame({"sample_id": ["a"], "weight": [1.0]}))
    s.refresh(pd.DataFrame({"sample_id": [9], "weight": [1.0]}))  # the last index is fine
    with pytest.raises(ValueError, match="num_samples"):
        MinerSampler(0)
    with pytest.raises(ValueError, match="seed"):
        MinerSampler(5, seed=-1)
    with pytest.raises(ValueError, match="epoch"):
        s.set_epoch(-1)


# --------------------------------------------------------------------------------- option checking
def test_options_are_checked_with_messages_that_say_what_to_pass():
    df = pd.DataFrame({"sample_id": [0, 1, 2, 3], "weight": [1.0, 1.0, 1.0, 1.0]})
    for bad in (True, 1.5, "1"):
        with pytest.raises(ValueError, match="seed=.* must be a non-negative integer"):
            ManifestSampler(df, seed=bad)
        with pytest.raises(ValueError, match=r"rank=.* must be an integer in \[0, 2\] \(num_replicas=3\)"):
            ManifestSampler(df, num_replicas=3, rank=bad if bad is not True else 3)
        with pytest.raises(ValueError, match="epoch=.* must be a non-negative integer"):
            ManifestSampler(df).set_epoch(bad)
    with pytest.raises(ValueError, match=r"rank=True must be an integer in \[0, 0\]"):
        ManifestSampler(df, rank=True)
    with pytest.raises(ValueError, match="replacement=1 must be True or False"):
        ManifestSampler(df, replacement=1)
    with pytest.raises(ValueError, match="without replacement exceeds the 4 samples with a positive weight; "
                                         "lower num_samples or use replacement=True"):
        ManifestSampler(df, num_samples=5, replacement=False)
    # 4 draws over 3 replicas need ceil(4/3)*3 = 6 distinct rows without replacement
    with pytest.raises(ValueError, match=r"does not split evenly over 3 replicas without replacement "
                                         r"\(6 > 4 samples with weight > 0\)"):
        ManifestSampler(df, num_samples=4, num_replicas=3, replacement=False)
    ok = ManifestSampler(df, num_samples=4, num_replicas=2, replacement=False)  # 2 x 2 = 4 rows: fine
    assert len(ok) == 2
    with pytest.raises(ValueError, match="finite weights >= 0"):
        ManifestSampler(df.assign(weight=["1", "x", "1", "1"]))  # not a number: refused, not guessed
    with pytest.raises(ValueError):
        ManifestSampler(df.assign(weight=pd.array([1.0, None, 1.0, 1.0], dtype="Float64")))
    with pytest.raises(ValueError, match="manifest of type int is not understood"):
        ManifestSampler(3)
    with pytest.raises(ValueError, match="not understood"):  # only a Scan has both attributes
        ManifestSampler(type("Half", (), {"manifest": lambda self: df})())


def test_small_weights_and_the_default_seed():
    df = pd.DataFrame({"sample_id": [0, 1, 2], "weight": [0.1, 0.2, 0.05]})  # sum < 1 is fine
    s = ManifestSampler(df)
    np.testing.assert_allclose(s.probabilities, [0.4, 0.8, 0.2] * np.array(1 / 1.4))
    assert list(s) == list(ManifestSampler(df, seed=0))  # the documented default seed
    assert s.replacement is True


def test_dataset_ids_of_any_sequence_type():
    df = pd.DataFrame({"sample_id": [2, 0, 1], "weight": [1.0, 0.0, 0.0]})
    for ids in ([10, 11, 12], np.array([10, 11, 12]), torch.tensor([10, 11, 12]), pd.Index([10, 11, 12])):
        s = ManifestSampler(df.assign(sample_id=[12, 10, 11]), dataset_ids=ids, num_samples=5)
        assert list(s) == [2] * 5, type(ids)  # only id 12 has weight: dataset position 2
    with pytest.raises(ValueError, match=r"dataset_ids has duplicates \(e.g. 'b'\); ids must be unique"):
        ManifestSampler(df.assign(sample_id=["a", "b", "c"]), dataset_ids=["a", "b", "b", "c"])
    with pytest.raises(ValueError, match="not dataset indices; pass dataset_ids \\(the sample id of every "
                                         "dataset item, in order\\)"):
        ManifestSampler(df.assign(sample_id=["a", "b", "c"]))


def test_miner_sampler_counts_refreshes_and_keeps_its_seed_after_one():
    from hardmine.sampler import MinerSampler

    manifest = pd.DataFrame({"sample_id": np.arange(30), "weight": np.linspace(0.5, 2.0, 30)})
    a, b = MinerSampler(30, seed=1), MinerSampler(30, seed=2)
    for s in (a, b):
        s.refresh(manifest)
        s.refresh(manifest)
    assert a.refreshes == 2 and a.state_dict()["refreshes"] == 2
    assert list(a) != list(b)  # the weighted draw is seeded by the sampler's own seed
    c = MinerSampler(30, seed=1)
    c.refresh(manifest)
    assert list(c) == list(a)
