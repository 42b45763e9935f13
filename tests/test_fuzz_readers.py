"""Fuzzing the dataset readers and the training loader with malformed files.

The contract every property checks: a reader either returns a valid result (checked against
the raw bytes it read, or against invariants any description must satisfy), or raises
ValueError / TypeError / FileNotFoundError (or a subclass) whose message names the file, and
for a list file also the 1-based line, which is the first bad line of the file. Anything
else (a crash, a hang, OverflowError or RecursionError from deep inside, a message that
names no file, a path outside the root returned without the opt-in) fails the property.

List files are drawn as lines built from awkward pieces (paths with spaces, ``..``, absolute
paths, backslashes; labels that are huge, negative, non-ASCII digits, empty; CRLF and CR
endings, a BOM, blank lines) or as random bytes. Binary formats (CIFAR pickles, IDX) are
mutated from real files: truncated, bit-flipped, replaced, or rebuilt with drawn contents.
Corrupt JPEGs go through :class:`mixnn_fast.pipeline.MixNNLoader` in both ``on_error`` modes.

Profiles: tests/conftest.py ("ci", the default, 60 examples per property; HYPOTHESIS_PROFILE=deep
for 3000); ``--hypothesis-show-statistics`` reports the examples tried.
"""
from __future__ import annotations

import gzip
import os
import pickle
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fixtures import (
    HAVE_FASHION_MNIST,
    idx_bytes,
    make_cifar,
    make_clothing1m,
    make_fashion_mnist_idx,
    make_path_label_list,
    make_webvision,
    photo_crops,
    python2_pickle_dumps,
    write_jpeg,
)
from mixnn_fast.data import (
    DatasetDescription,
    ListFileError,
    cifar,
    clothing1m,
    fashion_mnist,
    file_list,
    image_folder,
    read_path_label_list,
    read_path_list,
    webvision,
)
from mixnn_fast.data.listfile import read_names

ALLOWED = (ValueError, TypeError, FileNotFoundError)
fuzz = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
needs_fashion_mnist = pytest.mark.skipif(not HAVE_FASHION_MNIST, reason="Debian's dataset-fashion-mnist is not installed")


def check_error(error: BaseException, *files: str | os.PathLike, list_file: str | os.PathLike | None = None,
                lines: int | None = None) -> None:
    """``error`` is an allowed type, names one of ``files`` and, being a ListFileError about
    ``list_file``, a line in [1, lines]; its message stays short (no 5,000-digit labels)."""
    message = str(error)
    assert isinstance(error, ALLOWED), f"{type(error).__name__}: {message}"
    assert any(os.fspath(f) in message for f in files), f"names none of {files}: {message}"
    assert len(message) < 2000, f"message of {len(message)} characters"
    if isinstance(error, ListFileError):
        found = re.search(r"^(.*), line (\d+): ", message)
        assert found, message
        if list_file is not None and found.group(1) == os.fspath(list_file) and lines is not None:
            assert 1 <= int(found.group(2)) <= lines, message


def attempt(fn, *args, **kwargs):
    """(result, None) or (None, exception) for an allowed exception; anything else propagates.
    The outcome is recorded as a hypothesis event (``--hypothesis-show-statistics``)."""
    try:
        result = fn(*args, **kwargs)
    except ALLOWED as exc:
        event(f"raised {type(exc).__name__}")
        return None, exc
    event("returned a result")
    return result, None


# ============================================================================ list files

# Pieces of paths and labels that have broken parsers before, or could.
NASTY_PATHS = ["../x.jpg", "a/../../x.jpg", "/etc/passwd", "//etc/passwd", ".", "a/..", "./", "..",
               "dir with space/a b.jpg", "..\\..\\x.jpg", "a\\b.jpg", "a\x00b.jpg", "ünïcödé/ファイル.jpg",
               "~/x.jpg", "$HOME/x.jpg", "-1", "0", "a\tb.jpg", "x.jpg\u00a0", "\u2028x.jpg"]
