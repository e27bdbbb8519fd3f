from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from hardmine.datasets import fashion_mnist_dir, find_idx_pair, load_fashion_mnist, read_idx


def _write_idx(path, arr: np.ndarray, code: int = 0x08) -> None:
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(">u1" if code == 0x08 else ">i4").tobytes())


def test_read_idx_roundtrip(tmp_path):
    imgs = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([7, 1], dtype=np.uint8))
    x, y = load_fashion_mnist("train", root=tmp_path)
    assert np.array_equal(x, imgs) and y.tolist() == [7, 1] and y.dtype == np.int64
    _write_idx(tmp_path / "ints.gz", np.array([-5, 70000], dtype=np.int64), code=0x0C)
    assert read_idx(tmp_path / "ints.gz").tolist() == [-5, 70000]


def test_missing_files_name_the_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="split='val'"):
        find_idx_pair(tmp_path, "val")


def test_corrupt_files_are_clear_errors(tmp_path):
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"hello world"))
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad.gz")
    arr = np.zeros((4, 2), dtype=np.uint8)
    header = bytes([0, 0, 8, 2]) + struct.pack(">2I", 4, 2)
    (tmp_path / "short.gz").write_bytes(gzip.compress(header + arr.tobytes()[:5]))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short.gz")


@pytest.mark.skipif(not (fashion_mnist_dir() / "t10k-labels-idx1-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_test_split():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [1000] * 10
