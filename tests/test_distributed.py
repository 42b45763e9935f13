"""Several processes under torchrun, on the CPU with gloo: the refresh they share equals the
one-process refresh; a 2-process run trains end to end and writes one set of outputs; a 2-process
run killed with SIGKILL resumes and ends where the uninterrupted one does; a 2-process MixNN+ run
reports the last corrections a one-process rebuild of it reports."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mixnn_fast.train.checkpoint import CheckpointError, load_checkpoint
from mixnn_fast.train.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

# one thread per process: two processes on two cores, and the same arithmetic as one process with one thread
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests") + os.pathsep + os.environ.get(
    "PYTHONPATH", "")}
TINY = ["--dataset", "digits", "--noise-rate", "0.4", "--model-widths", "8", "16", "16", "16", "--batch-size", "64",
        "--epochs", "4", "--warmup-epochs", "1", "--correction-start", "2", "--restart-period", "2",
        "--num-threads", "1", "--no-progress", "--neighbour-backend", "exact"]


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def run(command: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def test_two_process_refresh_equals_the_one_process_refresh(tmp_path):
    script = str(REPO / "tests" / "distributed_refresh.py")
    run([sys.executable, script, str(tmp_path / "one.pt")])
    run(torchrun(script, str(tmp_path / "two.pt")))
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one.keys() == two.keys()
    for name in one:
        # each sample's forward pass sees the same batch in both runs (shards are whole batches),
        # one thread each: the same arithmetic, so the same bits
        assert torch.equal(one[name], two[name]), name


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()
                  and "tensorboard" not in p.parts)


def test_two_process_run_trains_and_writes_one_set_of_outputs(tmp_path):
    single, double = tmp_path / "one", tmp_path / "two"
    run([sys.executable, "-m", "mixnn_fast", "train", *TINY, "--out-dir", str(single)])
    result = run(torchrun("-m", "mixnn_fast", "train", *TINY, "--out-dir", str(double)))
    assert result.stdout.count('"final_test_accuracy"') == 1  # one summary printed, by rank 0
    assert _files(double) == _files(single)
    rows = read_metrics(double)
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]  # each epoch logged once
    assert [r["phase"] for r in rows] == ["plain", "mixnn", "mixnn", "mixnn"]
    summary = json.loads((double / "summary.json").read_text())
    assert summary["best_test_accuracy"] > 0.3  # it learnt (10 classes)
    # both processes trained: the epoch's images were seen once between them
    assert rows[0]["images_per_second"] > 0 and summary["epochs"] == 4


def _checkpoint_after(epoch: int, batch: int = 0):
    def ready(out: Path) -> bool:
        try:
            position = load_checkpoint(out)["position"]
        except (FileNotFoundError, CheckpointError, OSError):
            return False
        return (position["epoch"], position["batch"]) >= (epoch, batch)
    return ready


def test_two_process_run_killed_and_resumed_ends_as_the_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(torchrun("-m", "mixnn_fast", "train", *TINY, "--out-dir", str(straight)))
    command = torchrun("-m", "mixnn_fast", "train", *TINY, "--out-dir", str(killed), "--checkpoint-every-steps", "4")
    process = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    ready = _checkpoint_after(2, 1)  # inside epoch 2, after a refresh
    deadline = time.monotonic() + 300
    while not ready(killed):
        assert process.poll() is None, f"the run ended before it could be killed:\n{process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "the run did not reach the kill point"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # torchrun and both workers, at once
    process.wait()
    run(torchrun("-m", "mixnn_fast", "train", "--out-dir", str(killed), "--resume"))
    timing = ("_seconds", "images_per_second", "loader_wait_fraction")
    comparable = [{k: v for k, v in r.items() if not k.endswith(timing)} for r in read_metrics(killed)]
    expected = [{k: v for k, v in r.items() if not k.endswith(timing)} for r in read_metrics(straight)]
    assert comparable == expected


def test_two_process_run_survives_batches_skipped_whole_on_one_rank(tmp_path):
    """With ``--on-error skip`` and one image per batch, each corrupt image removes a whole batch
    from the rank that drew it: three corrupt images leave the two ranks with different numbers
    of batches in every epoch.  The run must neither hang nor fail (the short rank takes
    gradient-free steps in their place, so every rank makes the same optimiser steps)."""
    from fixtures import make_jpeg_folder

    train = make_jpeg_folder(tmp_path / "train", n_per_class=8, size=24, num_classes=2)
    test = make_jpeg_folder(tmp_path / "test", n_per_class=3, size=24, num_classes=2, seed=1)
    bad = [train.paths[i] for i in (1, 6, 12)]
    for path in bad:
        Path(path).write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)  # a JPEG header, then garbage
    out = tmp_path / "run"
    command = torchrun("-m", "mixnn_fast", "train", "--dataset", "image_folder", "--data-root", str(train.root),
                       "--test-root", str(test.root), "--noise", "none", "--method", "mixnn", "--epochs", "3",
                       "--warmup-epochs", "1", "--correction-start", "2", "--restart-period", "1",
                       "--batch-size", "1", "--model-widths", "4", "8", "8", "8", "--no-progress",
                       "--no-tensorboard", "--num-threads", "1", "--on-error", "skip", "--out-dir", str(out))
    process = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and both workers
        process.wait()
        raise AssertionError("the 2-process run hung on uneven batch counts") from None
    assert process.returncode == 0, stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["skipped_images"] == 3
    assert sorted(summary["skipped_files"]) == sorted(bad)
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == [0, 1, 2] and all(r["skipped_images"] == 3 for r in rows)


PLUS_SYMMETRIC = ["--dataset", "digits", "--train-subset", "500", "--noise-rate", "0.4", "--model-widths", "16", "32",
                  "32", "32", "--method", "mixnn_plus", "--epochs", "12", "--warmup-epochs", "4", "--correction-start",
                  "4", "--restart-period", "2", "--batch-size", "16", "--lr", "0.1", "--lr-min", "0.001", "--seed", "5",
                  "--plus-consistent-min-agreement", "0", "--plus-average-last", "0.5", "--plus-average-bn", "symmetric",
                  "--num-threads", "1", "--no-progress", "--neighbour-backend", "exact"]


def test_two_process_mixnn_plus_run_reports_the_last_corrections_one_process_reports(tmp_path):
    """MixNN+'s last correction where the noise looked symmetric scores the pool once more with the
    weight average, a pass every rank must join: the ranks must agree on whether it acts although
    only rank 0 holds the metrics rows it is decided from (so must they on whether the average's
    statistics are recomputed, ``--plus-average-bn symmetric``, at each snapshot).  The run ends, and the same run rebuilt
    in one process reports the same labels."""
    from mixnn_fast.audit.run_folder import RecordArrays
    from mixnn_fast.train.methods import symmetric_share

    out = tmp_path / "two"
    # 20 s here; ranks that disagree wait for each other until the timeout
    run(torchrun("-m", "mixnn_fast", "train", *PLUS_SYMMETRIC, "--out-dir", str(out)), timeout=300)
    assert symmetric_share(read_metrics(out), 4) >= 0.5, "the noise did not look symmetric: the branch is not run"
    summary = json.loads((out / "summary.json").read_text())
    assert "final_corrections" in summary  # the symmetric last correction acted
    two = RecordArrays.load(out / "label_record.npz")
    run([sys.executable, "-m", "mixnn_fast", "train", "--out-dir", str(out), "--resume"])  # no epoch left
    one = RecordArrays.load(out / "label_record.npz")
    assert json.loads((out / "summary.json").read_text())["final_corrections"] == summary["final_corrections"]
    assert (one.corrected == two.corrected).all()
