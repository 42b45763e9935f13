"""The IDX reader and the Fashion-MNIST source, on written IDX files and on Debian's real copy."""
from __future__ import annotations

import gzip
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fixtures import HAVE_FASHION_MNIST, idx_bytes, make_fashion_mnist_idx, write_idx
from mixnn_fast.data import fashion_mnist, read_idx
from mixnn_fast.data.fashion_mnist import CLASSES, DEBIAN_ROOT

needs_fashion_mnist = pytest.mark.skipif(not HAVE_FASHION_MNIST, reason="Debian's dataset-fashion-mnist is not installed")
IDX_DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    array=st.sampled_from(IDX_DTYPES).flatmap(
        lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5))
    ),
    gz=st.booleans(),
)
def test_idx_round_trip(tmp_path, array, gz):
    path = write_idx(tmp_path / "a.idx", array, gz=gz)
    back = read_idx(path)
    assert back.shape == array.shape and back.dtype == array.dtype and back.dtype.isnative
    np.testing.assert_array_equal(back, array)


def test_idx_malformed_files_are_named(tmp_path):
    path = tmp_path / "images-idx3-ubyte"
    good = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    path.write_bytes(b"\x00\x01" + good[2:])
    with pytest.raises(ValueError, match=re.escape(f"{path}: bad IDX magic number 0x00010803")):
        read_idx(path)
    path.write_bytes(good[:2] + b"\x07" + good[3:])
    with pytest.raises(ValueError, match="bad IDX magic number 0x00000703"):
        read_idx(path)
    path.write_bytes(good[:-1])
    with pytest.raises(ValueError, match=re.escape(f"{path}: truncated: header promises shape (2, 3, 4) (24 data bytes), found 23")):
        read_idx(path)
    path.write_bytes(good + b"\x00")
    with pytest.raises(ValueError, match="has trailing bytes"):
        read_idx(path)
    path.write_bytes(good[:9])
    with pytest.raises(ValueError, match="truncated IDX header"):
        read_idx(path)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="too short"):
        read_idx(path)
    compressed = gzip.compress(good)
    path.write_bytes(compressed[:-6])
    with pytest.raises(ValueError, match=re.escape(f"{path}: damaged gzip stream")):
        read_idx(path)
    with pytest.raises(FileNotFoundError, match="IDX file not found"):
        read_idx(tmp_path / "absent")


def test_idx_sizes_that_overflow_int64_or_numpy(tmp_path):
    path = tmp_path / "x-idx4-ubyte"
    # 65536**4 = 2**64: in int64 arithmetic the promised size wraps to 0 and matched an empty
    # body, and the reshape then failed with a message naming no file
    path.write_bytes(bytes([0, 0, 0x08, 4]) + b"\x00\x01\x00\x00" * 4)
    with pytest.raises(ValueError, match=re.escape(f"{path}: truncated: header promises shape (65536, 65536, 65536, "
                                                   f"65536) ({2**64} data bytes), found 0")):
        read_idx(path)
    path.write_bytes(bytes([0, 0, 0x0E, 3]) + b"\xff\xff\xff\xff" * 3)
    with pytest.raises(ValueError, match=re.escape(f"({(2**32 - 1)**3 * 8} data bytes)")):
        read_idx(path)
    # the header allows 255 dimensions, NumPy 64 (32 before NumPy 2)
    path.write_bytes(bytes([0, 0, 0x08, 100]) + b"\x00\x00\x00\x01" * 100)
    with pytest.raises(ValueError, match=re.escape(f"{path}: IDX header declares 100 dimensions, more than NumPy")):
        read_idx(path)
    # an empty array, but with sides NumPy cannot index (found by tests/test_fuzz_readers.py)
    path.write_bytes(bytes([0, 0, 0x08, 3]) + b"\x00\x00\x00\x00" + b"\xff\xff\xff\xff" * 2)
    with pytest.raises(ValueError, match=re.escape(f"{path}: header shape (0, 4294967295, 4294967295) is too large")):
        read_idx(path)
    path.write_bytes(bytes([0, 0, 0x08, 3]) + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x1c" * 2)
    assert read_idx(path).shape == (0, 28, 28)
    path.write_bytes(bytes([0, 0, 0x08, 32]) + b"\x00\x00\x00\x01" * 32 + b"\x07")
    assert read_idx(path).shape == (1,) * 32


@needs_fashion_mnist
@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_fashion_mnist_from_written_idx(tmp_path, gz):
    written = make_fashion_mnist_idx(tmp_path, n_train=50, n_test=12, gz=gz, seed=4)
    train = fashion_mnist(tmp_path, "train")
    test = fashion_mnist(tmp_path, split="test")
    np.testing.assert_array_equal(train.images[..., 0], written.train_images)
    np.testing.assert_array_equal(train.labels, written.train_labels)
    np.testing.assert_array_equal(test.images[..., 0], written.test_images)
    np.testing.assert_array_equal(test.labels, written.test_labels)
    assert train.images.shape == (50, 28, 28, 1) and train.labels.dtype == np.int64
    assert list(train.classes) == list(CLASSES)


@needs_fashion_mnist
def test_fashion_mnist_errors(tmp_path):
    make_fashion_mnist_idx(tmp_path, n_train=10, n_test=5, seed=1)
    labels_path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    write_idx(labels_path, np.array([0, 1, 2, 10, 4], dtype=np.uint8))
    with pytest.raises(ValueError, match=re.escape(f"{labels_path}: label 10 at index 3 is out of range [0, 10)")):
        fashion_mnist(tmp_path, "test")
    write_idx(labels_path, np.array([0, 1, 2], dtype=np.uint8))
    with pytest.raises(ValueError, match="3 labels for 5 images"):
        fashion_mnist(tmp_path, "test")
    images_path = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(images_path, np.zeros((10, 28, 27), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"expected \(N, 28, 28\) uint8 images"):
        fashion_mnist(tmp_path, "train")
    images_path.unlink()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz and .*train-images-idx3-ubyte"):
        fashion_mnist(tmp_path, "train")
    with pytest.raises(ValueError, match="split must be"):
        fashion_mnist(tmp_path, "validation")


@needs_fashion_mnist
def test_real_fashion_mnist_from_debian():
    train = fashion_mnist()
    test = fashion_mnist(split="test")
    assert train.root == DEBIAN_ROOT
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    # published facts about the dataset: exactly balanced classes, dark background
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert train.images[:, 0, 0, 0].mean() < 5 and 60 < train.images.mean() < 80
