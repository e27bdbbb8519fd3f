"""ManifestSampler / MinerSampler: what the user is told (warnings and errors quote the offending value and say
what to do), and the small behaviours around it (default seed, int indices)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd
import pytest

import hardmine
from hardmine.sampler import ManifestSampler, MinerSampler


def _df(ids, weights=None):
    return pd.DataFrame({"sample_id": ids, "weight": [1.0] * len(ids) if weights is None else weights})


def test_items_missing_from_the_manifest_are_warned_about_at_the_callers_line():
    with pytest.warns(UserWarning) as rec:
        ManifestSampler(_df(["a", "b", "c"]), dataset_ids=["a", "b", "c", "d", "e"])
    (w,) = [r for r in rec if "never be drawn" in str(r.message)]
    msg = str(w.message)
    assert "2 of the 5 dataset items are not in the manifest" in msg  # how many, out of how many
    assert "export the full scan" in msg  # what to do
    # The warning is attributed to the code that built the sampler, not to a line inside hardmine (under
    # mutmut, whose trampoline adds frames, that is mutmut's file; in a plain run, this test file).
    assert Path(hardmine.__file__).parent not in Path(w.filename).resolve().parents


def test_manifest_covering_every_item_gives_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = ManifestSampler(_df(["a", "b", "c"]), dataset_ids=["c", "a", "b"])
    assert sorted(s.indices.tolist()) == [0, 1, 2]


def test_custom_ids_without_dataset_ids_say_what_to_pass():
    df = _df([10, 20, 30])
    df.attrs["hardmine"] = {"sample_id_kind": "custom"}
    with pytest.raises(ValueError) as e:
        ManifestSampler(df)
    msg = str(e.value)
    assert "--id-column" in msg and "dataset_ids=" in msg and "dataset index" in msg


def test_ids_not_in_the_dataset_are_counted_and_quoted():
    # The first manifest id is at dataset position 0; five ids are not in the dataset at all.
    df = _df([0, 70, 71, 72, 73, 74])
    with pytest.raises(ValueError) as e:
        ManifestSampler(df, dataset_ids=[0, 1, 2])
    msg = str(e.value)
    assert msg.startswith("5 manifest sample ids are not in dataset_ids")
    assert "(e.g. [70, 71, 72])" in msg  # a few of the offending ids, not a flood of them
    assert "does not belong to this dataset" in msg


def test_indices_from_dataset_ids_are_python_ints():
    s = ManifestSampler(_df(["b", "a"]), dataset_ids=["a", "b"], num_samples=6)
    drawn = list(s)
    assert drawn and all(type(i) is int for i in drawn)  # what a DataLoader indexes a dataset with
    assert set(drawn) <= {0, 1}


def test_miner_sampler_errors_name_the_argument_and_its_value():
    with pytest.raises(ValueError) as e:
        MinerSampler(0)
    assert "num_samples=0" in str(e.value) and "the dataset length" in str(e.value)
    with pytest.raises(ValueError, match="seed=-1 "):
        MinerSampler(5, seed=-1)
    with pytest.raises(ValueError, match="replacement='yes' must be True or False"):
        MinerSampler(5, replacement="yes")
    with pytest.raises(ValueError, match="epoch=-2 "):
        MinerSampler(5).set_epoch(-2)


def test_miner_sampler_default_seed_is_zero():
    assert list(MinerSampler(20)) == list(MinerSampler(20, seed=0))
    assert list(MinerSampler(20)) != list(MinerSampler(20, seed=1))


def test_miner_sampler_refresh_errors_say_what_to_pass():
    s = MinerSampler(10)
    with pytest.raises(ValueError) as e:
        s.refresh(pd.DataFrame({"sample_id": [0]}))
    assert "DataFrame with 'sample_id' and 'weight' columns" in str(e.value)
    with pytest.raises(ValueError) as e:
        s.refresh(_df([12]))
    msg = str(e.value)
    assert "[0, 9]" in msg and "MinerSampler" in msg and "pass the dataset index as the id to observe()" in msg
