"""Small datasets in their native on-disk formats, built from real images, for the tests.

Stable helpers (other test modules and benchmarks import them; keep signatures and return
types). Every ``make_*`` writes only under the directory it is given (use pytest's
``tmp_path``) and returns what it wrote, so tests compare a reader's output with the truth
instead of with a second reading of the same files.

Image sources (real pictures, never random bytes):

- :func:`sample_photos`: the two JPEG photographs scikit-learn ships (china.jpg, flower.jpg,
  427×640 RGB); :func:`photo_crops` cuts any number of distinct images from them by random
  crop, resize and flip.
- :func:`fashion_mnist_samples`: real Fashion-MNIST images from Debian's
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``), read here by a
  five-line reader independent of ``mixnn_fast.data``; ``HAVE_FASHION_MNIST`` says if present.

Import: ``from fixtures import make_jpeg_folder`` inside tests/ (pytest puts tests/ on
sys.path), ``from tests.fixtures import make_jpeg_folder`` from the repository root (bench/).

Builders:

    make_jpeg_folder(root, n_per_class, size, ...)   -> ImageSet   root/<class>/<name>.jpg
    make_path_label_list(root, n_per_class, size, ...) -> ImageSet  + a "relative/path label" list
    make_clothing1m(root, ...)                       -> Clothing1MFixture
    make_webvision(root, ...)                        -> WebVisionFixture
    make_cifar(root, which, ...)                     -> CifarFixture (Python-2-style pickles)
    make_fashion_mnist_idx(root, ...)                -> FashionMnistFixture (IDX, .gz or raw)
    write_jpeg(path, image), write_idx(path, array), python2_pickle_dumps(obj)
"""
from __future__ import annotations

import functools
import gzip
import io
import os
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
HAVE_FASHION_MNIST = (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file()
CLOTHING1M_CLASSES = ("T-Shirt", "Shirt", "Knitwear", "Chiffon", "Sweater", "Hoodie", "Windbreaker",
                      "Jacket", "Downcoat", "Suit", "Shawl", "Dress", "Vest", "Underwear")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) from an int (square) or a (height, width) pair."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


# ---------------------------------------------------------------------------------------------
# Real image sources


@functools.lru_cache(maxsize=1)
def sample_photos() -> tuple[np.ndarray, ...]:
    """scikit-learn's two JPEG photographs, each (427, 640, 3) uint8 RGB (read-only arrays)."""
    from sklearn.datasets import load_sample_images

    photos = tuple(np.asarray(img, dtype=np.uint8) for img in load_sample_images().images)
    for photo in photos:
        photo.setflags(write=False)
    return photos


