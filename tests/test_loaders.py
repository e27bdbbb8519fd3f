"""Loading checkpoints and datasets from real files made in the test."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pandas as pd
import pytest
import torch
from models import MLP

from hardmine.loaders import load_model, open_data
from hardmine.loaders.model import state_dict_fingerprint


def _batches(src):
    return list(iter(src))


# ----------------------------------------------------------------------------------------------- models
@pytest.fixture
def mlp():
    torch.manual_seed(1)
    return MLP()


def _same_weights(a, b):
    return state_dict_fingerprint(a) == state_dict_fingerprint(b)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 3},
        lambda sd: {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "global_step": 10},  # Lightning
    ],
)
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_state_dict_checkpoints_are_unwrapped(tmp_path, mlp, wrap, suffix):
    path = tmp_path / f"ckpt{suffix}"
    torch.save(wrap(mlp.state_dict()), path)
    loaded = load_model(path, "models:MLP")
    assert loaded.kind == "state_dict" and _same_weights(loaded.model, mlp)
    assert loaded.fingerprint == state_dict_fingerprint(mlp)


def test_explicit_state_key(tmp_path, mlp):
    torch.save({"ema": mlp.state_dict(), "raw": MLP().state_dict()}, tmp_path / "c.pt")
    assert _same_weights(load_model(tmp_path / "c.pt", "models:MLP", state_key="ema").model, mlp)
    with pytest.raises(ValueError, match=r"'nope' is not in the checkpoint.*\['ema', 'raw'\]"):
        load_model(tmp_path / "c.pt", "models:MLP", state_key="nope")
    with pytest.raises(ValueError, match="--state-key"):
        load_model(tmp_path / "c.pt", "models:MLP")


def test_safetensors(tmp_path, mlp):
    from safetensors.torch import save_file

    save_file(mlp.state_dict(), tmp_path / "m.safetensors")
    assert _same_weights(load_model(tmp_path / "m.safetensors", "models:MLP").model, mlp)


def test_torch_export_archive_needs_no_factory(tmp_path, mlp):
    batch = torch.export.Dim("batch", min=1)
    prog = torch.export.export(mlp.eval(), (torch.randn(4, 12),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(prog, tmp_path / "m.pt2")
    loaded = load_model(tmp_path / "m.pt2")
    x = torch.randn(3, 12)
    torch.testing.assert_close(loaded.model(x), mlp(x))
    # the exact engine works through the exported graph
    from hardmine import per_sample_grads, reference_per_sample_grads

    b = (x, torch.tensor([0, 1, 2]))
    got, ref = per_sample_grads(loaded.model, b), reference_per_sample_grads(mlp, b)
    for n in ref.grads:
        torch.testing.assert_close(got.grads[n], ref.grads[n])


def test_pickled_model_is_refused_unless_opted_in(tmp_path, mlp):
    torch.save(mlp, tmp_path / "full.pt")
    with pytest.raises(ValueError, match=r"arbitrary code.*--unsafe-pickle"):
        load_model(tmp_path / "full.pt", "models:MLP")
    loaded = load_model(tmp_path / "full.pt", unsafe_pickle=True)
    assert loaded.kind == "pickle" and _same_weights(loaded.model, mlp)


def test_mismatched_checkpoint_lists_keys_and_shapes(tmp_path):
    sd = MLP(hidden=20).state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["fc2.bias"]
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ValueError) as err:
        load_model(tmp_path / "bad.pt", "models:MLP")
    msg = str(err.value)
    assert "missing keys ['fc2.bias']" in msg and "unexpected keys ['extra.weight']" in msg
    assert "fc1.weight: checkpoint (20, 12) vs model (16, 12)" in msg


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (("missing.pt", "models:MLP"), "does not exist"),
        (("ckpt.pt", None), "--model pkg.module:factory"),
        (("ckpt.pt", "models"), "package.module:function"),
        (("ckpt.pt", "no_such_module_xyz:f"), "cannot import module 'no_such_module_xyz'"),
        (("ckpt.pt", "models:Nope"), "has no attribute 'Nope'"),
        (("ckpt.onnx", "models:MLP"), "unknown extension '.onnx'"),
        (("garbage.pt", "models:MLP"), "could not be read"),
    ],
)
def test_bad_model_arguments(tmp_path, mlp, args, pattern):
    torch.save(mlp.state_dict(), tmp_path / "ckpt.pt")
    (tmp_path / "ckpt.onnx").write_bytes(b"x")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=pattern):
        load_model(tmp_path / args[0], args[1])


# ------------------------------------------------------------------------------------------------- data
def _frame(n=10, f=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f)).astype(np.float32)
    return x, rng.integers(0, 3, size=n)


def test_parquet_list_column_streamed_in_batches(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    x, y = _frame(10)
    table = pa.table({"feat": list(x), "label": y, "uid": [f"s{i}" for i in range(10)]})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=4)
    src = open_data(str(tmp_path / "d.parquet"), feature_column="feat", id_column="uid", input_shape=(2, 3), batch_size=4)
    got = _batches(src)
    assert src.total == 10 and [len(b[2]) for b in got] == [4, 4, 2]
    xs = torch.cat([b[0] for b in got])
    assert xs.shape == (10, 2, 3)
    np.testing.assert_allclose(xs.reshape(10, -1).numpy(), x)
    assert torch.cat([b[1] for b in got]).tolist() == y.tolist()
    assert sum((b[2] for b in got), []) == [f"s{i}" for i in range(10)]
    limited = _batches(open_data(str(tmp_path / "d.parquet"), feature_column="feat", batch_size=4, limit=5))
    assert sum((b[2] for b in limited), []) == [0, 1, 2, 3, 4]


def test_csv_glob_columns_and_row_index_ids(tmp_path):
    x, y = _frame(9, 4)
    df = pd.DataFrame(x, columns=[f"pix_{i}" for i in range(4)])
    df["other"] = 1.0
    df["label"] = y
    df.to_csv(tmp_path / "d.csv", index=False)
    src = open_data(str(tmp_path / "d.csv"), feature_columns="pix_*", batch_size=4)
    got = _batches(src)
    assert src.total == 9 and [len(b[2]) for b in got] == [4, 4, 1]
    np.testing.assert_allclose(torch.cat([b[0] for b in got]).numpy(), x, rtol=1e-6)
    assert sum((b[2] for b in got), []) == list(range(9))


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_memory_mapped_or_loaded(tmp_path, compressed):
    x, y = _frame(7, 5)
    (np.savez_compressed if compressed else np.savez)(tmp_path / "d.npz", X=x, y=y, ids=np.arange(100, 107))
    got = _batches(open_data(str(tmp_path / "d.npz"), batch_size=3))
    np.testing.assert_array_equal(torch.cat([b[0] for b in got]).numpy(), x)
    assert sum((b[2] for b in got), []) == list(range(100, 107))
    if not compressed:
        from hardmine.loaders.data import _npz_member

        assert isinstance(_npz_member(tmp_path / "d.npz", "X"), np.memmap)


def _write_idx(path, arr):
    header = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_idx_directory_detected(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, size=(5, 4, 4)).astype(np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 4]))
    src = open_data(str(tmp_path), batch_size=2)
    got = _batches(src)
    assert src.format.value == "idx" and got[0][0].shape == (2, 1, 4, 4)
    np.testing.assert_allclose(torch.cat([b[0] for b in got]).numpy()[:, 0], imgs / 255.0, rtol=1e-6)


def test_factory_dataset(tmp_path):
    got = _batches(open_data("models:tiny_dataset", batch_size=4))
    assert [len(b[2]) for b in got] == [4, 2] and got[0][0].shape == (4, 12)


@pytest.mark.parametrize(
    ("frame", "kwargs", "pattern"),
    [
        ({"feat": [[1.0, 2.0]] * 3, "label": [0.0, np.nan, 1.0]}, {}, r"label of sample 1 is nan"),
        ({"feat": [[1.0, 2.0]] * 3, "label": [0.0, 1.5, 1.0]}, {}, r"sample 1 is 1\.5, not an integer"),
        ({"feat": [[1.0, 2.0], [np.inf, 0.0], [1.0, 1.0]], "label": [0, 1, 1]}, {}, r"sample 1 contain NaN/inf"),
        ({"feat": [[1.0, 2.0]] * 3, "label": [0, 1, 7]}, {"num_classes": 3}, r"label 7 of sample 2 is out of range"),
        # the boundaries: num_classes itself is out of range, num_classes - 1 and 0 are not (below), -1 is
        ({"feat": [[1.0, 2.0]] * 3, "label": [0, 3, 1]}, {"num_classes": 3}, r"label 3 of sample 1 is out of range"),
        ({"feat": [[1.0, 2.0]] * 3, "label": [0, -1, 1]}, {"num_classes": 3}, r"label -1 of sample 1 is out of range"),
        ({"feat": [[1.0, 2.0]] * 3, "label": [0, 1, 1]}, {"input_shape": (3,)}, r"needs 3 values per sample but features have 2"),
        ({"feat": [[1.0, 2.0]] * 3, "lbl": [0, 1, 1]}, {}, r"--label-column 'label' is not a column.*\['feat', 'lbl'\]"),
        ({"feat": [[1.0, 2.0]] * 3, "label": [0, 1, 1]}, {"feature_column": "pixels"}, r"--feature-column 'pixels'"),
        ({"feat": [[1.0, 2.0]] * 3, "label": [0, 1, 1]}, {"id_column": "uid"}, r"--id-column 'uid'"),
        ({"feat": [1.0, 2.0, 3.0], "label": [0, 1, 1]}, {}, r"must be a list/array column"),
    ],
)
def test_bad_tabular_data(tmp_path, frame, kwargs, pattern):
    pd.DataFrame(frame).to_parquet(tmp_path / "d.parquet")
    kwargs = {"feature_column": "feat", **kwargs}
    with pytest.raises(ValueError, match=pattern):
        _batches(open_data(str(tmp_path / "d.parquet"), **kwargs))


def test_empty_and_missing_data(tmp_path):
    pd.DataFrame({"feat": pd.Series([], dtype=object), "label": pd.Series([], dtype="int64")}).to_parquet(tmp_path / "e.parquet")
    with pytest.raises(ValueError, match="no samples"):
        open_data(str(tmp_path / "e.parquet"), feature_column="feat")
    with pytest.raises(ValueError, match="does not exist"):
        open_data(str(tmp_path / "nope.parquet"), feature_column="feat")
    with pytest.raises(ValueError, match="cannot tell the format"):
        open_data(str(tmp_path / "e.parquet.txt"))


def test_labels_at_the_edges_of_num_classes_are_accepted(tmp_path):
    pd.DataFrame({"feat": [[1.0, 2.0]] * 3, "label": [0, 2, 1]}).to_parquet(tmp_path / "d.parquet")
    got = _batches(open_data(str(tmp_path / "d.parquet"), feature_column="feat", num_classes=3))
    assert got[0][1].tolist() == [0, 2, 1]
