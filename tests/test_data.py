"""fusednn.tools.data: the IDX reader on files the tests write (raw, gzipped, corrupt), MNIST loading from IDX
files, the digits split and the synthetic set."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from fusednn.tools.data import load_digits, load_mnist, read_idx, synthetic

IDX_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
             np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(a: np.ndarray) -> bytes:
    """The IDX encoding of `a` (big-endian values), written independently of the reader."""
    be = a.astype(a.dtype.newbyteorder(">"))
    return struct.pack(">HBB", 0, IDX_CODES[be.dtype], a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + be.tobytes()


def write_idx(path, a: np.ndarray) -> None:
    data = idx_bytes(a)
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", ["u1", "i1", "i2", "i4", "f4", "f8"])
def test_read_idx_round_trips_every_dtype_raw_and_gzipped(tmp_path, suffix, dtype):
    rng = np.random.default_rng(torch.randint(0, 2**31, ()).item())
    shape = (3, 5, 7)
    if dtype in ("f4", "f8"):
        a = rng.standard_normal(shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        a = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    path = tmp_path / f"data-idx3{suffix}"
    write_idx(path, a)
    t = read_idx(path)
    assert t.shape == shape
    assert np.array_equal(t.numpy(), a)  # values, not just bytes: big-endian decoded to native


def test_read_idx_reads_one_dimensional_and_empty_files(tmp_path):
    labels = np.array([7, 0, 9, 3], dtype="u1")
    write_idx(tmp_path / "labels", labels)
    assert read_idx(tmp_path / "labels").tolist() == [7, 0, 9, 3]
    write_idx(tmp_path / "empty", np.zeros((0, 28, 28), dtype="u1"))
    assert read_idx(tmp_path / "empty").shape == (0, 28, 28)


def _corrupt(kind: str) -> bytes:
    good = idx_bytes(np.arange(24, dtype="u1").reshape(2, 3, 4))
    return {
        "bad magic": b"\x12\x34" + good[2:],
        "unknown dtype": good[:2] + b"\x07" + good[3:],
        "zero dims": good[:3] + b"\x00",
        "truncated data": good[:-5],
        "trailing bytes": good + b"\x00",
        "truncated header": good[:9],
        "empty": b"",
    }[kind]


@pytest.mark.parametrize("kind", ["bad magic", "unknown dtype", "zero dims", "truncated data", "trailing bytes",
                                  "truncated header", "empty"])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_rejects_corrupt_files_with_an_error_naming_the_file(tmp_path, kind, suffix):
    path = tmp_path / f"broken-idx3-ubyte{suffix}"
    data = _corrupt(kind)
    path.write_bytes(gzip.compress(data) if suffix else data)
    with pytest.raises(ValueError, match="broken-idx3-ubyte"):
        read_idx(path)


def test_read_idx_rejects_a_gz_file_that_is_not_gzip(tmp_path):
    path = tmp_path / "images.gz"
    path.write_bytes(idx_bytes(np.zeros((2, 2), dtype="u1")))  # raw IDX under a .gz name
    with pytest.raises(ValueError, match="images.gz.*gzip"):
        read_idx(path)
    cut = tmp_path / "cut.gz"
    cut.write_bytes(gzip.compress(idx_bytes(np.zeros((50, 50), dtype="u1")))[:-20])  # stream cut short
    with pytest.raises(ValueError, match="cut.gz"):
        read_idx(cut)


def test_read_idx_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope")


def _mnist_dir(tmp_path, n_train=5, n_test=3, gz=("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte")):
    rng = np.random.default_rng(torch.randint(0, 2**31, ()).item())
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype="u1"),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype="u1"),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype="u1"),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype="u1"),
    }
    for name, a in arrays.items():
        write_idx(tmp_path / (name + (".gz" if name in gz else "")), a)
    return arrays


def test_load_mnist_pads_to_32x32_normalises_with_train_statistics_and_keeps_labels(tmp_path):
    arrays = _mnist_dir(tmp_path)
    train, test = load_mnist(tmp_path)
    x, y = train.tensors
    xt, yt = test.tensors
    assert x.shape == (5, 1, 32, 32) and xt.shape == (3, 1, 32, 32)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert yt.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    # Reference: zero-pad 2 pixels each side, scale to [0, 1], normalise with the padded train set's stats.
    ref = np.pad(arrays["train-images-idx3-ubyte"] / 255.0, ((0, 0), (2, 2), (2, 2)))
    mean, std = ref.mean(), ref.std(ddof=1)
    assert np.allclose(x[:, 0].numpy(), (ref - mean) / std, atol=1e-5)
    ref_t = np.pad(arrays["t10k-images-idx3-ubyte"] / 255.0, ((0, 0), (2, 2), (2, 2)))
    assert np.allclose(xt[:, 0].numpy(), (ref_t - mean) / std, atol=1e-5)


def test_load_mnist_missing_file_names_it(tmp_path):
    _mnist_dir(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        load_mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mnist(tmp_path / "no-such-dir")


def test_load_mnist_rejects_inconsistent_files(tmp_path):
    _mnist_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, dtype="u1"))  # 5 images, 4 labels
    with pytest.raises(ValueError, match="5 images but .* 4 labels"):
        load_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.full(5, 10, dtype="u1"))
    with pytest.raises(ValueError, match="label 10"):
        load_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5, dtype="u1"))
    (tmp_path / "train-images-idx3-ubyte.gz").unlink()
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((5, 27, 28), dtype="u1"))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: expected uint8 \[N, 28, 28\]"):
        load_mnist(tmp_path)


def test_load_digits_is_a_seeded_stratified_80_20_split_of_normalised_32x32_images():
    train, test = load_digits(0)
    x, y = train.tensors
    xt, yt = test.tensors
    assert (len(y), len(yt)) == (1437, 360)
    assert x.shape == (1437, 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    counts, counts_t = torch.bincount(y, minlength=10), torch.bincount(yt, minlength=10)
    assert torch.all((counts_t.double() - 0.2 * (counts + counts_t)).abs() <= 1)  # stratified
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-4  # train statistics
    again, _ = load_digits(0)
    assert torch.equal(again.tensors[0], x) and torch.equal(again.tensors[1], y)
    other, _ = load_digits(1)
    assert not torch.equal(other.tensors[1], y)


def test_synthetic_is_seeded_and_learnable_across_seeds():
    a, b = synthetic(400, 3), synthetic(200, 4)
    x, y = a.tensors
    assert x.shape == (400, 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(synthetic(400, 3).tensors[0], x)
    assert not torch.equal(synthetic(400, 5).tensors[0], x)
    # The class patterns do not depend on the seed: class means from one seed classify another seed's set.
    means = torch.stack([x[y == c].mean(0).flatten() for c in range(10)])
    xb, yb = b.tensors
    pred = torch.cdist(xb.flatten(1), means).argmin(1)
    assert (pred == yb).float().mean() > 0.9


def test_synthetic_rejects_a_negative_size():
    with pytest.raises(ValueError, match="n must be"):
        synthetic(-1)
