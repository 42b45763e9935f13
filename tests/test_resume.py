"""Resume, checkpoints and run folders, through the CLI as the README shows it.

- a run killed with SIGKILL at any moment and resumed writes the same metrics.jsonl as an
  uninterrupted run (timings aside);
- ``mixnn train --out-dir X --resume`` continues X with its own settings; flags that would
  change the experiment are refused by name, and nothing in X is written before that;
- ``mixnn evaluate X`` works on runs trained with the default settings;
- checkpoints are loaded with ``weights_only=True`` and checked: a truncated or corrupt one is
  an error naming the file, and the previous one is used only when asked.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mixnn_fast.app.cli import main as mixnn_main
from mixnn_fast.audit.run_folder import RECORD, RecordArrays
from mixnn_fast.train.checkpoint import CHECKPOINT, PREVIOUS, CheckpointError, load_checkpoint
from mixnn_fast.train.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent

# A tiny MixNN run on scikit-learn's digits (1,437 training images, 23 batches of 64 an epoch):
# warm-up, refreshes, label correction from epoch 3, restarts every 2 epochs, random partners
# drawn from the trainer's generator, and augmentation (pad-and-crop + flips) in the loader.
TINY = ["--dataset", "digits", "--noise-rate", "0.4", "--model-widths", "8", "16", "16", "16", "--batch-size", "64",
        "--epochs", "5", "--warmup-epochs", "1", "--correction-start", "3", "--restart-period", "2",
        "--num-threads", "1", "--no-progress"]


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``mixnn ARGS`` in a fresh process, as a user runs it."""
    result = subprocess.run([sys.executable, "-m", "mixnn_fast.app.cli", *args], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check and result.returncode != 0:
        raise AssertionError(f"mixnn {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def _comparable(rows: list[dict]) -> list[dict]:
    """Metrics rows without what depends on the clock."""
    return [{k: v for k, v in row.items() if not (k.endswith("_seconds") or k.endswith("_fraction") and "wait" in k
                                                   or k == "images_per_second")} for row in rows]


def _folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _train_straight(out: Path, *extra: str) -> Path:
    _cli("train", *TINY, *extra, "--out-dir", str(out))
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    return _train_straight(tmp_path_factory.mktemp("resume") / "straight")


@pytest.fixture(scope="module")
def uninterrupted_mixup(tmp_path_factory) -> Path:
    """mixup draws λ and the pairing from the trainer's generator at every step."""
    return _train_straight(tmp_path_factory.mktemp("resume") / "straight_mixup", "--method", "mixup")


def _kill_when(process: subprocess.Popen, out: Path, ready) -> None:
    """SIGKILL ``process`` as soon as ``ready(out)`` holds (polled), or fail if it ends first."""
    deadline = time.monotonic() + 300
    while not ready(out):
        if process.poll() is not None:
            raise AssertionError(f"the run ended before it could be killed:\n{process.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the run did not reach the kill point in 300 s")
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()


def _checkpoint_inside_epoch(epoch: int):
    def ready(out: Path) -> bool:
        try:
            position = load_checkpoint(out)["position"]
        except (FileNotFoundError, CheckpointError, OSError):
            return False
        return position["epoch"] >= epoch and position["batch"] > 0
    return ready


@pytest.fixture(scope="module")
def uninterrupted_plus(tmp_path_factory) -> Path:
    """MixNN+ with the freeze after one agreement, the stability gate at two refreshes and ELR:
    the counts of epoch 3's refresh decide which targets epoch 4's refresh may correct, and every
    refresh moves ELR's running averages, which every later step's loss reads, so a resume that
    lost any of them would differ.  The gate's threshold lies between the share of predictions
    that agree with the given labels at refresh 2 (0.30 where this was written) and refresh 3 (0.32):
    refresh 3 corrects without the gate, refresh 4 with it, which a resume inside epoch 3 must
    read from the checkpoint.  The weights are averaged at the ends of epochs 1 and 3 (the
    warm restarts within the last 0.9 of five epochs) and the average is tested at epoch 4: a
    resume inside epoch 3 that lost the first snapshot would test a different model."""
    return _train_straight(tmp_path_factory.mktemp("resume") / "straight_plus", *PLUS)


PLUS = ("--method", "mixnn_plus", "--plus-freeze", "1", "--plus-consistent", "2", "--plus-consistent-min-agreement",
        "0.31", "--plus-elr", "3", "--plus-average-last", "0.9")
KILLED_RUNS = {"mixnn": ("uninterrupted", ("--method", "mixnn")), "mixup": ("uninterrupted_mixup", ("--method", "mixup")),
               "mixnn_plus": ("uninterrupted_plus", PLUS)}


@pytest.mark.slow
@pytest.mark.parametrize("method,kill_in_epoch", [("mixnn", 4), ("mixup", 2), ("mixnn_plus", 3)])
def test_sigkill_and_resume_gives_the_uninterrupted_metrics(tmp_path, request, method, kill_in_epoch):
    fixture, flags = KILLED_RUNS[method]
    uninterrupted = request.getfixturevalue(fixture)
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "mixnn_fast.app.cli", "train", *TINY, *flags, "--out-dir", str(out),
               "--checkpoint-every-steps", "5"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    _kill_when(process, out, _checkpoint_inside_epoch(kill_in_epoch))
    killed_at = load_checkpoint(out)["position"]
    assert killed_at["batch"] > 0  # the kill came inside an epoch, after a mid-epoch checkpoint
    _cli("train", "--out-dir", str(out), "--resume")  # the README's command: no other flag
    resumed, straight = read_metrics(out), read_metrics(uninterrupted)
    assert [r["epoch"] for r in resumed] == list(range(5))
    assert _comparable(resumed) == _comparable(straight)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_test_accuracy"] == json.loads((uninterrupted / "summary.json").read_text())[
        "final_test_accuracy"]


@pytest.mark.slow
def test_sigkill_between_epochs_and_resume_with_more_epochs(tmp_path, uninterrupted):
    """Killed right after an epoch's checkpoint, resumed asking for more epochs: the first five
    epochs equal the uninterrupted run's."""
    out = tmp_path / "extended"
    command = [sys.executable, "-m", "mixnn_fast.app.cli", "train", *TINY, "--out-dir", str(out)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})

    def after_epoch_two(folder: Path) -> bool:
        try:
            return load_checkpoint(folder)["position"]["epoch"] >= 2
        except (FileNotFoundError, CheckpointError, OSError):
            return False

    _kill_when(process, out, after_epoch_two)
    _cli("train", "--out-dir", str(out), "--resume", "--epochs", "6")
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == list(range(6))
    assert _comparable(rows[:4]) == _comparable(read_metrics(uninterrupted)[:4])


