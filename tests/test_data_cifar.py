"""CIFAR-10/100 python pickles: exact contents, and the restricted unpickler refusing anything
but numpy arrays."""
from __future__ import annotations

import os
import pickle
import re

import numpy as np
import pytest

from fixtures import CIFAR10_CLASSES, make_cifar, python2_pickle_dumps
from mixnn_fast.data import cifar
from mixnn_fast.data.cifar import load_restricted_pickle


@pytest.mark.parametrize("python2", [True, False], ids=["python2-pickle", "python3-pickle"])
def test_cifar10_images_and_labels_exact(tmp_path, python2):
    written = make_cifar(tmp_path, "cifar10", n_train=23, n_test=7, python2=python2, seed=1)
    train = cifar(tmp_path, "cifar10", "train")
    test = cifar(written.directory, "cifar10", "test")  # the extracted directory itself works too
    np.testing.assert_array_equal(train.images, written.train_images)
    np.testing.assert_array_equal(train.labels, written.train_labels)
    np.testing.assert_array_equal(test.images, written.test_images)
    np.testing.assert_array_equal(test.labels, written.test_labels)
    assert train.images.shape == (23, 32, 32, 3) and train.images.dtype == np.uint8
    assert train.images.flags.c_contiguous and train.labels.dtype == np.int64
    assert list(train.classes) == list(CIFAR10_CLASSES) and train.clean_labels is None
    # the photo crops are natural images, not constants: a test that cannot pass by accident
    assert train.images.std() > 20


def test_cifar10_pixel_order_is_channel_planar(tmp_path):
    written = make_cifar(tmp_path, "cifar10", n_train=5, n_test=1, seed=2)
    raw = pickle.loads((written.directory / "data_batch_1").read_bytes(), encoding="latin1")["data"][0]
    image = cifar(tmp_path, "cifar10").images[0]
    # row 0: 1024 red values, then green, then blue, each 32x32 row-major
    assert image[0, 1, 0] == raw[1] and image[1, 0, 1] == raw[1024 + 32] and image[31, 31, 2] == raw[3071]


@pytest.mark.parametrize("python2", [True, False])
def test_cifar100_fine_and_coarse(tmp_path, python2):
    written = make_cifar(tmp_path, "cifar100", n_train=30, n_test=9, python2=python2, seed=3)
    for split, images, labels, coarse in (("train", written.train_images, written.train_labels, written.train_coarse),
                                          ("test", written.test_images, written.test_labels, written.test_coarse)):
        d = cifar(tmp_path, "cifar100", split)
        np.testing.assert_array_equal(d.images, images)
        np.testing.assert_array_equal(d.labels, labels)
        np.testing.assert_array_equal(d.extra["coarse_labels"], coarse)
        assert list(d.classes) == written.classes and d.extra["coarse_classes"] == written.coarse_classes


class _OpensAFile:
    """A pickle payload that would create ``path`` if the loader executed it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_restricted_unpickler_refuses_arbitrary_callables(tmp_path):
    marker = tmp_path / "should_not_exist"
    evil = tmp_path / "data_batch_1"
    evil.write_bytes(pickle.dumps({"data": _OpensAFile(str(marker)), "labels": []}, protocol=2))
    with pytest.raises(ValueError, match=re.escape(f"{evil}: not a readable CIFAR pickle") + r".*refusing to load global io\.open"):
        load_restricted_pickle(str(evil))
    assert not marker.exists()
    # the same payload does run under plain pickle — the test above can fail
    pickle.loads(evil.read_bytes())["data"].close()
    assert marker.exists()


def test_restricted_unpickler_refuses_other_codecs_and_object_arrays(tmp_path):
    # _codecs.encode('abc', 'rot13'): allowed name, forbidden use
    payload = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    assert pickle.loads(payload) == "nop"
    path = tmp_path / "codec"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match="only allowed as encode"):
        load_restricted_pickle(str(path))
    path.write_bytes(pickle.dumps({"data": np.array([1, "x"], dtype=object)}, protocol=2))
    with pytest.raises(ValueError, match="object arrays are not allowed"):
        load_restricted_pickle(str(path))


def test_cifar_malformed_files(tmp_path):
    written = make_cifar(tmp_path, "cifar10", n_train=10, n_test=2)
    batch = written.directory / "data_batch_3"
    good = batch.read_bytes()
    batch.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=re.escape(f"{batch}: not a readable CIFAR pickle")):
        cifar(tmp_path, "cifar10")
    content = pickle.loads(good, encoding="latin1")
    content["labels"][1] = 10
    batch.write_bytes(python2_pickle_dumps(content))
    with pytest.raises(ValueError, match=re.escape(f"{batch}: labels[1] = 10 is out of range [0, 10)")):
        cifar(tmp_path, "cifar10")
    content["labels"][1] = 0
    content["data"] = content["data"][:, :100]
    batch.write_bytes(python2_pickle_dumps(content))
    with pytest.raises(ValueError, match=r"'data' must be a \(N, 3072\) uint8 array"):
        cifar(tmp_path, "cifar10")
    del content["data"]
    batch.write_bytes(python2_pickle_dumps(content))
    with pytest.raises(ValueError, match="no 'data' entry"):
        cifar(tmp_path, "cifar10")
    os.remove(batch)
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        cifar(tmp_path, "cifar10")
    assert len(cifar(tmp_path, "cifar10", "test")) == 2  # the test split does not need the train files
    with pytest.raises(FileNotFoundError, match="cifar-100-python/ not found"):
        cifar(tmp_path, "cifar100")
    with pytest.raises(ValueError, match="which must be one of"):
        cifar(tmp_path, "cifar1000")
