"""Clothing1M, WebVision, ImageFolder, file-list and in-memory sources, on native-format
fixtures built from real images (tests/fixtures.py)."""
from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from fixtures import (
    CLOTHING1M_CLASSES,
    HAVE_FASHION_MNIST,
    make_clothing1m,
    make_jpeg_folder,
    make_path_label_list,
    make_webvision,
)
from mixnn_fast.data import (
    DatasetDescription,
    ListFileError,
    balanced_subset,
    clothing1m,
    file_list,
    from_arrays,
    image_folder,
    webvision,
)

needs_fashion_mnist = pytest.mark.skipif(not HAVE_FASHION_MNIST, reason="Debian's dataset-fashion-mnist is not installed")


def _replace_line(path: Path, number: int, text: str | None) -> None:
    """Replace 1-based line ``number`` of ``path`` by ``text`` (None deletes it)."""
    lines = path.read_text().splitlines()
    if text is None:
        del lines[number - 1]
    else:
        lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- Clothing1M

@pytest.fixture(scope="module")
def clothing_tree(tmp_path_factory):
    if not HAVE_FASHION_MNIST:
        pytest.skip("Debian's dataset-fashion-mnist is not installed (Clothing1M fixture uses its garments)")
    return make_clothing1m(tmp_path_factory.mktemp("clothing1m"), seed=3)


@pytest.fixture
def clothing_copy(clothing_tree, tmp_path):
    """A private copy of the Clothing1M tree that a test may damage."""
    root = tmp_path / "clothing1m"
    shutil.copytree(clothing_tree.root, root)
    return clothing_tree, root


@pytest.mark.parametrize("split", ["noisy_train", "clean_train", "clean_val", "clean_test"])
def test_clothing1m_splits_match_what_was_written(clothing_tree, split):
    d = clothing1m(clothing_tree.root, split)
    keys = clothing_tree.keys[split]
    assert list(d.classes) == list(CLOTHING1M_CLASSES)
    assert d.paths == [str(clothing_tree.root / k) for k in keys]
    assert all(Path(p).is_absolute() for p in d.paths)
    given_table = clothing_tree.noisy if split == "noisy_train" else clothing_tree.clean
    other_table = clothing_tree.clean if split == "noisy_train" else clothing_tree.noisy
    assert d.labels.tolist() == [given_table[k] for k in keys]
    other = [other_table.get(k, -1) for k in keys]
    if split == "noisy_train":
        assert d.clean_labels is None
        assert d.extra["clean_labels_where_known"].tolist() == other
        assert (d.extra["clean_labels_where_known"] >= 0).sum() == 6  # the overlap the fixture wrote
    else:
        assert d.clean_labels.tolist() == d.labels.tolist()
        assert d.extra["noisy_labels_where_known"].tolist() == other
    with Image.open(d.paths[0]) as image:  # the listed files are real, decodable JPEGs
        assert image.format == "JPEG" and image.size == (40, 40)


def test_clothing1m_description_keeps_working_downstream(clothing_tree):
    d = clothing1m(clothing_tree.root, "clean_val")
    part = d.subset([2, 0])
    assert part.paths == [d.paths[2], d.paths[0]] and part.labels.tolist() == [d.labels[2], d.labels[0]]
    relabelled = d.with_labels((d.labels + 1) % 14)
    assert relabelled.clean_labels.tolist() == d.labels.tolist()


def test_clothing1m_key_without_label_names_key_list_line(clothing_copy):
    tree, root = clothing_copy
    victim = tree.keys["noisy_train"][4]
    kv = root / "noisy_label_kv.txt"
    kv.write_text("".join(line + "\n" for line in kv.read_text().splitlines() if not line.startswith(victim + " ")))
    expected = f"{root / 'noisy_train_key_list.txt'}, line 5: {victim!r} has no label"
    with pytest.raises(ListFileError, match=re.escape(expected)):
        clothing1m(root, "noisy_train")


