"""Readers for the packaged demo data: Fashion-MNIST IDX gzip files (Debian ``dataset-fashion-mnist``).

No download code: the files come from the Debian package, installed by ``make install`` where apt is
available.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

__all__ = [
    "FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES", "read_idx", "load_fashion_mnist", "find_idx_pair", "fashion_mnist_dir",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_FILES = {"train": "train-{}-idx{}-ubyte.gz", "test": "t10k-{}-idx{}-ubyte.gz"}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (gzip or raw) into a numpy array with the shape its header declares."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic {data[:4]!r}); expected e.g. train-images-idx3-ubyte.gz.")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_DTYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = data[4 + 4 * ndim :]
    if len(body) != expected:
        raise ValueError(f"{path} is truncated or corrupt: header says {dims} ({expected} bytes), found {len(body)} bytes.")
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="), copy=False)


def find_idx_pair(root: str | os.PathLike[str], split: str = "train") -> tuple[Path, Path]:
    """Paths of the images/labels IDX files of ``split`` under ``root`` (gzip or raw)."""
    if split not in _FILES:
        raise ValueError(f"split={split!r} is not valid; use 'train' or 'test'.")
    root = Path(root)
    found = []
    for kind, nd in (("images", 3), ("labels", 1)):
        stem = _FILES[split].format(kind, nd)
        for cand in (root / stem, root / stem.removesuffix(".gz")):
            if cand.exists():
                found.append(cand)
                break
        else:
            raise FileNotFoundError(
                f"{root / stem} not found. The Fashion-MNIST files come from the Debian package "
                "'dataset-fashion-mnist': run `make install` (or `sudo apt-get install dataset-fashion-mnist`), "
                "or pass the folder that holds the IDX files."
            )
    return found[0], found[1]


def fashion_mnist_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """Where the Fashion-MNIST IDX files are looked for: ``root``, else ``$HARDMINE_FASHION_MNIST``, else
    ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``). The library, the tests, the
    scripts and ``make install`` all resolve the folder this way."""
    return Path(root or os.environ.get("HARDMINE_FASHION_MNIST") or FASHION_MNIST_DIR)


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST as ``(images uint8 (N, 28, 28), labels int64 (N,))``.

    ``root`` defaults to ``$HARDMINE_FASHION_MNIST`` or ``/usr/share/datasets/fashion-mnist``.
    """
    root = fashion_mnist_dir(root)
    img_path, lbl_path = find_idx_pair(root, split)
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{img_path} / {lbl_path} disagree: images {images.shape}, labels {labels.shape}.")
    return images, labels.astype(np.int64)
