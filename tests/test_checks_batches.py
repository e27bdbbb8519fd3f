"""``hardmine.checks`` (setting checks) and ``hardmine.batches`` (the batch contract) on their own."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hardmine.batches import (
    check_labels,
    infer_task,
    label_flag,
    not_finite_flag,
    sample_id_list,
    sample_ids,
    split_batch_ids,
    to_device,
)
from hardmine.checks import as_bool, finite_number, non_negative_int, number_in, positive_int
from hardmine.enums import LossKind, TaskKind


# -------------------------------------------------------------------------------------------- checks
def test_int_checks_refuse_bools_and_quote_the_value():
    assert positive_int(3, "n") == 3 and positive_int(np.int64(3), "n") == 3
    assert type(positive_int(np.int64(3), "n")) is int
    assert positive_int(None, "n", allow_none=True) is None
    assert non_negative_int(0, "seed") == 0
    for bad in (0, -1, True, 2.0, "3", None):
        with pytest.raises(ValueError, match=rf"n={bad!r} must be a positive integer\."):
            positive_int(bad, "n")
    with pytest.raises(ValueError, match=r"k=0 must be a positive integer or None \(why\)\."):
        positive_int(0, "k", allow_none=True, hint="why")
    with pytest.raises(ValueError, match=r"seed=-1 must be a non-negative integer\."):
        non_negative_int(-1, "seed")


def test_number_and_bool_checks():
    assert finite_number(0.5, "x", above=0) == 0.5
    for bad in (math.nan, math.inf, True, "1", 0):
        with pytest.raises(ValueError, match=r"x=.* must be a finite number > 0\."):
            finite_number(bad, "x", above=0)
    with pytest.raises(ValueError, match=r"w=-1 must be a finite number >= 0\."):
        finite_number(-1, "w", at_least=0)
    assert number_in(0.5, "t", 0.0, 1.0) == 0.5
    with pytest.raises(ValueError, match=r"t=nan must be a number in \[0.0, 1.0\]\."):
        number_in(math.nan, "t", 0.0, 1.0)
    assert as_bool(False, "flag") is False
    for bad in (1, "yes", None, np.bool_(True)):
        with pytest.raises(ValueError, match="must be True or False"):
            as_bool(bad, "flag")


# ------------------------------------------------------------------------------------------- batches
def test_sample_ids_array_and_list_forms():
    arr, kind = sample_ids(torch.tensor([3, 1, 2]), 3)
    assert kind == "int" and arr.dtype == np.int64 and arr.tolist() == [3, 1, 2]
    arr, kind = sample_ids(np.array(["a", "b"]), 2)
    assert kind == "str" and arr.dtype == object and arr.tolist() == ["a", "b"]
    ids, kind = sample_id_list(np.arange(3, dtype=np.int32), 3)
    assert kind == "int" and ids == [0, 1, 2] and all(type(v) is int for v in ids)
    ids, kind = sample_id_list(("x", "y"), 2)
    assert kind == "str" and ids == ["x", "y"]
    with pytest.raises(ValueError, match="3 sample ids for a batch of 4"):
        sample_ids([1, 2, 3], 4)
    with pytest.raises(ValueError, match="batch 2: 3 sample ids for 4 samples"):
        sample_ids([1, 2, 3], 4, "batch 2")
    for bad, text in (([1, "a"], "all integers or all strings"), ([True, False], "all integers or all strings"),
                      ("ab", "sequence"), ({1, 2}, "sequence"), (torch.ones(2), "1-D integer tensor")):
        with pytest.raises(ValueError, match=text):
            sample_ids(bad, 2)


def test_split_batch_ids_shapes():
    x, y = torch.randn(2, 3), torch.tensor([0, 1])
    inputs, target, ids = split_batch_ids((x, y, [5, 6]))
    assert inputs is x and target is y and ids == [5, 6]
    inputs, target, ids = split_batch_ids({"input_ids": x, "labels": y, "sample_id": ["a", "b"]})
    assert set(inputs) == {"input_ids"} and target is y and ids == ["a", "b"]
    assert split_batch_ids([x, y])[2] is None
    with pytest.raises(ValueError, match="batch 7: .*4 elements"):
        split_batch_ids((x, y, [1, 2], 0), "batch 7")
    with pytest.raises(ValueError, match="target is a list"):
        split_batch_ids((x, [0, 1]))


def test_task_labels_and_device():
    logits, ids = torch.randn(3, 4), torch.tensor([0, 1, 3])
    assert infer_task(LossKind.CROSS_ENTROPY, ids, logits) is TaskKind.CLASSIFICATION
    assert infer_task(LossKind.MSE, ids.float(), logits) is TaskKind.REGRESSION
    assert infer_task(None, ids, logits) is TaskKind.CLASSIFICATION  # custom loss: integer ids + (B, C)
    assert infer_task(None, torch.randn(3, 4), logits) is TaskKind.REGRESSION
    check_labels(ids, 4)
    with pytest.raises(ValueError, match=r"batch 1: label 4 is out of range for a model with 4 outputs"):
        check_labels(torch.tensor([0, 4]), 4, "batch 1")
    with pytest.raises(ValueError, match="label -1"):
        check_labels(torch.tensor([-1, 2]), 4)
    moved = to_device({"a": ids, "b": [ids, 3]}, torch.device("cpu"))
    assert moved["a"] is ids and moved["b"] == (ids, 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_not_finite_flag_is_isfinite_negated(dtype):
    info = torch.finfo(dtype)
    values = [0.0, -0.0, 1.5, -3.0, info.max, -info.max, info.tiny, float("nan"), float("inf"), float("-inf")]
    for v in values:
        t = torch.tensor(v, dtype=dtype)
        flag = not_finite_flag(t)
        assert flag.dtype == torch.bool and flag.ndim == 0
        assert bool(flag) == (not math.isfinite(v)), v


@pytest.mark.parametrize("outputs", [1, 2, 5])
def test_label_flag_flags_exactly_the_labels_out_of_range(outputs):
    classes = max(outputs, 2)  # a single logit is the binary model
    for labels, bad in [
        ([0, classes - 1, 1], False),
        ([0, classes, 1], True),
        ([-1, 0, 0], True),
        ([classes - 1], False),
        ([-100, 0], True),
    ]:
        target = torch.tensor(labels)
        flag, safe = label_flag(target, outputs)
        assert flag.ndim == 0 and bool(flag) == bad, labels
        assert safe.tolist() == [min(max(v, 0), classes - 1) for v in labels]
        assert target.tolist() == labels  # the caller's target is left alone