def test_clothing1m_label_out_of_range_names_kv_line(clothing_copy):
    tree, root = clothing_copy
    kv = root / "clean_label_kv.txt"
    key = kv.read_text().splitlines()[2].split()[0]
    _replace_line(kv, 3, f"{key} 14")
    with pytest.raises(ListFileError, match=re.escape(f"{kv}, line 3: label 14 is out of range [0, 14)")):
        clothing1m(root, "clean_test")


def test_clothing1m_malformed_and_conflicting_lines(clothing_copy):
    tree, root = clothing_copy
    kv = root / "noisy_label_kv.txt"
    original = kv.read_text()
    _replace_line(kv, 2, "images/0/00/broken.jpg eleven")
    with pytest.raises(ListFileError, match=re.escape(f"{kv}, line 2: label 'eleven'")):
        clothing1m(root, "noisy_train")
    first_key, first_label = original.splitlines()[0].split()
    kv.write_text(original + f"{first_key} {(int(first_label) + 1) % 14}\n")
    count = len(original.splitlines())
    with pytest.raises(ListFileError, match=rf"line {count + 1}: .* but line 1 gave it {first_label}"):
        clothing1m(root, "noisy_train")
    kv.write_text(original + f"{first_key} {first_label}\n")  # an exact repeat is harmless
    assert len(clothing1m(root, "noisy_train")) == len(tree.keys["noisy_train"])


def test_clothing1m_missing_files(clothing_copy):
    tree, root = clothing_copy
    missing_key = tree.keys["clean_val"][3]
    (root / missing_key).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"clean_val_key_list.txt, line 4: image {missing_key!r}")):
        clothing1m(root, "clean_val")
    assert len(clothing1m(root, "clean_val", check_exists=False)) == len(tree.keys["clean_val"])
    (root / "category_names_eng.txt").unlink()
    with pytest.raises(FileNotFoundError, match="category_names_eng.txt"):
        clothing1m(root, "clean_val")
    with pytest.raises(ValueError, match="split must be one of"):
        clothing1m(root, "train")
    with pytest.raises(FileNotFoundError, match="root directory not found"):
        clothing1m(root / "nowhere", "clean_val")


