"""Datasets for `fusednn train`: the UCI digits scikit-learn ships, MNIST from the user's IDX files, and a
synthetic toy set. Every loader returns (train, test) TensorDatasets of float32 [N, 1, 32, 32] images
(LeNet's input size) and int64 labels, normalised with the training set's mean and standard deviation.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

# IDX dtype codes (the third byte of the magic number) -> NumPy dtype; IDX values are big-endian.
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _normalise(train_x: torch.Tensor, test_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Statistics from the training set only, so the test set stays unseen.
    mean, std = train_x.mean(), train_x.std().clamp_min(1e-8)
    return ((train_x - mean) / std).contiguous(), ((test_x - mean) / std).contiguous()


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """The 1,797 UCI 8x8 digits (scikit-learn, no download) upsampled to 32x32 bilinear; a seeded
    stratified train/test split (80/20 by default)."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # an optional dependency: say how to get it
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn") from e
    bunch = sk_load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixels are 0..16
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    train_idx, test_idx = train_test_split(torch.arange(len(labels)).numpy(), test_size=test_fraction,
                                           random_state=seed, stratify=labels.numpy())
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    train_x, test_x = _normalise(images[train_idx], images[test_idx])
    return TensorDataset(train_x, labels[train_idx]), TensorDataset(test_x, labels[test_idx])


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (gzip.BadGzipFile, EOFError, OSError) as e:
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        raise ValueError(f"{path}: not a readable gzip file ({e})") from e


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an IDX file (MNIST's format), gzipped (name ends in .gz) or raw, into a tensor.

    Raises ValueError naming the file when the magic number, dtype code, dimensions or length are wrong.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: not an IDX file ({len(data)} bytes, shorter than the 4-byte magic number)")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise ValueError(f"{path}: not an IDX file (magic number 0x{data[:4].hex()} does not start with two zero bytes)")
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX dtype code 0x{code:02x} (expected one of "
                         f"{', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)})")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, {ndim} dimensions need {header})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_DTYPES[code]
    count = 1
    for d in dims:
        count *= d
    expected = header + count * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise ValueError(f"{path}: IDX file {what}: shape {list(dims)} needs {expected} bytes, file has {len(data)}")
    values = np.frombuffer(data, dtype=dtype, count=count, offset=header).astype(dtype.newbyteorder("="))  # native order, a copy
    return torch.from_numpy(values.reshape(dims))


def _find_idx(data_dir: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (data_dir / name).is_file():
            return data_dir / name
    raise FileNotFoundError(f"MNIST file {stem}[.gz] not found in {data_dir}")


def load_mnist(data_dir: str | os.PathLike) -> tuple[TensorDataset, TensorDataset]:
    """MNIST from the user's IDX files in data_dir (`train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte`,
    `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each gzipped or raw); 28x28 zero-padded to 32x32."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"MNIST data directory {data_dir} does not exist")
    arrays = {}
    for key, stem in _MNIST_FILES.items():
        path = _find_idx(data_dir, stem)
        t = read_idx(path)
        want = 3 if key.endswith("images") else 1
        if t.dim() != want or t.dtype != torch.uint8 or (want == 3 and tuple(t.shape[1:]) != (28, 28)):
            raise ValueError(f"{path}: expected uint8 {'[N, 28, 28] images' if want == 3 else '[N] labels'}, "
                             f"got {t.dtype} {list(t.shape)}")
        if want == 1 and t.numel() and int(t.max()) > 9:
            raise ValueError(f"{path}: label {int(t.max())} is not a digit 0..9")
        arrays[key] = (path, t)
    out = []
    for split in ("train", "test"):
        (ipath, images), (lpath, labels) = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != len(labels):
            raise ValueError(f"{ipath} holds {len(images)} images but {lpath} holds {len(labels)} labels")
        x = F.pad(images.unsqueeze(1).float() / 255.0, (2, 2, 2, 2))  # zero = background, as in LeNet-5
        out.append((x, labels.long()))
    (train_x, train_y), (test_x, test_y) = out
    train_x, test_x = _normalise(train_x, test_x)
    return TensorDataset(train_x, train_y), TensorDataset(test_x, test_y)


def synthetic(n: int, seed: int = 0) -> TensorDataset:
    """A learnable toy set of n [1, 32, 32] images: one fixed smooth pattern per class (the same for every
    seed, so sets drawn with different seeds pose the same task) plus Gaussian noise; `seed` draws the
    labels and the noise."""
    if n < 0:
        raise ValueError(f"synthetic: n must be >= 0, got {n}")
    protos = F.interpolate(torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(1234)),
                           size=(32, 32), mode="bilinear", align_corners=False)
    protos = protos / protos.flatten(1).std(dim=1).view(10, 1, 1, 1)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = protos[labels] + 0.5 * torch.randn(n, 1, 32, 32, generator=g)
    return TensorDataset(images.contiguous(), labels)