def photo_crops(n: int, size: int | tuple[int, int], *, seed: int = 0) -> np.ndarray:
    """(n, H, W, 3) uint8: n distinct natural images cut from :func:`sample_photos`.

    Each is a random crop (10-100 % of the photo's area, aspect 3/4-4/3) of one of the two
    photos, resized bilinearly to ``size`` (int, or (height, width)) and flipped at random.
    """
    from PIL import Image  # here, not at the top: the CUDA tests run where Pillow is absent

    height, width = _size(size)
    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(p) for p in sample_photos()]
    out = np.empty((n, height, width, 3), dtype=np.uint8)
    for k in range(n):
        photo = photos[k % len(photos)]
        area = photo.width * photo.height * rng.uniform(0.1, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        w = int(min(photo.width, round(np.sqrt(area * aspect))))
        h = int(min(photo.height, round(np.sqrt(area / aspect))))
        x = int(rng.integers(0, photo.width - w + 1))
        y = int(rng.integers(0, photo.height - h + 1))
        crop = photo.crop((x, y, x + w, y + h)).resize((width, height), Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out[k] = np.asarray(crop)
    return out


@functools.lru_cache(maxsize=2)
def _fashion_mnist_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.is_file():
        raise FileNotFoundError(f"{images_path} not found: install the Debian package dataset-fashion-mnist")
    # Deliberately not mixnn_fast.data.read_idx: the fixtures must not depend on the code under test.
    images = np.frombuffer(gzip.decompress(images_path.read_bytes()), np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.frombuffer(gzip.decompress(labels_path.read_bytes()), np.uint8, offset=8).astype(np.int64)
    return images, labels


def fashion_mnist_samples(n: int, *, split: str = "train", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n real Fashion-MNIST images chosen at random: ((n, 28, 28) uint8, (n,) int64 labels)."""
    images, labels = _fashion_mnist_split(split)
    pick = np.sort(np.random.default_rng(seed).choice(len(images), size=n, replace=False))
    return images[pick].copy(), labels[pick].copy()


def fashion_mnist_rgb(n: int, size: int | tuple[int, int], *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n Fashion-MNIST garments as (n, H, W, 3) uint8 RGB, upscaled to ``size``; and their labels."""
    from PIL import Image  # here, not at the top: the CUDA tests run where Pillow is absent

    height, width = _size(size)
    grey, labels = fashion_mnist_samples(n, seed=seed)
    out = np.stack([np.asarray(Image.fromarray(g).resize((width, height), Image.BILINEAR).convert("RGB")) for g in grey])
    return out, labels


# ---------------------------------------------------------------------------------------------
# Writers


def write_jpeg(path: str | os.PathLike, image: np.ndarray, *, quality: int = 90) -> Path:
    """Encode ``image`` ((H, W, 3) or (H, W) uint8) as a JPEG at ``path`` (parents created)."""
    from PIL import Image  # here, not at the top: the CUDA tests run where Pillow is absent

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path, format="JPEG", quality=quality)
    return path


_IDX_TYPE = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
             np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array`` (uint8, int8, int16, int32, float32 or float64)."""
    array = np.asarray(array)
    big = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    header = bytes([0, 0, _IDX_TYPE[big.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(big).tobytes()


def write_idx(path: str | os.PathLike, array: np.ndarray, *, gz: bool = True) -> Path:
    """Write ``array`` as an IDX file, gzip-compressed when ``gz``."""
    data = idx_bytes(array)
    path = Path(path)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


class _Python2StylePickler(pickle._Pickler):
    """Pickles like Python 2's cPickle did for the CIFAR files: protocol 2, every str/bytes as
    a BINSTRING (Python 2's byte string), and numpy's constructors under numpy 1.x's
    ``numpy.core.multiarray`` module path."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_string(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = _save_py2_string
    dispatch[bytes] = _save_py2_string

    def save_global(self, obj: Any, name: str | None = None) -> None:
        reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
        known = {id(reconstruct): b"numpy.core.multiarray\n_reconstruct\n",
                 id(np.ndarray): b"numpy\nndarray\n", id(np.dtype): b"numpy\ndtype\n"}
        if id(obj) in known:
            self.write(pickle.GLOBAL + known[id(obj)])
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def python2_pickle_dumps(obj: Any) -> bytes:
    """``obj`` pickled the way the published CIFAR python files are (Python 2, protocol 2)."""
    buffer = io.BytesIO()
    _Python2StylePickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Dataset builders


@dataclass
class ImageSet:
    """What a builder wrote: ``paths`` absolute, in the order the reader should return them;
    ``labels`` (N,) int64; ``classes``; ``root``; ``list_path`` for list-file builders."""

    root: Path
    paths: list[str]
    labels: np.ndarray
    classes: list[str]
    list_path: Path | None = None


def make_jpeg_folder(
    root: str | os.PathLike,
    n_per_class: int,
    size: int | tuple[int, int] = 64,
    *,
    num_classes: int = 3,
    quality: int = 90,
    seed: int = 0,
    source: str = "photos",
) -> ImageSet:
    """An ImageFolder tree ``root/class_<k>/img_<i>.jpg`` of ``num_classes × n_per_class`` JPEGs.

    ``size``: int or (height, width) of every image; ``source``: "photos" (crops of
    scikit-learn's photographs, the web-image-like default) or "fashion_mnist" (garments,
    upscaled to RGB). Returns paths sorted as ``image_folder`` lists them (class, then name).
    """
    root = Path(root)
    n = num_classes * n_per_class
    if source == "photos":
        images = photo_crops(n, size, seed=seed)
    elif source == "fashion_mnist":
        images, _ = fashion_mnist_rgb(n, size, seed=seed)
    else:
        raise ValueError(f"source must be 'photos' or 'fashion_mnist', got {source!r}")
    classes = [f"class_{k}" for k in range(num_classes)]
    paths, labels = [], []
    for k, name in enumerate(classes):
        for i in range(n_per_class):
            path = write_jpeg(root / name / f"img_{i:04d}.jpg", images[k * n_per_class + i], quality=quality)
            paths.append(str(path.resolve()))
            labels.append(k)
    return ImageSet(root.resolve(), paths, np.asarray(labels, dtype=np.int64), classes)


def make_path_label_list(
    root: str | os.PathLike,
    n_per_class: int,
    size: int | tuple[int, int] = 32,
    *,
    num_classes: int = 3,
    seed: int = 0,
    list_name: str = "list.txt",
) -> ImageSet:
    """JPEGs under ``root/images/`` (one sub-directory with a space in its name, to exercise
    path parsing) and ``root/<list_name>`` of ``relative/path label`` lines in shuffled order."""
    root = Path(root).resolve()
    n = num_classes * n_per_class
    images = photo_crops(n, size, seed=seed)
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), n_per_class)
    order = np.random.default_rng(seed).permutation(n)
    relative = [f"images/{'with space' if i % 2 else 'plain'}/{i:04d}.jpg" for i in range(n)]
    for i in range(n):
        write_jpeg(root / relative[i], images[i])
    lines = [f"{relative[i]} {labels[i]}\n" for i in order]
    list_path = root / list_name
    list_path.write_text("".join(lines), encoding="utf-8")
    return ImageSet(root, [str(root / relative[i]) for i in order], labels[order],
                    [str(k) for k in range(num_classes)], list_path)


@dataclass
class Clothing1MFixture:
    """A miniature Clothing1M. ``keys[split]``: the split's keys ("images/a/bc/name.jpg") in
    key-list order; ``noisy[key]``, ``clean[key]``: the label tables as written."""

    root: Path
    keys: dict[str, list[str]]
    noisy: dict[str, int]
    clean: dict[str, int]
    classes: tuple[str, ...] = CLOTHING1M_CLASSES


def make_clothing1m(
    root: str | os.PathLike,
    *,
    n_noisy_train: int = 42,
    n_clean: tuple[int, int, int] = (10, 8, 8),
    n_overlap: int = 6,
    size: int | tuple[int, int] = 40,
    seed: int = 0,
) -> Clothing1MFixture:
    """Clothing1M's layout under ``root``, with real garment pictures (Fashion-MNIST, RGB JPEG).

    ``n_noisy_train`` noisy-train images; ``n_clean`` = sizes of clean_train, clean_val,
    clean_test. The first ``n_overlap`` noisy-train images also get a clean label, and the
    clean-train images also get a noisy label, as in the real dataset. Noisy labels differ
    from the clean ones for about half the overlapping images. The kv files list their keys
    in an order unrelated to the key lists.
    """
    root = Path(root).resolve()
    rng = np.random.default_rng(seed)
    splits = {"noisy_train": n_noisy_train, "clean_train": n_clean[0], "clean_val": n_clean[1], "clean_test": n_clean[2]}
    total = sum(splits.values())
    images, _ = fashion_mnist_rgb(total, size, seed=seed)
    keys: dict[str, list[str]] = {}
    noisy: dict[str, int] = {}
    clean: dict[str, int] = {}
    k = 0
    for split, n in splits.items():
        keys[split] = []
        for i in range(n):
            key = f"images/{k % 3}/{k % 7:02d}/{split}_{i:05d}.jpg"
            write_jpeg(root / key, images[k])
            keys[split].append(key)
            truth = int(rng.integers(0, len(CLOTHING1M_CLASSES)))
            flipped = int(rng.integers(0, len(CLOTHING1M_CLASSES))) if rng.random() < 0.5 else truth
            if split == "noisy_train":
                noisy[key] = flipped
                if i < n_overlap:
                    clean[key] = truth
            else:
                clean[key] = truth
                if split == "clean_train":
                    noisy[key] = flipped
            k += 1
    (root / "category_names_eng.txt").write_text("\n".join(CLOTHING1M_CLASSES) + "\n")
    for name, table in (("noisy_label_kv.txt", noisy), ("clean_label_kv.txt", clean)):
        items = list(table.items())
        order = rng.permutation(len(items))
        (root / name).write_text("".join(f"{items[j][0]} {items[j][1]}\n" for j in order))
    for split, split_keys in keys.items():
        (root / f"{split}_key_list.txt").write_text("".join(f"{key}\n" for key in split_keys))
    return Clothing1MFixture(root, keys, noisy, clean)


@dataclass
class WebVisionFixture:
    """A miniature WebVision. ``train``/``val``/``imagenet_val``: (relative path as listed,
    label) for EVERY written entry, including labels >= 50 that mini-WebVision drops; paths of
    train are relative to root, of val to root/val_images_256, of imagenet_val to root/imagenet."""

    root: Path
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    imagenet_val: list[tuple[str, int]]
    synsets: list[str] = field(default_factory=list)


def make_webvision(
    root: str | os.PathLike,
    *,
    n_train: int = 36,
    n_val: int = 12,
    n_imagenet: int = 12,
    label_range: int = 60,
    size: int | tuple[int, int] = 48,
    imagenet_layout: str = "folders",
    write_synsets: bool = True,
    seed: int = 0,
) -> WebVisionFixture:
    """WebVision's layout under ``root`` with photo crops as images. Labels are drawn from
    [0, label_range) so some exceed the first 50 classes. ``imagenet_layout``: "folders"
    (``imagenet/val/<label>/``) or "list" (``imagenet/val_filelist.txt``)."""
    root = Path(root).resolve()
    rng = np.random.default_rng(seed)
    images = iter(photo_crops(n_train + n_val + n_imagenet, size, seed=seed))
    train, val, imagenet = [], [], []
    for i in range(n_train):
        label = int(rng.integers(0, label_range))
        relative = f"google/q{label + 1:04d}/{i:06d}.jpg"
        write_jpeg(root / relative, next(images))
        train.append((relative, label))
    for i in range(n_val):
        label = int(rng.integers(0, label_range))
        relative = f"val{i + 1:06d}.jpg"
        write_jpeg(root / "val_images_256" / relative, next(images))
        val.append((relative, label))
    for i in range(n_imagenet):
        label = int(rng.integers(0, label_range))
        relative = f"val/{label}/ILSVRC2012_val_{i + 1:08d}.JPEG"
        write_jpeg(root / "imagenet" / relative, next(images))
        imagenet.append((relative, label))
    (root / "info").mkdir(parents=True, exist_ok=True)
    (root / "info" / "train_filelist_google.txt").write_text("".join(f"{p} {y}\n" for p, y in train))
    (root / "info" / "val_filelist.txt").write_text("".join(f"{p} {y}\n" for p, y in val))
    if imagenet_layout == "list":
        (root / "imagenet" / "val_filelist.txt").write_text("".join(f"{p} {y}\n" for p, y in imagenet))
    elif imagenet_layout == "folders":
        for label in range(label_range):  # every class folder exists, possibly empty
            (root / "imagenet" / "val" / str(label)).mkdir(parents=True, exist_ok=True)
    else:
        raise ValueError(f"imagenet_layout must be 'folders' or 'list', got {imagenet_layout!r}")
    synsets = [f"n{1440764 + 7 * k:08d} class number {k}" for k in range(1000)]
    if write_synsets:
        (root / "info" / "synsets.txt").write_text("\n".join(synsets) + "\n")
    return WebVisionFixture(root, train, val, imagenet, synsets if write_synsets else [])


@dataclass
class CifarFixture:
    """What :func:`make_cifar` wrote: images (N, 32, 32, 3) uint8 HWC and labels per split."""

    directory: Path
    classes: list[str]
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    coarse_classes: list[str] | None = None
    train_coarse: np.ndarray | None = None
    test_coarse: np.ndarray | None = None


def make_cifar(
    root: str | os.PathLike,
    which: str = "cifar10",
    *,
    n_train: int = 50,
    n_test: int = 10,
    python2: bool = True,
    seed: int = 0,
) -> CifarFixture:
    """CIFAR-10 (``cifar-10-batches-py/``: 5 data batches, test_batch, batches.meta) or
    CIFAR-100 (``cifar-100-python/``: train, test, meta) under ``root``, with 32×32 photo crops.

    Batches hold ``data`` (n, 3072) uint8 in the published channel-planar order. ``python2``
    writes them as the published files are (Python 2 protocol-2 pickles, byte-string keys);
    False writes an ordinary Python 3 ``pickle.dump(protocol=2)``.
    """
    root = Path(root).resolve()
    rng = np.random.default_rng(seed)
    dumps = python2_pickle_dumps if python2 else functools.partial(pickle.dumps, protocol=2)
    images = photo_crops(n_train + n_test, 32, seed=seed)
    cifar100 = which == "cifar100"
    num_classes = 100 if cifar100 else 10
    labels = rng.integers(0, num_classes, n_train + n_test).astype(np.int64)
    coarse = rng.integers(0, 20, n_train + n_test).astype(np.int64)
    classes = [f"fine_{k}" for k in range(100)] if cifar100 else list(CIFAR10_CLASSES)
    coarse_classes = [f"coarse_{k}" for k in range(20)]
    directory = root / ("cifar-100-python" if cifar100 else "cifar-10-batches-py")
    directory.mkdir(parents=True, exist_ok=True)

    def batch(start: int, stop: int, title: str) -> dict:
        planar = images[start:stop].transpose(0, 3, 1, 2).reshape(stop - start, 3072)
        content = {"batch_label": title, "data": np.ascontiguousarray(planar),
                   "filenames": [f"photo_crop_{i}.png" for i in range(start, stop)]}
        if cifar100:
            content["fine_labels"] = labels[start:stop].tolist()
            content["coarse_labels"] = coarse[start:stop].tolist()
        else:
            content["labels"] = labels[start:stop].tolist()
        return content

    if cifar100:
        (directory / "train").write_bytes(dumps(batch(0, n_train, "training batch 1 of 1")))
        (directory / "meta").write_bytes(dumps({"fine_label_names": classes, "coarse_label_names": coarse_classes}))
        (directory / "test").write_bytes(dumps(batch(n_train, n_train + n_test, "testing batch 1 of 1")))
    else:
        bounds = np.linspace(0, n_train, 6).astype(int)
        for b in range(5):
            content = batch(bounds[b], bounds[b + 1], f"training batch {b + 1} of 5")
            (directory / f"data_batch_{b + 1}").write_bytes(dumps(content))
        (directory / "batches.meta").write_bytes(dumps({"label_names": classes, "num_cases_per_batch": 10000}))
        (directory / "test_batch").write_bytes(dumps(batch(n_train, n_train + n_test, "testing batch 1 of 1")))
    return CifarFixture(
        directory, classes, images[:n_train], labels[:n_train], images[n_train:], labels[n_train:],
        coarse_classes if cifar100 else None, coarse[:n_train] if cifar100 else None,
        coarse[n_train:] if cifar100 else None,
    )


@dataclass
class FashionMnistFixture:
    """The arrays :func:`make_fashion_mnist_idx` wrote: images (n, 28, 28) uint8, labels (n,) int64."""

    root: Path
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def make_fashion_mnist_idx(
    root: str | os.PathLike, *, n_train: int = 100, n_test: int = 20, gz: bool = True, seed: int = 0
) -> FashionMnistFixture:
    """The four Fashion-MNIST IDX files under ``root`` (``*.gz`` when ``gz``) holding real
    Fashion-MNIST images and labels sampled from Debian's copy."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    train_x, train_y = fashion_mnist_samples(n_train, split="train", seed=seed)
    test_x, test_y = fashion_mnist_samples(n_test, split="test", seed=seed)
    suffix = ".gz" if gz else ""
    for prefix, x, y in (("train", train_x, train_y), ("t10k", test_x, test_y)):
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", x, gz=gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", y.astype(np.uint8), gz=gz)
    return FashionMnistFixture(root, train_x, train_y, test_x, test_y)


class DLPackOnly:
    """A producer that is neither a tensor nor an ndarray (as CuPy, DALI or JAX arrays are to torch)."""

    def __init__(self, array):
        self._array = array

    def __dlpack__(self, *args, **kwargs):
        return self._array.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()