def _balanced_subset_reference(labels, num_classes, wanted, seed):
    """DivideMix's loop (dataloader_clothing1M.py), with numpy's generator for the shuffles."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    kept, per_class = [], [0] * num_classes
    for i in order:
        if per_class[labels[i]] < wanted / num_classes and len(kept) < wanted:
            kept.append(i)
            per_class[labels[i]] += 1
    return rng.permutation(np.asarray(kept, dtype=np.int64))


def _paths_description(labels, num_classes):
    return DatasetDescription(name="t", classes=[str(c) for c in range(num_classes)], labels=np.asarray(labels),
                              paths=[f"/x/{i}.jpg" for i in range(len(labels))])


@given(
    weights=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=14),
    n=st.integers(0, 400), num_batches=st.integers(1, 6), batch_size=st.integers(1, 40), seed=st.integers(0, 2**31),
)
def test_balanced_subset_equals_the_sequential_rule(weights, n, num_batches, batch_size, seed):
    num_classes = len(weights)
    p = np.asarray(weights) + 1e-3
    labels = np.random.default_rng(seed).choice(num_classes, size=n, p=p / p.sum())
    d = _paths_description(labels, num_classes)
    ids = balanced_subset(d, num_batches, batch_size, seed)
    wanted = num_batches * batch_size
    np.testing.assert_array_equal(ids, _balanced_subset_reference(labels, num_classes, wanted, seed))
    assert ids.dtype == np.int64 and len(np.unique(ids)) == len(ids)
    per_class = np.bincount(labels[ids], minlength=num_classes)
    cap = math.ceil(wanted / num_classes)
    assert per_class.max(initial=0) <= cap
    assert len(ids) == min(wanted, int(np.minimum(np.bincount(labels, minlength=num_classes), cap).sum()))


def test_balanced_subset_on_clothing1m_is_seeded_and_balanced(clothing_tree):
    d = clothing1m(clothing_tree.root, "noisy_train")
    a = balanced_subset(d, num_batches=2, batch_size=7, seed=1)
    assert np.array_equal(a, balanced_subset(d, 2, 7, seed=1))
    assert not np.array_equal(a, balanced_subset(d, 2, 7, seed=2))
    assert np.bincount(d.labels[a], minlength=14).max() <= 1  # ceil(14 / 14): at most one per class
    with pytest.raises(ValueError, match="num_batches and batch_size"):
        balanced_subset(d, 0, 7, seed=1)


# --------------------------------------------------------------------------- WebVision

@pytest.fixture(scope="module")
def webvision_tree(tmp_path_factory):
    return make_webvision(tmp_path_factory.mktemp("webvision"), seed=5)


def test_webvision_train_keeps_first_50_classes(webvision_tree):
    d = webvision(webvision_tree.root, "train")
    kept = [(p, y) for p, y in webvision_tree.train if y < 50]
    assert 0 < len(kept) < len(webvision_tree.train)  # the fixture exercises the filter
    assert d.paths == [str(webvision_tree.root / p) for p, _ in kept]
    assert d.labels.tolist() == [y for _, y in kept]
    assert d.clean_labels is None
    assert list(d.classes) == webvision_tree.synsets[:50]
    full = webvision(webvision_tree.root, "train", num_classes=60)
    assert len(full) == len(webvision_tree.train)


def test_webvision_val_reads_val_images_256(webvision_tree):
    d = webvision(webvision_tree.root, "val")
    kept = [(p, y) for p, y in webvision_tree.val if y < 50]
    assert d.paths == [str(webvision_tree.root / "val_images_256" / p) for p, _ in kept]
    assert d.labels.tolist() == d.clean_labels.tolist() == [y for _, y in kept]


def test_webvision_imagenet_val_from_class_folders(webvision_tree):
    d = webvision(webvision_tree.root, "imagenet_val", num_classes=50)
    expected = sorted((y, str(webvision_tree.root / "imagenet" / p)) for p, y in webvision_tree.imagenet_val if y < 50)
    assert list(zip(d.labels.tolist(), d.paths)) == expected
    assert d.clean_labels.tolist() == d.labels.tolist()


def test_webvision_imagenet_val_from_list(tmp_path):
    tree = make_webvision(tmp_path, n_train=2, n_val=2, n_imagenet=10, imagenet_layout="list", write_synsets=False)
    d = webvision(tree.root, "imagenet_val", num_classes=30)
    kept = [(p, y) for p, y in tree.imagenet_val if y < 30]
    assert d.paths == [str(tree.root / "imagenet" / p) for p, _ in kept]
    assert d.labels.tolist() == [y for _, y in kept]
    assert list(d.classes) == [str(i) for i in range(30)]  # no info/synsets.txt: numbered classes


def test_webvision_errors_name_file_and_line(tmp_path):
    tree = make_webvision(tmp_path, n_train=6, n_val=3, n_imagenet=0, seed=1)
    listing = tree.root / "info" / "train_filelist_google.txt"
    _replace_line(listing, 4, "google/q0001/x.jpg 1000")
    with pytest.raises(ListFileError, match=re.escape(f"{listing}, line 4: label 1000 is out of range [0, 1000)")):
        webvision(tree.root, "train")
    _replace_line(listing, 4, "google/q0001/x.jpg 3")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{listing}, line 4: image 'google/q0001/x.jpg'")):
        webvision(tree.root, "train")
    (tree.root / "info" / "val_filelist.txt").unlink()
    with pytest.raises(FileNotFoundError, match="val_filelist.txt"):
        webvision(tree.root, "val")
    shutil.rmtree(tree.root / "imagenet")
    with pytest.raises(FileNotFoundError, match="ILSVRC12 validation data not found"):
        webvision(tree.root, "imagenet_val")
    with pytest.raises(ValueError, match="num_classes"):
        webvision(tree.root, "train", num_classes=0)


# --------------------------------------------------------------------------- ImageFolder, file list

def test_image_folder_matches_the_tree(tmp_path):
    tree = make_jpeg_folder(tmp_path / "folder", n_per_class=4, size=(24, 32), num_classes=3)
    (tmp_path / "folder" / "class_1" / "notes.txt").write_text("not an image")
    (tmp_path / "folder" / "class_2" / ".hidden.jpg").write_bytes(b"")
    nested = tmp_path / "folder" / "class_0" / "more" / "deep.JPG"
    nested.parent.mkdir()
    shutil.copy(tree.paths[0], nested)
    d = image_folder(tmp_path / "folder")
    assert list(d.classes) == tree.classes
    expected = sorted(tree.paths[:4] + [str(nested)]) + tree.paths[4:]
    assert d.paths == expected
    assert d.labels.tolist() == [0] * 5 + [1] * 4 + [2] * 4
    assert d.extra["ignored_files"] == 2 and d.clean_labels is None
    with Image.open(d.paths[-1]) as image:
        assert image.size == (32, 24) and image.mode == "RGB"


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        image_folder(tmp_path / "absent")
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(FileNotFoundError, match="no class sub-directories"):
        image_folder(tmp_path / "empty_root")
    make_jpeg_folder(tmp_path / "f", n_per_class=1, size=16, num_classes=2)
    (tmp_path / "f" / "class_9").mkdir()
    with pytest.raises(FileNotFoundError, match="'class_9' holds no image"):
        image_folder(tmp_path / "f")


def test_file_list_matches_the_list(tmp_path):
    tree = make_path_label_list(tmp_path, n_per_class=3, size=16, num_classes=4, seed=2)
    d = file_list(tree.list_path)
    assert d.paths == tree.paths and d.labels.tolist() == tree.labels.tolist()
    assert list(d.classes) == ["0", "1", "2", "3"]
    assert any(" " in p for p in d.paths)
    named = file_list(tree.list_path, tmp_path, classes=["a", "b", "c", "d", "e"])
    assert list(named.classes) == ["a", "b", "c", "d", "e"]


def test_file_list_errors(tmp_path):
    tree = make_path_label_list(tmp_path, n_per_class=2, size=16, num_classes=3, seed=4)
    bad_line = int(np.flatnonzero(tree.labels == 2)[0]) + 1
    with pytest.raises(ListFileError, match=re.escape(f"{tree.list_path}, line {bad_line}: label 2 is out of range [0, 2)")):
        file_list(tree.list_path, classes=2)
    Path(tree.paths[1]).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{tree.list_path}, line 2: image")):
        file_list(tree.list_path)
    assert len(file_list(tree.list_path, check_exists=False)) == len(tree.paths)
    with pytest.raises(FileNotFoundError, match="list file not found"):
        file_list(tmp_path / "no_list.txt")


# --------------------------------------------------------------------------- arrays

@needs_fashion_mnist
def test_from_arrays_layouts_agree():
    from fixtures import fashion_mnist_rgb

    images, labels = fashion_mnist_rgb(6, 20, seed=1)
    nhwc = from_arrays(images, labels, classes=10)
    nchw = from_arrays(torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(labels), layout="NCHW")
    grey = from_arrays(images[..., 0], labels, layout="NHW")
    np.testing.assert_array_equal(nhwc.images, images)
    np.testing.assert_array_equal(nchw.images, images)
    assert nchw.images.flags.c_contiguous and nchw.labels.dtype == np.int64
    assert grey.images.shape == (6, 20, 20, 1)
    assert nhwc.num_classes == 10 and nchw.num_classes == int(labels.max()) + 1
    assert nhwc.in_memory and nhwc.paths is None


def test_from_arrays_rejects_bad_input():
    images = np.zeros((3, 4, 4, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="must be uint8"):
        from_arrays(images.astype(np.float32), [0, 1, 2])
    with pytest.raises(ValueError, match="needs a 4-D array"):
        from_arrays(images[0], [0, 1, 2])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        from_arrays(images, [0, 1, 2], classes=2)
    with pytest.raises(ValueError, match="3 labels for 3 samples|2 labels for 3 samples"):
        from_arrays(images, [0, 1])
    d = from_arrays(images, [0, 1, 1], clean_labels=[0, 1, 2])
    assert d.num_classes == 3 and d.clean_labels.tolist() == [0, 1, 2]


# --------------------------------------------------------------------------- paths outside the root

@pytest.fixture
def secret(tmp_path):
    """An existing file outside every dataset root, so that 'not found' cannot mask the check."""
    path = tmp_path / "outside" / "secret.jpg"
    path.parent.mkdir()
    path.write_bytes(b"\xff\xd8\xff not for the loader")
    return path


def test_clothing1m_key_outside_root_names_key_list_line(clothing_copy, secret):
    tree, root = clothing_copy
    escaping = os.path.relpath(secret, root)  # "../outside/secret.jpg"
    keys = root / "clean_val_key_list.txt"
    _replace_line(keys, 2, escaping)
    with (root / "clean_label_kv.txt").open("a") as kv:
        kv.write(f"{escaping} 3\n{secret} 4\n")
    with pytest.raises(ListFileError, match=re.escape(f"{keys}, line 2: path {escaping!r} resolves to {secret}, "
                                                      f"outside the dataset root {root}")):
        clothing1m(root, "clean_val")
    d = clothing1m(root, "clean_val", allow_outside_root=True)
    assert d.paths[1] == str(secret) and d.labels[1] == 3
    _replace_line(keys, 2, str(secret))  # an absolute key elsewhere
    with pytest.raises(ListFileError, match=re.escape(f"{keys}, line 2: path {str(secret)!r}")):
        clothing1m(root, "clean_val", check_exists=False)


def test_webvision_lists_outside_their_directory(tmp_path, secret):
    tree = make_webvision(tmp_path / "wv", n_train=4, n_val=3, n_imagenet=4, label_range=10,
                          imagenet_layout="list", seed=2)
    train = tree.root / "info" / "train_filelist_google.txt"
    _replace_line(train, 3, "../outside/secret.jpg 1")
    with pytest.raises(ListFileError, match=re.escape(f"{train}, line 3: path '../outside/secret.jpg' resolves to "
                                                      f"{secret}, outside the dataset root {tree.root}")):
        webvision(tree.root, "train")
    assert webvision(tree.root, "train", allow_outside_root=True).paths[2] == str(secret)
    # val paths are relative to val_images_256/: leaving that directory is leaving the list's root
    val = tree.root / "info" / "val_filelist.txt"
    (tree.root / "google" / "escaped.jpg").write_bytes(b"\xff\xd8\xff")
    _replace_line(val, 1, "../google/escaped.jpg 2")
    with pytest.raises(ListFileError, match=re.escape(f"{val}, line 1: path '../google/escaped.jpg'") +
                       ".*outside the dataset root " + re.escape(str(tree.root / "val_images_256"))):
        webvision(tree.root, "val")
    assert webvision(tree.root, "val", allow_outside_root=True).paths[0] == str(tree.root / "google" / "escaped.jpg")
    imagenet = tree.root / "imagenet" / "val_filelist.txt"
    _replace_line(imagenet, 2, f"{secret} 1")
    with pytest.raises(ListFileError, match=re.escape(f"{imagenet}, line 2: path {str(secret)!r}")):
        webvision(tree.root, "imagenet_val")
    assert str(secret) in webvision(tree.root, "imagenet_val", allow_outside_root=True).paths


def test_webvision_synsets_that_are_not_utf8_name_file_and_line(tmp_path):
    tree = make_webvision(tmp_path, n_train=2, n_val=1, n_imagenet=0, seed=3)
    synsets = tree.root / "info" / "synsets.txt"
    lines = synsets.read_bytes().split(b"\n")
    lines[6] = b"n0000 caf\xe9"
    synsets.write_bytes(b"\n".join(lines))
    with pytest.raises(ListFileError, match=re.escape(f"{synsets}, line 7: not valid UTF-8")):
        webvision(tree.root, "train")


def test_file_list_outside_root_and_the_opt_in(tmp_path, secret):
    tree = make_path_label_list(tmp_path / "set", n_per_class=2, size=16, num_classes=2, seed=1)
    lines = tree.list_path.read_text().splitlines()
    for entry in ("../outside/secret.jpg", "images/../../outside/secret.jpg", str(secret)):
        tree.list_path.write_text("\n".join(lines[:2] + [f"{entry} 1"] + lines[2:]) + "\n")
        with pytest.raises(ListFileError, match=re.escape(f"{tree.list_path}, line 3: path {entry!r} resolves to "
                                                          f"{secret}, outside the dataset root {tree.root}")):
            file_list(tree.list_path)
        d = file_list(tree.list_path, allow_outside_root=True)
        assert d.paths[2] == str(secret) and len(d) == len(lines) + 1
    # the root is the one given: the absolute entry lies inside tmp_path
    assert file_list(tree.list_path, tmp_path, check_exists=False).paths[2] == str(secret)
    tree.list_path.write_text("\n".join(lines + ["images/.. 0"]) + "\n")
    with pytest.raises(ListFileError, match=re.escape(f"line {len(lines) + 1}: path 'images/..' resolves to the "
                                                      f"dataset root {tree.root} itself")):
        file_list(tree.list_path, check_exists=False)


def test_file_list_does_not_infer_billions_of_classes(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8\xff")
    listing = tmp_path / "list.txt"
    listing.write_text("a.jpg 0\na.jpg 1000000000000\n")
    with pytest.raises(ListFileError, match=re.escape(f"{listing}, line 2: label 1000000000000 would make")):
        file_list(listing)
    with pytest.raises(ListFileError, match=r"line 2: label 1000000000000 is out of range \[0, 10\)"):
        file_list(listing, classes=10)


def test_image_folder_follows_a_symlink_farm(tmp_path):
    store = make_jpeg_folder(tmp_path / "store", n_per_class=2, size=16, num_classes=2)
    farm = tmp_path / "farm"
    farm.mkdir()
    for name in store.classes:
        (farm / name).symlink_to(store.root / name, target_is_directory=True)
    d = image_folder(farm)
    assert d.paths == [str(farm / Path(p).parent.name / Path(p).name) for p in store.paths]
    assert d.labels.tolist() == store.labels.tolist()


def test_image_folder_symlink_loop_is_an_error(tmp_path):
    make_jpeg_folder(tmp_path / "f", n_per_class=1, size=16, num_classes=2)
    loop = tmp_path / "f" / "class_1" / "again"
    loop.symlink_to(tmp_path / "f", target_is_directory=True)  # back to an ancestor
    with pytest.raises(ValueError, match=re.escape(f"symbolic link loop: {loop} leads back to {tmp_path / 'f'}")):
        image_folder(tmp_path / "f")
    loop.unlink()
    # a loop through a directory outside the root, two links long
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "f" / "class_0" / "out").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "back").symlink_to(tmp_path / "f" / "class_0", target_is_directory=True)
    with pytest.raises(ValueError, match="symbolic link loop: .*/class_0/out/back leads back to "):
        image_folder(tmp_path / "f")
    # two links to one directory (no loop) are two listings of the same images, as before
    (elsewhere / "back").unlink()
    (elsewhere / "x.jpg").write_bytes((tmp_path / "f" / "class_0" / "img_0000.jpg").read_bytes())
    (tmp_path / "f" / "class_1" / "out2").symlink_to(elsewhere, target_is_directory=True)
    d = image_folder(tmp_path / "f")
    assert d.labels.tolist() == [0, 0, 1, 1]


def test_a_description_refuses_a_path_with_a_nul_byte(tmp_path):
    """The loader opens paths with np.fromfile, whose 'embedded null byte' ValueError names no
    file (and escapes on_error='skip'): such a path is refused where the description is made."""
    with pytest.raises(ValueError, match=re.escape("mine: paths[1] = '/x/b\\x00.jpg' contains a NUL byte")):
        DatasetDescription("mine", ["a"], np.zeros(2, np.int64), paths=["/x/a.jpg", "/x/b\x00.jpg"])
    d = DatasetDescription("mine", ["a"], np.zeros(2, np.int64), paths=["/x/a.jpg", Path("/x/b.jpg")])
    assert len(d.subset([1])) == 1
