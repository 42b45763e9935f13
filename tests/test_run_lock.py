"""One writer per run folder: a second process training into a folder that is being written
stops with a clear error and writes nothing; the lock dies with its holder, even on kill -9."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mixnn_fast.train.config import TrainConfig
from mixnn_fast.train.run_lock import LOCK, RunFolderBusy, lock_run_folder
from mixnn_fast.train.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
TINY = ["--dataset", "digits", "--train-subset", "200", "--model-widths", "4", "8", "8", "8", "--epochs", "1",
        "--warmup-epochs", "1", "--num-threads", "1", "--no-progress", "--no-tensorboard"]


def _contents(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_a_second_trainer_on_a_folder_being_written_stops_before_writing(tmp_path):
    cfg = TrainConfig(dataset="digits", train_subset=200, model_widths=[4, 8, 8, 8], epochs=1, warmup_epochs=1,
                      num_threads=1, progress=False, tensorboard=False, out_dir=str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    holder = lock_run_folder(tmp_path / "run")
    try:
        with pytest.raises(RunFolderBusy, match=r"run is being written by another process"):
            Trainer(cfg).fit()
        assert _contents(tmp_path / "run") == {LOCK}  # no config.yaml, no metrics
    finally:
        holder.close()
    Trainer(cfg).fit()  # released: the same folder trains
    assert {"config.yaml", "metrics.jsonl", "checkpoint.pt"} <= _contents(tmp_path / "run")


def test_the_cli_refuses_a_folder_another_process_writes(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = lock_run_folder(out)
    try:
        result = subprocess.run([sys.executable, "-m", "mixnn_fast", "train", *TINY, "--out-dir", str(out)],
                                capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        holder.close()
    assert result.returncode == 2, result.stderr[-2000:]
    assert "is being written by another process" in result.stderr and "Traceback" not in result.stderr
    assert _contents(out) == {LOCK}


def test_the_lock_dies_with_a_killed_holder(tmp_path):
    code = ("import sys, time; from mixnn_fast.train.run_lock import lock_run_folder; "
            "h = lock_run_folder(sys.argv[1]); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=str(tmp_path)):
            lock_run_folder(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    deadline = time.monotonic() + 10
    while True:  # the kernel releases the lock as the process's files close
        try:
            lock_run_folder(tmp_path).close()
            break
        except RunFolderBusy:
            assert time.monotonic() < deadline, "the lock outlived its killed holder"
            time.sleep(0.05)
