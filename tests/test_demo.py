"""The demo (the README's first command) trains CE, MixNN and MixNN+ side by side on the real
Fashion-MNIST at the results table's sym-40 settings cut to 40 epochs, prints the table, and a second run reports the
finished runs again."""
from __future__ import annotations

import pytest

from mixnn_fast.data import fashion_mnist
from mixnn_fast.app.demo import DEMO_EPOCHS, DEMO_METHODS, DEMO_SUBSET, demo_cells, run_demo
from mixnn_fast.app.experiments import table_cells


def _fashion_mnist_installed() -> bool:
    try:
        fashion_mnist(split="test")
    except (FileNotFoundError, ValueError):
        return False
    return True


def test_demo_runs_the_tables_sym40_cells_for_fewer_epochs(tmp_path):
    demo = {m: c.config for m, c in demo_cells(epochs=DEMO_EPOCHS, subset=DEMO_SUBSET, out_dir=str(tmp_path),
                                               progress=False).items()}
    table = {c.method: c.config for c in table_cells(out_dir=tmp_path, seeds=(0,), methods=DEMO_METHODS,
                                                     epochs=DEMO_EPOCHS, plan_pair=False, ablations=False)
             if c.noise == "sym-40"}
    assert set(demo) == set(DEMO_METHODS) == {"ce", "mixnn", "mixnn_plus"}
    assert DEMO_EPOCHS == 40 and DEMO_SUBSET == 2000
    for method in DEMO_METHODS:
        a, b = demo[method].to_dict(), table[method].to_dict()
        assert {k for k in a if a[k] != b[k]} <= {"out_dir", "progress", "eval_every", "warmup_epochs",
                                                  "restart_period"}
        # the table's 60-epoch warm-up and restart period (2), the correction scaled to 40 epochs
        assert (a["warmup_epochs"], a["restart_period"], a["correction_start"]) == (2, 2, 8)
        # tested at every second warm restart: still at the cycle's lowest learning rate
        assert a["eval_every"] == 2 * a["restart_period"]


@pytest.mark.parametrize("epochs", [1, 2, 3, 6, 29, 30, 31, 40, 44, 45, 59, 60, 61, 150, 299, 300, 301, 1000])
def test_demo_schedule_is_the_papers_rounded_up(epochs):
    from fractions import Fraction
    from math import ceil

    from mixnn_fast.app.experiments import scaled_schedule

    exact = {"warmup_epochs": Fraction(10 * epochs, 300), "correction_start": Fraction(60 * epochs, 300),
             "restart_period": Fraction(10 * epochs, 300)}
    floor = {"warmup_epochs": 1, "correction_start": 2, "restart_period": 1}
    assert scaled_schedule(epochs, round_up=True) == {k: max(floor[k], ceil(v)) for k, v in exact.items()}
    if all(v.denominator == 1 for v in exact.values()):  # whole lengths: the table's schedule
        assert scaled_schedule(epochs, round_up=True) == scaled_schedule(epochs)


def test_a_demo_that_ends_inside_a_warm_restart_says_so():
    from mixnn_fast.app.experiments import mid_cycle_note

    def note(epochs):
        return mid_cycle_note(epochs, round_up=True)  # the demo's schedule

    assert note(40) is None and note(60) is None and note(6) is None
    assert "45 epochs is not a multiple of the warm-restart period (2)" in note(45) and "44 or 46 epochs" in note(45)
    assert note(31) is not None and "30 or 32 epochs" in note(31)  # period ceil(31/30) = 2
    assert mid_cycle_note(31) is None  # the table's rounds 31/30 to a period of 1


def test_testing_less_often_trains_the_same_run(tmp_path):
    """The demo tests less often than the table; its runs still end where the table's cells end,
    because testing leaves the model, its targets and every random stream untouched."""
    import dataclasses

    from mixnn_fast.app.experiments import run_cell
    from mixnn_fast.train.metrics import read_metrics

    runs = {}
    for every in (1, 3):
        cell = _tiny_cell(tmp_path / f"every{every}", "mixnn_plus")
        cell = dataclasses.replace(cell, config=dataclasses.replace(cell.config, eval_every=every, num_threads=1))
        runs[every] = (run_cell(cell, log=lambda _: None), cell.config.out_dir)
    (often, often_dir), (rarely, rarely_dir) = runs[1], runs[3]
    assert [r.get("test_accuracy") is not None for r in read_metrics(rarely_dir)] == [False, False, True]
    assert often["final_test_accuracy"] == rarely["final_test_accuracy"]
    assert often["label_accuracy_after_correction"] == rarely["label_accuracy_after_correction"]
    assert _untimed(read_metrics(often_dir), "test_accuracy") == _untimed(read_metrics(rarely_dir), "test_accuracy")


