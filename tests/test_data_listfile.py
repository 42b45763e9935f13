"""The shared list-file parser: round trips (property-based) and every error naming file and line."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixnn_fast.data.listfile import (
    ListFileError,
    check_images_exist,
    check_label_range,
    read_names,
    read_path_label_list,
    read_path_list,
    resolve,
    resolve_entries,
)

# Paths as people write them: any printable text, spaces inside allowed, no line breaks and
# no leading/trailing whitespace (which a line-oriented format cannot preserve).
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
paths = st.text(
    st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters=_LINE_BREAKS + "\ufeff"),
    min_size=1, max_size=30,
).filter(lambda s: s.strip() == s and s != "")
labels = st.integers(min_value=0, max_value=10**6)
entries = st.lists(st.tuples(paths, labels), max_size=20)
fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@fixture_ok
@given(entries=entries, crlf=st.booleans(), blank_every=st.integers(0, 4))
def test_path_label_round_trip(tmp_path, entries, crlf, blank_every):
    newline = "\r\n" if crlf else "\n"
    lines, expected_numbers = [], []
    for k, (path, label) in enumerate(entries):
        if blank_every and k % blank_every == 0:
            lines.append("   ")  # blank lines are skipped but still counted
        lines.append(f"{path} {label}")
        expected_numbers.append(len(lines))
    file = tmp_path / "list.txt"
    file.write_bytes(newline.join(lines).encode("utf-8"))
    parsed = read_path_label_list(file)
    assert parsed.paths == [p for p, _ in entries]
    assert parsed.labels.dtype == np.int64
    assert parsed.labels.tolist() == [y for _, y in entries]
    assert parsed.line_numbers.tolist() == expected_numbers


@fixture_ok
@given(entries=st.lists(st.tuples(paths, labels), min_size=1, max_size=12), data=st.data())
def test_a_broken_line_is_reported_with_its_number(tmp_path, entries, data):
    broken = data.draw(st.integers(0, len(entries) - 1))
    bad_label = data.draw(st.sampled_from(["", "x", "-1", "+3", "3_0", "1.5", "٣", "0x1"]))
    lines = [f"{p} {y}" for p, y in entries]
    path, _ = entries[broken]
    # Without whitespace inside, the path cannot itself supply a (valid) last field.
    solid_path = "".join("_" if c.isspace() else c for c in path)
    lines[broken] = f"{solid_path} {bad_label}".rstrip()
    file = tmp_path / "broken.txt"
    file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ListFileError, match=re.escape(f"{file}, line {broken + 1}:")):
        read_path_label_list(file)


def test_error_messages_say_what_is_wrong(tmp_path):
    file = tmp_path / "l.txt"
    file.write_text("a.jpg 1\nb.jpg -4\n")
    with pytest.raises(ListFileError, match=r"line 2: label -4 is negative"):
        read_path_label_list(file)
    file.write_text("a.jpg 1\nonly_a_path.jpg\n")
    with pytest.raises(ListFileError, match=r"line 2: expected 'path label'"):
        read_path_label_list(file)
    file.write_bytes(b"a.jpg 1\n\xff\xfe.jpg 2\n")
    with pytest.raises(ListFileError, match=r"line 2: not valid UTF-8"):
        read_path_label_list(file)


def test_errors_are_value_errors_and_missing_files_are_named(tmp_path):
    assert issubclass(ListFileError, ValueError)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "absent.txt"))):
        read_path_label_list(tmp_path / "absent.txt")
    with pytest.raises(FileNotFoundError, match="not a regular file"):
        read_path_list(tmp_path)


def test_bom_and_spaces_in_paths(tmp_path):
    file = tmp_path / "l.txt"
    file.write_bytes("\ufeffdir one/a b.jpg   7\n\n  c.jpg\t0  \n".encode("utf-8"))
    parsed = read_path_label_list(file)
    assert parsed.paths == ["dir one/a b.jpg", "c.jpg"]
    assert parsed.labels.tolist() == [7, 0]
    assert parsed.line_numbers.tolist() == [1, 3]


def test_path_list_rejects_extra_fields(tmp_path):
    file = tmp_path / "keys.txt"
    file.write_text("images/0/a.jpg\nimages/0/b.jpg 3\n")
    with pytest.raises(ListFileError, match=r"line 2: expected one path"):
        read_path_list(file)
    file.write_text("images/0/a.jpg\n\nimages/0/b.jpg\n")
    parsed = read_path_list(file)
    assert parsed.labels is None and parsed.paths == ["images/0/a.jpg", "images/0/b.jpg"]
    assert parsed.line_numbers.tolist() == [1, 3]


@fixture_ok
@given(labels=st.lists(st.integers(0, 30), min_size=1, max_size=40), num_classes=st.integers(1, 31))
def test_label_range_names_the_first_offending_line(tmp_path, labels, num_classes):
    file = tmp_path / "l.txt"
    file.write_text("".join(f"p{i}.jpg {y}\n" for i, y in enumerate(labels)))
    parsed = read_path_label_list(file)
    offending = [i for i, y in enumerate(labels) if y >= num_classes]
    if not offending:
        check_label_range(parsed, num_classes)
        return
    with pytest.raises(ListFileError, match=re.escape(f"{file}, line {offending[0] + 1}: label {labels[offending[0]]} ")):
        check_label_range(parsed, num_classes)


def test_missing_image_names_list_line_and_path(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    file = tmp_path / "l.txt"
    file.write_text("a.jpg 0\n\nmissing.jpg 1\nalso_missing.jpg 1\n")
    parsed = read_path_label_list(file)
    absolute = resolve(str(tmp_path), parsed.paths)
    with pytest.raises(FileNotFoundError, match=r"line 3: image 'missing.jpg' not found .*\(1 more missing\)"):
        check_images_exist(parsed, absolute)
    check_images_exist(parsed.select(np.array([True, False, False])), absolute[:1])


def test_select_keeps_line_numbers(tmp_path):
    file = tmp_path / "l.txt"
    file.write_text("a 0\nb 5\nc 1\n")
    parsed = read_path_label_list(file)
    kept = parsed.select(parsed.labels < 2)
    assert kept.paths == ["a", "c"] and kept.line_numbers.tolist() == [1, 3]
    assert kept.where(1) == f"{file}, line 3"


def test_read_names(tmp_path):
    file = tmp_path / "names.txt"
    file.write_text("T-Shirt\r\nShirt\r\n\r\n")
    assert read_names(file) == ["T-Shirt", "Shirt"]


# --------------------------------------------------------------------------- paths outside the root


def _one_entry(tmp_path, path: str, *, blank_lines: int = 2):
    """A list file holding ``path`` on line ``blank_lines + 2`` after one ordinary entry."""
    file = tmp_path / "l.txt"
    file.write_text("ok.jpg 0\n" + "\n" * blank_lines + f"{path} 1\n", encoding="utf-8")
    return file, read_path_label_list(file), blank_lines + 2


@pytest.mark.parametrize("entry, problem", [
    ("../x.jpg", "outside the dataset root"),
    ("../../etc/passwd", "outside the dataset root"),
    ("a/../../x.jpg", "outside the dataset root"),          # nested: only normpath shows it leaves
    ("a/b/../../../root_sibling/x.jpg", "outside the dataset root"),
    ("/etc/passwd", "outside the dataset root"),           # absolute, elsewhere
    ("//etc/passwd", "outside the dataset root"),          # POSIX keeps a leading "//"
    (".", "the dataset root .* itself"),
    ("a/..", "the dataset root .* itself"),
    ("./", "the dataset root .* itself"),
])
def test_paths_leaving_the_root_name_file_and_line(tmp_path, entry, problem):
    root = tmp_path / "data"
    root.mkdir()
    file, entries, line = _one_entry(tmp_path, entry)
    with pytest.raises(ListFileError, match=re.escape(f"{file}, line {line}: path {entry!r} resolves to ") + ".*" + problem) as info:
        resolve_entries(root, entries)
    assert "allow_outside_root=True" in str(info.value)
    # the opt-in returns the normalised path, wherever it is
    opted = resolve_entries(root, entries, allow_outside_root=True)
    assert opted == [str(root / "ok.jpg"), os.path.normpath(os.path.join(root, entry))]


def test_root_given_with_dots_or_trailing_separator(tmp_path):
    (tmp_path / "data").mkdir()
    file, entries, _ = _one_entry(tmp_path, "sub/x.jpg")
    for root in (f"{tmp_path}/data/", f"{tmp_path}/other/../data", f"{tmp_path}/data/."):
        assert resolve_entries(root, entries) == [str(tmp_path / "data" / "ok.jpg"), str(tmp_path / "data/sub/x.jpg")]
    # a sibling whose name starts with the root's name is outside it, not inside
    _, entries, line = _one_entry(tmp_path, "../data2/x.jpg")
    with pytest.raises(ListFileError, match=f"line {line}: .*outside the dataset root"):
        resolve_entries(tmp_path / "data", entries)


@pytest.mark.parametrize("entry", [
    "a/../b.jpg",                 # .. that stays inside
    "./a.jpg",
    "a//b.jpg",
    "..foo/x.jpg",                # a name starting with two dots is not a parent reference
    "a\\..\\..\\etc\\passwd",     # backslashes: ordinary name characters on Linux
    "..\\..\\x.jpg",
    "dir with space/..  odd .jpg",
])
def test_paths_inside_the_root_are_accepted(tmp_path, entry):
    root = tmp_path / "data"
    root.mkdir()
    _, entries, _ = _one_entry(tmp_path, entry)
    resolved = resolve_entries(root, entries)[1]
    assert resolved == os.path.normpath(os.path.join(root, entry))
    assert resolved.startswith(str(root) + os.sep)
    if "\\" in entry:  # the whole backslashed string is one file name directly under the root
        assert os.path.dirname(resolved) == str(root) and os.path.basename(resolved) == entry


def test_an_absolute_path_inside_the_root_is_accepted(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    _, entries, _ = _one_entry(tmp_path, f"{root}/sub/x.jpg")
    assert resolve_entries(root, entries)[1] == str(root / "sub" / "x.jpg")
    _, entries, _ = _one_entry(tmp_path, "/anything/at/all.jpg")
    assert resolve_entries("/", entries)[1] == "/anything/at/all.jpg"  # everything is under "/"


def test_symlinks_inside_the_root_are_followed_lexically(tmp_path):
    """The documented choice: the check is on the lexical path, so a symlink farm whose
    links point to another disk still works; what a list line alone cannot do is leave."""
    outside = tmp_path / "big_disk" / "class_a"
    outside.mkdir(parents=True)
    (outside / "img.jpg").write_bytes(b"\xff\xd8\xff")
    root = tmp_path / "data"
    root.mkdir()
    (root / "class_a").symlink_to(outside, target_is_directory=True)
    _, entries, _ = _one_entry(tmp_path, "class_a/img.jpg")
    resolved = resolve_entries(root, entries)
    assert resolved[1] == str(root / "class_a" / "img.jpg")
    check_images_exist(entries.select(np.array([False, True])), resolved[1:])
    # ".." after a link is resolved lexically too: it stays inside root, as written
    _, entries, _ = _one_entry(tmp_path, "class_a/../class_a/img.jpg")
    assert resolve_entries(root, entries)[1] == str(root / "class_a" / "img.jpg")


def test_many_outside_lines_are_counted(tmp_path):
    file = tmp_path / "l.txt"
    file.write_text("a.jpg 0\n../b.jpg 0\n/c.jpg 1\nd/../../e.jpg 2\n")
    with pytest.raises(ListFileError, match=r"line 2: path '\.\./b\.jpg' .* \(2 more lines like it\)"):
        resolve_entries(tmp_path / "root", read_path_label_list(file))


# --------------------------------------------------------------------------- label and path limits


def test_huge_labels_are_reported_with_their_line(tmp_path):
    file = tmp_path / "l.txt"
    for huge in ("9" * 19, "9" * 30, "9" * 5000, str(2**63)):
        file.write_text(f"a.jpg 1\nb.jpg {huge}\n")
        with pytest.raises(ListFileError, match=re.escape(f"{file}, line 2: label ") + ".* is too large") as info:
            read_path_label_list(file)
        assert len(str(info.value)) < 400  # a 5,000-digit label is not copied into the message
    file.write_text(f"a.jpg {2**63 - 1}\nb.jpg 000000000000000000000000000007\n")
    assert read_path_label_list(file).labels.tolist() == [2**63 - 1, 7]


def test_a_nul_byte_in_a_path_is_reported(tmp_path):
    file = tmp_path / "l.txt"
    file.write_bytes(b"a.jpg 0\nb\x00c.jpg 1\n")
    with pytest.raises(ListFileError, match=re.escape(f"{file}, line 2: path ") + ".*NUL byte"):
        read_path_label_list(file)
    file.write_bytes(b"a.jpg\n\nb\x00c.jpg\n")
    with pytest.raises(ListFileError, match=re.escape(f"{file}, line 3: path ") + ".*NUL byte"):
        read_path_list(file)


def test_cr_line_endings_are_reported_not_merged_into_one_entry(tmp_path):
    file = tmp_path / "l.txt"
    file.write_bytes(b"a.jpg 0\rb.jpg 1\rc.jpg 2\r")  # CR-only: one 'line' holding three entries
    with pytest.raises(ListFileError, match=re.escape(f"{file}, line 1: carriage return inside the line")):
        read_path_label_list(file)
    file.write_bytes(b"a.jpg 0\r\nb.jpg 1\r\nc.jpg\r2\n")  # CRLF is fine; a stray CR is not
    with pytest.raises(ListFileError, match=re.escape(f"{file}, line 3: carriage return")):
        read_path_label_list(file)
    file.write_bytes(b"T-Shirt\rShirt\r")
    with pytest.raises(ListFileError, match="line 1: carriage return"):
        read_names(file)
    file.write_bytes(b"keys/a.jpg\r\n\r\nkeys/b.jpg\r\n")
    assert read_path_list(file).paths == ["keys/a.jpg", "keys/b.jpg"]