NASTY_LABELS = ["", "-", "+3", "3_0", "1.5", "0x1", "٣", "３", "²", "1e3", "nan", "007", "-0", "-7",
                "9" * 19, "9" * 30, "9" * 5000, str(2**63 - 1), str(2**63), "\ufeff1"]
SEPARATORS = [" ", "\t", "  ", " \t ", "\u00a0", "\u3000", "\x0b", "\x1f"]
NEWLINES = ["\n", "\r\n", "\r"]


def _paths(known: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(known) if known else st.nothing(),
        st.sampled_from(NASTY_PATHS),
        st.text(max_size=24),
    )


def _labels(num_classes: int) -> st.SearchStrategy[str]:
    return st.one_of(
        st.integers(0, max(num_classes - 1, 0)).map(str),
        st.integers(0, 10**25).map(str),
        st.integers(-(10**6), -1).map(str),
        st.sampled_from(NASTY_LABELS),
        st.text(max_size=6),
    )


@st.composite
def list_file_bytes(draw, known: list[str] = (), num_classes: int = 10, labelled: bool = True) -> bytes:
    """A list file: mostly lines of the expected shape built from awkward pieces, sometimes
    random text or random bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300))
    paths, labels = _paths(list(known)), _labels(num_classes)
    entry = st.builds(lambda p, s, y: f"{p}{s}{y}", paths, st.sampled_from(SEPARATORS), labels) if labelled \
        else paths
    line = st.one_of(entry, entry, entry, paths, st.sampled_from(["", "   ", "\t"]), st.text(max_size=30))
    lines = draw(st.lists(line, max_size=12))
    newline = draw(st.sampled_from(NEWLINES))
    text = newline.join(lines) + draw(st.sampled_from(["", newline, newline * 2]))
    if draw(st.booleans()):
        text = "\ufeff" + text
    raw = text.encode("utf-8", errors="surrogatepass")
    if draw(st.integers(0, 5)) == 0 and raw:  # a stray byte that is not UTF-8
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\x80", b"\xed\xa0\x80"])) + raw[at:]
    return raw


def _lines_of(raw: bytes) -> list[str | None]:
    """The file's lines as the readers number them (split on LF), decoded, BOM removed from
    line 1; None for a line that is not UTF-8."""
    out: list[str | None] = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            out.append(None)
            continue
        out.append(text.removeprefix("\ufeff") if number == 1 else text)
    return out


def _prefix_parses(reader, file: Path, raw: bytes, line: int) -> None:
    """The lines before ``line`` parse on their own, and the file cut after ``line`` fails
    at ``line``: the reported line is the first bad one."""
    pieces = raw.split(b"\n")
    file.write_bytes(b"\n".join(pieces[: line - 1]) + (b"\n" if line > 1 else b""))
    reader(file)
    file.write_bytes(b"\n".join(pieces[:line]))
    with pytest.raises(ListFileError, match=re.escape(f"{file}, line {line}: ")):
        reader(file)


def _parsed_or_refused(reader, file, raw):
    """Write ``raw`` to ``file`` and read it with ``reader``: (entries, lines) when it parses;
    None when it is refused -- after checking that the error is a ListFileError naming the file
    and a line, and that the lines before that one parse."""
    file.write_bytes(raw)
    entries, error = attempt(reader, file)
    lines = _lines_of(raw)
    if error is None:
        return entries, lines
    check_error(error, file, list_file=file, lines=len(lines))
    assert isinstance(error, ListFileError), repr(error)
    _prefix_parses(reader, file, raw, int(re.search(r", line (\d+): ", str(error)).group(1)))
    return None


@fuzz
@given(raw=list_file_bytes())
def test_fuzz_read_path_label_list(tmp_path, raw):
    parsed = _parsed_or_refused(read_path_label_list, tmp_path / "list.txt", raw)
    if parsed is None:
        return
    entries, lines = parsed
    assert len(entries.paths) == len(entries.labels) == len(entries.line_numbers)
    assert entries.labels.dtype == np.int64 and (entries.labels >= 0).all()
    assert entries.line_numbers.tolist() == [n for n, t in enumerate(lines, 1) if t is not None and t.strip()]
    for path, label, number in zip(entries.paths, entries.labels.tolist(), entries.line_numbers.tolist()):
        text = lines[number - 1].strip()
        assert text.startswith(path) and path == path.strip() and path and "\x00" not in path
        separator, token = text[len(path):], text[len(path):].strip()
        assert separator[: len(separator) - len(token)].isspace() and token.isascii() and token.isdigit()
        assert int(token) == label


@fuzz
@given(raw=list_file_bytes(labelled=False))
def test_fuzz_read_path_list(tmp_path, raw):
    parsed = _parsed_or_refused(read_path_list, tmp_path / "keys.txt", raw)
    if parsed is None:
        return
    entries, lines = parsed
    assert entries.labels is None
    kept = [(n, t.strip()) for n, t in enumerate(lines, 1) if t is not None and t.strip()]
    assert list(zip(entries.line_numbers.tolist(), entries.paths)) == kept
    assert all(len(p.split()) == 1 and "\x00" not in p for p in entries.paths)


@fuzz
@given(raw=list_file_bytes(labelled=False))
def test_fuzz_read_names(tmp_path, raw):
    file = tmp_path / "names.txt"
    file.write_bytes(raw)
    names, error = attempt(read_names, file)
    lines = _lines_of(raw)
    if error is not None:
        check_error(error, file, list_file=file, lines=len(lines))
        bad = int(re.search(r", line (\d+): (not valid UTF-8|carriage return inside)", str(error)).group(1))

        def usable(t):
            return t is not None and "\r" not in t.strip()
        assert not usable(lines[bad - 1]) and all(usable(t) for t in lines[: bad - 1])
        return
    assert names == [t.strip() for t in lines if t is not None and t.strip()]


# ============================================================================ sources built on them


def check_description(d: DatasetDescription, root: Path | str, *, inside: bool, exist: bool) -> None:
    """What every path-based description must satisfy."""
    assert isinstance(d, DatasetDescription) and d.paths is not None
    assert len(d.paths) == len(d.labels) and d.labels.dtype == np.int64
    if len(d):
        assert 0 <= d.labels.min() and d.labels.max() < d.num_classes
    root = os.fspath(root)
    for p in d.paths:
        assert os.path.isabs(p) and os.path.normpath(p) == p, p
        if inside:
            assert p.startswith(root.rstrip(os.sep) + os.sep), f"{p} is outside {root}"
        if exist:
            assert os.path.isfile(p), p


class Restore:
    """Writes a fuzzed version of one file of a shared fixture and puts the original back."""

    def __init__(self, path: Path, content: bytes):
        self.path, self.content = path, content

    def __enter__(self):
        self.original = self.path.read_bytes() if self.path.exists() else None
        self.path.write_bytes(self.content)
        return self.path

    def __exit__(self, *exc):
        if self.original is None:
            self.path.unlink()
        else:
            self.path.write_bytes(self.original)


@pytest.fixture(scope="module")
def clothing_tree(tmp_path_factory):
    if not HAVE_FASHION_MNIST:
        pytest.skip("Debian's dataset-fashion-mnist is not installed (Clothing1M fixture uses its garments)")
    tree = make_clothing1m(tmp_path_factory.mktemp("fuzz_clothing1m"), n_noisy_train=8, n_clean=(4, 3, 3),
                           n_overlap=2, size=16, seed=1)
    outside = tree.root.parent / "outside.jpg"  # an existing file outside the root
    shutil.copy(tree.root / tree.keys["clean_val"][0], outside)
    return tree


@fuzz
@given(data=st.data())
def test_fuzz_clothing1m(clothing_tree, data):
    tree, root = clothing_tree, clothing_tree.root
    split = data.draw(st.sampled_from(["noisy_train", "clean_train", "clean_val", "clean_test"]), label="split")
    known = [k for keys in tree.keys.values() for k in keys] + ["../outside.jpg", str(root.parent / "outside.jpg")]
    target, content = data.draw(st.one_of(
        st.tuples(st.just("category_names_eng.txt"), list_file_bytes(list(tree.classes), labelled=False)),
        st.tuples(st.sampled_from(["noisy_label_kv.txt", "clean_label_kv.txt"]), list_file_bytes(known, 16)),
        st.tuples(st.just(f"{split}_key_list.txt"), list_file_bytes(known, labelled=False)),
    ), label="fuzzed file")
    allow = data.draw(st.booleans(), label="allow_outside_root")
    with Restore(root / target, content) as fuzzed:
        d, error = attempt(clothing1m, root, split, allow_outside_root=allow)
        if error is None:
            assert len(d) == len(read_path_list(root / f"{split}_key_list.txt"))  # one image per key
    if error is not None:
        check_error(error, fuzzed, root)
        return
    check_description(d, root, inside=not allow, exist=True)


@fuzz
@given(data=st.data())
def test_fuzz_webvision(tmp_path_factory, data):
    root = _webvision_root(tmp_path_factory)
    target, split, known = data.draw(st.sampled_from([
        ("info/train_filelist_google.txt", "train", _WEBVISION["train"]),
        ("info/val_filelist.txt", "val", _WEBVISION["val"]),
        ("imagenet/val_filelist.txt", "imagenet_val", _WEBVISION["imagenet_val"]),
        ("info/synsets.txt", "train", []),
    ]), label="fuzzed file")
    labelled = not target.endswith("synsets.txt")
    content = data.draw(list_file_bytes(known + ["../outside.jpg"], 60, labelled=labelled), label="content")
    num_classes = data.draw(st.sampled_from([1, 10, 50, 1000]), label="num_classes")
    allow = data.draw(st.booleans(), label="allow_outside_root")
    with Restore(root / target, content) as fuzzed:
        d, error = attempt(webvision, root, split, num_classes, allow_outside_root=allow)
    if error is not None:
        check_error(error, fuzzed, root)
        return
    base = {"train": root, "val": root / "val_images_256", "imagenet_val": root / "imagenet"}[split]
    check_description(d, base, inside=not allow, exist=True)
    assert d.num_classes == num_classes


_WEBVISION: dict = {}


def _webvision_root(factory) -> Path:
    """One miniature WebVision (list layout for ImageNet) for the whole module."""
    if "root" not in _WEBVISION:
        tree = make_webvision(factory.mktemp("fuzz_webvision"), n_train=6, n_val=4, n_imagenet=4, label_range=60,
                              size=16, imagenet_layout="list", seed=4)
        _WEBVISION.update(root=tree.root, train=[p for p, _ in tree.train], val=[p for p, _ in tree.val],
                          imagenet_val=[p for p, _ in tree.imagenet_val])
        (tree.root.parent / "outside.jpg").write_bytes((tree.root / tree.train[0][0]).read_bytes())
    return _WEBVISION["root"]


@fuzz
@given(data=st.data())
def test_fuzz_file_list(tmp_path_factory, data):
    if "file_list" not in _WEBVISION:
        tree = make_path_label_list(tmp_path_factory.mktemp("fuzz_file_list"), n_per_class=2, size=16, num_classes=3)
        _WEBVISION["file_list"] = tree
    tree = _WEBVISION["file_list"]
    known = [os.path.relpath(p, tree.root) for p in tree.paths]
    content = data.draw(list_file_bytes(known, 3), label="content")
    classes = data.draw(st.sampled_from([None, 3, 5, ["a", "b", "c"]]), label="classes")
    allow = data.draw(st.booleans(), label="allow_outside_root")
    check_exists = data.draw(st.booleans(), label="check_exists")
    with Restore(tree.list_path, content) as fuzzed:
        d, error = attempt(file_list, fuzzed, classes=classes, check_exists=check_exists, allow_outside_root=allow)
    if error is not None:
        check_error(error, fuzzed)
        return
    check_description(d, tree.root, inside=not allow, exist=check_exists)


# ============================================================================ image folders

NAMES = ["a", "b c", "ünï", ".hidden", "x.jpg", "-", "deep"]
FILES = ["img.jpg", "IMG.JPG", "b.png", "c.jpeg", "notes.txt", ".dot.jpg", "noext", "x.webp", "y.TIFF"]
LINKS = ["to_root", "to_own_class", "to_other_class", "to_outside_dir", "broken", "to_outside_file"]


@st.composite
def folder_trees(draw):
    """[(class name, [(relative file or dir path, kind)])]: kind "file", "dir" or a link kind."""
    classes = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=4))
    tree = []
    for name in classes:
        entries = draw(st.lists(st.one_of(
            st.tuples(st.sampled_from(FILES), st.just("file")),
            st.tuples(st.sampled_from(["sub/", ".hid/", "sub/deeper/"]).flatmap(
                lambda d: st.sampled_from(FILES).map(lambda f: d + f)), st.just("file")),
            st.tuples(st.sampled_from(["link", "sub/link", ".link"]), st.sampled_from(LINKS)),
        ), max_size=5))
        tree.append((name, entries))
    return tree


def _loops(root: Path, max_depth: int = 16) -> bool:
    """Whether walking ``root`` (following links, skipping hidden names, as image_folder does)
    reaches a directory that is one of its own ancestors: written apart from the package."""
    stack = [(root, (os.path.realpath(root),))]
    while stack:
        directory, chain = stack.pop()
        if len(chain) > max_depth:
            return True
        for entry in sorted(os.listdir(directory)):
            child = os.path.join(directory, entry)
            if entry.startswith(".") or not os.path.isdir(child):
                continue
            real = os.path.realpath(child)
            if real in chain:
                return True
            stack.append((child, chain + (real,)))
    return False


def _build_tree(base: Path, tree) -> Path:
    """Writes ``tree`` under base/root; returns root."""
    root, outside = base / "root", base / "outside"
    (outside / "dir").mkdir(parents=True)
    jpeg = JPEG_BYTES()
    (outside / "dir" / "o.jpg").write_bytes(jpeg)
    root.mkdir()
    for name, entries in tree:
        class_dir = root / name
        class_dir.mkdir(exist_ok=True)
        for relative, kind in entries:
            path = class_dir / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists() or path.is_symlink():
                continue
            if kind == "file":
                path.write_bytes(jpeg)
                continue
            target = {"to_root": root, "to_own_class": class_dir, "to_other_class": root / tree[0][0],
                      "to_outside_dir": outside / "dir", "broken": outside / "missing",
                      "to_outside_file": outside / "dir" / "o.jpg"}[kind]
            path.symlink_to(target)
    return root


_JPEG: list[bytes] = []


def JPEG_BYTES() -> bytes:
    if not _JPEG:
        from io import BytesIO

        from PIL import Image

        buffer = BytesIO()
        Image.fromarray(photo_crops(1, 8, seed=0)[0]).save(buffer, format="JPEG")
        _JPEG.append(buffer.getvalue())
    return _JPEG[0]


@fuzz
@given(tree=folder_trees())
def test_fuzz_image_folder(tmp_path, tree):
    base = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
    root = _build_tree(base, tree)
    loops = _loops(root)
    note(f"loops={loops}")
    d, error = attempt(image_folder, root)
    if error is not None:
        check_error(error, root)
        if "symbolic link loop" in str(error):
            assert loops, str(error)
        return
    assert not loops, "a link back to an ancestor was followed without an error"
    classes = sorted(n for n, _ in tree if not n.startswith(".") and (root / n).is_dir())
    assert list(d.classes) == classes
    for path, label in zip(d.paths, d.labels.tolist()):
        relative = Path(path).relative_to(root)  # lexically inside the root
        assert relative.parts[0] == classes[label]
        assert not any(part.startswith(".") for part in relative.parts)
        assert path.lower().endswith((".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"))
        assert os.path.lexists(path)  # a broken link is listed; the loader reports it when read
    assert sorted(set(d.labels.tolist())) == list(range(len(classes)))  # no empty class


# ============================================================================ CIFAR pickles


@pytest.fixture(scope="module")
def cifar_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_cifar")
    written = make_cifar(root, "cifar10", n_train=10, n_test=3)
    return root, written.directory, {p.name: p.read_bytes() for p in written.directory.iterdir()}


def _array_values():
    return st.one_of(
        hnp.arrays(np.uint8, st.tuples(st.integers(0, 4), st.just(3072))),
        hnp.arrays(st.sampled_from([np.uint8, np.int64, np.float32, np.int8]), hnp.array_shapes(max_dims=3, max_side=4)),
        st.lists(st.integers(-3, 12), max_size=6),
        st.lists(st.integers(-(2**70), 2**70), max_size=3),
        st.lists(st.sampled_from(["cat", b"dog", "caf\xe9"]), min_size=9, max_size=11),
        st.text(st.characters(max_codepoint=255), max_size=5),  # Python 2 byte strings: latin-1
        st.none(), st.integers(), st.lists(st.lists(st.integers(0, 3), max_size=2), max_size=2),
    )


@st.composite
def damaged_pickles(draw, original: bytes) -> bytes:
    kind = draw(st.sampled_from(["random", "truncate", "flip", "rebuilt", "rebuilt"]), label="mutation")
    if kind == "random":
        return draw(st.binary(max_size=400))
    if kind == "truncate":
        return original[: draw(st.integers(0, len(original) - 1))]
    if kind == "flip":
        raw = bytearray(original)
        for _ in range(draw(st.integers(1, 8))):
            at = draw(st.integers(0, len(raw) - 1))
            raw[at] ^= 1 << draw(st.integers(0, 7))
        return bytes(raw)
    keys = st.sampled_from(["data", "labels", "label_names", "batch_label", "filenames", b"data", b"labels", "x"])
    content = draw(st.dictionaries(keys, _array_values(), max_size=5))
    dumps = draw(st.sampled_from([python2_pickle_dumps, lambda o: pickle.dumps(o, protocol=2)]))
    return dumps(content)


@fuzz
@given(data=st.data())
def test_fuzz_cifar(cifar_tree, data):
    root, directory, originals = cifar_tree
    name = data.draw(st.sampled_from(sorted(originals)), label="file")
    content = data.draw(damaged_pickles(originals[name]), label="content")
    split = "test" if name == "test_batch" else "train" if name.startswith("data_batch") else \
        data.draw(st.sampled_from(["train", "test"]))
    with Restore(directory / name, content) as fuzzed:
        d, error = attempt(cifar, root, "cifar10", split)
    if error is not None:
        check_error(error, fuzzed)
        return
    assert d.images.dtype == np.uint8 and d.images.shape[1:] == (32, 32, 3) and len(d.images) == len(d)
    assert d.num_classes == 10 and (len(d) == 0 or 0 <= d.labels.min() <= d.labels.max() < 10)


# ============================================================================ Fashion-MNIST IDX


@pytest.fixture(scope="module")
def fashion_tree(tmp_path_factory):
    if not HAVE_FASHION_MNIST:
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    root = tmp_path_factory.mktemp("fuzz_fmnist")
    make_fashion_mnist_idx(root, n_train=6, n_test=3, gz=False)
    return root, {p.name: p.read_bytes() for p in root.iterdir()}


@st.composite
def damaged_idx(draw, original: bytes, images: bool) -> bytes:
    kind = draw(st.sampled_from(["random", "truncate", "flip", "header", "shaped"]), label="mutation")
    if kind == "random":
        raw = draw(st.binary(max_size=200))
    elif kind == "truncate":
        raw = original[: draw(st.integers(0, len(original) - 1))]
    elif kind == "flip":
        raw = bytearray(original)
        for _ in range(draw(st.integers(1, 6))):
            raw[draw(st.integers(0, len(raw) - 1))] ^= 1 << draw(st.integers(0, 7))
        raw = bytes(raw)
    elif kind == "header":  # any header, a body that may or may not match it
        type_code = draw(st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x00, 0x07, 0xFF]))
        dims = draw(st.lists(st.one_of(st.integers(0, 4), st.sampled_from([28, 65536, 2**32 - 1])), max_size=6))
        head = bytes([0, 0, type_code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
        raw = head + draw(st.binary(max_size=100))
    else:  # well formed, with drawn contents: reaches the shape and label checks
        n = draw(st.integers(0, 3))
        if images:
            shape = draw(st.sampled_from([(n, 28, 28), (n, 28, 27), (n, 784)]))
            array = draw(hnp.arrays(st.sampled_from([np.uint8, np.int8, np.float32]), shape))
        else:
            array = np.asarray(draw(st.lists(st.integers(0, 12), min_size=n, max_size=n)), dtype=np.uint8)
        raw = idx_bytes(array)
    if draw(st.booleans()):
        raw = gzip.compress(raw)
    return raw


@fuzz
@given(data=st.data())
def test_fuzz_fashion_mnist(fashion_tree, data):
    root, originals = fashion_tree
    name = data.draw(st.sampled_from(sorted(originals)), label="file")
    content = data.draw(damaged_idx(originals[name], images="images" in name), label="content")
    split = "train" if name.startswith("train") else "test"
    with Restore(root / name, content) as fuzzed:
        d, error = attempt(fashion_mnist, root, split)
    if error is not None:
        check_error(error, fuzzed)
        return
    assert d.images.dtype == np.uint8 and d.images.shape[1:] == (28, 28, 1) and len(d.images) == len(d)
    assert len(d) == 0 or (0 <= d.labels.min() and d.labels.max() < 10)


# ============================================================================ corrupt JPEGs, the loader

N_JPEGS = 6


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_jpegs")
    paths = [str(write_jpeg(root / f"{i}.jpg", image)) for i, image in enumerate(photo_crops(N_JPEGS, 24, seed=3))]
    return paths, [Path(p).read_bytes() for p in paths]


@st.composite
def corrupt_jpegs(draw, original: bytes) -> bytes:
    kind = draw(st.sampled_from(["truncated", "flipped", "empty", "magic + random", "header + random"]),
                label="corruption")
    if kind == "truncated":
        return original[: draw(st.integers(1, len(original) - 1))]
    if kind == "flipped":
        raw = bytearray(original)
        for _ in range(draw(st.integers(1, 16))):
            raw[draw(st.integers(0, len(raw) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(raw)
    if kind == "empty":
        return b""
    if kind == "magic + random":
        return b"\xff\xd8\xff" + draw(st.binary(max_size=300))
    return original[: draw(st.integers(3, 200))] + draw(st.binary(min_size=1, max_size=300))


def _loader(paths, on_error: str):
    from mixnn_fast.pipeline import LoaderOptions, MixNNLoader
    from mixnn_fast.refresh.partners import PartnerTable

    n = len(paths)
    description = DatasetDescription("fuzz", ["a", "b"], np.arange(n) % 2, paths=paths)
    neighbours = (np.arange(n)[:, None] + 1) % n  # anchor i mixes with i + 1
    partners = PartnerTable.build(np.arange(n), neighbours, np.full((n, 2), 0.5), n)
    return MixNNLoader(description, 3, LoaderOptions(size=16, device="cpu", num_threads=1, on_error=on_error, seed=1),
                       partners=partners)


def _anchors_of(loader) -> list[int]:
    return sorted(a for batch in loader for a in batch.anchor_ids.tolist())


@fuzz
@given(data=st.data())
def test_fuzz_corrupt_jpeg_raise(jpeg_dir, data):
    paths, originals = jpeg_dir
    victim = data.draw(st.integers(0, N_JPEGS - 1), label="victim")
    content = data.draw(corrupt_jpegs(originals[victim]), label="content")
    from mixnn_fast.pipeline import ImageDecodeError

    with Restore(Path(paths[victim]), content):
        loader = _loader(paths, "raise")
        try:
            anchors = _anchors_of(loader)
        except (ImageDecodeError, FileNotFoundError) as error:
            event(f"raised {type(error).__name__}")
            check_error(error, paths[victim])
            for other in set(paths) - {paths[victim]}:
                assert other not in str(error), f"blames a good file: {error}"
            if isinstance(error, ImageDecodeError):
                assert error.paths == [paths[victim]]
            return
    event("decoded every image")
    assert anchors == list(range(N_JPEGS))  # decoded after all (the damage was harmless to DALI)


@fuzz
@given(data=st.data())
def test_fuzz_corrupt_jpeg_skip(jpeg_dir, data):
    paths, originals = jpeg_dir
    victim = data.draw(st.integers(0, N_JPEGS - 1), label="victim")
    content = data.draw(corrupt_jpegs(originals[victim]), label="content")
    with Restore(Path(paths[victim]), content):
        loader = _loader(paths, "skip")
        anchors = _anchors_of(loader)
    assert set(loader.skipped) <= {victim}, loader.skipped
    event("skipped the victim" if loader.skipped else "decoded every image")
    if loader.skipped:
        assert paths[victim] in loader.skipped[victim]
        # only the victim is lost: the anchor it partners trains mixed with itself instead
        assert anchors == sorted(set(range(N_JPEGS)) - {victim})
        assert loader.skipped_anchors == 1
    else:
        assert anchors == list(range(N_JPEGS)) and loader.skipped_anchors == 0


# ---------------------------------------------------------------------------------------------
# files DALI refuses but PIL decodes: a JPEG whose DHT marker byte 0xFF is flipped to 0xFE is
# rejected by DALI's decoder ('[jpeg_parser] Invalid marker') and decoded by libjpeg through PIL;
# the loader then asks DALI about each file alone to name the culprit


def _dht_flipped(jpeg_dir, which: int = 0) -> tuple[Path, bytes]:
    """Image 0 with the 0xFF of its ``which``-th DHT marker (0xFFC4) changed to 0xFE."""
    paths, originals = jpeg_dir
    raw = originals[0]
    at = [i for i in range(len(raw) - 1) if raw[i:i + 2] == b"\xff\xc4"][which]
    return Path(paths[0]), raw[:at] + b"\xfe" + raw[at + 1:]


def test_dht_flip_is_decoded_by_pil(jpeg_dir):
    """The premise of the two tests below: PIL decodes the damaged file (DALI does not)."""
    from PIL import Image

    path, content = _dht_flipped(jpeg_dir)
    with Restore(path, content), Image.open(path) as image:
        image.load()
        assert image.size == (24, 24)


def test_dali_only_decode_failure_raises_image_decode_error(jpeg_dir):
    from mixnn_fast.pipeline import ImageDecodeError

    paths, _ = jpeg_dir
    path, content = _dht_flipped(jpeg_dir)
    with Restore(path, content), pytest.raises(ImageDecodeError, match=re.escape(str(path))) as info:
        _anchors_of(_loader(paths, "raise"))
    assert info.value.paths == [str(path)]


def test_dali_only_decode_failure_is_skipped(jpeg_dir):
    paths, _ = jpeg_dir
    path, content = _dht_flipped(jpeg_dir, which=1)
    with Restore(path, content):
        loader = _loader(paths, "skip")
        anchors = _anchors_of(loader)
    assert set(loader.skipped) == {0} and loader.skipped_anchors == 1
    assert anchors == [1, 2, 3, 4, 5]  # anchor 0 is lost; anchor 5 (whose partner is 0) mixes with itself
