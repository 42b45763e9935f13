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


def test_the_folder_stays_locked_until_the_report_is_written(tmp_path):
    """fit(keep_lock=True), as the CLI and the table call it, keeps the lock, so nothing can start
    in the folder between training and the report; release_run_folder() (or close()) lets the
    next writer in; a failed fit frees it; a plain fit() frees it when it returns."""
    from mixnn_fast.train.run_lock import try_lock

    cfg = TrainConfig(dataset="digits", train_subset=200, model_widths=[4, 8, 8, 8], epochs=1, warmup_epochs=1,
                      num_threads=1, progress=False, tensorboard=False, out_dir=str(tmp_path / "run"))
    trainer = Trainer(cfg)
    trainer.fit(keep_lock=True)
    assert try_lock(tmp_path / "run" / LOCK) is None  # still this trainer's
    trainer.release_run_folder()
    handle = try_lock(tmp_path / "run" / LOCK)
    assert handle is not None
    handle.close()

    failing = Trainer(TrainConfig.from_dict({**cfg.to_dict(), "epochs": 2}), overwrite=True)
    failing.train_epoch = lambda epoch: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        failing.fit(keep_lock=True)
    handle = try_lock(tmp_path / "run" / LOCK)
    assert handle is not None  # released by the failure
    handle.close()

    plain = Trainer(cfg, overwrite=True)
    plain.fit()
    handle = try_lock(tmp_path / "run" / LOCK)
    assert handle is not None  # the Python API's plain fit() leaves the folder free
    handle.close()
