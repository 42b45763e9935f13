"""``mixnn audit`` through the command line, as the README shows it.

Two tiny finished runs (CE and MixNN on scikit-learn's digits, trained once for the module):

- ``mixnn audit FOLDER_OF_RUNS`` prints precision, recall, F1 and AUROC of ours beside
  cleanlab's, and rewrites each run's audit.json, label_issues.csv (most likely wrong first,
  the clean probabilities named for the labels they are measured against) and report.html,
  and the folder's comparison page;
- ``--no-reference`` leaves cleanlab out; without cleanlab installed the command says to use it;
- mistakes (a folder that is not a run, a missing path, a damaged record, --folds 1) exit with
  code 2 and one line on stderr, no traceback, and nothing written anywhere.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mixnn_fast.audit.issues import read_issues_csv

REPO = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "mixnn"  # the console script the README runs

# seconds, not minutes: 400 digits, 3 epochs (warm-up 1, label correction from epoch 2)
TINY = ["--dataset", "digits", "--train-subset", "400", "--noise-rate", "0.4", "--model-widths", "8", "16", "16", "16",
        "--batch-size", "64", "--epochs", "3", "--warmup-epochs", "1", "--correction-start", "2",
        "--restart-period", "1", "--num-threads", "1", "--no-progress", "--no-tensorboard"]


def mixnn(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "mixnn_fast.app.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("runs")
    for method in ("ce", "mixnn"):
        done = mixnn("train", *TINY, "--method", method, "--out-dir", str(base / method))
        assert done.returncode == 0, done.stderr[-3000:]
    return base


def _one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("mixnn audit: error:"), lines[0]
    return lines[0]


def test_audit_prints_ours_beside_cleanlab_and_rewrites_the_reports(runs):
    done = mixnn("audit", str(runs))
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert re.search(r"precision\s+recall\s+F1\s+AUROC", out)
    for name in ("ce", "mixnn"):
        result = json.loads((runs / name / "audit.json").read_text())
        assert set(result["methods"]) == {"ours", "cleanlab"}
        for row in result["methods"].values():
            assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1 and 0 <= row["auroc"] <= 1
            assert row["wrong"] > 0 and row["samples"] == 400
        # the printed table carries the same numbers
        ours = result["methods"]["ours"]
        assert re.search(rf"^ours\s+{ours['precision']:.3f}\s+{ours['recall']:.3f}\s+{ours['f1']:.3f}\s+"
                         rf"{ours['auroc']:.3f}", out, re.M)
    # cleanlab's side depends on the labels and images only: computed once, the same for both runs
    a, b = (json.loads((runs / n / "audit.json").read_text())["methods"]["cleanlab"] for n in ("ce", "mixnn"))
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    assert done.stderr.count("cleanlab on 5-fold") == 1

    for name, corrects in (("ce", False), ("mixnn", True)):
        issues = read_issues_csv(runs / name / "label_issues.csv")
        assert np.all(np.diff(issues["score"]) <= 0)  # most likely wrong first
        assert len(issues["sample_id"]) == 400 and sorted(issues["sample_id"]) == list(range(400))
        for column in ("score", "is_label_issue", "suggested_label", "suggested_confidence", "given_label",
                       "clean_prob_given_labels", "true_label", "given_label_wrong"):
            assert column in issues, (name, column)
        assert ("clean_prob_current_labels" in issues) == corrects, name
        page = (runs / name / "report.html").read_text()
        assert "cleanlab" in page and "suspected label errors" in page
        _self_contained(page)
    comparison = (runs / "report.html").read_text()
    assert "ours (ce)" in comparison and "ours (mixnn)" in comparison and "cleanlab" in comparison
    _self_contained(comparison)


def _self_contained(page: str) -> None:
    sources = re.findall(r"""(?:src|href)=['"]([^'"]*)['"]""", page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources), sources[:3]
    assert "http://" not in page and "https://" not in page and "<script" not in page


def test_no_reference_audits_ours_alone(runs):
    done = mixnn("audit", str(runs / "ce"), "--no-reference")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cleanlab" not in done.stdout and re.search(r"^ours\s+\d", done.stdout, re.M)
    default = json.loads((runs / "ce" / "audit.json").read_text())
    assert set(default["methods"]) == {"ours"} and default["rule"] == "class_threshold"
    # --rule argmax flags every label another class beats: a superset of the default's flags
    done = mixnn("audit", str(runs / "ce"), "--no-reference", "--rule", "argmax")
    assert done.returncode == 0, done.stderr[-3000:]
    argmax = json.loads((runs / "ce" / "audit.json").read_text())
    assert argmax["rule"] == "argmax" and argmax["flagged"] >= default["flagged"]
    assert "rule: argmax" in (runs / "ce" / "report.html").read_text()
    flags = read_issues_csv(runs / "ce" / "label_issues.csv")
    assert flags["is_label_issue"].sum() == argmax["flagged"]


def test_without_cleanlab_the_message_suggests_no_reference(runs, tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    # a cleanlab that cannot be imported, as on a machine without it
    (shim / "cleanlab.py").write_text("raise ImportError(\"No module named 'cleanlab'\")\n")
    before = _digest(runs)
    line = _one_line_error(mixnn("audit", str(runs), env={"PYTHONPATH": str(shim)}))
    assert "cleanlab" in line and "--no-reference" in line and "pip install" in line
    assert _digest(runs) == before


def test_a_folder_that_is_not_a_run_is_refused_and_nothing_is_written(runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a run")
    before = _digest(runs), _digest(tmp_path)
    for args in ([str(empty)], [str(runs / "ce"), str(empty)]):  # a good run beside a bad folder: neither is touched
        line = _one_line_error(mixnn("audit", *args))
        assert "holds no finished run" in line, line
    # more kinds of wrong path, through the same entry point in this process (a new one costs seconds)
    from mixnn_fast.app.cli import main

    for args in ([str(other)], [str(tmp_path / "missing")], [str(other / "notes.txt")]):
        capsys.readouterr()
        code = main(["audit", *args])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and "holds no finished run" in err, (args, err)
    assert (_digest(runs), _digest(tmp_path)) == before


def test_a_damaged_record_is_named(runs, tmp_path):
    import shutil

    run = tmp_path / "ce"
    shutil.copytree(runs / "ce", run)
    (run / "label_record.npz").write_bytes((runs / "ce" / "label_record.npz").read_bytes()[:300])
    before = _digest(tmp_path)
    line = _one_line_error(mixnn("audit", str(run), "--no-reference"))
    assert "label_record.npz" in line and "not a readable label record" in line
    assert _digest(tmp_path) == before


@pytest.mark.parametrize("field", ["corrected", "target_given", "true"])
def test_a_record_with_arrays_of_different_lengths_is_named(runs, tmp_path, field):
    import shutil

    run = tmp_path / "ce"
    shutil.copytree(runs / "ce", run)
    with np.load(run / "label_record.npz") as f:
        arrays = {k: f[k] for k in f.files}
    arrays[field] = arrays[field][:-3]  # a copy cut short in one array: still a valid .npz
    np.savez(run / "label_record.npz", **arrays)
    before = _digest(tmp_path)
    line = _one_line_error(mixnn("audit", str(run), "--no-reference"))
    assert "label_record.npz" in line and "different lengths" in line and field in line, line
    assert _digest(tmp_path) == before


def test_bad_folds_are_refused(runs):
    before = _digest(runs)
    line = _one_line_error(mixnn("audit", str(runs / "ce"), "--folds", "1"))
    assert "--folds" in line
    assert _digest(runs) == before