@pytest.mark.skipif(not _fashion_mnist_installed(), reason="Debian's dataset-fashion-mnist is not installed")
def test_quick_demo_trains_once_and_reports_twice(tmp_path, capsys, monkeypatch):
    results = run_demo(epochs=3, subset=300, out_dir=str(tmp_path), progress=False)
    assert set(results) == {"ce", "mixnn", "mixnn_plus"}
    assert all(0 <= r["final_test_accuracy"] <= 1 for r in results.values())
    first = capsys.readouterr().out
    assert "| mixnn |" in first and (tmp_path / "accuracy_by_method.png").stat().st_size > 0
    # one page with both runs' label audits side by side, images inlined
    page = (tmp_path / "report.html").read_text()
    assert "ours (ce)" in page and "ours (mixnn)" in page and "ours (mixnn_plus)" in page and page.count("data:image/png;base64,") >= 5
    assert f"open {tmp_path / 'report.html'}" in first

    class NoTraining:
        def __init__(self, *args, **kwargs):
            raise AssertionError("the demo trained a finished run again")

    monkeypatch.setattr("mixnn_fast.train.trainer.Trainer", NoTraining)
    again = run_demo(epochs=3, subset=300, out_dir=str(tmp_path), progress=False)
    assert {m: r["final_test_accuracy"] for m, r in again.items()} == \
        {m: r["final_test_accuracy"] for m, r in results.items()}


def _untimed(rows: list[dict], *also: str) -> list[dict]:
    """Metrics rows without what differs between two runs of the same training (timings, loader
    waits) and without the keys ``also``."""
    return [{k: v for k, v in r.items() if not k.endswith("_seconds") and k != "images_per_second"
             and "wait" not in k and k not in also} for r in rows]


def _tiny_cell(folder, method: str):
    from mixnn_fast.app.experiments import Cell
    from mixnn_fast.train.config import TrainConfig

    cfg = TrainConfig(dataset="digits", method=method, model_widths=[8, 16, 16, 16], batch_size=64, epochs=3,
                      warmup_epochs=1, correction_start=2, restart_period=1, progress=False, tensorboard=False,
                      out_dir=str(folder / method))
    return Cell(noise="sym-40", method=method, seed=0, config=cfg)


def test_runs_side_by_side_equal_the_same_runs_one_after_another(tmp_path):
    """Two runs trained at once in processes of their own, one thread each, give what each gives
    trained here alone with one thread: same metrics, each under its own method."""
    import dataclasses

    from mixnn_fast.app.demo import train_side_by_side
    from mixnn_fast.app.experiments import run_cell
    from mixnn_fast.train.metrics import read_metrics

    cells = {m: _tiny_cell(tmp_path / "side_by_side", m) for m in ("ce", "mixnn")}
    together = train_side_by_side(cells, progress=False, cores=2)
    assert list(together) == ["ce", "mixnn"]
    for method, cell in cells.items():
        alone_cfg = dataclasses.replace(cell.config, num_threads=1, out_dir=str(tmp_path / "alone" / method))
        alone = run_cell(dataclasses.replace(cell, config=alone_cfg), log=lambda _: None)
        assert together[method]["final_test_accuracy"] == alone["final_test_accuracy"]
        assert _untimed(read_metrics(cell.config.out_dir)) == _untimed(read_metrics(alone_cfg.out_dir))
    assert _untimed(read_metrics(cells["ce"].config.out_dir)) != _untimed(read_metrics(cells["mixnn"].config.out_dir))
    # the runs were trained with one thread each, yet a cell that leaves threads to torch finds them finished
    from mixnn_fast.app.experiments import finished_summary

    assert finished_summary(cells["mixnn"]) == together["mixnn"]


def test_status_line_reads_each_runs_epoch_and_last_test_accuracy(tmp_path):
    import json

    from mixnn_fast.app.demo import status_line

    cells = {m: _tiny_cell(tmp_path, m) for m in ("ce", "mixnn", "mixnn_plus")}
    (tmp_path / "ce").mkdir()
    rows = [{"epoch": 0, "test_accuracy": 0.5}, {"epoch": 1, "test_accuracy": None}]
    (tmp_path / "ce" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"epoch": 2, "te')
    (tmp_path / "mixnn").mkdir()
    (tmp_path / "mixnn" / "metrics.jsonl").write_text(json.dumps({"epoch": 0}) + "\n")
    line = status_line(cells, 150.0)
    assert line == "[demo] 2.5 min: ce epoch 2/3 (test 50.0%) · mixnn epoch 1/3 · mixnn_plus epoch 0/3"


def test_a_side_by_side_runs_error_is_raised_after_the_others_finish(tmp_path):
    """One run cannot read its data: its error (naming the folder) comes back to the caller, and
    the other run, in a process of its own, still finished."""
    import dataclasses

    from mixnn_fast.app.demo import train_side_by_side
    from mixnn_fast.app.experiments import finished_summary

    good = _tiny_cell(tmp_path, "ce")
    broken = _tiny_cell(tmp_path, "mixnn")
    missing = tmp_path / "no_such_folder"
    broken = dataclasses.replace(broken, config=dataclasses.replace(broken.config, dataset="image_folder",
                                                                    data_root=str(missing)))
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        train_side_by_side({"ce": good, "mixnn": broken}, progress=False, cores=2)
    assert finished_summary(good) is not None


def test_an_interrupted_demo_says_how_to_resume_without_a_traceback(monkeypatch, capsys):
    from mixnn_fast.app.cli import main

    def interrupted(**_):
        raise KeyboardInterrupt

    monkeypatch.setattr("mixnn_fast.app.demo.run_demo", interrupted)
    assert main(["demo", "--quick"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "the same command resumes" in err and "Traceback" not in err
