"""CIFAR-10/100 python pickles: exact contents, and the restricted unpickler refusing anything
but numpy arrays."""
from __future__ import annotations

import os
import pickle
import re
import time

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
    content["data"] = good_data = pickle.loads(good, encoding="latin1")["data"]
    content["labels"] = [[], [0]] + [0] * (len(good_data) - 2)  # ragged: np.asarray raised, naming nothing
    batch.write_bytes(python2_pickle_dumps(content))
    with pytest.raises(ValueError, match=re.escape(f"{batch}: 'labels' must be 2 integers (ValueError: ")):
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


def test_a_few_corrupt_bytes_do_not_allocate_gigabytes(tmp_path):
    """The C unpickler sizes its memo by the largest index an opcode names: this 7-byte file
    (None, LONG_BINPUT 0x3fffffff) made it allocate and zero 16 GB and take a minute."""
    path = tmp_path / "data_batch_1"
    path.write_bytes(b"N" + b"r\xff\xff\xff\x3f" + b".")
    started = time.perf_counter()
    assert load_restricted_pickle(str(path)) is None
    assert time.perf_counter() - started < 1.0
    path.write_bytes(b"Np99999999999999999999\n.")  # PUT with a decimal index
    assert load_restricted_pickle(str(path)) is None


def test_a_pickle_cannot_allocate_arrays_of_its_choosing(tmp_path):
    path = tmp_path / "data_batch_1"
    # numpy.ndarray((2**40,)) called directly
    path.write_bytes(b"\x80\x02cnumpy\nndarray\n\x8a\x06\x00\x00\x00\x00\x00\x01\x85R.")
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a readable CIFAR pickle") + ".*not callable"):
        load_restricted_pickle(str(path))
    # _reconstruct(ndarray, (2**40,), b"b") instead of numpy's (0,)
    path.write_bytes(b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
                     b"\x8a\x06\x00\x00\x00\x00\x00\x01\x85C\x01b\x87R.")
    with pytest.raises(ValueError, match="_reconstruct is only allowed as numpy writes it"):
        load_restricted_pickle(str(path))


def test_malformed_meta_and_keys_name_the_file(tmp_path):
    written = make_cifar(tmp_path, "cifar10", n_train=5, n_test=2)
    meta = written.directory / "batches.meta"
    meta.write_bytes(python2_pickle_dumps({"label_names": 10}))
    with pytest.raises(ValueError, match=re.escape(f"{meta}: 'label_names' must be a list of class names")):
        cifar(tmp_path, "cifar10")
    meta.write_bytes(pickle.dumps({"label_names": [b"caf\xe9"] * 10}, protocol=2))
    with pytest.raises(ValueError, match=re.escape(f"{meta}: a class name in 'label_names' is not UTF-8")):
        cifar(tmp_path, "cifar10")
    # a dict key nested a million tuples deep made hashing overflow the C stack (SIGSEGV); the
    # guard refuses any key nested deeper than MAX_NESTING (100,000 here: the test stays fast)
    meta.write_bytes(b"\x80\x02}N" + b"\x85" * 100_000 + b"Ns.")
    with pytest.raises(ValueError, match=re.escape(f"{meta}: not a readable CIFAR pickle (UnpicklingError: a dict key "
                                                   "or set member that cannot be hashed safely: containers nested")):
        cifar(tmp_path, "cifar10")
    # a key list that is not printable in full is summarised by type
    meta.write_bytes(python2_pickle_dumps({(1, (2, 3)): 0, "x" * 500: 1}))
    with pytest.raises(ValueError, match=r"no 'label_names' entry \(keys: \['<tuple>', 'xxxx") as info:
        cifar(tmp_path, "cifar10")
    assert len(str(info.value)) < 400


def _shared_halves(levels: int, innermost: bytes = b"N", tuple_op: bytes = b"\x86") -> bytes:
    """A pickle body building t_k = (t_(k-1), t_(k-1)) ``levels`` times (memo PUT/GET), so
    its expanded size is 2**levels for a few bytes a level."""
    body = innermost + b"q\x00" + b"0"  # PUT 0, POP: only the memo keeps each level
    for level in range(levels):
        body += b"h" + bytes([level]) + b"h" + bytes([level]) + tuple_op + b"q" + bytes([level + 1]) + b"0"
    return body + b"h" + bytes([levels])  # GET: the outermost tuple, alone on the stack


@pytest.mark.parametrize("what, payload, problem", [
    # hashing (t, t) nested 60 times visits 2**60 entries: the load hung
    ("key", b"\x80\x02}" + _shared_halves(60) + b"Ns.", "cannot be hashed safely: more than 10000 entries"),
    ("set member", b"\x80\x02\x8f(" + _shared_halves(60) + b"\x90.", "cannot be hashed safely"),
    ("frozenset member", b"\x80\x02(" + _shared_halves(60) + b"\x91.", "cannot be hashed safely"),
    # as a value it loads, but np.asarray or str() of it would hang: refused after loading
    ("value", b"\x80\x02}X\x04\x00\x00\x00data" + _shared_halves(60) + b"s.", "more than 10000000 entries"),
    ("list", b"\x80\x02]q\x00h\x00a.", "a container holds itself"),
    ("depth", b"\x80\x02" + b"]" * 40 + b"a" * 39 + b".", "containers nested more than 32 deep"),
])
def test_pickles_that_would_hang_or_crash_later_are_refused(tmp_path, what, payload, problem):
    path = tmp_path / "data_batch_1"
    path.write_bytes(payload)
    started = time.perf_counter()
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a readable CIFAR pickle") + ".*" + re.escape(problem)):
        load_restricted_pickle(str(path))
    assert time.perf_counter() - started < 2.0


def test_numpy_dtype_is_only_a_type_string(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(b"\x80\x02cnumpy\ndtype\n]\x85R.")  # dtype([])
    with pytest.raises(ValueError, match="numpy.dtype is only allowed as numpy pickles it"):
        load_restricted_pickle(str(path))
    path.write_bytes(pickle.dumps(np.dtype("u1"), protocol=2))
    assert load_restricted_pickle(str(path)) == np.dtype("u1")


def test_a_numpy_state_that_is_not_a_tuple(tmp_path):
    """One flipped bit (TUPLE -> DICT) in a dtype's state made numpy's __setstate__ raise
    SystemError ('bad argument to internal function'); found by tests/test_fuzz_readers.py."""
    good = pickle.dumps({"data": np.zeros((1, 3072), np.uint8)}, protocol=2)
    state_end = good.index(b"K\x00t", good.index(b"dtype")) + 2  # the TUPLE closing the dtype's state
    path = tmp_path / "data_batch_1"
    path.write_bytes(good[:state_end] + b"d" + good[state_end + 1:])
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a readable CIFAR pickle") + ".*must be a tuple"):
        load_restricted_pickle(str(path))