def test_resume_refuses_settings_that_change_the_experiment_and_writes_nothing(uninterrupted, capsys):
    before = _folder_digest(uninterrupted)
    code = mixnn_main(["train", "--out-dir", str(uninterrupted), "--resume", "--method", "ce", "--lr", "0.1",
                       "--epochs", "7"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--method 'ce'" in err and "--lr 0.1" in err and "traceback" not in err.lower()
    assert _folder_digest(uninterrupted) == before  # config.yaml included


def test_resume_accepts_the_run_own_settings_restated(uninterrupted, capsys):
    """Restating the run's settings (the full original command plus --resume) is fine: nothing
    changes, and a finished run with the same epochs trains nothing more."""
    before = read_metrics(uninterrupted)
    assert mixnn_main(["train", *TINY, "--out-dir", str(uninterrupted), "--resume"]) == 0
    assert read_metrics(uninterrupted) == before


def test_train_without_resume_does_not_wipe_a_run(uninterrupted, capsys):
    before = _folder_digest(uninterrupted)
    assert mixnn_main(["train", *TINY, "--out-dir", str(uninterrupted)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert _folder_digest(uninterrupted) == before


def test_evaluate_a_run_trained_with_default_reporting(uninterrupted, capsys):
    """The README's ``mixnn evaluate runs/X``: TensorBoard and progress were on (the defaults)
    while training; evaluating depends on neither, and writes nothing."""
    before = _folder_digest(uninterrupted)
    assert mixnn_main(["evaluate", str(uninterrupted), "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["epochs_trained"] == 5
    assert result["test_accuracy"] == pytest.approx(read_metrics(uninterrupted)[-1]["test_accuracy"], abs=0)
    assert _folder_digest(uninterrupted) == before


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_checkpoint_is_named_and_previous_is_used_only_when_asked(tmp_path, uninterrupted, capsys):
    run = _copy_run(uninterrupted, tmp_path / "run")
    assert (run / PREVIOUS).exists()  # every save keeps the one it replaces
    data = (run / CHECKPOINT).read_bytes()
    (run / CHECKPOINT).write_bytes(data[: len(data) // 2])
    before = _folder_digest(run)
    assert mixnn_main(["train", "--out-dir", str(run), "--resume", "--epochs", "6"]) == 2
    err = capsys.readouterr().err
    assert str(run / CHECKPOINT) in err and "truncated" in err and "--resume-from-previous" in err
    assert _folder_digest(run) == before
    assert mixnn_main(["evaluate", str(run)]) == 2
    assert str(run / CHECKPOINT) in capsys.readouterr().err
    assert mixnn_main(["train", "--out-dir", str(run), "--resume-from-previous", "--epochs", "6"]) == 0
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == list(range(6))


def test_flipped_bit_inside_a_tensor_is_detected(tmp_path, uninterrupted):
    run = _copy_run(uninterrupted, tmp_path / "run")
    data = bytearray((run / CHECKPOINT).read_bytes())
    state = load_checkpoint(run)
    # find the bytes of the largest tensor (the soft targets or a weight) and flip one bit in it
    weights = state["modules"]["targets"]["targets"].numpy().tobytes()
    at = bytes(data).find(weights[:64])
    assert at > 0
    data[at + 17] ^= 0x04
    (run / CHECKPOINT).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(run)


def test_checkpoints_open_with_weights_only(uninterrupted):
    state = torch.load(uninterrupted / CHECKPOINT, weights_only=True)  # refuses arbitrary objects
    assert state["format"] == 3 and state["state"]["position"] == {"epoch": 5, "batch": 0}


def test_no_checkpoint_is_ever_loaded_with_weights_only_false():
    offenders = []
    for path in (REPO / "mixnn_fast").rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if "weights_only=" + "False" in line.replace(" ", ""):  # spelt so that grep finds no such call
                offenders.append(f"{path.relative_to(REPO)}:{number}")
    assert not offenders, offenders


def test_a_foreign_pickle_is_refused_without_running_it(tmp_path):
    """A checkpoint.pt that would run code when unpickled is refused by name."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    run = tmp_path / "run"
    run.mkdir()
    torch.save({"format": 3, "sha256": "", "state": Evil()}, run / CHECKPOINT, pickle_module=pickle)
    with pytest.raises(CheckpointError, match=str(run / CHECKPOINT)):
        load_checkpoint(run)
    assert not (tmp_path / "pwned").exists()


def test_resume_needs_a_run(tmp_path, capsys):
    assert mixnn_main(["train", "--out-dir", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "holds no run" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


def test_bench_accepts_only_listed_benchmarks(capsys):
    from mixnn_fast.app.cli import BENCHMARKS

    assert sorted(BENCHMARKS) == sorted(p.stem for p in (REPO / "bench").glob("*.py") if p.stem != "common")
    assert mixnn_main(["bench", "../setup"]) == 2
    assert "no benchmark" in capsys.readouterr().err


def test_a_save_interrupted_at_any_step_leaves_a_complete_checkpoint(tmp_path, monkeypatch):
    """write_atomic's steps (temporary file, keeping the previous one, the final rename) fail one
    at a time: checkpoint.pt is always there, whole, with the old or the new content."""
    from mixnn_fast.train import atomic

    target, previous = tmp_path / "checkpoint.pt", tmp_path / "checkpoint.prev.pt"
    atomic.write_atomic(target, b"old", keep_previous=previous)
    real_replace = os.replace
    for failing_call in (1, 2):
        calls = []

        def replace(src, dst, calls=calls, failing_call=failing_call):
            calls.append(dst)
            if len(calls) == failing_call:
                raise OSError("power cut")
            return real_replace(src, dst)

        monkeypatch.setattr(atomic.os, "replace", replace)
        with pytest.raises(OSError, match="power cut"):
            atomic.write_atomic(target, b"new", keep_previous=previous)
        monkeypatch.setattr(atomic.os, "replace", real_replace)
        assert target.read_bytes() == b"old"
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    atomic.write_atomic(target, b"new", keep_previous=previous)
    assert target.read_bytes() == b"new" and previous.read_bytes() == b"old"


@pytest.mark.slow
def test_resuming_a_finished_run_reports_the_labels_it_reported(tmp_path, uninterrupted_plus):
    """``mixnn train --out-dir X --resume`` on a run that has trained all its epochs makes no
    refresh; its report must still read the last refresh's clean probabilities and the soft
    targets from the checkpoint, not take the model's predictions as a baseline's.  With
    ``--plus-final-correction`` (a setting a resume may change) it reports the last correction."""
    out = tmp_path / "finished"
    shutil.copytree(uninterrupted_plus, out, ignore=shutil.ignore_patterns("*.lock"))
    before = json.loads((out / "summary.json").read_text())
    record = RecordArrays.load(out / RECORD)
    _cli("train", "--out-dir", str(out), "--resume")
    after = json.loads((out / "summary.json").read_text())
    resumed = RecordArrays.load(out / RECORD)
    assert after["label_accuracy_after_correction"] == before["label_accuracy_after_correction"]
    np.testing.assert_array_equal(resumed.corrected, record.corrected)
    np.testing.assert_allclose(resumed.clean_prob, record.clean_prob, rtol=1e-6)  # kept as float32
    assert after.get("final_corrections") == before.get("final_corrections")
    # the soft targets' argmax alone, then the last correction of every run against it
    _cli("train", "--out-dir", str(out), "--resume", "--plus-final-correction", "off",
         "--no-plus-final-correction-symmetric")
    assert "final_corrections" not in json.loads((out / "summary.json").read_text())
    plain = RecordArrays.load(out / RECORD)
    _cli("train", "--out-dir", str(out), "--resume", "--plus-final-correction", "always",
         "--no-plus-final-correction-symmetric")
    last = json.loads((out / "summary.json").read_text())
    relabelled = RecordArrays.load(out / RECORD)
    changed = relabelled.corrected != plain.corrected
    assert last["final_corrections"] == int(changed.sum())
    np.testing.assert_array_equal(relabelled.corrected[changed], relabelled.predicted[changed])
